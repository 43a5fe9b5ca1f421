"""Sparse then prune (Prasetyo et al., "Sparse then Prune: Toward Efficient Vision Transformers"), as optax pieces.

    optimizer = optax.chain(l1_regularization(5e-5), optax.adamw(1e-3))         # 1. train with L1 sparsity
    masks = magnitude_masks(params, sparsity=0.7)                               # 2. prune by magnitude
    params = apply_masks(params, masks)
    optimizer = optax.chain(optax.adamw(3e-4), keep_masked(masks))              # 3. fine-tune, masks kept

In the trainer, all three in one run: `config.optim.sparsity = dict(l1=2e-4, prune_step=N, target=0.7,
scope="global")` puts `l1_until(l1, N)` before the optimizer and `prune_at_step(N, 0.7)` after it
(`vitjax.optim.make_optimizer`); the masks live in the optimizer state, so checkpoints keep them.

The prunable weights are the kernels (`kernel` leaves: every Dense / DenseGeneral / Conv), by default all
but the classifier head; biases, norms, embeddings and tokens stay dense. Masks are boolean pytrees
shaped like the params (None where not pruned).
"""
import re
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitjax import pytree

Predicate = Callable[[str, Any], bool]
# Prunable by default: kernels outside the classifier head.
_HEAD = re.compile(r"(^|/)head(/|$)")


def prunable(path: str, leaf: Any) -> bool:
    """Returns True for the leaves the sparsity acts on by default: kernels, except the classifier head's."""
    return path.endswith("kernel") and not _HEAD.search(path)


def _paths(tree: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda path, _: pytree.path_to_str(path), tree)


def _add_l1(updates, params, strength, predicate: Predicate, caller: str):
    """Returns updates + strength * sign(w) on the prunable weights (`strength` may be traced)."""
    if params is None:
        raise ValueError(f"{caller} needs the params: call update(grads, state, params)")
    paths = _paths(params)
    return jax.tree.map(lambda g, w, p: g + (strength * jnp.sign(w)).astype(g.dtype) if predicate(p, w) else g,
                        updates, params, paths)


def l1_regularization(strength: float, predicate: Predicate = prunable) -> optax.GradientTransformation:
    """Returns a transform adding strength * sign(w) (the L1 subgradient) to the gradients of prunable weights."""
    if strength < 0:
        raise ValueError(f"L1 strength must be >= 0, got {strength}")

    def update(updates, state, params=None):
        return _add_l1(updates, params, strength, predicate, "l1_regularization"), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def magnitude_masks(params: Any, sparsity: float, predicate: Predicate = prunable, scope: str = "global") -> Any:
    """Returns masks (True = kept) zeroing the `sparsity` fraction of smallest-magnitude prunable weights.

    scope "global": one threshold over all prunable weights; "layer": the fraction in each tensor.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in SCOPES:
        raise ValueError(f"Unknown pruning scope {scope!r}; valid choices: {SCOPES}")
    masks = device_masks(params, sparsity, predicate, scope)
    return jax.tree.map(lambda m, w, p: m if predicate(p, w) else None, masks, params, _paths(params))


def apply_masks(params: Any, masks: Any) -> Any:
    """Returns params with the masked-out weights set to zero."""
    return jax.tree.map(lambda w, m: w if m is None else jnp.where(m, w, 0).astype(w.dtype), params, masks,
                        is_leaf=lambda x: x is None)


def keep_masked(masks: Any) -> optax.GradientTransformation:
    """Returns a transform zeroing the updates of pruned weights (last in a chain, so they stay exactly zero)."""

    def update(updates, state, params=None):
        del params
        return apply_masks(updates, masks), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def sparsity_of(params: Any, predicate: Optional[Predicate] = prunable) -> float:
    """Returns the fraction of exact zeros among the prunable weights."""
    paths = _paths(params)
    leaves = [np.asarray(w) for w, p in zip(jax.tree.leaves(params), jax.tree.leaves(paths)) if predicate(p, w)]
    return float(sum((leaf == 0).sum() for leaf in leaves) / sum(leaf.size for leaf in leaves))


SCOPES = ("global", "layer")
SETTINGS = ("l1", "prune_step", "target", "scope")


class CountState(NamedTuple):
    """The number of updates made so far."""
    count: jax.Array


class PruneState(NamedTuple):
    """The number of updates made so far and the masks (True = kept) of every param, all True until pruning."""
    count: jax.Array
    masks: Any


def l1_until(strength: float, stop_step: int, predicate: Predicate = prunable) -> optax.GradientTransformation:
    """Returns `l1_regularization(strength)` for the first `stop_step` updates, then nothing (the masks take over)."""
    if strength < 0:
        raise ValueError(f"L1 strength must be >= 0, got {strength}")

    def update(updates, state, params=None):
        on = (state.count < stop_step).astype(jnp.float32)
        return _add_l1(updates, params, on * strength, predicate, "l1_until"), CountState(state.count + 1)

    return optax.GradientTransformation(lambda params: CountState(jnp.zeros([], jnp.int32)), update)


def device_masks(params: Any, sparsity: float, predicate: Predicate = prunable, scope: str = "global") -> Any:
    """Returns masks (True = kept) for every param, computed with jnp (inside jit): `magnitude_masks`' rule,
    with True for the weights that are not prunable."""
    paths = _paths(params)
    leaves, path_leaves = jax.tree.leaves(params), jax.tree.leaves(paths)

    def threshold(values):
        count = int(round(sparsity * values.size))
        return jnp.asarray(-jnp.inf) if count == 0 else jnp.sort(values)[count - 1]

    chosen = [jnp.abs(w.astype(jnp.float32)).reshape(-1) for w, p in zip(leaves, path_leaves) if predicate(p, w)]
    if not chosen:
        raise ValueError("No prunable weights (kernels outside the head) in these params")
    global_threshold = threshold(jnp.concatenate(chosen)) if scope == "global" else None

    def mask(w, p):
        if not predicate(p, w):
            return jnp.ones(w.shape, bool)
        magnitude = jnp.abs(w.astype(jnp.float32))
        limit = global_threshold if scope == "global" else threshold(magnitude.reshape(-1))
        return magnitude > limit

    return jax.tree.map(mask, params, paths)


def prune_at_step(prune_step: int, sparsity: float, scope: str = "global",
                  predicate: Predicate = prunable) -> optax.GradientTransformation:
    """Returns a transform, last in a chain, that prunes to `sparsity` at update `prune_step` and keeps it so.

    Update `prune_step` (counting from 1) computes the masks from the updated weights and sends the pruned
    weights to exactly 0 (update = -weight); every later update does so too, so they stay 0.
    """
    check_prune(prune_step, sparsity, scope)

    def init(params):
        # A tree_map over params, so optax.tree_map_params (the trainer's shardings) sees the masks as param-shaped.
        return PruneState(jnp.zeros([], jnp.int32), jax.tree.map(lambda w: jnp.ones(jnp.shape(w), bool), params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("prune_at_step needs the params: call update(updates, state, params)")
        count = state.count + 1
        updated = jax.tree.map(lambda w, u: w + u.astype(w.dtype), params, updates)
        masks = jax.lax.cond(count == prune_step, lambda: device_masks(updated, sparsity, predicate, scope),
                             lambda: state.masks)
        updates = jax.tree.map(lambda u, w, m: jnp.where(m, u, -w.astype(u.dtype)), updates, params, masks)
        return updates, PruneState(count, masks)

    return optax.GradientTransformation(init, update)


def check_prune(prune_step: int, sparsity: float, scope: str, total_steps: Optional[int] = None) -> None:
    """Raises ValueError naming the valid range when the pruning settings cannot be run."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity target must be in [0, 1), got {sparsity!r}")
    if scope not in SCOPES:
        raise ValueError(f"Unknown pruning scope {scope!r}; valid choices: {SCOPES}")
    if isinstance(prune_step, bool) or not isinstance(prune_step, int) or prune_step < 1:
        raise ValueError(f"prune_step must be an int >= 1, got {prune_step!r}")
    if total_steps is not None and prune_step > total_steps:
        raise ValueError(f"prune_step={prune_step} is beyond the run's total_steps={total_steps}; "
                         f"valid: 1..{total_steps}")


def from_config(settings: Optional[Mapping[str, Any]], total_steps: int):
    """Returns (front, back) transforms of `config.optim.sparsity` (L1 before the optimizer, pruning after it),
    or (None, None) when it is unset; raises ValueError naming the valid settings first."""
    if not settings:
        return None, None
    settings = dict(settings.to_dict() if hasattr(settings, "to_dict") else settings)
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown or "prune_step" not in settings or "target" not in settings:
        raise ValueError(f"config.optim.sparsity takes {SETTINGS} (prune_step and target required), "
                         f"got {sorted(settings)}")
    l1, scope = float(settings.get("l1", 0.0)), settings.get("scope", "global")
    check_prune(settings["prune_step"], settings["target"], scope, total_steps)
    if l1 < 0:
        raise ValueError(f"config.optim.sparsity.l1 must be >= 0, got {l1}")
    return l1_until(l1, settings["prune_step"]), prune_at_step(settings["prune_step"], settings["target"], scope)


__all__ = ["CountState", "PruneState", "SCOPES", "SETTINGS", "apply_masks", "check_prune", "device_masks",
           "from_config", "keep_masked", "l1_regularization", "l1_until", "magnitude_masks", "prunable",
           "prune_at_step", "sparsity_of"]
