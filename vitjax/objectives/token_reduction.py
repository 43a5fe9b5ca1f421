"""Supervised fine-tuning of a token-reduction model with its method's training-time parts.

    config.objective = "token_reduction"
    config.objective_kwargs = dict(shrink_start_step=..., shrink_steps=...)        # EViT keep-rate warm-up
    config.objective_kwargs = dict(consistency_threshold=0.5, consistency_weight=1.0)  # MCTF consistency loss

EViT (`vitjax.tokens.evit`): with `shrink_steps` > 0 the keep rate of each train step follows the official
`adjust_keep_rate` (1 until `shrink_start_step`, a cosine down to the model's base_keep_rate over
`shrink_steps`, then base_keep_rate); the official flags count epochs, so give them times the steps per epoch.
Evaluation uses the model as configured (base_keep_rate), as the official evaluation does.

MCTF (`vitjax.tokens.mctf`): training fuses r_student tokens (evaluation: the model's r, i.e. r_eval if set).
With `consistency_threshold` > 0 (the official `task_type[2]`) a teacher forward of the same weights at
r_teacher, drawn per step as the official `resetInfo` does, gives the consistency loss (`consistency_loss`)
of the images whose student confidence exceeds the threshold, times `consistency_weight` (`task_weight[2]`).
The confidence is the student's probability of the label's classes: the classes whose soft label is above
its smallest entry (the true class, or both classes of a mixup pair; the official adds the flipped
batch's class, so a pair of equal classes counts twice there and once here).

Token counts set the shapes, so the step picks among the distinct reductions with `lax.switch`: one compile
holds one branch per distinct token count (EViT: per count the warm-up passes through; MCTF: per teacher r).
The step reaches the objective as a counter in the `token_schedule` collection, which the train step carries
in its model state (and checkpoints with it); it counts micro-batches, so it is divided by grad_accum_steps.
"""
import dataclasses
from typing import Any, Dict, List, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitjax import tokens
from vitjax.objectives.base import Variables
from vitjax.objectives.supervised import Supervised

COUNTER = "token_schedule"


def keep_rate_at(step: int, shrink_start_step: int, shrink_steps: int, base_keep_rate: float) -> float:
    """Returns EViT's keep rate at train step `step` (the official adjust_keep_rate with one step per epoch)."""
    if shrink_steps <= 0:
        return float(base_keep_rate)
    return tokens.evit.adjust_keep_rate(step, step, shrink_start_step, shrink_start_step + shrink_steps, 1,
                                        base_keep_rate=base_keep_rate)


def teacher_rs(r_teacher_max: Any) -> Tuple[Any, ...]:
    """Returns every r_teacher the official draw can give, equally likely (see tokens.mctf.draw_r_teacher)."""
    if not r_teacher_max:
        return (0,)
    if r_teacher_max < 1:
        return tuple(k / 100 for k in range(int(r_teacher_max * 100)))
    return tuple(range(int(r_teacher_max)))


class TokenReduction(Supervised):
    """Supervised classification with EViT's keep-rate warm-up or MCTF's consistency loss (module doc)."""

    default_kwargs: Dict[str, Any] = dict(shrink_start_step=0, shrink_steps=0, consistency_threshold=0.0,
                                          consistency_weight=1.0)

    def __init__(self, config):
        super().__init__(config)
        self.method = self.module.token_method() if hasattr(self.module, "token_method") else None
        name = getattr(self.method, "name", None)
        if name not in ("evit", "mctf"):
            raise ValueError(f"Objective token_reduction needs config.model.token_reduction with method 'evit' or "
                             f"'mctf', got {name!r}")
        kw = self.kwargs
        for key in ("shrink_start_step", "shrink_steps"):
            if not isinstance(kw[key], int) or kw[key] < 0:
                raise ValueError(f"objective_kwargs.{key} must be an int >= 0, got {kw[key]!r}")
        if (kw["shrink_steps"] or kw["shrink_start_step"]) and name != "evit":
            raise ValueError("objective_kwargs shrink_start_step / shrink_steps are EViT's keep-rate warm-up; "
                             f"the model's method is {name!r}")
        if not 0.0 <= kw["consistency_threshold"] < 1.0:
            raise ValueError(f"objective_kwargs.consistency_threshold must be in [0, 1) (0: off), got "
                             f"{kw['consistency_threshold']!r}")
        if kw["consistency_threshold"] and name != "mctf":
            raise ValueError(f"objective_kwargs.consistency_threshold is MCTF's; the model's method is {name!r}")
        optim = config.get("optim") if hasattr(config, "get") else None
        self.grad_accum_steps = int(optim.get("grad_accum_steps", 1)) if optim is not None else 1

    # ---- the per-step choice of reduction --------------------------------------------------------
    def _num_tokens(self, images: jax.Array) -> int:
        patch = self.module.patch_size
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        grid = images.shape[1] // patch[0], images.shape[2] // patch[1]
        return self.module.num_prefix_tokens + grid[0] * grid[1]

    def _distinct(self, methods: List[Any], num_tokens: int) -> Tuple[List[Any], np.ndarray]:
        """Returns (one method per distinct token plan, the index of each given method's plan)."""
        prefix, depth = self.module.num_prefix_tokens, self.module.depth
        keys: Dict[Any, int] = {}
        unique, index = [], []
        for method in methods:
            plan = method.plan(num_tokens, depth, prefix)
            key = (plan.token_counts, tuple(getattr(block, "keep", getattr(block, "r", None)) for block in plan.blocks))
            if key not in keys:
                keys[key] = len(unique)
                unique.append(method)
            index.append(keys[key])
        return unique, np.asarray(index, np.int32)

    def keep_rates(self, num_steps: int) -> np.ndarray:
        """Returns EViT's keep rate at each of the first `num_steps` train steps."""
        kw = self.kwargs
        return np.asarray([keep_rate_at(step, kw["shrink_start_step"], kw["shrink_steps"],
                                        self.method.base_keep_rate) for step in range(num_steps)])

    def _forward(self, method, variables: Variables, images: jax.Array, rngs) -> Tuple[jax.Array, jax.Array]:
        """Returns (fp32 logits, the final normed tokens' class token) of the model with `method`, in training."""
        module = self.module.clone(token_reduction=method, tome=None)
        output, intermediates = module.apply(variables, images, train=True, rngs=rngs)
        heads = output if isinstance(output, (tuple, list)) else (output,)
        logits = jnp.stack([head.astype(jnp.float32) for head in heads])
        return logits, intermediates["encoded"][:, 0].astype(jnp.float32)

    def _switch(self, index, methods, variables, images, rngs):
        branches = [lambda v, x, r, m=m: self._forward(m, v, x, r) for m in methods]
        if len(branches) == 1:
            return branches[0](variables, images, rngs)
        return jax.lax.switch(index, branches, variables, images, rngs)

    # ---- Objective interface -----------------------------------------------------------------------
    def init_variables(self, rng: jax.Array, batch: Dict[str, Any]) -> Variables:
        """Returns the model's initial variables and the step counter (`token_schedule`)."""
        variables = super().init_variables(rng, batch)
        variables[COUNTER] = {"step": jnp.zeros((), jnp.int32)}
        return variables

    def _model_variables(self, variables: Variables) -> Variables:
        return {name: value for name, value in variables.items() if name != COUNTER}

    def train_loss(self, variables: Variables, batch: Dict[str, Any], rng: jax.Array
                   ) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (cross-entropy [+ weighted consistency loss], {"metrics", "updates": the advanced counter})."""
        chex.assert_rank(batch["image"], 4)
        chex.assert_shape(batch["label"], (batch["image"].shape[0], self.num_classes))
        images, labels = batch["image"], batch["label"].astype(jnp.float32)
        counter = variables[COUNTER]["step"]
        step = counter // self.grad_accum_steps
        model_variables = self._model_variables(variables)
        num_tokens = self._num_tokens(images)
        dropout_rng, drop_path_rng, teacher_rng = jax.random.split(rng, 3)
        rngs = {"dropout": dropout_rng, "drop_path": drop_path_rng}
        metrics: Dict[str, jax.Array] = {}
        kw = self.kwargs
        if self.method.name == "evit":
            num_steps = kw["shrink_start_step"] + kw["shrink_steps"] + 1
            rates = self.keep_rates(num_steps)
            methods, index = self._distinct([tokens.evit.with_keep_rate(self.method, float(rate)) for rate in rates],
                                            num_tokens)
            step_index = jnp.asarray(index)[jnp.minimum(step, num_steps - 1)]
            logits, student_cls = self._switch(step_index, methods, model_variables, images, rngs)
            metrics["keep_rate"] = jnp.asarray(rates, jnp.float32)[jnp.minimum(step, num_steps - 1)]
        else:
            student = dataclasses.replace(self.method, r_eval=None)
            logits, student_cls = self._forward(student, model_variables, images, rngs)
        losses = jax.vmap(lambda head: optax.softmax_cross_entropy(head, labels).mean())(logits)
        loss = jnp.mean(losses)
        mean_logits = jnp.mean(logits, axis=0)
        if self.method.name == "mctf" and kw["consistency_threshold"]:
            candidates = [dataclasses.replace(self.method, r_eval=None, r_student=r)
                          for r in teacher_rs(self.method.r_teacher_max)]
            methods, index = self._distinct(candidates, num_tokens)
            draw = jax.random.randint(teacher_rng, (), 0, len(candidates))
            teacher_rngs = {name: jax.random.fold_in(value, 1) for name, value in rngs.items()}
            # The teacher is a constant (the official detaches it): no branch of it is differentiated.
            _, teacher_cls = self._switch(jnp.asarray(index)[draw], methods, jax.lax.stop_gradient(model_variables),
                                          images, teacher_rngs)
            per_image = tokens.mctf.consistency_loss(student_cls[:, None], teacher_cls[:, None])
            probs = jax.nn.softmax(mean_logits, axis=-1)
            label_classes = labels > jnp.min(labels, axis=-1, keepdims=True) + 1e-6
            confidence = jnp.sum(jnp.where(label_classes, probs, 0.0), axis=-1)
            passed = jax.lax.stop_gradient((confidence > kw["consistency_threshold"]).astype(jnp.float32))
            consistency = jnp.sum(per_image * passed) / jnp.maximum(jnp.sum(passed), 1.0) * kw["consistency_weight"]
            metrics.update(loss_ce=loss, loss_consistency=consistency, consistency_pass=jnp.mean(passed))
            loss = loss + consistency
        top1 = jnp.mean(jnp.argmax(mean_logits, -1) == jnp.argmax(labels, -1))
        metrics.update(loss=loss, top1=top1)
        return loss, {"metrics": metrics, "updates": {COUNTER: {"step": counter + 1}}}

    def eval_logits(self, variables: Variables, images: jax.Array) -> jax.Array:
        """Returns the eval-mode logits (B, classes) in fp32 of the model as configured."""
        return super().eval_logits(self._model_variables(variables), images)

    def features(self, variables: Variables, images: jax.Array) -> jax.Array:
        """Returns (B, D) fp32 pre-logits of the model as configured."""
        return super().features(self._model_variables(variables), images)


__all__ = ["TokenReduction", "keep_rate_at", "teacher_rs"]
