"""Optimizers from config: AdamW, SGD-momentum, LARS, LAMB, with the ViT training conventions.

`make_optimizer(config.optim, params, ...)` returns `(tx, lr_schedule)`:

  * learning rate: `lr`, or `blr` scaled by batch size (`lr = blr * batch_size / 256`, as MAE and
    DeiT write it); linear warmup from `warmup_init_lr`, then cosine / linear decay to `min_lr`,
    or constant.
  * weight decay, decoupled and scaled by the learning rate (PyTorch AdamW), never applied to
    1-D params (norm scales, layer-scale), biases (a param named "bias", whatever its rank: a
    DenseGeneral's (3, heads, head_dim) qkv bias is torch's 1-D one) nor to paths matching the model's
    `no_weight_decay()` regexes (tokens, position embeddings), or `optim.no_decay` where the config
    gives it (it replaces the model's list).
  * layer-wise lr decay (BEiT / MAE fine-tuning): param with layer id `i` of `L` layers gets
    `layer_decay ** (L + 1 - i)`; the model numbers its params (`layer_ids(params)`, passed here as
    `layer_ids_fn`; see `vitjax.models.param_groups`): 0 the stem, L + 1 the head.
  * gradient clipping by global norm; frozen sub-trees (`frozen` regexes) get no update and no
    optimizer state.

Gradient accumulation is done by the trainer (micro-batches inside one jitted step, so the step
counter, schedule and checkpoints count optimizer updates), from `optim.grad_accum_steps`.

Param paths are "/"-joined dict keys, e.g. "blocks_3/attn/qkv/kernel". A `param_axes` tree of
logical axis names (from the models' `nn.LogicallyPartitioned` boxes) tells which params are
stacked over layers by `nn.scan` (axis name "layers"): their per-layer ndim, trust ratios and
layer-wise lr scales are computed per layer.
"""
import math
import re
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import optax.contrib

from vitjax.pytree import map_with_path, param_paths, path_to_str

Schedule = Callable[[Any], jax.Array]
LayerIds = Union[int, Sequence[int]]
# params -> ({path: layer id, or one id per entry of the param's "layers" axis}, number of layers)
LayerIdsFn = Callable[[Any], Tuple[Dict[str, LayerIds], int]]

SCHEDULES = ("cosine", "linear", "constant")


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------
def _map_with_path(fn: Callable[[str, Any], Any], tree) -> Any:
    """Returns `tree` with each leaf replaced by fn(path string, leaf); empty nodes are kept."""
    return map_with_path(fn, tree)


def layers_axes(param_axes) -> Dict[str, Optional[int]]:
    """Returns {path: index of the "layers" axis, or None} from a tree of logical axis names."""
    if param_axes is None:
        return {}
    is_spec = lambda x: isinstance(x, (tuple, jax.sharding.PartitionSpec))  # noqa: E731
    flat, _ = jax.tree_util.tree_flatten_with_path(param_axes, is_leaf=is_spec)
    result = {}
    for path, names in flat:
        names = tuple(names) if names is not None else ()
        result[path_to_str(path)] = names.index("layers") if "layers" in names else None
    return result


def _matches(path: str, patterns: Sequence[str]) -> bool:
    """Returns whether `path` matches (re.search) one of `patterns`."""
    return any(re.search(pattern, path) for pattern in patterns)


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule
# ---------------------------------------------------------------------------------------------
def peak_learning_rate(optim_config, batch_size: int) -> float:
    """Returns the peak lr: `lr`, or `blr * batch_size / 256`."""
    if optim_config.get("lr") is not None:
        return float(optim_config.lr)
    return float(optim_config.blr) * batch_size / 256.0


def make_schedule(name: str, peak_lr: float, total_steps: int, warmup_steps: int = 0,
                  init_lr: float = 0.0, end_lr: float = 0.0) -> Schedule:
    """Returns step -> lr: linear warmup to `peak_lr` over `warmup_steps`, then `name` decay to `end_lr`."""
    if name not in SCHEDULES:
        raise ValueError(f"Unknown schedule {name!r}; valid choices: {list(SCHEDULES)}")
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} exceeds total_steps={total_steps}")
    decay_steps = max(total_steps - warmup_steps, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = init_lr + (peak_lr - init_lr) * step / max(warmup_steps, 1)
        progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
        if name == "cosine":
            decayed = end_lr + (peak_lr - end_lr) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        elif name == "linear":
            decayed = peak_lr + (end_lr - peak_lr) * progress
        else:
            decayed = jnp.full_like(progress, peak_lr)
        return jnp.where(step < warmup_steps, warmup, decayed)

    return schedule


# ---------------------------------------------------------------------------------------------
# Layer-wise lr decay
# ---------------------------------------------------------------------------------------------
def layer_decay_scales(params, layer_decay: float, layer_ids_fn: LayerIdsFn,
                       param_axes=None) -> Dict[str, Union[float, np.ndarray]]:
    """Returns {path: lr multiplier}; stacked params get an array that broadcasts along their layers axis."""
    ids, num_layers = layer_ids_fn(params)
    axes = layers_axes(param_axes)
    shapes = {path: np.shape(leaf) for path, leaf in param_paths(params).items()}
    scales = {}
    for path, shape in shapes.items():
        if path not in ids:
            raise ValueError(f"layer_ids_fn gave no layer id for param {path!r}")
        layer_id = ids[path]
        if isinstance(layer_id, (int, np.integer)):
            scales[path] = float(layer_decay ** (num_layers + 1 - int(layer_id)))
            continue
        layer_id = np.asarray(layer_id)
        axis = axes.get(path)
        axis = 0 if axis is None else axis
        if shape[axis] != layer_id.shape[0]:
            raise ValueError(f"{len(layer_id)} layer ids for param {path!r} of shape {shape} (layers axis {axis})")
        broadcast = [1] * len(shape)
        broadcast[axis] = shape[axis]
        scales[path] = (layer_decay ** (num_layers + 1 - layer_id)).astype(np.float32).reshape(broadcast)
    return scales


def lr_multipliers(params, pairs: Sequence[Tuple[str, float]]) -> Dict[str, float]:
    """Returns {path: lr multiplier} of `optim.lr_mult`'s (regex, multiplier) pairs; the first match sets a path's."""
    pairs = tuple(pairs)
    if not all(isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)
               and isinstance(pair[1], (int, float)) and not isinstance(pair[1], bool) and pair[1] > 0
               for pair in pairs):
        raise ValueError(f"optim.lr_mult must be (regex, multiplier > 0) pairs, e.g. ((r'^dml/proxies$', 20.0),); "
                         f"got {pairs!r}")
    paths = sorted(param_paths(params))
    scales = {}
    for pattern, multiplier in pairs:
        matched = [path for path in paths if re.search(pattern, path)]
        if not matched:
            raise ValueError(f"optim.lr_mult pattern {pattern!r} matches no param; params: {paths[:20]}...")
        for path in matched:
            scales.setdefault(path, float(multiplier))
    return scales


def scale_by_path(scales: Dict[str, Union[float, np.ndarray]]) -> optax.GradientTransformation:
    """Returns a transformation multiplying each update by `scales[path]` (1 where absent)."""

    def update_fn(updates, state, params=None):
        del params
        updates = _map_with_path(
            lambda path, update: update * jnp.asarray(scales.get(path, 1.0), update.dtype), updates)
        return updates, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


# ---------------------------------------------------------------------------------------------
# Weight decay and trust ratio
# ---------------------------------------------------------------------------------------------
def decay_mask_fn(no_decay: Sequence[str], param_axes=None) -> Callable[[Any], Any]:
    """Returns params -> bool tree: True where weight decay applies (per-layer ndim >= 2, not a bias, no
    `no_decay` match)."""
    axes = layers_axes(param_axes)

    def mask(params):
        def decide(path, leaf):
            per_layer_ndim = len(np.shape(leaf)) - (axes.get(path) is not None)
            is_bias = path.rsplit("/", 1)[-1] == "bias"
            return per_layer_ndim >= 2 and not is_bias and not _matches(path, no_decay)
        return _map_with_path(decide, params)

    return mask


def scale_by_trust_ratio(trust_coefficient: float, mask: Callable[[Any], Any], param_axes=None,
                         eps: float = 0.0) -> optax.GradientTransformation:
    """Returns the LARS/LAMB trust-ratio scaling, per layer for stacked params, 1 where `mask` is False."""
    axes = layers_axes(param_axes)

    def update_fn(updates, state, params):
        if params is None:
            raise ValueError("The trust ratio needs params: call tx.update(grads, state, params).")
        decisions = mask(params)

        def scale(path, update, param, use):
            if not use:
                return update
            axis = axes.get(path)
            reduce_axes = tuple(i for i in range(update.ndim) if i != axis)
            param_norm = jnp.sqrt(jnp.sum(jnp.square(param.astype(jnp.float32)), reduce_axes, keepdims=True))
            update_norm = jnp.sqrt(jnp.sum(jnp.square(update.astype(jnp.float32)), reduce_axes, keepdims=True))
            ratio = trust_coefficient * param_norm / (update_norm + eps)
            ratio = jnp.where((param_norm > 0) & (update_norm > 0), ratio, 1.0)
            return update * ratio.astype(update.dtype)

        updates = jax.tree_util.tree_map_with_path(
            lambda path, u, p, use: scale(path_to_str(path), u, p, use), updates, params, decisions)
        return updates, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


# ---------------------------------------------------------------------------------------------
# The optimizer
# ---------------------------------------------------------------------------------------------
def warmup_steps_from_config(optim_config, steps_per_epoch: Optional[float]) -> int:
    """Returns the number of warmup steps from `warmup_steps` or `warmup_epochs`."""
    if optim_config.get("warmup_steps") is not None:
        return int(optim_config.warmup_steps)
    if optim_config.get("warmup_epochs") is not None:
        if steps_per_epoch is None:
            raise ValueError("optim.warmup_epochs needs the dataset size; give optim.warmup_steps instead")
        return int(round(float(optim_config.warmup_epochs) * steps_per_epoch))
    return 0


def no_decay_patterns(optim_config, no_weight_decay: Sequence[str] = ()) -> Tuple[str, ...]:
    """Returns the regexes of params not weight-decayed: `optim_config.no_decay`, or the model's where it is None."""
    configured = optim_config.get("no_decay")
    return tuple(no_weight_decay if configured is None else configured)


def make_optimizer(optim_config, params, *, batch_size: int, total_steps: int,
                   steps_per_epoch: Optional[float] = None, param_axes=None,
                   layer_ids_fn: Optional[LayerIdsFn] = None, no_weight_decay: Sequence[str] = (),
                   trained_only: Sequence[str] = ()) -> Tuple[optax.GradientTransformation, Schedule]:
    """Returns (optax transformation, step -> lr schedule) for `optim_config` (see `config_utils`).

    `params` may be abstract (ShapeDtypeStructs): only paths and shapes are read. `layer_ids_fn` and
    `no_weight_decay` are the model's (an objective's `layer_ids` and `no_weight_decay()`). `trained_only`
    (regexes; parameter-efficient adaptation, `vitjax.adapt`) freezes every param matching none of them.
    """
    layer_decay = optim_config.get("layer_decay")
    if layer_decay is not None and layer_decay != 1.0 and layer_ids_fn is None:
        raise ValueError(f"optim.layer_decay={layer_decay} needs layer ids, and the model declares no layer ids "
                         "(a `layer_ids(params)` method, see vitjax.models.param_groups); unset optim.layer_decay "
                         "or give the model one")
    name = optim_config.name
    if name == "sam" and optim_config.get("sparsity"):
        raise ValueError("optim.sparsity (sparse then prune) is not supported with optim.name='sam'; valid choices "
                         "with it: ['adamw', 'sgd', 'lars', 'lamb']")
    if name == "sam" and trained_only:
        raise ValueError("optim.name='sam' does not support parameter-efficient adaptation (config.adapt); "
                         "valid choices with it: ['adamw', 'sgd', 'lars', 'lamb']")
    if name == "sam":
        return make_sam(optim_config, params, batch_size=batch_size, total_steps=total_steps,
                        steps_per_epoch=steps_per_epoch, param_axes=param_axes, layer_ids_fn=layer_ids_fn,
                        no_weight_decay=no_weight_decay)
    from vitjax.quant import sparsity  # optim.sparsity: sparse then prune (L1, then magnitude masks)
    sparse_front, sparse_back = sparsity.from_config(optim_config.get("sparsity"), total_steps)
    peak_lr = peak_learning_rate(optim_config, batch_size)
    warmup_steps = warmup_steps_from_config(optim_config, steps_per_epoch)
    schedule = make_schedule(optim_config.get("schedule", "cosine"), peak_lr, total_steps, warmup_steps,
                             init_lr=optim_config.get("warmup_init_lr", 0.0),
                             end_lr=optim_config.get("min_lr", 0.0))
    weight_decay = float(optim_config.get("weight_decay", 0.0))
    decay_mask = decay_mask_fn(no_decay_patterns(optim_config, no_weight_decay), param_axes)
    mu_dtype = optim_config.get("mu_dtype")
    mu_dtype = jnp.dtype(mu_dtype) if mu_dtype else None

    transforms = []
    if optim_config.get("clip_grad_norm"):
        transforms.append(optax.clip_by_global_norm(float(optim_config.clip_grad_norm)))
    if sparse_front is not None:
        transforms.append(sparse_front)
    if name == "adamw":
        transforms += [optax.scale_by_adam(b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                                           mu_dtype=mu_dtype),
                       optax.add_decayed_weights(weight_decay, mask=decay_mask)]
    elif name == "lamb":
        # Layer adaptation skips 1-D params and tokens, as BERT's LAMB excludes norms and biases.
        transforms += [optax.scale_by_adam(b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                                           mu_dtype=mu_dtype),
                       optax.add_decayed_weights(weight_decay, mask=decay_mask),
                       scale_by_trust_ratio(1.0, decay_mask, param_axes)]
    elif name == "sgd":
        # Coupled L2 (decay added to the gradient before momentum), as torch.optim.SGD.
        transforms += [optax.add_decayed_weights(weight_decay, mask=decay_mask),
                       optax.trace(decay=optim_config.momentum, nesterov=optim_config.nesterov,
                                   accumulator_dtype=mu_dtype)]
    elif name == "lars":
        # Momentum accumulates trust-scaled updates and the lr multiplies the momentum, as the
        # LARS of MoCo v3 / MAE linear probing.
        transforms += [optax.add_decayed_weights(weight_decay, mask=decay_mask),
                       scale_by_trust_ratio(optim_config.trust_coefficient, decay_mask, param_axes),
                       optax.trace(decay=optim_config.momentum, nesterov=optim_config.nesterov,
                                   accumulator_dtype=mu_dtype)]
    else:
        raise ValueError(f"Unknown optimizer {name!r}; valid choices: ['adamw', 'sgd', 'lars', 'lamb', 'sam']")

    if layer_decay is not None and layer_decay != 1.0:
        transforms.append(scale_by_path(layer_decay_scales(params, float(layer_decay), layer_ids_fn, param_axes)))
    if optim_config.get("lr_mult"):
        transforms.append(scale_by_path(lr_multipliers(params, optim_config.lr_mult)))
    transforms.append(optax.scale_by_learning_rate(schedule))
    if sparse_back is not None:
        transforms.append(sparse_back)  # last: a pruned weight's update is minus the weight, whatever came before
    tx = optax.chain(*transforms)

    frozen = tuple(optim_config.get("frozen", ()))
    trained_only = tuple(trained_only)
    if frozen or trained_only:
        labels = _map_with_path(lambda path, _: "frozen" if _is_frozen(path, frozen, trained_only) else "trained",
                                params)
        counts = {label: sum(1 for value in jax.tree.leaves(labels) if value == label)
                  for label in ("frozen", "trained")}
        if frozen and not any(_matches(path, frozen) for path in param_paths(params)):
            raise ValueError(f"optim.frozen patterns {list(frozen)} match no param; params: "
                             f"{sorted(param_paths(params))[:20]}...")
        if counts["trained"] == 0:
            only = f" with only {list(trained_only)} trained (config.adapt)" if trained_only else ""
            raise ValueError(f"optim.frozen patterns {list(frozen)}{only} freeze every param")
        tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule


# --- SAM: sharpness-aware minimisation around any base optimizer -------------------------------------------------

SAM_SYNC_PERIOD = 2   # gradients per SAM update: one for the ascent, one for the base optimizer's step


def needs_grad_fn(optim_config) -> bool:
    """Returns whether the optimizer takes `grad_fn` in its update (SAM on one batch: it evaluates a second gradient)."""
    return optim_config.get("name") == "sam" and bool(optim_config.get("sam_same_batch", True))


def scale_by_sam_ascent(rho: float, adaptive: bool = False, eta: float = 0.01) -> optax.GradientTransformation:
    """Returns a transformation mapping gradients g at w to the ascent -eps (optax's sign: params + updates).

    SAM (Foret et al. 2021): eps = rho * g / ||g||. Adaptive SAM (ASAM, Kwon et al. 2021): with T = |w| + eta
    element-wise, eps = rho * T^2 g / ||T g||, so the ascent is invariant to rescaling the weights.
    The norms are global over the whole tree (one radius for the model, as both papers).
    """
    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if adaptive:
            if params is None:
                raise ValueError("adaptive SAM needs the params to scale its ascent")
            scales = jax.tree.map(lambda w: jnp.abs(w) + eta, params)
            scaled = jax.tree.map(lambda t, g: t * g, scales, updates)
            norm = optax.tree.norm(scaled)
            ascent = jax.tree.map(lambda t, g: t * t * g, scales, updates)
        else:
            norm = optax.tree.norm(updates)
            ascent = updates
        # optax.contrib.sam negates what this returns and adds it to the params: w + eps.
        factor = -rho / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny)
        return jax.tree.map(lambda g: factor * g, ascent), state

    return optax.GradientTransformation(init_fn, update_fn)


def make_sam(optim_config, params, *, batch_size: int, total_steps: int, steps_per_epoch: Optional[float] = None,
             param_axes=None, layer_ids_fn: Optional[LayerIdsFn] = None, no_weight_decay: Sequence[str] = ()
             ) -> Tuple[optax.GradientTransformation, Schedule]:
    """Returns (SAM around `optim.sam_base`, step -> lr schedule) on optax.contrib.sam.

    A SAM update takes the gradient g at w, the ascent eps (`scale_by_sam_ascent` with `sam_rho`,
    `sam_adaptive`, `sam_eta`), the gradient at w + eps, and applies the base optimizer's update with it to w
    (weight decay, clipping, layer decay and frozen params as the base optimizer has them).

    `sam_same_batch=True` (default; the paper): optax's opaque mode. Both gradients come from the step's batch:
    the trainer passes `grad_fn` (its own, accumulated, loss gradient on that batch) to the update, so every
    trainer step is one SAM update at twice the cost of a plain step (see `needs_grad_fn`).
    `sam_same_batch=False`: optax's transparent mode. Each update takes two trainer steps on consecutive batches
    (the first moves the params to w + eps, the second takes the gradient there): the cost of a plain step, half
    the updates; the base schedule is laid out over the total_steps / 2 updates and the returned schedule gives
    its lr at a trainer step; the state holds one params-shaped copy (w, sharded as the params).
    Gradient accumulation and sharding need nothing special in either mode.
    """
    base_config = dict(optim_config.items() if hasattr(optim_config, "items") else optim_config)
    base_name = base_config.get("sam_base", "adamw")
    if base_name == "sam":
        raise ValueError("optim.sam_base must be a base optimizer; valid choices: ['adamw', 'sgd', 'lars', 'lamb']")
    base_config["name"] = base_name
    same_batch = bool(base_config.get("sam_same_batch", True))
    steps_per_update = 1 if same_batch else SAM_SYNC_PERIOD
    if base_config.get("warmup_steps") is not None:
        base_config["warmup_steps"] = int(base_config["warmup_steps"]) // steps_per_update
    base_steps = max(int(total_steps) // steps_per_update, 1)
    base_tx, base_schedule = make_optimizer(
        ml_collections.ConfigDict(base_config), params, batch_size=batch_size, total_steps=base_steps,
        steps_per_epoch=None if steps_per_epoch is None else steps_per_epoch / steps_per_update,
        param_axes=param_axes, layer_ids_fn=layer_ids_fn, no_weight_decay=no_weight_decay)
    rho = float(base_config.get("sam_rho", 0.05))
    if not rho > 0:
        raise ValueError(f"optim.sam_rho must be positive, got {rho}")
    ascent = scale_by_sam_ascent(rho, bool(base_config.get("sam_adaptive", False)),
                                 float(base_config.get("sam_eta", 0.01)))
    tx = optax.contrib.sam(base_tx, ascent, sync_period=SAM_SYNC_PERIOD, reset_state=True, opaque_mode=same_batch)

    def schedule(step):
        return base_schedule(step // steps_per_update)

    return tx, schedule


def _is_frozen(path: str, frozen: Sequence[str], trained_only: Sequence[str]) -> bool:
    """Returns whether a param is frozen: it matches `frozen`, or `trained_only` is given and it matches none."""
    return _matches(path, frozen) or (bool(trained_only) and not _matches(path, trained_only))


def trainable_mask(optim_config, params, trained_only: Sequence[str] = ()) -> Any:
    """Returns a bool tree: False for params frozen by `optim_config.frozen` or outside `trained_only` (if given)."""
    frozen = tuple(optim_config.get("frozen", ()))
    return _map_with_path(lambda path, _: not _is_frozen(path, frozen, tuple(trained_only)), params)
