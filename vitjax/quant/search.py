"""AdaLog's calibration searches for the uniform grids (its official code, built on RepQ-ViT and PTQ4ViT).

Every uniform grid of AdaLog's pipeline (weights per output channel, activations per tensor or per channel,
the q / k / v operands of the attention matmuls per head) is an asymmetric grid (scale, integer zero point)
chosen by Fast Progressive Combining Search (`fpcs`): candidates from percentiles (`percentile_candidates`:
scales spanning the 10-90th to the 0-100th percentile range, zero points around the middle level), the
`width` best kept, their scales refined `steps - 1` times around them. The error a candidate is ranked by is
either the grid's own squared error ("self") or the squared error of the layer's / matmul's output with the
other operand quantized as currently calibrated. `calibrate_linear` and the matmul functions run the rounds
of the official `hyperparameter_searching` (`SEARCH_ROUNDS` alternations, each operand given the other's
latest grid).
"""
import functools
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from vitjax.quant import quantizers

# The official configs (configs/{3,4,6}bit.py): eq_n, search_round, steps; `fpcs_width` of its FPCS.
EQ_N = 128
SEARCH_ROUNDS = 3
FPCS_STEPS = 6
FPCS_WIDTH = 16
# Activation scales below this are not tried (the official clamp).
MIN_ACTIVATION_SCALE = 1e-4
# Elements evaluated at once (candidates x data) by the error functions.
BUDGET = 1 << 25

Grid = Tuple[np.ndarray, np.ndarray]      # (scale, zero point), one per group


# The official configs stop at 6 bits; wider grids take the zero-point rule of `percentile_candidates`.
OFFICIAL_MAX_BITS = 6


def zero_point_count(bits: int, kind: str) -> int:
    """Returns how many zero points the candidates try: weights / matmul operands min(16, 2^(b-1)), activations
    min(16, 2^b), convolution kernels 2^(b-1) (the official counts), at most 16 above `OFFICIAL_MAX_BITS`."""
    half = 2 ** (bits - 1)
    conv = half if bits <= OFFICIAL_MAX_BITS else min(16, half)
    return {"weight": min(16, half), "matmul": min(16, half), "activation": min(16, 2 * half), "conv": conv}[kind]


def quantile(groups: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Returns the fractions' quantiles (F, G) of each row of `groups` (G, n), linear interpolation in float32
    (as torch.quantile, which the official candidates use: numpy's float64 positions move them by ~1e-5)."""
    ordered = np.sort(np.asarray(groups, np.float32), axis=1)
    position = np.asarray(fractions, np.float32) * np.float32(ordered.shape[1] - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, ordered.shape[1] - 1)
    weight = (position - low.astype(np.float32))[:, None]
    below, above = ordered[:, low].T, ordered[:, high].T
    return (below + weight * (above - below)).astype(np.float32)


def percentile_candidates(groups: np.ndarray, bits: int, kind: str, eq_n: int = EQ_N) -> Grid:
    """Returns (scales, zero points), each (eq_n, G), for the G rows of `groups` (G, n): scales linear from the
    10-90th to the 0-100th percentile range over 2^b - 1, crossed with zero points around 2^(b-1).

    Above `OFFICIAL_MAX_BITS` the zero points lie around each candidate's own (its lower percentile over its
    scale) instead: 16 zero points around the middle of 256 levels cannot reach a skewed range, so the
    searched 8-bit grids clipped it (digits Swin W8A8 93.3% against 97.5% FP32; 97.2% with this rule).
    """
    groups = np.asarray(groups, np.float32)
    fractions = np.asarray([0.9, 1.0], np.float32)
    upper = quantile(groups, fractions)                                                  # (2, G)
    lower = quantile(groups, np.float32(1) - fractions)
    delta_min, delta_max = upper[0] - lower[0], upper[1] - lower[1]
    count = zero_point_count(bits, kind)
    num_scale = eq_n // count
    splits = np.linspace(0, 1, num_scale, dtype=np.float32)[:, None] * (delta_max - delta_min)[None]
    scales = np.tile(delta_min[None] + splits, (count, 1)) / np.float32(2 ** bits - 1)
    if kind == "activation":
        scales = np.maximum(scales, np.float32(MIN_ACTIVATION_SCALE))
    half = 2 ** (bits - 1)
    zero_points = np.arange(int(half - count / 2), int(half + count / 2), dtype=np.float32)
    zero_points = np.broadcast_to(np.repeat(zero_points, num_scale)[:, None], scales.shape)
    if bits > OFFICIAL_MAX_BITS:
        lows = np.tile(lower[0][None] + np.linspace(0, 1, num_scale, dtype=np.float32)[:, None]
                       * (lower[1] - lower[0])[None], (count, 1))
        zero_points = np.clip(np.round(-lows / scales) + (zero_points - half), 0, 2 ** bits - 1)
    return scales.astype(np.float32), np.ascontiguousarray(zero_points, dtype=np.float32)


def _best(errors: np.ndarray, k: int) -> np.ndarray:
    # a stable order: ties go to the earlier candidate
    return np.argsort(errors, axis=0, kind="stable")[:k]


def fpcs(candidates: Grid, error_fn: Callable[[np.ndarray, np.ndarray], np.ndarray], eq_n: int = EQ_N,
         width: int = FPCS_WIDTH, steps: int = FPCS_STEPS, min_scale: Optional[float] = None) -> Grid:
    """Returns the best (scale, zero point) per group, each (G,), by Fast Progressive Combining Search.

    error_fn(scales (C, G), zero_points (C, G)) -> errors (C, G). The `width` best initial candidates per
    group, then `steps - 1` times: each kept scale tried at eq_n / width offsets across one scale step (the
    step shrinking each time) with its zero point, keeping the `width` best (the last time the best).
    """
    scales, zero_points = candidates
    new_count = eq_n // width
    delta = scales[1] - scales[0]
    chosen = _best(error_fn(scales, zero_points), width)
    top_scales = np.take_along_axis(scales, chosen, 0)
    top_zeros = np.take_along_axis(zero_points, chosen, 0)
    for remaining in range(steps - 1, 0, -1):
        offsets = (np.linspace(0, 1, new_count, dtype=np.float32)[:, None] - np.float32(0.5)) * delta[None]
        delta = delta / np.float32(new_count - 0.5)
        scales = (top_scales[:, None] + offsets[None]).reshape(-1, top_scales.shape[-1])
        if min_scale is not None:
            scales = np.maximum(scales, np.float32(min_scale))
        zero_points = np.repeat(top_zeros, new_count, axis=0)
        chosen = _best(error_fn(scales, zero_points), 1 if remaining == 1 else width)
        top_scales = np.take_along_axis(scales, chosen, 0)
        top_zeros = np.take_along_axis(zero_points, chosen, 0)
    return top_scales[0], top_zeros[0]


def _chunked(fn, scales: np.ndarray, zero_points: np.ndarray, per_candidate: int, *data) -> np.ndarray:
    chunk = max(1, min(scales.shape[0], BUDGET // max(per_candidate, 1)))
    return np.concatenate([np.asarray(fn(jnp.asarray(scales[i:i + chunk]), jnp.asarray(zero_points[i:i + chunk]),
                                         *data)) for i in range(0, scales.shape[0], chunk)])


def fake_quantize(x, scale, zero_point, bits: int):
    """Returns x on the asymmetric grid (clip(round(x / scale) + zero_point, 0, 2^b - 1) - zero_point) * scale."""
    return (jnp.clip(jnp.round(x / scale) + zero_point, 0, 2 ** bits - 1) - zero_point) * scale


# ---- error functions (candidates on axis 0) ----------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("bits",))
def _self_errors(scales, zeros, groups, *, bits):
    # groups (G, n); candidates (C, G)
    quantized = fake_quantize(groups[None], scales[..., None], zeros[..., None], bits)
    return jnp.mean(jnp.square(quantized - groups[None]), axis=-1)


@functools.partial(jax.jit, static_argnames=("bits",))
def _weight_output_errors(scales, zeros, kernel, x_sim, bias, reference, *, bits):
    # kernel (I, O); candidates (C, O)
    kernels = fake_quantize(kernel[None], scales[:, None, :], zeros[:, None, :], bits)
    out = jnp.einsum("ri,cio->cro", x_sim, kernels) + bias
    return jnp.mean(jnp.square(out - reference[None]), axis=1)


@functools.partial(jax.jit, static_argnames=("bits",))
def _input_output_errors(scales, zeros, x, kernel_sim, bias, reference, *, bits):
    # x (R, I); candidates (C, 1)
    quantized = fake_quantize(x[None], scales[:, :, None], zeros[:, :, None], bits)
    out = jnp.einsum("cri,io->cro", quantized, kernel_sim) + bias
    return jnp.mean(jnp.square(out - reference[None]), axis=(1, 2))[:, None]


@functools.partial(jax.jit, static_argnames=("bits", "subscripts", "first"))
def _matmul_errors(scales, zeros, operand, other_sim, reference, *, bits, subscripts, first):
    # operand (B, N, H, D) or similar with heads on axis 2; candidates (C, H)
    expand = (slice(None), None, None, slice(None), None)
    quantized = fake_quantize(operand[None], scales[expand], zeros[expand], bits)
    pair = (quantized, other_sim) if first else (other_sim, quantized)
    out = jnp.einsum(subscripts, *pair)           # (C, B, H, ...)
    return jnp.mean(jnp.square(out - reference[None]), axis=(1,) + tuple(range(3, out.ndim)))


# ---- linear layers -------------------------------------------------------------------------------------

def _rows(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, np.float32).T)


def search_weight_self(kernel: np.ndarray, bits: int, kind: str = "weight", eq_n: int = EQ_N,
                       steps: int = FPCS_STEPS) -> Grid:
    """Returns the per-output-channel grid of `kernel` (I, O) with the least squared error of its own values."""
    groups = _rows(kernel)
    data = jnp.asarray(groups)
    errors = lambda s, z: _chunked(functools.partial(_self_errors, bits=bits), s, z, groups.size, data)  # noqa: E731
    return fpcs(percentile_candidates(groups, bits, kind, eq_n), errors, eq_n, steps=steps)


def search_input_self(x: np.ndarray, bits: int, channel_wise: bool = False, eq_n: int = EQ_N,
                      steps: int = FPCS_STEPS) -> Grid:
    """Returns the activation grid of x (R, I), per tensor ((1,) each) or per channel ((I,) each), of least
    squared error of its own values."""
    x = np.asarray(x, np.float32)
    groups = _rows(x) if channel_wise else x.reshape(1, -1)
    data = jnp.asarray(groups)
    errors = lambda s, z: _chunked(functools.partial(_self_errors, bits=bits), s, z, groups.size, data)  # noqa: E731
    return fpcs(percentile_candidates(groups, bits, "activation", eq_n), errors, eq_n, steps=steps,
                min_scale=MIN_ACTIVATION_SCALE)


def search_weight_output(kernel: np.ndarray, bias: np.ndarray, x_sim: np.ndarray, reference: np.ndarray,
                         bits: int, kind: str = "weight", eq_n: int = EQ_N, steps: int = FPCS_STEPS) -> Grid:
    """Returns the per-output-channel grid of `kernel` (I, O) whose output x_sim @ Q(kernel) + bias is closest,
    per channel, to `reference` (R, O)."""
    data = [jnp.asarray(a, jnp.float32) for a in (kernel, x_sim, bias, reference)]
    fn = functools.partial(_weight_output_errors, bits=bits)
    errors = lambda s, z: _chunked(fn, s, z, reference.size + kernel.size, *data)  # noqa: E731
    return fpcs(percentile_candidates(_rows(kernel), bits, kind, eq_n), errors, eq_n, steps=steps)


def search_input_output(x: np.ndarray, kernel_sim: np.ndarray, bias: np.ndarray, reference: np.ndarray,
                        bits: int, eq_n: int = EQ_N, steps: int = FPCS_STEPS) -> Grid:
    """Returns the per-tensor grid ((1,) each) of the input x (R, I) whose output Q(x) @ kernel_sim + bias is
    closest to `reference` (R, O)."""
    x = np.asarray(x, np.float32)
    data = [jnp.asarray(a, jnp.float32) for a in (x, kernel_sim, bias, reference)]
    fn = functools.partial(_input_output_errors, bits=bits)
    errors = lambda s, z: _chunked(fn, s, z, reference.size + x.size, *data)  # noqa: E731
    return fpcs(percentile_candidates(x.reshape(1, -1), bits, "activation", eq_n), errors, eq_n, steps=steps,
                min_scale=MIN_ACTIVATION_SCALE)


def quantize_array(x: np.ndarray, grid: Grid, bits: int) -> np.ndarray:
    """Returns x (numpy) fake-quantized on `grid`, broadcast as given."""
    return np.asarray(fake_quantize(jnp.asarray(x, jnp.float32), jnp.asarray(grid[0]), jnp.asarray(grid[1]), bits))


def calibrate_linear(x: np.ndarray, kernel: np.ndarray, bias: Optional[np.ndarray], w_bits: int, a_bits: int,
                     rounds: int = SEARCH_ROUNDS, input_grid: Optional[Grid] = None, eq_n: int = EQ_N,
                     steps: int = FPCS_STEPS, kind: str = "weight") -> Tuple[Grid, Grid]:
    """Returns (kernel grid (O,) each, input grid (1,) each) of a linear layer y = x @ kernel + bias.

    As AdaLog's `AsymmetricallyBatchingQuantLinear.hyperparameter_searching`: both grids first by their own
    squared error, then `rounds` times the kernel grid by the output error with the input quantized, and the
    input grid by the output error with the kernel quantized. `input_grid` given: kept (not searched).
    """
    x = np.asarray(x, np.float32)
    kernel = np.asarray(kernel, np.float32)
    bias = np.zeros((kernel.shape[1],), np.float32) if bias is None else np.asarray(bias, np.float32)
    reference = x @ kernel + bias
    weight_grid = search_weight_self(kernel, w_bits, kind, eq_n, steps)
    search_input = input_grid is None
    if search_input:
        input_grid = search_input_self(x, a_bits, eq_n=eq_n, steps=steps)
    for _ in range(rounds):
        x_sim = quantize_array(x, input_grid, a_bits)
        weight_grid = search_weight_output(kernel, bias, x_sim, reference, w_bits, kind, eq_n, steps)
        if search_input:
            kernel_sim = quantize_array(kernel, weight_grid, w_bits)
            input_grid = search_input_output(x, kernel_sim, bias, reference, a_bits, eq_n, steps)
    return weight_grid, input_grid


# ---- attention matmuls (heads on axis 2 of (B, N, H, D) operands) -------------------------------------

def _head_groups(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return np.ascontiguousarray(np.moveaxis(x, 2, 0).reshape(x.shape[2], -1))


def _per_head(grid: Grid) -> Grid:
    return tuple(np.asarray(a, np.float32).reshape(1, 1, -1, 1) for a in grid)


def search_operand(operand: np.ndarray, other_sim: np.ndarray, reference: np.ndarray, subscripts: str,
                   first: bool, bits: int, eq_n: int = EQ_N, steps: int = FPCS_STEPS) -> Grid:
    """Returns the per-head grid ((H,) each) of `operand` whose matmul with `other_sim` (einsum `subscripts`,
    the operand first or second) is closest per head to `reference` (B, H, ...)."""
    data = [jnp.asarray(a, jnp.float32) for a in (operand, other_sim, reference)]
    fn = functools.partial(_matmul_errors, bits=bits, subscripts=subscripts, first=first)
    errors = lambda s, z: _chunked(fn, s, z, reference.size + operand.size, *data)  # noqa: E731
    return fpcs(percentile_candidates(_head_groups(operand), bits, "matmul", eq_n), errors, eq_n, steps=steps)


def _initial_head_grid(operand: np.ndarray, bits: int, eq_n: int) -> Grid:
    scales, zeros = percentile_candidates(_head_groups(operand), bits, "matmul", eq_n)
    return scales[-2], zeros[-2]


SCORES = "cbqhd,bkhd->cbhqk"
MIXING = "bhqk,cbkhd->cbhqd"


def calibrate_scores(query: np.ndarray, key: np.ndarray, bits: int, rounds: int = SEARCH_ROUNDS,
                     eq_n: int = EQ_N, steps: int = FPCS_STEPS) -> Tuple[Grid, Grid]:
    """Returns the per-head grids ((H,) each) of query and key (B, N, H, D) for q k^T, as AdaLog's
    `AsymmetricallyBatchingQuantMatMul`: both from their percentile candidates, then `rounds` times each by
    the per-head error of q k^T with the other quantized."""
    reference = np.einsum("bqhd,bkhd->bhqk", query, key)
    query_grid, key_grid = _initial_head_grid(query, bits, eq_n), _initial_head_grid(key, bits, eq_n)
    for _ in range(rounds):
        key_sim = quantize_array(key, _per_head(key_grid), bits)
        query_grid = search_operand(query, key_sim, reference, SCORES, True, bits, eq_n, steps)
        query_sim = quantize_array(query, _per_head(query_grid), bits)
        key_grid = search_operand(key, query_sim, reference, "cbkhd,bqhd->cbhqk", True, bits, eq_n, steps)
    return query_grid, key_grid


def calibrate_mixing(attention: np.ndarray, value: np.ndarray, bits: int, softmax_bits: int,
                     rounds: int = SEARCH_ROUNDS, eq_n: int = EQ_N, steps: int = FPCS_STEPS) -> Tuple[int, Grid]:
    """Returns (AdaLog's q of the post-softmax weights, the per-head value grid ((H,) each)) for weights @ v,
    as AdaLog's `PostSoftmaxAsymmetricallyBatchingQuantMatMul`: the value grid from its percentile candidates,
    then `rounds` times the base searched with the values quantized and the value grid by the per-head output
    error with the weights quantized. attention (B, H, Nq, Nk); value (B, Nk, H, D)."""
    reference = np.einsum("bhqk,bkhd->bhqd", attention, value)
    value_grid = _initial_head_grid(value, bits, eq_n)
    q = 0
    for _ in range(rounds):
        value_sim = quantize_array(value, _per_head(value_grid), bits)
        q = quantizers.search_adalog_softmax(attention, value, softmax_bits, num_candidates=eq_n, value_sim=value_sim)
        attention_sim = np.asarray(quantizers.adalog_quantize(jnp.asarray(attention), 1.0, q, softmax_bits))
        value_grid = search_operand(value, attention_sim, reference, MIXING, False, bits, eq_n, steps)
    return q, value_grid


__all__ = ["EQ_N", "FPCS_STEPS", "FPCS_WIDTH", "MIN_ACTIVATION_SCALE", "SEARCH_ROUNDS", "calibrate_linear",
           "calibrate_mixing", "calibrate_scores", "fake_quantize", "fpcs", "percentile_candidates",
           "quantize_array", "search_input_output", "search_input_self", "search_operand", "search_weight_output",
           "search_weight_self", "zero_point_count"]
