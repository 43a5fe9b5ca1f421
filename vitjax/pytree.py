"""Pytree paths as strings: "blocks_3/attn/qkv/kernel", the names every layer of vitjax uses for params.

A leaf module: it imports nothing of vitjax, so models, optimizers, sharding and weight loading all
name params the same way without importing each other.
"""
from typing import Any, Callable, Dict

import jax


def key_name(key: Any) -> str:
    """Returns the name of one key-path entry (dict key, attribute name or sequence index)."""
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def path_to_str(path) -> str:
    """Returns the "/"-joined name of a jax key path."""
    return "/".join(key_name(key) for key in path)


def param_paths(tree: Any, is_leaf: Callable[[Any], bool] = None) -> Dict[str, Any]:
    """Returns {path string: leaf} for a tree (leaves may be arrays, ShapeDtypeStructs or anything else)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return {path_to_str(path): leaf for path, leaf in flat}


def map_with_path(fn: Callable[[str, Any], Any], tree: Any, *rest: Any, is_leaf: Callable[[Any], bool] = None) -> Any:
    """Returns `tree` with each leaf replaced by fn(path string, leaf, *leaves of `rest`)."""
    return jax.tree_util.tree_map_with_path(lambda path, leaf, *others: fn(path_to_str(path), leaf, *others),
                                            tree, *rest, is_leaf=is_leaf)


def unbox(tree: Any) -> Any:
    """Returns `tree` with flax's axis-metadata boxes removed, applying no sharding constraint.

    flax's own `nn.meta.unbox` constrains each leaf to its logical axes, which fails for host arrays or
    shape structs inside a mesh context (loading weights for a run, or evaluating one standalone).
    """
    from flax.linen import meta
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, meta.AxisMetadata) else x,
                        tree, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))
