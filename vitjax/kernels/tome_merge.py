"""ToMe's merge step (Bolya et al., ICLR 2023) as a fused Pallas kernel, with its pure-jnp reference.

Both implementations compute one merge, defined here (a clean-room reading of the paper):
- tokens at even positions form set A, tokens at odd positions set B (a cls token at 0 lies in A,
  a distillation token at 1 in B);
- the first `num_protected` tokens (cls, dist) never merge and never receive a merge;
- score(a, b) is the cosine similarity of the two tokens' metric rows (the head-averaged keys);
- each A token's match is its highest-scoring B token (the first one on ties);
- the r A tokens whose match scores highest (the earlier one on ties) merge into their match;
- the output is: the protected tokens, the unmerged A tokens in their original order, then the B tokens
  in their original order (the paper's concatenation of A and B; with one protected cls token this is
  exactly [unmerged A, B]; a dist token is kept at position 1 so the head finds it where it expects);
- a B token that receives tokens becomes the size-weighted mean sum_i s_i x_i / sum_i s_i over itself
  and its sources, and its size becomes sum_i s_i.

Both return `MergeOutput`: the merged tokens (B, N - r, C), merged sizes (B, N - r) fp32, `slot` (B, N)
int32 (the output row each input token went to) and `weight` (B, N) fp32 (the share s_i / sum s of that
row each input token contributes). `slot` and `weight` describe the merge completely: `apply_merge`
replays it on any other per-token array, and the gradient of the merge is a gather with them, so
neither the forward nor the backward needs a scatter-add (slow and non-deterministic on GPU).

The Pallas kernel runs one program per image: similarity, row max and argmax, the top-r ranking
(a pairwise count, no sort), the output slots, the weights, and the weighted merge as a one-hot
matrix product over channel chunks, all in one launch. Lowerings:
- "triton" (GPU): arrays stay in the caller's layout; tiles are powers of two and the ragged edges are
  masked loads and stores.
- "mosaic" (TPU): arrays are zero-padded to whole (8, 128) tiles first (one copy), as Mosaic loads
  cannot be masked.
On a CPU the kernel runs in interpret mode: the same kernel body evaluated op by op, logged once
(`common.resolve_backend`); numerics, not speed. The tests run interpret mode and lower both flavours for
their hardware (`.lower(lowering_platforms=...)`); experiments/kernel_compile_table.py compiles both ahead of
time (TPU and sm_90a); neither has been run or timed on a GPU or TPU yet: experiments/gpu_report.py does that.
"""
import dataclasses
import functools
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from vitjax.kernels import common
from vitjax.kernels.common import BACKENDS, LANES, SUBLANES, load as _load, store as _store

MERGE_IMPLS = ("jnp", "pallas")
# One Triton program holds (N/2)^2 planning matrices in registers; past this the jnp merge is used. At
# 257-512 tokens ptxas spilled 39 KB (266 s to compile, issue 18's review); forced through at 577 tokens
# (ViT-B/16 at 384 px) the sm_90a compile did not finish within 25 minutes on a loaded 2-core host.
_MAX_TRITON_HALF_TOKENS = 256


class MergeOutput(NamedTuple):
    """The result of one merge: tokens, sizes, and the (slot, weight) description of the merge."""
    tokens: jax.Array   # (B, N - r, C), the input dtype
    sizes: jax.Array    # (B, N - r) fp32: how many input patches each output token holds
    slot: jax.Array     # (B, N) int32: the output row of each input token
    weight: jax.Array   # (B, N) fp32: s_i / (sum of s over the output row i joins)


def max_merge(num_tokens: int, num_protected: int) -> int:
    """Returns the most tokens one merge can remove from `num_tokens`, `num_protected` of them protected."""
    return max(0, (num_tokens - num_protected) // 2)


def _split_sizes(num_tokens: int, num_protected: int) -> Tuple[int, int, int, int]:
    """Returns (|A|, |B|, protected tokens in A, protected tokens in B)."""
    return (num_tokens + 1) // 2, num_tokens // 2, (num_protected + 1) // 2, num_protected // 2


def _check(x, metric, sizes, r: int, num_protected: int) -> None:
    batch, num_tokens = x.shape[:2]
    if x.ndim != 3 or metric.ndim != 3 or metric.shape[:2] != (batch, num_tokens):
        raise ValueError(f"x must be (B, N, C) and metric (B, N, D), got {x.shape} and {metric.shape}")
    if sizes.shape != (batch, num_tokens):
        raise ValueError(f"sizes must be (B, N) = {(batch, num_tokens)}, got {sizes.shape}")
    if num_protected < 0 or num_protected > num_tokens:
        raise ValueError(f"num_protected must be in [0, {num_tokens}], got {num_protected}")
    limit = max_merge(num_tokens, num_protected)
    if not 0 <= r <= limit:
        raise ValueError(f"r={r} is outside [0, {limit}] for {num_tokens} tokens, {num_protected} protected")


def _identity(x, sizes) -> MergeOutput:
    batch, num_tokens = x.shape[:2]
    slot = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32), (batch, num_tokens))
    return MergeOutput(x, sizes.astype(jnp.float32), slot, jnp.ones((batch, num_tokens), jnp.float32))


def _interleave(even, odd, num_tokens: int):
    """Returns (B, N) with `even` (B, ceil(N/2)) at even positions and `odd` (B, floor(N/2)) at odd ones."""
    if odd.shape[1] < even.shape[1]:
        odd = jnp.pad(odd, ((0, 0), (0, even.shape[1] - odd.shape[1])))
    return jnp.stack([even, odd], axis=2).reshape(even.shape[0], -1)[:, :num_tokens]


# ------------------------------------------------------------------------------------------------
# Reference (pure jnp)
# ------------------------------------------------------------------------------------------------

def normalize_metric(metric):
    """Returns the metric rows scaled to unit length, in fp32."""
    metric = metric.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(metric * metric, axis=-1, keepdims=True))
    return metric / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny)


def merge_reference(x, metric, sizes, r: int, num_protected: int = 1) -> MergeOutput:
    """Returns the merge of `r` tokens of x (B, N, C) by bipartite soft matching on metric (B, N, D)."""
    _check(x, metric, sizes, r, num_protected)
    if r == 0:
        return _identity(x, sizes)
    batch, num_tokens, _ = x.shape
    size_a_count, size_b_count, protected_a, protected_b = _split_sizes(num_tokens, num_protected)
    unmerged_count = size_a_count - protected_a - r
    sizes = sizes.astype(jnp.float32)
    metric = normalize_metric(metric)
    a_index = jnp.arange(size_a_count)
    b_index = jnp.arange(size_b_count)
    candidate_a = a_index >= protected_a
    candidate_b = b_index >= protected_b

    # Similarity, each A token's best B match, and the A tokens ranked by that match's score.
    scores = jnp.einsum("bid,bjd->bij", metric[:, 0::2], metric[:, 1::2], precision=lax.Precision.HIGHEST)
    scores = jnp.where(candidate_a[:, None] & candidate_b[None, :], scores, -jnp.inf)
    best_score = jnp.max(scores, axis=-1)
    best_match = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    other, mine = best_score[:, None, :], best_score[:, :, None]
    ahead = (other > mine) | ((other == mine) & (a_index[None, :] < a_index[:, None]))
    rank = jnp.sum(ahead & candidate_a[None, None, :], axis=-1)
    merged = candidate_a & (rank < r)                                        # (B, |A|)
    merged_before = jnp.cumsum(merged, axis=-1, dtype=jnp.int32) - merged

    # Output rows: protected, unmerged A in order, then B in order.
    first_b_row = num_protected + unmerged_count
    slot_b = jnp.where(candidate_b, first_b_row + b_index - protected_b, 2 * b_index + 1).astype(jnp.int32)
    slot_a = jnp.where(~candidate_a, 2 * a_index,
                       jnp.where(merged, first_b_row + best_match - protected_b,
                                 num_protected + a_index - protected_a - merged_before)).astype(jnp.int32)

    sizes_a, sizes_b = sizes[:, 0::2], sizes[:, 1::2]
    into = merged[:, None, :] & (best_match[:, None, :] == b_index[None, :, None])   # (B, |B|, |A|)
    total_b = sizes_b + jnp.sum(jnp.where(into, sizes_a[:, None, :], 0.0), axis=-1)
    weight_b = sizes_b / total_b
    weight_a = jnp.where(merged, sizes_a / jnp.take_along_axis(total_b, best_match, axis=1), 1.0)

    # The merged B rows: a one-hot product instead of a scatter-add; unmerged A rows: a gather.
    compute_dtype = x.dtype
    a_tokens, b_tokens = x[:, 0::2], x[:, 1::2]
    into_weights = jnp.where(into, weight_a[:, None, :], 0.0).astype(compute_dtype)
    received = jnp.einsum("bji,bic->bjc", into_weights, a_tokens, precision=common.matmul_precision(compute_dtype),
                          preferred_element_type=jnp.float32)
    own = weight_b.astype(compute_dtype).astype(jnp.float32)[..., None] * b_tokens.astype(jnp.float32)
    merged_b = (own + received).astype(x.dtype)
    order_key = jnp.where(candidate_a & ~merged, a_index, size_a_count + a_index)
    unmerged_index = jnp.argsort(order_key, axis=-1)[:, :unmerged_count]
    tokens = jnp.concatenate([
        x[:, :num_protected],
        jnp.take_along_axis(a_tokens, unmerged_index[..., None], axis=1),
        merged_b[:, protected_b:]], axis=1)
    out_sizes = jnp.concatenate([
        sizes[:, :num_protected], jnp.take_along_axis(sizes_a, unmerged_index, axis=1),
        total_b[:, protected_b:]], axis=1)
    return MergeOutput(tokens, out_sizes, _interleave(slot_a, jnp.broadcast_to(slot_b, (batch, size_b_count)),
                                                      num_tokens),
                       _interleave(weight_a, weight_b, num_tokens))


def apply_merge(values, slot, weight, num_out: int, mode: str = "mean"):
    """Returns `values` (B, N, ...) merged like the tokens: (B, num_out, ...), by `slot` and `weight`.

    mode "mean": the size-weighted mean (as the tokens); "sum": plain sums (sizes, 0/1 source maps).
    A one-hot product, so no scatter-add; exact for 0/1 values and small integer counts.
    """
    if mode not in ("mean", "sum"):
        raise ValueError(f"Unknown merge mode {mode!r}; valid choices: ('mean', 'sum')")
    one_hot = (slot[:, None, :] == jnp.arange(num_out, dtype=slot.dtype)[None, :, None]).astype(jnp.float32)
    if mode == "mean":
        one_hot = one_hot * weight[:, None, :]
    flat = values.reshape(values.shape[:2] + (-1,)).astype(jnp.float32)
    merged = jnp.einsum("bon,bnk->bok", one_hot, flat, precision=lax.Precision.HIGHEST)
    return merged.reshape((values.shape[0], num_out) + values.shape[2:]).astype(values.dtype)


# ------------------------------------------------------------------------------------------------
# Pallas kernel
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one merge call."""
    backend: str
    interpret: bool
    r: int
    num_protected: int
    num_tokens: int
    channels: int
    metric_dim: int
    dtype: str
    half_a: int          # padded |A| (rows of the planning matrices)
    half_b: int          # padded |B|
    tokens_padded: int   # padded N (columns of the merge matrix)
    metric_padded: int
    out_block: int       # output rows per merge tile
    channel_block: int   # channels per merge tile
    channels_padded: int
    num_warps: int

    @property
    def num_out(self) -> int:
        return self.num_tokens - self.r

    @property
    def out_padded(self) -> int:
        return common.round_up(self.num_out, self.out_block)

    @property
    def masked_io(self) -> bool:
        return self.backend == "triton"


def _make_config(x, metric, r, num_protected, backend, interpret, channel_block, out_block, num_warps) -> _Config:
    _, num_tokens, channels = x.shape
    size_a_count, size_b_count, _, _ = _split_sizes(num_tokens, num_protected)
    itemsize = jnp.dtype(x.dtype).itemsize
    if backend == "triton":
        pad = common.triton_pad
        half_a, half_b, tokens_padded = pad(size_a_count), pad(size_b_count), pad(num_tokens)
        metric_padded = pad(metric.shape[-1])
        # Keep the x tile of one chunk (N x channel_block) within 64 KiB of shared memory.
        fits = max(1, 65536 // (tokens_padded * itemsize))
        default_channels = max(common.MIN_TRITON_TILE, min(128, 1 << (fits.bit_length() - 1)))
        channel_block = common.check_triton_tile("channel_block", channel_block or min(default_channels, pad(channels)))
        out_block = common.check_triton_tile("out_block", out_block or min(64, pad(num_tokens - r)))
        channels_padded = common.round_up(channels, channel_block)
    else:
        half_a = common.round_up(size_a_count, LANES)
        half_b = common.round_up(size_b_count, LANES)
        tokens_padded = common.round_up(num_tokens, LANES)
        metric_padded = common.round_up(metric.shape[-1], LANES)
        channel_block = channel_block or LANES
        out_block = out_block or 128
        if channel_block % LANES or out_block % SUBLANES:
            raise ValueError(f"Mosaic channel_block must be a multiple of {LANES} and out_block of {SUBLANES}, "
                             f"got {channel_block} and {out_block}")
        channels_padded = common.round_up(channels, channel_block)
    return _Config(backend=backend, interpret=interpret, r=int(r), num_protected=int(num_protected),
                   num_tokens=num_tokens, channels=channels, metric_dim=metric.shape[-1],
                   dtype=jnp.dtype(x.dtype).name, half_a=half_a, half_b=half_b, tokens_padded=tokens_padded,
                   metric_padded=metric_padded, out_block=out_block, channel_block=channel_block,
                   channels_padded=channels_padded,
                   # The planning matrices grow as N^2: more warps keep them out of local memory.
                   num_warps=num_warps or (8 if tokens_padded >= 256 else 4))


def _iota(shape, axis):
    return lax.broadcasted_iota(jnp.int32, shape, axis)


def _column_to_row(column, length: int, fill):
    """Returns the (length, 1) column as a (1, length) row (a masked reduction: exact, no transpose op)."""
    eye = _iota((length, length), 0) == _iota((length, length), 1)
    if fill == 0:
        return jnp.sum(jnp.where(eye, column, jnp.zeros((), column.dtype)), axis=0, keepdims=True)
    return jnp.max(jnp.where(eye, column, jnp.asarray(fill, column.dtype)), axis=0, keepdims=True)


def _row_to_column(row, length: int):
    """Returns the (1, length) row as a (length, 1) column (exact; zero fill)."""
    eye = _iota((length, length), 0) == _iota((length, length), 1)
    return jnp.sum(jnp.where(eye, row, jnp.zeros((), row.dtype)), axis=1, keepdims=True)


def _merge_kernel(metric_a_ref, metric_b_ref, sizes_a_ref, sizes_b_ref, x_ref,
                  out_ref, out_sizes_ref, slot_ref, weight_ref, *, cfg: _Config):
    """One image: plan the merge (similarity, best match, top-r, slots, weights), then merge x."""
    num_tokens, r, protected = cfg.num_tokens, cfg.r, cfg.num_protected
    size_a_count, size_b_count, protected_a, protected_b = _split_sizes(num_tokens, protected)
    unmerged_count = size_a_count - protected_a - r
    first_b_row = protected + unmerged_count
    half_a, half_b, tokens_padded = cfg.half_a, cfg.half_b, cfg.tokens_padded

    a_col = _iota((half_a, 1), 0)
    b_col = _iota((half_b, 1), 0)
    b_row = _iota((1, half_b), 1)
    candidate_a_col = (a_col >= protected_a) & (a_col < size_a_count)
    candidate_b_row = (b_row >= protected_b) & (b_row < size_b_count)
    candidate_b_col = (b_col >= protected_b) & (b_col < size_b_count)

    # --- similarity and each A token's best match --------------------------------------------------
    metric_cols = _iota((1, cfg.metric_padded), 1) < cfg.metric_dim
    metric_a = _load(cfg, metric_a_ref, mask=(a_col < size_a_count) & metric_cols).astype(jnp.float32)
    metric_b = _load(cfg, metric_b_ref, mask=(b_col < size_b_count) & metric_cols).astype(jnp.float32)
    tiny = jnp.finfo(jnp.float32).tiny
    metric_a = metric_a / jnp.maximum(jnp.sqrt(jnp.sum(metric_a * metric_a, axis=1, keepdims=True)), tiny)
    metric_b = metric_b / jnp.maximum(jnp.sqrt(jnp.sum(metric_b * metric_b, axis=1, keepdims=True)), tiny)
    scores = lax.dot_general(metric_a, metric_b, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                             preferred_element_type=jnp.float32)                 # (|A|, |B|)
    scores = jnp.where(candidate_a_col & candidate_b_row, scores, -jnp.inf)
    best_score = jnp.max(scores, axis=1, keepdims=True)                          # (|A|, 1)
    b_index = _iota((half_a, half_b), 1)
    best_match = jnp.min(jnp.where(scores == best_score, b_index, half_b), axis=1, keepdims=True)

    # --- top r: rank each candidate by how many candidates score higher (earlier wins ties) ---------
    best_score_row = _column_to_row(best_score, half_a, -jnp.inf)                # (1, |A|)
    a_other = _iota((half_a, half_a), 1)
    a_mine = _iota((half_a, half_a), 0)
    a_row = _iota((1, half_a), 1)
    candidate_a_row = (a_row >= protected_a) & (a_row < size_a_count)
    ahead = ((best_score_row > best_score) | ((best_score_row == best_score) & (a_other < a_mine))) & candidate_a_row
    rank = jnp.sum(ahead.astype(jnp.int32), axis=1, keepdims=True)
    merged = candidate_a_col & (rank < r)                                        # (|A|, 1)
    merged_int = merged.astype(jnp.int32)
    merged_row = _column_to_row(merged_int, half_a, 0)                           # (1, |A|)
    merged_before = jnp.sum(jnp.where(a_other < a_mine, merged_row, 0), axis=1, keepdims=True)

    # --- output slots and weights ------------------------------------------------------------------
    slot_a = jnp.where(~candidate_a_col, 2 * a_col,
                       jnp.where(merged, first_b_row + best_match - protected_b,
                                 protected + a_col - protected_a - merged_before))
    slot_b = jnp.where(candidate_b_col, first_b_row + b_col - protected_b, 2 * b_col + 1)
    sizes_a = _load(cfg, sizes_a_ref, mask=a_col < size_a_count)                 # (|A|, 1)
    sizes_b = _load(cfg, sizes_b_ref, mask=b_col < size_b_count)                 # (|B|, 1)
    best_match_row = _column_to_row(best_match, half_a, 0)
    sizes_a_row = _column_to_row(sizes_a, half_a, 0)
    into = (merged_row > 0) & (best_match_row == _iota((half_b, half_a), 0))     # (|B|, |A|)
    total_b = sizes_b + jnp.sum(jnp.where(into, sizes_a_row, 0.0), axis=1, keepdims=True)
    total_b_row = _column_to_row(total_b, half_b, 0)
    total_of_a = jnp.sum(jnp.where(best_match == b_index, total_b_row, 0.0), axis=1, keepdims=True)
    weight_a = jnp.where(merged, sizes_a / jnp.where(merged, total_of_a, 1.0), 1.0)
    weight_b = jnp.where(b_col < size_b_count, sizes_b / jnp.where(b_col < size_b_count, total_b, 1.0), 0.0)

    # Into token positions: A index i sits at 2i, B index j at 2j + 1.
    position_row = _iota((1, tokens_padded), 1)
    from_a = _iota((half_a, tokens_padded), 1) == 2 * _iota((half_a, tokens_padded), 0)
    from_b = _iota((half_b, tokens_padded), 1) == 2 * _iota((half_b, tokens_padded), 0) + 1
    valid_row = position_row < num_tokens
    slot_row = jnp.where(valid_row, jnp.sum(jnp.where(from_a, slot_a, 0), axis=0, keepdims=True)
                         + jnp.sum(jnp.where(from_b, slot_b, 0), axis=0, keepdims=True), -1)
    weight_row = (jnp.sum(jnp.where(from_a, weight_a, 0.0), axis=0, keepdims=True)
                  + jnp.sum(jnp.where(from_b, weight_b, 0.0), axis=0, keepdims=True))
    sizes_row = (jnp.sum(jnp.where(from_a, sizes_a, 0.0), axis=0, keepdims=True)
                 + jnp.sum(jnp.where(from_b, sizes_b, 0.0), axis=0, keepdims=True))
    _store(cfg, slot_ref, slot_row, mask=valid_row)
    _store(cfg, weight_ref, weight_row, mask=valid_row)

    # --- the weighted merge: out = (one-hot slots x weights) @ x, tile by tile --------------------
    out_block, channel_block = cfg.out_block, cfg.channel_block
    token_col_valid = _iota((tokens_padded, 1), 0) < num_tokens
    precision = common.matmul_precision(cfg.dtype)
    num_channel_blocks = pl.cdiv(cfg.channels, channel_block)

    def out_tile(tile, carry):
        start = tile * out_block
        if cfg.backend == "mosaic":
            start = pl.multiple_of(start, out_block)
        out_rows = start + _iota((out_block, 1), 0)
        hits = slot_row == out_rows                                              # (out_block, N)
        row_valid = out_rows < cfg.num_out
        _store(cfg, out_sizes_ref, jnp.sum(jnp.where(hits, sizes_row, 0.0), axis=1, keepdims=True),
               rows=pl.ds(start, out_block), mask=row_valid)
        weights = jnp.where(hits, weight_row, 0.0).astype(x_ref.dtype)

        def channel_tile(chunk, carry):
            first = chunk * channel_block
            if cfg.backend == "mosaic":
                first = pl.multiple_of(first, channel_block)
            cols = pl.ds(first, channel_block)
            col_valid = first + _iota((1, channel_block), 1) < cfg.channels
            tokens = _load(cfg, x_ref, cols=cols, mask=token_col_valid & col_valid)
            merged_tokens = lax.dot_general(weights, tokens, (((1,), (0,)), ((), ())), precision=precision,
                                            preferred_element_type=jnp.float32)
            _store(cfg, out_ref, merged_tokens.astype(out_ref.dtype), rows=pl.ds(start, out_block), cols=cols,
                   mask=row_valid & col_valid)
            return carry

        return lax.fori_loop(0, num_channel_blocks, channel_tile, carry)

    lax.fori_loop(0, pl.cdiv(cfg.num_out, out_block), out_tile, 0)


def _compiler_params(cfg: _Config):
    """Returns the kernel's compiler params (grid: one program per image; no loop worth pipelining)."""
    return common.compiler_params(cfg.backend, 1, num_warps=cfg.num_warps, num_stages=1)


def _merge_call(cfg: _Config, x, metric, sizes):
    """Returns (tokens, sizes, slot, weight) of the kernel, in the caller's shapes."""
    batch = x.shape[0]
    num_tokens, num_out = cfg.num_tokens, cfg.num_out
    sizes = sizes.astype(jnp.float32)
    metric_a, metric_b = metric[:, 0::2], metric[:, 1::2]
    sizes_a, sizes_b = sizes[:, 0::2, None], sizes[:, 1::2, None]
    if cfg.backend == "mosaic":
        def pad(array, rows, cols=None):
            widths = [(0, 0), (0, rows - array.shape[1])]
            widths.append((0, 0) if cols is None else (0, cols - array.shape[2]))
            return jnp.pad(array, widths)
        metric_a = pad(metric_a, cfg.half_a, cfg.metric_padded)
        metric_b = pad(metric_b, cfg.half_b, cfg.metric_padded)
        sizes_a, sizes_b = pad(sizes_a, cfg.half_a), pad(sizes_b, cfg.half_b)
        x = pad(x, cfg.tokens_padded, cfg.channels_padded)
        out_rows, out_cols, slot_cols = cfg.out_padded, cfg.channels_padded, cfg.tokens_padded
    else:
        out_rows, out_cols, slot_cols = num_out, cfg.channels, num_tokens

    def whole(rows, cols):
        return pl.BlockSpec((None, rows, cols), lambda b: (b, 0, 0))

    tokens, out_sizes, slot, weight = pl.pallas_call(
        functools.partial(_merge_kernel, cfg=cfg),
        grid=(batch,),
        in_specs=[whole(cfg.half_a, cfg.metric_padded), whole(cfg.half_b, cfg.metric_padded),
                  whole(cfg.half_a, 1), whole(cfg.half_b, 1), whole(cfg.tokens_padded, cfg.channels_padded)],
        out_specs=[whole(cfg.out_padded, cfg.channels_padded), whole(cfg.out_padded, 1),
                   whole(1, cfg.tokens_padded), whole(1, cfg.tokens_padded)],
        out_shape=[jax.ShapeDtypeStruct((batch, out_rows, out_cols), x.dtype),
                   jax.ShapeDtypeStruct((batch, out_rows if cfg.backend == "mosaic" else num_out, 1), jnp.float32),
                   jax.ShapeDtypeStruct((batch, 1, slot_cols), jnp.int32),
                   jax.ShapeDtypeStruct((batch, 1, slot_cols), jnp.float32)],
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="vitjax_tome_merge",
    )(metric_a, metric_b, sizes_a, sizes_b, x)
    return (tokens[:, :num_out, :cfg.channels], out_sizes[:, :num_out, 0], slot[:, 0, :num_tokens],
            weight[:, 0, :num_tokens])


default_backend = common.default_backend


def unsupported_reason(x, metric, backend: Optional[str] = None, interpret: Optional[bool] = None) -> Optional[str]:
    """Returns why the Pallas merge cannot take these operands, or None."""
    backend = default_backend() if backend is None else backend
    dtype_reason = common.dtype_unsupported_reason(x.dtype, backend, interpret)
    if dtype_reason is not None:
        return dtype_reason
    if backend == "triton" and (x.shape[1] + 1) // 2 > _MAX_TRITON_HALF_TOKENS:
        return (f"{x.shape[1]} tokens: one Triton program plans at most {2 * _MAX_TRITON_HALF_TOKENS} (its (N/2)^2 "
                f"planning matrices spill registers beyond that, and at 577 tokens the compile did not finish in "
                f"25 minutes)")
    return None


def merge_pallas(x, metric, sizes, r: int, num_protected: int = 1, *, backend: Optional[str] = None,
                 interpret: Optional[bool] = None, channel_block: Optional[int] = None,
                 out_block: Optional[int] = None, num_warps: Optional[int] = None) -> MergeOutput:
    """Returns `merge_reference`'s result computed by one fused Pallas kernel per image.

    backend: "triton" (GPU) or "mosaic" (TPU), by default the platform's; interpret defaults to True on
    a CPU (the same kernel evaluated op by op; logged once).
    """
    backend, interpret = common.resolve_backend("vitjax ToMe merge kernel", backend, interpret)
    _check(x, metric, sizes, r, num_protected)
    if r == 0:
        return _identity(x, sizes)
    reason = unsupported_reason(x, metric, backend, interpret)
    if reason is not None:
        raise ValueError(f"merge_pallas: {reason}")
    cfg = _make_config(x, metric, r, num_protected, backend, interpret, channel_block, out_block, num_warps)
    return MergeOutput(*_merge_call(cfg, x, metric, sizes))


# ------------------------------------------------------------------------------------------------
# Public entry point: either implementation, with a gather for a gradient
# ------------------------------------------------------------------------------------------------

def merge(x, metric, sizes, r: int, num_protected: int = 1, impl: str = "jnp") -> MergeOutput:
    """Returns the ToMe merge of `r` tokens with `impl` ("jnp" or "pallas"), differentiable in x.

    The gradient w.r.t. x is dx_i = weight_i * d_out[slot_i] (a gather); metric and sizes get none
    (the matching is discrete and sizes are counts). "pallas" runs the kernel or raises, at trace time,
    with the reason it cannot (`unsupported_reason`); it never silently runs "jnp" instead.
    """
    if impl not in MERGE_IMPLS:
        raise ValueError(f"Unknown merge_impl {impl!r}; valid choices: {MERGE_IMPLS}")
    if r == 0:
        _check(x, metric, sizes, r, num_protected)
        return _identity(x, sizes)
    if impl == "pallas":
        reason = unsupported_reason(x, metric)
        if reason is not None:
            raise ValueError(f"merge_impl='pallas' cannot run this merge: {reason}; valid choices: "
                             f"{MERGE_IMPLS} ('jnp' takes any operands)")
    return _merge_vjp(int(r), int(num_protected), impl, x, metric, sizes.astype(jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _merge_vjp(r, num_protected, impl, x, metric, sizes):
    function = merge_pallas if impl == "pallas" else merge_reference
    return function(x, metric, sizes, r, num_protected)


def _merge_vjp_forward(r, num_protected, impl, x, metric, sizes):
    result = _merge_vjp(r, num_protected, impl, x, metric, sizes)
    return result, (result.slot, result.weight, metric, sizes)


def _merge_vjp_backward(r, num_protected, impl, residuals, cotangents):
    slot, weight, metric, sizes = residuals
    d_tokens = cotangents.tokens
    d_x = weight[..., None] * jnp.take_along_axis(d_tokens.astype(jnp.float32), slot[..., None], axis=1)
    return d_x.astype(d_tokens.dtype), jnp.zeros_like(metric), jnp.zeros_like(sizes)


_merge_vjp.defvjp(_merge_vjp_forward, _merge_vjp_backward)


__all__ = ["BACKENDS", "MERGE_IMPLS", "MergeOutput", "apply_merge", "default_backend", "max_merge", "merge",
           "merge_pallas", "merge_reference", "normalize_metric", "unsupported_reason"]
