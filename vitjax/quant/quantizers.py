"""Fake quantizers (quantize, then dequantize, in floating point) with the straight-through estimator.

Each quantizer maps x to the nearest point of its grid and back; rounding passes gradients straight
through (`round_ste`), so the same functions serve post-training quantization and quantization-aware
fine-tuning. Grids:

* uniform: scale * (k - zero_point), k in [0, 2^bits - 1] (asymmetric, as AdaLog's UniformQuantizer);
  its range comes from min-max, a percentile or an MSE-optimal search (`uniform_range`), per tensor,
  per output channel (weights) or per token (activations, computed on the fly: `dynamic_uniform`).
* log2: scale * 2^-k, k in [0, 2^bits - 1], and 0 below the last level (AdaLog's Log2Quantizer).
* AdaLog (Wu et al., ECCV 2024): scale * 2^(-k q / r) with r = 37 and an integer q chosen by search (the
  base adapts to the distribution), dequantized through its hardware table (`adalog_levels`); post-GELU
  activations are shifted by GELU's minimum first. `search_adalog_softmax` and `search_adalog_gelu` are
  its hyperparameter searches (the log base; the log base and scale with Fast Progressive Combining Search).
"""
import functools
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

# AdaLog's fixed numerator of the base exponent, r in base = 2^(q / r) (the paper's and its code's 37).
ADALOG_R = 37
# -min GELU(x): post-GELU values are shifted by this before a log quantizer (AdaLog's bias reparameterisation).
GELU_SHIFT = 0.16997124254703522
UNIFORM_RULES = ("minmax", "percentile", "mse")
GRANULARITIES = ("tensor", "channel", "token")
# The percentile rule clips to [0.01th, 99.99th] percentiles; the MSE rule tries these shrink factors.
PERCENTILE = 99.99
MSE_SHRINKS = tuple(float(v) for v in np.geomspace(0.02, 1.0, 64))


def check_bits(bits: int, what: str) -> int:
    """Returns `bits` when it is an int in [2, 8]; raises ValueError naming the valid range otherwise."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= int(bits) <= 8:
        raise ValueError(f"{what} must be an integer bit width in 2..8, got {bits!r}")
    return int(bits)


def round_ste(x: jax.Array) -> jax.Array:
    """Returns round(x) whose gradient is the identity (the straight-through estimator)."""
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def uniform_quantize(x: jax.Array, scale: jax.Array, zero_point: jax.Array, bits: int) -> jax.Array:
    """Returns x fake-quantized to scale * (k - round(zero_point)), k in [0, 2^bits - 1]; gradients pass in range."""
    zero = round_ste(zero_point)
    levels = jnp.clip(round_ste(x / scale) + zero, 0, 2 ** bits - 1)
    return (levels - zero) * scale


def uniform_params(low: jax.Array, high: jax.Array, bits: int) -> Tuple[jax.Array, jax.Array]:
    """Returns (scale, zero_point) of the uniform grid covering [low, high] widened to hold 0 (numpy in, numpy out)."""
    xp = np if isinstance(low, (np.ndarray, np.generic, float)) else jnp
    low, high = xp.minimum(low, 0.0), xp.maximum(high, 0.0)
    scale = xp.maximum(high - low, 1e-8) / (2 ** bits - 1)
    return scale, -low / scale


def _reduce_axes(ndim: int, keep: Sequence[int]) -> Tuple[int, ...]:
    keep = {axis % ndim for axis in keep}
    return tuple(axis for axis in range(ndim) if axis not in keep)


def uniform_range(x: jax.Array, bits: int, rule: str, keep_axes: Sequence[int] = ()) -> Tuple[jax.Array, jax.Array]:
    """Returns (low, high) of `x` per slice along `keep_axes` (kept as size-1 elsewhere) by min-max, percentile or MSE.

    "mse" picks, per slice, the shrink factor s of MSE_SHRINKS whose grid over [s min, s max] has the least
    squared error ||x - Q(x)||^2 (an MSE-optimal scale by grid search). A numpy `x` is computed in numpy
    (calibration, nothing to compile), a jax one in jax (dynamic quantization inside a traced function).
    """
    if rule not in UNIFORM_RULES:
        raise ValueError(f"Unknown uniform range rule {rule!r}; valid choices: {UNIFORM_RULES}")
    xp = np if isinstance(x, np.ndarray) else jnp
    x = x.astype(np.float32)
    axes = _reduce_axes(x.ndim, keep_axes)
    if rule == "percentile":
        low = xp.percentile(x, 100.0 - PERCENTILE, axis=axes, keepdims=True)
        high = xp.percentile(x, PERCENTILE, axis=axes, keepdims=True)
        return low, high
    low, high = x.min(axis=axes, keepdims=True), x.max(axis=axes, keepdims=True)
    if rule == "minmax":
        return low, high

    def error(shrink):
        scale, zero = uniform_params(shrink * low, shrink * high, bits)
        zero = xp.round(zero)
        quantized = (xp.clip(xp.round(x / scale) + zero, 0, 2 ** bits - 1) - zero) * scale
        return xp.mean(xp.square(x - quantized), axis=axes, keepdims=True)

    shrinks = np.asarray(MSE_SHRINKS, np.float32)
    if xp is np:
        errors = np.stack([error(shrink) for shrink in shrinks])
    else:
        errors = jax.lax.map(error, jnp.asarray(shrinks))
    best = xp.asarray(shrinks)[xp.argmin(errors, axis=0)]
    return best * low, best * high


def dynamic_uniform(x: jax.Array, bits: int, rule: str = "minmax") -> jax.Array:
    """Returns x fake-quantized per token (one grid per slice of the last axis), the grid computed from x itself."""
    low, high = uniform_range(jax.lax.stop_gradient(x), bits, rule, keep_axes=tuple(range(x.ndim - 1)))
    scale, zero = uniform_params(low, high, bits)
    return uniform_quantize(x, scale, zero, bits)


def log2_quantize(x: jax.Array, scale: jax.Array, bits: int, shift: float = 0.0) -> jax.Array:
    """Returns x fake-quantized to (scale * 2^-k) - shift, k in [0, 2^bits - 1], 0 - shift below the last level."""
    scaled = jnp.clip((x + shift) / scale, 1e-15, 1.0)
    exponent = round_ste(-jnp.log2(scaled))
    inside = jax.lax.stop_gradient(exponent) < 2 ** bits
    exponent = jnp.clip(exponent, 0, 2 ** bits - 1)
    return jnp.where(inside, jnp.exp2(-exponent) * scale, 0.0) - shift


def adalog_levels(q: int, bits: int, r: int = ADALOG_R) -> np.ndarray:
    """Returns the 2^bits dequantized AdaLog levels 2^(-floor(kq/r)) * T[kq mod r] (float32), k = 0, 1, ...

    T[j] is 2^(-j/r) rounded to the grid 1 / (2^(bits+1) - 2): the hardware table that replaces the
    fractional power, so dequantization is a table look-up and a shift.
    """
    k = np.arange(2 ** bits, dtype=np.int64)
    powers = np.exp2(-((k * int(q)) // r).astype(np.float64))
    return (powers * _adalog_table(bits, r)[(k * int(q)) % r]).astype(np.float32)


def _adalog_table(bits: int, r: int) -> np.ndarray:
    grid = 2.0 ** (bits + 1) - 2.0
    return np.round(np.exp2(-np.arange(r, dtype=np.float64) / r) * grid) / grid


def adalog_quantize(x: jax.Array, scale: jax.Array, q: int, bits: int, shift: float = 0.0,
                    r: int = ADALOG_R) -> jax.Array:
    """Returns x fake-quantized by AdaLog: scale * levels[k] - shift, k = round(-log2((x + shift) / scale) r / q).

    The forward value is the table's (`adalog_levels`); the gradient is that of scale * 2^(-k q / r) with
    k rounded straight through, about the identity inside the range.
    """
    levels = jnp.asarray(adalog_levels(q, bits, r))
    scaled = jnp.clip((x + shift) / scale, 1e-15, 1.0)
    exponent = round_ste(-jnp.log2(scaled) * r / q)
    inside = jax.lax.stop_gradient(exponent) < 2 ** bits
    exponent = jnp.clip(exponent, 0, 2 ** bits - 1)
    smooth = jnp.exp2(-exponent * q / r) * scale
    exact = levels[jax.lax.stop_gradient(exponent).astype(jnp.int32)] * scale
    value = smooth + jax.lax.stop_gradient(exact - smooth)
    return jnp.where(inside, value, 0.0) - shift


# ---- AdaLog's hyperparameter search ------------------------------------------------------------------

def _search_table(bits: int, r: int) -> np.ndarray:
    """Returns the search's fp32 table: 2^(-j/r) rounded to 1 / (2^(bits+1) - 2) in fp32 (as AdaLog's search)."""
    step = np.float32(1.0 / (2.0 ** (bits + 1) - 2.0))
    table = np.exp2(-np.arange(r, dtype=np.float64) / r).astype(np.float32)
    return (np.round(table / step) * step).astype(np.float32)


def _adalog_candidates(x: jax.Array, scale: jax.Array, q: jax.Array, bits: int, shift: float, r: int,
                       clamp_low: bool = True) -> jax.Array:
    """Returns x quantized by AdaLog for each (scale, q) candidate: shape (candidates,) + x.shape."""
    expand = (slice(None),) + (None,) * x.ndim
    scale, q = scale[expand], q[expand].astype(jnp.int32)
    scaled = (x[None] + shift) / scale
    # Post-softmax zeros go to -inf and out of range (the search does not clamp them, as AdaLog's).
    scaled = jnp.clip(scaled, 1e-15 if clamp_low else 0.0, 1.0)
    exponent = jnp.round(-jnp.log2(scaled) * r / q.astype(jnp.float32))
    inside = exponent < 2 ** bits
    k = jnp.clip(exponent, 0, 2 ** bits - 1).astype(jnp.int32)
    table = jnp.asarray(_search_table(bits, r))
    value = jnp.exp2(-((k * q) // r).astype(jnp.float32)) * table[(k * q) % r]
    return jnp.where(inside, value, 0.0) * scale - shift


def _chunked(error_fn, scales: jax.Array, qs: jax.Array, per_candidate: int, *data,
             budget: int = 1 << 25) -> jax.Array:
    """Returns error_fn(scales, qs, *data) over all candidates, in chunks of about `budget` elements."""
    chunk = max(1, min(int(scales.shape[0]), budget // max(per_candidate, 1)))
    out = [np.asarray(error_fn(scales[start:start + chunk], qs[start:start + chunk], *data))
           for start in range(0, scales.shape[0], chunk)]
    return np.concatenate(out)


@functools.partial(jax.jit, static_argnames=("bits", "r"))
def _softmax_errors(scales, qs, attention, value_sim, reference, *, bits, r):
    quantized = _adalog_candidates(attention, scales, qs, bits, 0.0, r, clamp_low=False)
    out = jnp.einsum("cbhqk,bkhd->cbhqd", quantized, value_sim)
    return jnp.mean(jnp.square(out - reference[None]), axis=tuple(range(1, out.ndim)))


def search_adalog_softmax(attention: jax.Array, value: jax.Array, bits: int, num_candidates: int = 128,
                          r: int = ADALOG_R, value_sim: Optional[jax.Array] = None) -> int:
    """Returns AdaLog's base numerator q in 10..9+num_candidates (scale 1) for post-softmax weights.

    attention: (B, H, Nq, Nk) softmax weights; value: (B, Nk, H, D), the values they weigh; value_sim: the
    values as the quantized matmul sees them (default: value). Picks the q whose quantized weights times
    value_sim come closest in mean squared error to attention @ value (AdaLog's `_search_best_A_log_base`).
    """
    attention = jnp.asarray(attention, jnp.float32)
    value = jnp.asarray(value, jnp.float32)
    value_sim = value if value_sim is None else jnp.asarray(value_sim, jnp.float32)
    reference = jnp.einsum("bhqk,bkhd->bhqd", attention, value)
    qs = np.arange(10, 10 + num_candidates, dtype=np.int32)
    ones = np.ones((num_candidates,), np.float32)
    errors = functools.partial(_softmax_errors, bits=bits, r=r)
    found = _chunked(errors, ones, qs, attention.size + reference.size, attention, value_sim, reference)
    return int(qs[np.argmin(found)])


def positive_percentiles(x: np.ndarray, fractions: Sequence[float]) -> np.ndarray:
    """Returns, for each fraction f, the ceil(f n)-th smallest of the n positive entries of x (0 when none)."""
    positive = np.sort(np.asarray(x, np.float32)[np.asarray(x) > 0].reshape(-1))
    if positive.size == 0:
        return np.zeros(len(fractions), np.float32)
    ranks = np.ceil(np.float32(positive.size) * np.asarray(fractions, np.float32)).astype(np.int64) - 1
    return positive[np.clip(ranks, 0, positive.size - 1)]


@functools.partial(jax.jit, static_argnames=("bits", "shift", "r"))
def _gelu_errors(scales, qs, x, kernel_sim, bias, reference, *, bits, shift, r):
    quantized = _adalog_candidates(x, scales, qs, bits, shift, r)
    return jnp.mean(jnp.square(quantized @ kernel_sim + bias - reference[None]), axis=(1, 2))


def search_adalog_gelu(inputs: jax.Array, kernel: jax.Array, bias: Optional[jax.Array], bits: int,
                       shift: float = GELU_SHIFT, num_candidates: int = 128, steps: int = 6,
                       base_top: int = 8, scale_count: int = 16, width: int = 32,
                       r: int = ADALOG_R, kernel_sim: Optional[jax.Array] = None,
                       initial_scale: Optional[float] = None) -> Tuple[float, int]:
    """Returns AdaLog's (scale, q) for the post-GELU input of a linear layer, by Fast Progressive Combining Search.

    inputs: (..., C_in) full-precision activations; kernel: (C_in, C_out) the layer's kernel, kernel_sim the
    quantized one (default: kernel). The error is the mean squared difference of the output with quantized
    inputs and kernel_sim from the full-precision output (inputs @ kernel + bias). As AdaLog's
    `activation_fpcs`: the `base_top` best q of 10..9+num_candidates at the initial scale (the second-largest
    of `num_candidates` between the 90th percentile and the maximum of the shifted positive inputs), then
    those q crossed with `scale_count` scales in that range, keeping the `width` best pairs and refining
    their scales `steps - 1` times. `initial_scale` replaces the initial scale (the official search's later
    rounds start from the scale found before).
    """
    x = np.asarray(inputs, np.float32).reshape(-1, np.shape(inputs)[-1])
    kernel = np.asarray(kernel, np.float32)
    kernel_sim = kernel if kernel_sim is None else np.asarray(kernel_sim, np.float32)
    bias = np.zeros((kernel.shape[-1],), np.float32) if bias is None else np.asarray(bias, np.float32)
    reference = x @ kernel + bias
    low, high = (positive_percentiles(x, (0.9, 1.0)) + np.float32(shift)).astype(np.float32)
    errors = functools.partial(_gelu_errors, bits=bits, shift=shift, r=r)
    device_data = [jnp.asarray(array) for array in (x, kernel_sim, bias, reference)]

    def top(scales, qs, k):
        found = _chunked(errors, scales.astype(np.float32), qs.astype(np.int32), x.size + reference.size,
                         *device_data)
        # a stable order: ties go to the earlier candidate
        return np.argsort(found, kind="stable")[:k]

    if initial_scale is None:
        initial_scale = low + (high - low) * np.float32((num_candidates - 2) / (num_candidates - 1))
    initial_scale = np.float32(initial_scale)
    qs = np.arange(10, 10 + num_candidates)
    best_q = qs[top(np.full((num_candidates,), initial_scale, np.float32), qs, base_top)]
    grid = low + (high - low) * (np.arange(scale_count, dtype=np.float32) / np.float32(scale_count - 1))
    delta = grid[1] - grid[0]
    scales, qs = np.tile(grid, base_top), np.repeat(best_q, scale_count)
    chosen = top(scales, qs, width)
    scales, qs = scales[chosen], qs[chosen]
    new_count = num_candidates // width
    for remaining in range(steps - 1, 0, -1):
        offsets = (np.linspace(0.0, 1.0, new_count, dtype=np.float32) - np.float32(0.5)) * delta
        delta = delta / np.float32(new_count - 0.5)
        scales = (scales[:, None] + offsets[None, :]).reshape(-1)
        qs = np.repeat(qs, new_count)
        chosen = top(scales, qs, 1 if remaining == 1 else width)
        scales, qs = scales[chosen], qs[chosen]
    return float(scales[0]), int(qs[0])


__all__ = ["ADALOG_R", "GELU_SHIFT", "GRANULARITIES", "MSE_SHRINKS", "PERCENTILE", "UNIFORM_RULES", "adalog_levels",
           "adalog_quantize", "check_bits", "dynamic_uniform", "log2_quantize", "positive_percentiles", "round_ste",
           "search_adalog_gelu", "search_adalog_softmax", "uniform_params", "uniform_quantize", "uniform_range"]
