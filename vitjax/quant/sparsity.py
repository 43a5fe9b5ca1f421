"""Sparse then prune (Prasetyo et al., "Sparse then Prune: Toward Efficient Vision Transformers"), as optax pieces.

    optimizer = optax.chain(l1_regularization(5e-5), optax.adamw(1e-3))         # 1. train with L1 sparsity
    masks = magnitude_masks(params, sparsity=0.7)                               # 2. prune by magnitude
    params = apply_masks(params, masks)
    optimizer = optax.chain(optax.adamw(3e-4), keep_masked(masks))              # 3. fine-tune, masks kept

The prunable weights are the kernels (`kernel` leaves: every Dense / DenseGeneral / Conv), by default all
but the classifier head; biases, norms, embeddings and tokens stay dense. Masks are boolean pytrees
shaped like the params (None where not pruned).
"""
import re
from typing import Any, Callable, Optional

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


def l1_regularization(strength: float, predicate: Predicate = prunable) -> optax.GradientTransformation:
    """Returns a transform adding strength * sign(w) (the L1 subgradient) to the gradients of prunable weights."""
    if strength < 0:
        raise ValueError(f"L1 strength must be >= 0, got {strength}")

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("l1_regularization needs the params: call update(grads, state, params)")
        paths = _paths(params)
        updates = jax.tree.map(lambda g, w, p: g + strength * jnp.sign(w) if predicate(p, w) else g,
                               updates, params, paths)
        return updates, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def magnitude_masks(params: Any, sparsity: float, predicate: Predicate = prunable, scope: str = "global") -> Any:
    """Returns masks (True = kept) zeroing the `sparsity` fraction of smallest-magnitude prunable weights.

    scope "global": one threshold over all prunable weights; "layer": the fraction in each tensor.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in ("global", "layer"):
        raise ValueError(f"Unknown pruning scope {scope!r}; valid choices: ('global', 'layer')")
    paths = _paths(params)
    chosen = [np.abs(np.asarray(w, np.float32)).reshape(-1) for w, p in
              zip(jax.tree.leaves(params), jax.tree.leaves(paths)) if predicate(p, w)]
    if not chosen:
        raise ValueError("No prunable weights (kernels outside the head) in these params")

    def threshold(values):
        count = int(round(sparsity * values.size))
        return -np.inf if count == 0 else np.partition(values, count - 1)[count - 1]

    global_threshold = threshold(np.concatenate(chosen))

    def mask(w, p):
        if not predicate(p, w):
            return None
        magnitude = np.abs(np.asarray(w, np.float32))
        limit = global_threshold if scope == "global" else threshold(magnitude.reshape(-1))
        return jnp.asarray(magnitude > limit)

    return jax.tree.map(mask, params, paths)


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


__all__ = ["apply_masks", "keep_masked", "l1_regularization", "magnitude_masks", "prunable", "sparsity_of"]
