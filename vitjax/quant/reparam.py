"""RepQ-ViT's scale reparameterisation of post-LayerNorm activations (as AdaLog's official code applies it).

A post-LayerNorm activation has channels of very different ranges; one grid per channel fits them, but a
matmul needs one grid per tensor. The per-channel grids (scale s_c, zero point z_c) are folded into the
LayerNorm's affine and the next layer's kernel and bias: with target scale s = mean(s_c), zero point
z = round(mean(z_c)), r_c = s_c / s and b_c = -z_c s_c / r_c + z s, the LayerNorm then outputs x_c / r_c - b_c
(scale / r, bias / r - b) and the layer takes kernel rows * r_c and bias + b @ kernel', so the FP32 function is
unchanged and the new input fits one grid. The pairs are those of the official code (`wrap_modules_in_net`):
a block's `norm1` before its attention's `qkv`, its `norm2` before its MLP's `fc1`, and a patch merging's
`norm` before its `reduction`.
"""
from typing import Any, Dict, Iterable, List, Tuple

import numpy as np

# (layer name, its norm's name relative to the layer's path)
PAIRS = (("qkv", ("..", "..", "norm1")), ("fc1", ("..", "..", "norm2")), ("reduction", ("..", "norm")))


def _lookup(tree: Any, path: Tuple[str, ...]) -> Any:
    for key in path:
        if not hasattr(tree, "get") or key not in tree:
            return None
        tree = tree[key]
    return tree


def norm_path(layer_path: Tuple[str, ...]) -> Tuple[str, ...]:
    """Returns the path of the LayerNorm the official code folds into the layer at `layer_path`, or ()."""
    for name, relative in PAIRS:
        if layer_path and layer_path[-1] == name:
            ups = sum(part == ".." for part in relative)
            return tuple(layer_path[:len(layer_path) - ups]) + tuple(p for p in relative if p != "..")
    return ()


def find_pairs(points: Iterable[Any], params: Any) -> Dict[str, Tuple[str, ...]]:
    """Returns {layer point name: its LayerNorm's param path} for the layers whose input the official code
    reparameterises (the norm with a 1-D scale and bias of the layer's input width, the layer with a bias)."""
    pairs = {}
    for point in points:
        path = norm_path(tuple(point.kernel_path[:-1]))
        norm = _lookup(params, path) if path else None
        kernel = _lookup(params, point.kernel_path)
        if norm is None or kernel is None or not point.has_bias or "scale" not in norm or "bias" not in norm:
            continue
        width = np.shape(norm["scale"])
        if len(width) == 1 and np.ndim(kernel) - len(point.output_axes) == 1 and np.shape(kernel)[0] == width[0]:
            pairs[point.name] = path
    return pairs


def fold(channel_scale: np.ndarray,
         channel_zero: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.float32, np.float32]:
    """Returns (r, b, target scale, target zero point) of the reparameterisation of per-channel grids (C,)."""
    channel_scale = np.asarray(channel_scale, np.float32)
    channel_zero = np.asarray(channel_zero, np.float32)
    channel_min = -channel_zero * channel_scale
    target_scale = np.mean(channel_scale, dtype=np.float32)
    target_zero = np.round(np.mean(channel_zero, dtype=np.float32))
    target_min = -target_zero * target_scale
    r = channel_scale / target_scale
    return r, channel_min / r - target_min, np.float32(target_scale), np.float32(target_zero)


def apply_fold(norm: Dict[str, np.ndarray], kernel: np.ndarray, bias: np.ndarray, r: np.ndarray,
               b: np.ndarray) -> Tuple[Dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Returns (norm params, kernel, bias) with (r, b) folded in: the norm outputs x / r - b, the layer
    (kernel (C, ...) on the norm's output) gives the same output on it."""
    norm = dict(norm)
    norm["scale"] = (np.asarray(norm["scale"], np.float32) / r).astype(np.float32)
    norm["bias"] = (np.asarray(norm["bias"], np.float32) / r - b).astype(np.float32)
    kernel = np.asarray(kernel, np.float32)
    shape = kernel.shape
    kernel = (kernel.reshape(shape[0], -1) * r[:, None]).astype(np.float32)
    bias = (np.asarray(bias, np.float32).reshape(-1) + b @ kernel).astype(np.float32)
    return norm, kernel.reshape(shape), bias


def set_path(tree: Dict[str, Any], path: Tuple[str, ...], value: Any) -> None:
    """Sets tree[path[0]]...[path[-1]] = value in a tree of (mutable) dicts."""
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def mutable_copy(tree: Any) -> Any:
    """Returns a copy of a params tree as nested dicts (leaves shared)."""
    if hasattr(tree, "items"):
        return {key: mutable_copy(value) for key, value in tree.items()}
    return tree


__all__: List[str] = ["PAIRS", "apply_fold", "find_pairs", "fold", "mutable_copy", "norm_path", "set_path"]
