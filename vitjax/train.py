"""The trainer: one readable loop that every objective plugs into.

    python -m vitjax.main --config=configs/digits_vit.py --workdir=/tmp/digits

`train_and_evaluate(config, workdir)` runs these named parts, in this order (anything that can be
wrong in the config or the weights fails in the first three, before anything is compiled):

  1. build         config validated (`config_utils.validate_config`), input config and evaluators
                   validated, objective and model built from their registries (bad names raise here);
  2. resume check  a workdir holding checkpoints resumes from the newest complete one; its saved
                   config must equal this one except for run-length and cadence keys (or the caller
                   accepts the change); `config.init_from` is read and fitted (`vitjax.weights`) for
                   a new run only;
  3. setup         `create_train_setup`: mesh, optimizer, abstract train state and its shardings
                   from the logical axes of every variable (params, optimizer slots, EMA, a frozen
                   teacher); no compilation;
  4. state         `initial_state` (init, then pretrained weights) or the restored checkpoint, every
                   array verified against its fingerprint: a damaged step is moved aside and the
                   previous one restored (`checkpoint.Checkpointer.restore_newest_good`);
  5. loop          jitted train step (donated state, explicit shardings, micro-batched gradient
                   accumulation), batches prefetched to the devices, logging, the evaluators of
                   `config.evals` at their own cadence, checkpoints, NaN guard (which reads the
                   checkpoints back before naming one), SIGTERM / SIGINT: save the step, raise Preempted.

Experiments reuse the parts: `create_train_setup`, `initial_state`, `make_train_step` and
`vitjax.evaluate.evaluators`.

Outputs in WORKDIR: metrics.jsonl (one JSON object per logged step), tensorboard/ event files,
checkpoints/, config.json.
"""
import dataclasses
import itertools
import json
import math
import os
import re
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from vitjax import adapt as adapt_lib
from vitjax import checkpoint as checkpoint_lib
from vitjax import config_utils, optim, parallel, weights
from vitjax import objectives as objectives_lib
from vitjax.evaluate import evaluators as evaluators_lib
from vitjax.pytree import param_paths, unbox

# Metrics whose non-finite value stops the run: a non-finite loss, gradient or updated param
# means the next checkpoint would be corrupt.
_GUARDED_METRICS = ("train/loss", "train/grad_norm", "train/param_norm")


class ConfigChangedError(ValueError):
    """A workdir's saved config differs from the new run's in more than its length and cadences."""


class Preempted(Exception):
    """SIGTERM or SIGINT stopped the run after saving its current step; the next run resumes from it."""

    def __init__(self, message: str, step: int, signal_name: str, save_seconds: float,
                 seconds_after_signal: Optional[float]):
        super().__init__(message)
        self.step, self.signal_name = step, signal_name
        self.save_seconds, self.seconds_after_signal = save_seconds, seconds_after_signal


class NonFiniteError(FloatingPointError):
    """A guarded metric (loss, gradient norm, param norm) was NaN or infinite at `step`."""

    def __init__(self, step: int, key: str, value: float):
        super().__init__(f"Non-finite {key} = {value} at step {step}")
        self.step, self.key, self.value = step, key, value


# =============================================================================================
# Train state
# =============================================================================================
@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs: `step` is also the data position."""
    step: jax.Array          # number of optimizer updates done
    params: Any              # fp32 master weights
    opt_state: Any
    model_state: Any         # non-param collections (e.g. batch_stats, a frozen teacher); {} for ViTs
    rng: jax.Array           # base key; step s uses fold_in(rng, s)
    ema_params: Any = None   # exponential moving average of params (config.ema_decay > 0), else None


def place_params(params: Any, shardings: Any) -> Any:
    """Returns `params` as global arrays with `shardings`; host (numpy) leaves are laid out from every host's copy."""
    def place(leaf, sharding):
        if isinstance(leaf, jax.Array):
            return leaf if leaf.sharding == sharding else jax.device_put(leaf, sharding)
        value = np.asarray(leaf)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
    return jax.tree.map(place, params, shardings)


def param_overview(params: Any, trainable: Any = None) -> str:
    """Returns a table of parameter counts per top-level module (numbered blocks grouped) and totals."""
    groups: Dict[str, List[int]] = {}
    shapes: Dict[str, set] = {}
    for path, leaf in param_paths(params).items():
        top = path.split("/")[0]
        group = re.sub(r"_\d+$", "_*", top)
        groups.setdefault(group, [0, 0])
        groups[group][0] += int(np.prod(leaf.shape))
        if top != group:
            shapes.setdefault(group, set()).add(top)
    total = sum(count for count, _ in groups.values())
    lines = [f"{'module':<28} {'params':>14}"]
    for group, (count, _) in groups.items():
        repeats = f" (x{len(shapes[group])})" if group in shapes else ""
        lines.append(f"{group + repeats:<28} {count:>14,}")
    lines.append(f"{'total':<28} {total:>14,}")
    if trainable is not None:
        trained = sum(int(np.prod(leaf.shape)) for leaf, use in
                      zip(jax.tree.leaves(params), jax.tree.leaves(trainable)) if use)
        lines.append(f"{'trainable':<28} {trained:>14,} ({100.0 * trained / max(total, 1):.2f}%)")
    return "\n".join(lines)


def split_run_key(rng: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Returns (init key, train key) of a new run from PRNGKey(config.seed); train step s draws from fold_in(train key, s)."""
    return tuple(jax.random.split(rng))


@dataclasses.dataclass
class TrainSetup:
    """A run's optimizer, abstract train state and shardings: everything to create and step a state, uncompiled."""
    config: Any
    objective: Any
    mesh: jax.sharding.Mesh
    rules: Tuple[Tuple[str, Any], ...]
    tx: optax.GradientTransformation
    schedule: Callable[[Any], jax.Array]
    total_steps: int
    steps_per_epoch: Optional[float]
    example_batch: Dict[str, jax.Array]      # zeros with the batch's shapes (one row per batch shard)
    abstract_variables: Any                  # the objective's variables, boxed with logical axes
    abstract_state: TrainState               # ShapeDtypeStructs
    state_shardings: TrainState              # a NamedSharding per leaf
    batch_sharding: jax.sharding.Sharding

    @property
    def params_shardings(self) -> Any:
        """Returns the shardings of the params (and of the EMA params)."""
        return self.state_shardings.params

    def init_fn(self, rng: jax.Array) -> TrainState:
        """Returns a freshly initialised TrainState (traceable; jit it with out_shardings=state_shardings)."""
        init_rng, train_rng = split_run_key(rng)
        variables = unbox(dict(self.objective.init_variables(init_rng, self.example_batch)))
        params = variables.pop("params")
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                          model_state=variables, rng=train_rng,
                          ema_params=jax.tree.map(jnp.copy, params) if self.config.ema_decay > 0 else None)


def create_train_setup(config, objective, mesh: jax.sharding.Mesh, example_batch: Dict[str, Any], *,
                       total_steps: int, steps_per_epoch: Optional[float] = None) -> TrainSetup:
    """Returns the TrainSetup of a validated config: optimizer, abstract state and shardings (no compilation).

    Every leaf of the state is laid out from logical axis names: params and the model's other
    collections (a teacher, batch statistics) by their own boxes (unnamed leaves replicate), optimizer
    slots by the param they belong to (`optax.tree_map_params`), EMA params as the params.
    """
    rules = parallel.logical_rules(config.sharding_rules)
    divisor = parallel.batch_divisor(mesh)
    example = {key: jnp.zeros((divisor,) + tuple(np.shape(value))[1:], np.asarray(value).dtype)
               for key, value in example_batch.items()}
    rng = jax.random.PRNGKey(config.seed)
    abstract_variables = jax.eval_shape(lambda r: objective.init_variables(r, example), rng)
    logical_specs = parallel.logical_param_specs(abstract_variables["params"])
    abstract_params = unbox(abstract_variables["params"])
    tx, schedule = optim.make_optimizer(
        config.optim, abstract_params, batch_size=config.batch_size, total_steps=total_steps,
        steps_per_epoch=steps_per_epoch, param_axes=logical_specs,
        layer_ids_fn=objective.layer_ids, no_weight_decay=objective.no_weight_decay(),
        trained_only=adapted_params(config))
    setup = TrainSetup(config=config, objective=objective, mesh=mesh, rules=rules, tx=tx, schedule=schedule,
                       total_steps=total_steps, steps_per_epoch=steps_per_epoch, example_batch=example,
                       abstract_variables=abstract_variables, abstract_state=None, state_shardings=None,
                       batch_sharding=parallel.batch_sharding(mesh))
    setup.abstract_state = jax.eval_shape(setup.init_fn, rng)
    variable_shardings = parallel.logical_shardings(abstract_variables, mesh, rules)
    params_shardings = variable_shardings.pop("params")
    replicated = parallel.replicated(mesh)
    setup.state_shardings = TrainState(
        step=replicated, params=params_shardings,
        opt_state=parallel.optimizer_shardings(tx, setup.abstract_state.opt_state, params_shardings, mesh),
        model_state=variable_shardings, rng=replicated,
        ema_params=params_shardings if config.ema_decay > 0 else None)
    return setup


# =============================================================================================
# Parameter-efficient adaptation: only the trained params are checkpointed
# =============================================================================================
def adapted_params(config) -> Tuple[str, ...]:
    """Returns regexes of the params an adapted run trains (its method's and config.adapt.train), () without one."""
    section = config.get("adapt") if hasattr(config, "get") else None
    method = adapt_lib.parse(section) if section is not None else None
    return adapt_lib.trained_patterns(method, tuple(section.get("train", adapt_lib.DEFAULT_TRAIN))) if method else ()


def _keep_paths(tree: Any, patterns: Tuple[str, ...], prefix: str = "") -> Any:
    """Returns the nested dict `tree` with only the leaves whose path matches a pattern (empty sub-dicts dropped)."""
    kept = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) or hasattr(value, "items"):
            sub = _keep_paths(value, patterns, path + "/")
            if sub:
                kept[key] = sub
        elif any(re.search(pattern, path) for pattern in patterns):
            kept[key] = value
    return kept


def _overlay(full: Any, part: Any) -> Any:
    """Returns the nested dict `full` with the leaves of `part` in place of its own."""
    out = dict(full)
    for key, value in part.items():
        out[key] = _overlay(full[key], value) if hasattr(value, "items") else value
    return out


def checkpoint_view(state: TrainState, patterns: Tuple[str, ...]) -> TrainState:
    """Returns what a checkpoint of `state` holds: with adaptation (`patterns`) only the trained params (and EMA)."""
    if not patterns:
        return state
    ema = None if state.ema_params is None else _keep_paths(state.ema_params, patterns)
    return state.replace(params=_keep_paths(state.params, patterns), ema_params=ema)


def from_checkpoint_view(restored: TrainState, base: TrainState) -> TrainState:
    """Returns the full state: `base`'s params (init + init_from) with the restored trained params over them."""
    ema = None if base.ema_params is None else _overlay(base.ema_params, restored.ema_params)
    return restored.replace(params=_overlay(base.params, restored.params), ema_params=ema)


# =============================================================================================
# Pretrained weights (config.init_from, frozen weights such as a teacher)
# =============================================================================================
def plan_init_from(config, objective, abstract_variables) -> Optional[weights.Plan]:
    """Returns the plan of loading `config.init_from` into the objective's variables (None without one).

    Reads the checkpoint and checks every shape against the abstract variables: a missing path or a
    checkpoint of another architecture fails here, before anything compiles.
    """
    if not config.get("init_from"):
        return None
    pretrained = weights.load(config.init_from, model_name=config.model_name,
                              model_overrides=objectives_lib.base.model_overrides(config.model))
    rules = objective.init_from_rules()
    method = adapt_lib.parse(config.get("adapt"))
    if method is not None:  # the adaptation's own params are new: kept at their init, listed in the table
        rules = dataclasses.replace(rules, adaptation=tuple(method.param_patterns))
    return weights.plan(unbox(abstract_variables), pretrained, rules)


def load_frozen_weights(objective, abstract_variables) -> Dict[str, Any]:
    """Returns {collection: numpy variables} of the objective's frozen weights (a teacher), fitted exactly."""
    loaded = {}
    for collection, spec in objective.frozen_weights().items():
        target = unbox(abstract_variables[collection])
        loaded[collection] = weights.load_exact(spec["source"], target, spec["model_name"],
                                                spec.get("model_overrides") or {})
    return loaded


def initial_state(setup: TrainSetup, rng: jax.Array, init_plan: Optional[weights.Plan] = None,
                  frozen: Optional[Dict[str, Any]] = None) -> TrainState:
    """Returns a new run's state on the mesh: initialised, then `init_plan`'s weights and the `frozen` collections."""
    state = jax.jit(setup.init_fn, out_shardings=setup.state_shardings)(rng)
    if init_plan is not None:
        variables = init_plan.apply({"params": state.params, **state.model_state})
        params = place_params(variables.pop("params"), setup.state_shardings.params)
        model_state = place_params(variables, setup.state_shardings.model_state)
        state = state.replace(params=params, model_state=model_state,
                              ema_params=jax.tree.map(jnp.copy, params) if state.ema_params is not None else None)
    if frozen:
        model_state = dict(state.model_state)
        for collection, values in frozen.items():
            model_state[collection] = place_params(values, setup.state_shardings.model_state[collection])
        state = state.replace(model_state=model_state)
    return state


# =============================================================================================
# Steps
# =============================================================================================
def global_norm(tree: Any) -> jax.Array:
    """Returns the L2 norm of all leaves of `tree` together, in fp32."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in jax.tree.leaves(tree)))


def make_train_step(objective, tx: optax.GradientTransformation, schedule: Callable,
                    grad_accum_steps: int, batch_sharding, ema_decay: float = 0.0,
                    batch_transform: Optional[Callable[..., Dict[str, jax.Array]]] = None,
                    trainable: Any = None, optimizer_grad_fn: bool = False) -> Callable:
    """Returns train_step(state, batch) -> (new state, {"train/...": scalar}); jit it with donated state.

    `batch_transform(batch, rng, step)`, when given, runs first on the device (one-hot labels, mixup / cutmix).
    With `ema_decay` > 0 the step also updates state.ema_params = d * ema + (1 - d) * new params.
    `trainable` (a bool tree like the params; adaptation) stops the gradient of the False leaves, so their
    weight gradients are never computed (zeros in the metrics).
    `optimizer_grad_fn` (SAM on one batch, `optim.needs_grad_fn`): the update also gets `grad_fn(params, i)`,
    the same (accumulated) gradient of this step's batch and keys at other params.
    """

    def loss_fn(params, model_state, batch, rng):
        if trainable is not None:
            params = jax.tree.map(lambda leaf, use: leaf if use else jax.lax.stop_gradient(leaf), params, trainable)
        loss, aux = objective.train_loss({"params": params, **model_state}, batch, rng)
        return loss, aux

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def gradients(params, model_state, batch, step_rng):
        """Returns (grads, updated model_state, metrics) of the batch, micro-batched under accumulation."""
        if grad_accum_steps == 1:
            (loss, aux), grads = grad_fn(params, model_state, batch, step_rng)
            return grads, {**model_state, **aux.get("updates", {})}, dict(aux.get("metrics", {}), loss=loss)

        # Micro-batch i takes examples i, i + k, i + 2k, ...: every device keeps an equal share
        # of each micro-batch, so no data moves between devices.
        def split(x):
            x = x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:])
            return jnp.swapaxes(x, 0, 1)

        micro_batches = jax.tree.map(split, batch)

        def accumulate(carry, inputs):
            grads_sum, model_state = carry
            micro_batch, index = inputs
            micro_batch = jax.lax.with_sharding_constraint(micro_batch, batch_sharding)
            (loss, aux), grads = grad_fn(params, model_state, micro_batch, jax.random.fold_in(step_rng, index))
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            model_state = {**model_state, **aux.get("updates", {})}
            return (grads_sum, model_state), dict(aux.get("metrics", {}), loss=loss)

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, model_state), metrics = jax.lax.scan(
            accumulate, (zeros, model_state), (micro_batches, jnp.arange(grad_accum_steps)))
        return jax.tree.map(lambda g: g / grad_accum_steps, grads), model_state, jax.tree.map(jnp.mean, metrics)

    def train_step(state: TrainState, batch: Dict[str, jax.Array]):
        step_rng = jax.random.fold_in(state.rng, state.step)
        if batch_transform is not None:  # it folds its own salt into the key: the model's draws stay independent
            batch = batch_transform(batch, step_rng, state.step)
        grads, model_state, metrics = gradients(state.params, state.model_state, batch, step_rng)
        extra = {}
        if optimizer_grad_fn:  # its model-state updates (batch statistics) are dropped: the step keeps the first pass's
            extra["grad_fn"] = lambda params, _: gradients(params, state.model_state, batch, step_rng)[0]
        updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
        params = optax.apply_updates(state.params, updates)
        metrics = {f"train/{name}": value for name, value in metrics.items()}
        metrics["train/grad_norm"] = global_norm(grads)
        metrics["train/param_norm"] = global_norm(params)
        metrics["train/lr"] = schedule(state.step)
        ema_params = state.ema_params
        if ema_decay > 0:
            ema_params = jax.tree.map(lambda ema, new: ema_decay * ema + (1.0 - ema_decay) * new, ema_params, params)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  model_state=model_state, ema_params=ema_params)
        return new_state, metrics

    return train_step


def jit_train_step(setup: TrainSetup, batch_transform=None) -> Callable:
    """Returns the run's jitted train step: donated state, the setup's shardings, replicated metrics."""
    config = setup.config
    adapted = adapted_params(config)
    trainable = optim.trainable_mask(config.optim, setup.abstract_state.params, adapted) if adapted else None
    step = make_train_step(setup.objective, setup.tx, setup.schedule, int(config.optim.grad_accum_steps),
                           setup.batch_sharding, ema_decay=float(config.ema_decay), batch_transform=batch_transform,
                           trainable=trainable, optimizer_grad_fn=optim.needs_grad_fn(config.optim))
    return jax.jit(step, in_shardings=(setup.state_shardings, setup.batch_sharding),
                   out_shardings=(setup.state_shardings, parallel.replicated(setup.mesh)), donate_argnums=(0,))


# =============================================================================================
# Logging
# =============================================================================================
class MetricsWriter:
    """Writes WORKDIR/metrics.jsonl and TensorBoard events (process 0 only); resumes cleanly."""

    def __init__(self, workdir: str, enabled: bool, resume_step: int):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tensorboard = None
        if not enabled:
            return
        # Lines a killed run wrote after its last checkpoint are replayed by this run: drop them.
        kept = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        with open(self.path, "w") as f:
            f.writelines(kept)
        from tensorboardX import SummaryWriter
        self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                         purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, metrics: Dict[str, Any]) -> None:
        """Appends one record for `step` to the jsonl file and the TensorBoard events."""
        if not self.enabled or not metrics:
            return
        record = {"step": int(step), **{key: _to_python(value) for key, value in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, step)
        self.tensorboard.flush()

    def close(self) -> None:
        """Closes the TensorBoard writer."""
        if self.tensorboard is not None:
            self.tensorboard.close()


def _to_python(value: Any) -> Any:
    """Returns a JSON-serializable version of a scalar metric."""
    value = np.asarray(value)
    return value.item() if value.size == 1 else value.tolist()


def _check_finite(pending: List[Tuple[int, Dict[str, Any]]]) -> None:
    """Raises NonFiniteError naming the first step whose loss, gradient or params are not finite."""
    for step, metrics in pending:
        for key in _GUARDED_METRICS:
            if key in metrics and not np.all(np.isfinite(np.asarray(metrics[key]))):
                raise NonFiniteError(step, key, float(np.asarray(metrics[key])))


def _preempted(preemption: checkpoint_lib.PreemptionSignals, step: int, save_seconds: float,
               checkpoint_dir: str) -> Preempted:
    """Returns the Preempted error of a run that saved `step` on a signal, logging its one-line account."""
    after = time.time() - preemption.received_at if preemption.received_at else None
    message = (f"Preempted by {preemption.signal_name} at step {step}: saved step {step} to {checkpoint_dir} in "
               f"{save_seconds:.2f} s" + (f" ({after:.2f} s after the signal)" if after is not None else "")
               + f"; the next run resumes from step {step}.")
    logging.warning("%s", message)
    return Preempted(message, step, preemption.signal_name, save_seconds, after)


def explain_non_finite(error: NonFiniteError, checkpointer: checkpoint_lib.Checkpointer, abstract_state: Any,
                       restored_step: Optional[int]) -> str:
    """Returns what a non-finite metric tells, after reading the checkpoints back: the restored one, or the last good one.

    In the first step after a restore the restored state is the suspect, not the learning rate: that
    step is verified again (fingerprints and finiteness) and moved aside if damaged. Otherwise the
    newest step that verifies is named "the last good checkpoint"; damaged newer ones are moved aside.
    """
    checkpointer.wait_until_finished()
    directory = checkpointer.directory
    advice = ("Try a lower learning rate, optim.clip_grad_norm, a longer warmup, or check the input data for NaNs.")
    if restored_step is not None and error.step == restored_step + 1:
        verification = checkpointer.verify(restored_step, abstract_state, check_finite=True)
        where = (f"{error} (the first step after resuming from checkpoint step {restored_step}, "
                 f"{verification.path}): the restored state is the first suspect, not the learning rate. "
                 f"Read back from disk, step {restored_step} ")
        if verification.status == "damaged":
            moved = checkpoint_lib.move_aside(directory, restored_step, verification.problems)
            return (where + f"is damaged ({'; '.join(verification.problems[:3])}): moved aside to {moved}. Rerun "
                    "to resume from the previous step that verifies (`python -m vitjax.checkpoint verify` lists them).")
        if verification.status == "unverifiable":
            return (where + "has no fingerprints (saved before vitjax recorded them), so it cannot be verified and may "
                    f"be damaged. Move it aside (rename it to {restored_step}.damaged-manual) to resume from an older step.")
        if verification.non_finite:
            return (where + f"matches its fingerprints, so it holds what the run saved, but its leaves "
                    f"{list(verification.non_finite[:5])} are not finite: the run that saved it was already broken. "
                    "Resume from an older step or start again. " + advice)
        return (where + "matches its fingerprints and is finite, so it holds exactly what the run saved: the cause is "
                f"step {error.step} itself, its input batch or the run's settings. " + advice)
    for step in reversed(checkpoint_lib.complete_steps(directory)):
        verification = checkpointer.verify(step, abstract_state)
        if verification.status == "verified":
            return (f"{error}: stopping the run. The last good checkpoint (step {step}) is kept in {directory} "
                    f"(read back and verified against its fingerprints). " + advice)
        if verification.status == "unverifiable":
            return (f"{error}: stopping the run. The newest checkpoint, step {step} in {directory}, has no "
                    f"fingerprints (saved before vitjax recorded them), so it is not verified. " + advice)
        moved = checkpoint_lib.move_aside(directory, step, verification.problems)
        logging.error("Checkpoint step %d is damaged (%s): moved aside to %s", step,
                      "; ".join(verification.problems[:3]), moved)
    return f"{error}: stopping the run. No checkpoint that verifies had been written yet. " + advice


# =============================================================================================
# Setup helpers
# =============================================================================================
def _data_module():
    """Returns `vitjax.data` (imported here: it loads TensorFlow on use)."""
    import vitjax.data as data
    return data


def steps_from_config(config, num_train_examples: Optional[int]) -> Tuple[int, Optional[float]]:
    """Returns (total optimizer steps, steps per epoch or None) from total_steps / total_epochs."""
    steps_per_epoch = num_train_examples / config.batch_size if num_train_examples else None
    if config.total_steps is not None:
        return int(config.total_steps), steps_per_epoch
    if steps_per_epoch is None:
        raise ValueError("config.total_epochs needs the dataset size; set config.total_steps instead")
    return int(math.ceil(config.total_epochs * steps_per_epoch)), steps_per_epoch


def check_batch_sizes(config, mesh, eval_batch_size: int) -> None:
    """Raises ValueError if a global batch does not split evenly over hosts, devices and micro-batches."""
    divisor = parallel.batch_divisor(mesh)
    accum = int(config.optim.grad_accum_steps)
    micro = config.batch_size // accum
    if micro % divisor:
        raise ValueError(f"config.batch_size={config.batch_size} / grad_accum_steps={accum} = {micro} is not "
                         f"divisible by the {divisor} batch shards (mesh data x fsdp = "
                         f"{mesh.shape['data']} x {mesh.shape['fsdp']})")
    sizes = [("eval batch size", eval_batch_size)] + [
        (f"config.evals.{name}.batch_size", settings["batch_size"])
        for name, settings in evaluators_lib.validate_evals(config).items() if settings.get("batch_size")]
    for name, size in sizes:
        if size % divisor:
            raise ValueError(f"The {name} {size} is not divisible by the {divisor} batch shards "
                             f"(mesh data x fsdp); set config.eval_batch_size")
    for name, size in [("batch_size", config.batch_size)] + sizes:
        if size % jax.process_count():
            raise ValueError(f"The {name} {size} is not divisible by the {jax.process_count()} hosts")


def build(config) -> Tuple[Any, Any]:
    """Returns (validated config, objective): every config error surfaces here, before any tracing."""
    config = config_utils.validate_config(config)
    _data_module().validate_input_config(config.input)
    evaluators_lib.validate_evals(config)
    objective = objectives_lib.create(config.objective, config)
    if config.init_from:
        weights.check_source(config.init_from)
    return config, objective


def check_config_change(workdir: str, config, *, allow: bool = False) -> List[str]:
    """Returns the differences between WORKDIR/config.json and `config` (run length and cadence aside).

    Raises ConfigChangedError showing them unless `allow`: resuming a run with another model, data or
    recipe would silently mix two experiments in one workdir.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return []
    with open(path) as file:
        saved = json.load(file)
    # Keys a workdir written by an older vitjax lacks count at their defaults.
    defaults = config_utils.config_as_json(config_utils.default_config())
    saved = {**defaults, **saved, "optim": {**defaults["optim"], **saved.get("optim", {})}}
    lines = config_utils.config_diff(saved, config_utils.config_as_json(config))
    if lines and not allow:
        raise ConfigChangedError(
            f"The workdir {workdir} holds a run whose config differs from this one (saved -> new):\n  "
            + "\n  ".join(lines) + "\nRun-length and cadence keys may change on resume; these may not. Use a new "
            "--workdir, or pass --allow_config_change to continue this run with the new config.")
    if lines:
        logging.warning("Resuming %s with a changed config (saved -> new):\n  %s", workdir, "\n  ".join(lines))
    return lines


# =============================================================================================
# Train and evaluate
# =============================================================================================
def train_and_evaluate(config, workdir: str, *, mesh: Optional[jax.sharding.Mesh] = None,
                       stop_after_steps: Optional[int] = None, allow_config_change: bool = False) -> Dict[str, Any]:
    """Returns the final metrics (eval/top1, ...) after training `config` in `workdir`, resuming if possible.

    `mesh` overrides `config.mesh` (tests run one config on several meshes); `stop_after_steps`
    stops (with a checkpoint) after that global step, as a preempted run would;
    `allow_config_change` lets a resumed run continue with a config that differs from the saved one.
    """
    # ---- 1. Build: config, objective, model, data sizes ----------------------------------------
    config, objective = build(config)
    data = _data_module()
    info = data.dataset_info(config.input)
    dataset_classes = info.get("num_classes")
    objective_classes = objective.num_classes
    if objective_classes and dataset_classes and objective_classes != dataset_classes:
        raise ValueError(f"The model has {objective_classes} classes but dataset {config.input.dataset!r} has "
                         f"{dataset_classes}; set config.model.num_classes={dataset_classes}")
    total_steps, steps_per_epoch = steps_from_config(config, info.get("num_train_examples"))
    is_main = jax.process_index() == 0

    # ---- 2. Resume check ---------------------------------------------------------------------
    os.makedirs(workdir, exist_ok=True)
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    existing = checkpoint_lib.complete_steps(checkpoint_dir)
    resume_step = existing[-1] if existing else None
    if resume_step is not None:
        check_config_change(workdir, config, allow=allow_config_change)

    # ---- 3. Setup: mesh, data, optimizer, abstract state, shardings, pretrained weights -----------
    mesh = mesh or parallel.create_mesh(config.mesh)
    eval_batch_size = config.eval_batch_size or config.batch_size
    check_batch_sizes(config, mesh, eval_batch_size)
    logging.info("Mesh %s over %d devices (%d hosts); total steps %d, global batch %d",
                 dict(mesh.shape), mesh.size, jax.process_count(), total_steps, config.batch_size)
    start_step = int(resume_step or 0)
    keys = tuple(objective.batch_keys)
    host_fields = objective.host_batch_fields(start_step=start_step, total_steps=total_steps)

    def train_batches(first_step: int):
        # Batch b is a function of the recipe and b alone; host fields (stored teacher logits) are keyed by b too.
        batches = data.make_train_iterator(config.input, global_batch_size=config.batch_size, seed=config.seed,
                                           start_step=first_step)
        if host_fields is None:
            return batches
        return ({**batch, **host_fields(index)} for index, batch in enumerate(batches, first_step))

    train_iter = train_batches(start_step)
    first_batch = next(train_iter)
    missing = sorted(set(keys) - set(first_batch))
    if missing:
        raise ValueError(f"Objective {config.objective!r} needs batch keys {missing}; the pipeline gives "
                         f"{sorted(first_batch)}")
    train_iter = itertools.chain([first_batch], train_iter)
    setup = create_train_setup(config, objective, mesh, {key: first_batch[key] for key in keys},
                               total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    init_plan, frozen = None, None
    adapted = adapted_params(config)
    # Pretrained weights go into a new run only, never over a resumed one, except under adaptation, whose
    # checkpoints hold only the trained params: the frozen rest is rebuilt from init_from.
    if resume_step is None or adapted:
        init_plan = plan_init_from(config, objective, setup.abstract_variables)
        frozen = load_frozen_weights(objective, setup.abstract_variables)
        if init_plan is not None and is_main:
            logging.info("%s", init_plan.table())
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    # ---- 4. State: init (+ pretrained weights) or restore -------------------------------------
    checkpointer = checkpoint_lib.Checkpointer(checkpoint_dir, keep=config.keep_checkpoints,
                                               async_save=config.checkpoint_async)
    if (config.keep_checkpoints < 2 and config.checkpoint_every_steps
            and config.checkpoint_every_steps < total_steps):
        logging.warning("config.keep_checkpoints=%d: a damaged newest checkpoint leaves no step to fall back to; "
                        "keep 2 or more.", config.keep_checkpoints)
    abstract_state = checkpoint_view(
        checkpoint_lib.abstract_like(setup.abstract_state, setup.state_shardings), adapted)
    if resume_step is not None:
        # Every array is checked against its fingerprint; damaged steps are moved aside, newest first.
        state, _, restored, _ = checkpointer.restore_newest_good(abstract_state)
        if restored.step != resume_step:  # fell back: the data must replay from the older step
            resume_step = start_step = restored.step
            host_fields = objective.host_batch_fields(start_step=start_step, total_steps=total_steps)
            train_iter = train_batches(start_step)
        if adapted:
            state = from_checkpoint_view(state, initial_state(setup, jax.random.PRNGKey(config.seed), init_plan,
                                                              frozen))
        logging.info("Resuming from step %d (%s)", resume_step, checkpoint_dir)
    else:
        state = initial_state(setup, jax.random.PRNGKey(config.seed), init_plan, frozen)
    if is_main:
        abstract_params = setup.abstract_state.params
        logging.info("Model %s, objective %s:\n%s", config.model_name, config.objective,
                     param_overview(abstract_params, optim.trainable_mask(config.optim, abstract_params, adapted)))

    with parallel.use_mesh(mesh), nn.logical_axis_rules(setup.rules):
        batch_transform = data.make_batch_transform(config.input, dataset_classes or objective_classes)
        train_step = jit_train_step(setup, batch_transform)
        evaluators = evaluators_lib.build_evaluators(config, evaluators_lib.EvalContext(
            objective=objective, input_config=config.input, mesh=mesh, state_shardings=setup.state_shardings,
            batch_sharding=setup.batch_sharding, eval_batch_size=eval_batch_size,
            default_every_steps=int(config.eval_every_steps), data=data))
        batches = data.prefetch_to_device(({key: batch[key] for key in keys} for batch in train_iter), 2,
                                          setup.batch_sharding)

        # ---- 5. Loop ---------------------------------------------------------------------------
        writer = MetricsWriter(workdir, is_main, start_step)
        progress = progress_bar(config.progress_bar and is_main, total_steps, start_step)
        log = lambda message: _log(progress, message)  # noqa: E731
        pending: List[Tuple[int, Dict[str, Any]]] = []  # device metrics since the last log
        final: Dict[str, Any] = {}
        timer_start, timer_step = time.time(), start_step
        preemption = checkpoint_lib.PreemptionSignals(checkpointer)
        try:
            preemption.install()  # from here SIGTERM / SIGINT save the current step before stopping
            if start_step >= total_steps:  # already complete: evaluate the final state
                final.update(evaluators_lib.run_evaluators(evaluators, state, start_step, True, log))
            for step in range(start_step + 1, total_steps + 1):
                state, metrics = train_step(state, next(batches))
                pending.append((step, metrics))
                progress.update(1)
                if step == start_step + 1:
                    jax.block_until_ready(metrics)
                    logging.info("First step (including compilation) done in %.1f s", time.time() - timer_start)
                    timer_start, timer_step = time.time(), step

                is_last = step == total_steps
                preempted = preemption.reached(step)
                stopping = preempted or (stop_after_steps is not None and step >= stop_after_steps)
                record: Dict[str, Any] = {}
                if step % config.log_every_steps == 0 or is_last or stopping:
                    fetched = jax.device_get(pending)
                    _check_finite(fetched)
                    record.update({key: float(np.mean([m[key] for _, m in fetched])) for key in fetched[-1][1]})
                    record["train/lr"] = float(fetched[-1][1]["train/lr"])
                    elapsed = time.time() - timer_start
                    if step > timer_step and elapsed > 0:
                        record["images_per_sec"] = (step - timer_step) * config.batch_size / elapsed
                        record["steps_per_sec"] = (step - timer_step) / elapsed
                    if steps_per_epoch:
                        record["epoch"] = step / steps_per_epoch
                    timer_start, timer_step = time.time(), step
                    pending = []
                    progress.set_postfix(loss=f"{record['train/loss']:.4f}",
                                         img_per_s=f"{record.get('images_per_sec', 0.0):.0f}", refresh=False)
                    if not progress.enabled:
                        logging.info("step %d/%d: %s", step, total_steps, _format(record))
                eval_start = time.time()
                # A preempted run has seconds to save: the evaluation of its last step is skipped.
                eval_metrics = ({} if preempted and not is_last
                                else evaluators_lib.run_evaluators(evaluators, state, step, is_last, log))
                if eval_metrics:
                    record.update(eval_metrics)
                    final.update(eval_metrics)
                    timer_start += time.time() - eval_start  # eval time is not training throughput
                save_seconds = None
                if ((config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0)
                        or is_last or stopping):
                    _check_finite(jax.device_get(pending))
                    meta = {"data_step": step, "seed": config.seed, "total_steps": total_steps}
                    if adapted:  # the checkpoint holds the trained params; the rest is this reference's
                        meta.update(init_from=config.init_from, adapt=config.adapt.method)
                    if preempted:
                        save_seconds = checkpointer.save_now(step, checkpoint_view(state, adapted), meta)
                    else:
                        checkpointer.save(step, checkpoint_view(state, adapted), meta)
                writer.write(step, record)
                if preempted and not is_last:
                    raise _preempted(preemption, step, save_seconds, checkpoint_dir)
                if stopping and not is_last:
                    logging.info("Stopping after step %d (a resumed run continues from here)", step)
                    break
        except NonFiniteError as error:
            state = None  # frees the device memory the checkpoints are read back into
            raise FloatingPointError(explain_non_finite(error, checkpointer, abstract_state, resume_step)) from None
        finally:
            batches.close()
            progress.close()
            writer.close()
            checkpointer.close()
            preemption.uninstall()  # after the last save is written: a signal meanwhile must not cut it
    final["step"] = int(jax.device_get(state.step))
    if final.get("step") == total_steps and is_main:
        logging.info("Done: %s", _format(final))
    return final


def progress_bar(enabled: bool, total: int, initial: int, desc: str = "train"):
    """Returns a tqdm progress bar over steps (ETA, it/s), or a no-op stand-in."""
    if enabled:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc=desc,
                   mininterval=0.5 if os.isatty(2) else 30.0)
        bar.enabled = True
        return bar
    return _NoProgress()


class _NoProgress:
    """A progress bar that shows nothing."""
    enabled = False

    def update(self, count: int) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _log(progress, message: str) -> None:
    """Logs `message` above the progress bar (or with absl logging when there is none)."""
    if progress.enabled:
        progress.write(message)
    else:
        logging.info(message)


def _format(metrics: Dict[str, Any]) -> str:
    """Returns 'key=value' pairs of the metrics, floats with 4 significant digits."""
    return ", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in sorted(metrics.items()))
