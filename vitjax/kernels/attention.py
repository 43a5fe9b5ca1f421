"""FlashAttention-style fused attention in Pallas, forward and backward, with its pure-jnp reference.

`flash_attention(q, k, v, bias=..., key_bias=...)` computes softmax(q k^T / sqrt(d) + bias + key_bias) v
tile by tile with an online softmax (FlashAttention-2), so the N x N score matrix never reaches memory
(except dbias, which *is* an N x N array when a full bias needs a gradient). The backward pass is a
`jax.custom_vjp` whose work is two more Pallas kernels: one owning a block of keys (dK, dV, dkey_bias,
dbias) and one owning a block of queries (dQ); both recompute the probabilities from the saved
log-sum-exp instead of storing them.

One kernel body serves both lowerings; they differ only in how memory is touched:
- "triton" (GPU): arrays stay in the caller's (batch, length, heads, head_dim) layout, nothing is
  padded or transposed; blocks that run past the sequence or the head dim are read and written with
  masked loads and stores. Triton wants power-of-two tiles, so head dim 80 uses a 128-wide tile.
- "mosaic" (TPU): arrays are transposed to (batch, heads, length, head_dim) and zero-padded to whole
  tiles (one fused copy), because Mosaic tiles are (8, 128)-aligned and plain loads cannot be masked.
In both, keys at positions >= N get a -inf logit in-kernel, and probabilities of query rows >= N are
zeroed in the backward, so sequence lengths like 50, 197 or 577 need nothing from the caller.

On a CPU the kernels run in Pallas interpret mode (`interpret=True`, the default there): the same
kernel body evaluated op by op, logged once (`common.resolve_backend`); numerics, not speed. The tests
run interpret mode and lower both flavours for their hardware (`.lower(lowering_platforms=("cuda",))` and
("tpu",)); experiments/kernel_compile_table.py compiles both ahead of time on a CPU host (TPU v4 / v5e / v5p with
libtpu, sm_90a with the triton package); neither has been run or timed on a GPU or TPU: gpu_report.py does that.
"""
import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from vitjax.kernels import common
from vitjax.kernels.common import BACKENDS, LANES, load as _load, store as _store

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)
# Past this the (block_q, head_dim) accumulators no longer fit a program's registers / VMEM tiles.
MAX_HEAD_DIM = 256
# fp32 tiles are twice as wide in shared memory: past this head dim a Triton program needs more than the
# 227 KB of an sm_90 SM (the compile-only review of issue 18 measured 295-328 KB for head dims 129-256).
MAX_TRITON_FP32_HEAD_DIM = 128


# ------------------------------------------------------------------------------------------------
# Reference
# ------------------------------------------------------------------------------------------------

def clip_probabilities(weights, softmax_clip):
    """Returns clip((zeta - gamma) * weights + gamma, 0, 1) for softmax_clip = (gamma, zeta); weights as is for None.

    The clipped softmax of Bondarenko et al. (2023): the stretch lets a head give a key exactly 0 (or 1)
    without pushing its logits towards infinity.
    """
    if softmax_clip is None:
        return weights
    gamma, zeta = softmax_clip
    return jnp.clip((zeta - gamma) * weights + gamma, 0.0, 1.0)


def attention_reference(q, k, v, *, bias=None, key_bias=None, scale: Optional[float] = None,
                        return_weights: bool = False, return_lse: bool = False, softmax_clip=None):
    """Returns softmax(q k^T * scale + bias + key_bias) v in layout (batch, length, heads, head_dim).

    q: (B, Nq, H, D); k, v: (B, Nk, H, D).
    bias: broadcastable to (B, H, Nq, Nk) (e.g. Swin's relative position bias plus mask).
    key_bias: (B, Nk), added to every query's logit for that key (ToMe's log token size).
    scale defaults to 1/sqrt(D). The softmax is computed in fp32 whatever the input dtype.
    softmax_clip: (gamma, zeta) for the clipped softmax (`clip_probabilities`); the weights returned are clipped.
    With return_weights and/or return_lse, returns a tuple (out, [weights (B, H, Nq, Nk)], [lse (B, H, Nq)]).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # At least fp32 for the softmax; float64 inputs stay float64 (exactness tests compare in fp64).
    acc = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=acc) * scale
    if bias is not None:
        logits = logits + bias.astype(acc)
    if key_bias is not None:
        logits = logits + jnp.broadcast_to(key_bias, (q.shape[0], k.shape[1])).astype(acc)[:, None, None, :]
    weights = clip_probabilities(jax.nn.softmax(logits, axis=-1), softmax_clip)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
    extras = []
    if return_weights:
        extras.append(weights)
    if return_lse:
        extras.append(jax.nn.logsumexp(logits, axis=-1))
    return (out, *extras) if extras else out


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the three kernels; None means the per-backend default (`default_block_sizes`).

    block_q/block_k: forward. block_q_dkv/block_k_dkv: the kernel that owns a key block and loops over
    queries. block_q_dq/block_k_dq: the kernel that owns a query block and loops over keys.
    num_warps/num_stages are Triton launch parameters (ignored by Mosaic).
    """
    block_q: Optional[int] = None
    block_k: Optional[int] = None
    block_q_dkv: Optional[int] = None
    block_k_dkv: Optional[int] = None
    block_q_dq: Optional[int] = None
    block_k_dq: Optional[int] = None
    num_warps: Optional[int] = None
    num_warps_backward: Optional[int] = None
    num_stages: Optional[int] = None


def default_block_sizes(backend: str, head_dim: int) -> BlockSizes:
    """Returns the default tiles for a backend and head dim (untuned guesses for the TPU)."""
    if backend == "triton":
        wide = head_dim > 64
        # Forward: a 128-query tile amortises the K/V loads; backward: the key-block kernel keeps dK
        # and dV accumulators in registers, so its key tile shrinks as the head dim grows. Both backward
        # kernels run 8 warps: at head dim 64 with 4, ptxas (sm_90a) spills 2.6-3.0 KB in the dK/dV kernel
        # (N = 197), with 8 it spills 16 bytes (experiments/kernel_compile_table.py --target gpu; not timed).
        return BlockSizes(block_q=128, block_k=64,
                          block_q_dkv=32, block_k_dkv=64 if wide else 128,
                          block_q_dq=64 if wide else 128, block_k_dq=32,
                          num_warps=8 if wide else 4, num_warps_backward=8,
                          num_stages=2)
    if backend == "mosaic":
        return BlockSizes(block_q=128, block_k=128, block_q_dkv=128, block_k_dkv=128,
                          block_q_dq=128, block_k_dq=128)
    raise ValueError(f"Unknown backend {backend!r}; valid choices: {BACKENDS}")


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one attention call (hashable: it is a custom_vjp nondiff argument)."""
    backend: str
    interpret: bool
    scale: float
    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    head_dim_padded: int
    q_len_padded: int  # length of the q-side arrays the kernels see (== q_len for triton)
    kv_len_padded: int
    block_q: int
    block_k: int
    block_q_dkv: int
    block_k_dkv: int
    block_q_dq: int
    block_k_dq: int
    num_warps: Optional[int]
    num_warps_backward: Optional[int]
    num_stages: Optional[int]
    has_bias: bool
    bias_per_batch: bool
    bias_per_head: bool
    has_key_bias: bool
    dtype: str
    # (gamma, zeta) of the clipped softmax, or None. Clipping needs each probability normalised before it is
    # clipped, so the forward makes a second pass over the keys with the first pass's log-sum-exp.
    softmax_clip: Optional[tuple] = None

    @property
    def masked_io(self) -> bool:
        """Returns whether loads and stores must be masked (triton: nothing is padded)."""
        return self.backend == "triton"

    @property
    def precision(self):
        """Returns the matmul precision: full fp32 for fp32 inputs (the TPU default would use bf16 passes)."""
        return common.matmul_precision(self.dtype)

    @property
    def block_axis(self) -> int:
        """Returns which grid axis enumerates the sequence blocks."""
        return 0 if self.backend == "triton" else 2


def _make_config(q, k, bias, key_bias, scale, block_sizes, backend, interpret, softmax_clip=None) -> _Config:
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    defaults = default_block_sizes(backend, head_dim)
    blocks = {field.name: getattr(block_sizes, field.name) if getattr(block_sizes, field.name) is not None
              else getattr(defaults, field.name) for field in dataclasses.fields(BlockSizes)}
    q_names = ("block_q", "block_q_dkv", "block_q_dq")
    k_names = ("block_k", "block_k_dkv", "block_k_dq")
    if backend == "triton":
        head_dim_padded = common.triton_pad(head_dim)
        for name in q_names:
            blocks[name] = common.triton_tile(name, blocks[name], q_len)
        for name in k_names:
            blocks[name] = common.triton_tile(name, blocks[name], kv_len)
        q_len_padded, kv_len_padded = q_len, kv_len
    else:
        # A block may span a whole array dim, so a head dim that is a multiple of the 8 sublanes stays as
        # it is: padding 64 to 128 lanes doubled every matmul and every q/k/v/dO byte in VMEM.
        head_dim_padded = head_dim if head_dim % common.SUBLANES == 0 else common.round_up(head_dim, LANES)
        # Key tiles are the lane dimension of the logits, bias and key_bias tiles, so they need 128;
        # query tiles would only need 8 (16 for bf16) sublanes, but the backward transposes
        # (block_q, block_k) tiles, which Mosaic handles best at whole (128, 128) tiles.
        for name in q_names + k_names:
            blocks[name] = common.mosaic_tile(name, blocks[name], q_len if name in q_names else kv_len, LANES)
        q_len_padded = common.round_up(q_len, math.lcm(*(blocks[name] for name in q_names)))
        kv_len_padded = common.round_up(kv_len, math.lcm(*(blocks[name] for name in k_names)))
    return _Config(
        backend=backend, interpret=interpret, scale=float(scale), batch=batch, heads=heads,
        q_len=q_len, kv_len=kv_len, head_dim=head_dim, head_dim_padded=head_dim_padded,
        q_len_padded=q_len_padded, kv_len_padded=kv_len_padded,
        **{name: blocks[name] for name in q_names + k_names},
        num_warps=blocks["num_warps"], num_warps_backward=blocks["num_warps_backward"],
        num_stages=blocks["num_stages"],
        has_bias=bias is not None,
        bias_per_batch=bias is not None and bias.shape[0] != 1,
        bias_per_head=bias is not None and bias.shape[1] != 1,
        has_key_bias=key_bias is not None,
        dtype=jnp.dtype(q.dtype).name,
        softmax_clip=None if softmax_clip is None else (float(softmax_clip[0]), float(softmax_clip[1])),
    )


# ------------------------------------------------------------------------------------------------
# Memory access: the only place where the two lowerings differ inside a kernel
# ------------------------------------------------------------------------------------------------

def _positions(start, size: int, axis: int):
    """Returns start + [0, size) as an int32 column (axis 0: shape (size, 1)) or row (axis 1: (1, size))."""
    shape = (size, 1) if axis == 0 else (1, size)
    return start + lax.broadcasted_iota(jnp.int32, shape, axis)


def _and(*masks):
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    result = masks[0]
    for m in masks[1:]:
        result = result & m
    return result


def _dot(cfg, a, b, transpose_b=False):
    """Returns a @ b (or a @ b^T) accumulated in fp32."""
    dims = (((1,), (1 if transpose_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=cfg.precision, preferred_element_type=jnp.float32)


def _block_start(cfg, index, block):
    start = index * block
    # Mosaic needs to know dynamic row offsets are tile-aligned to emit aligned loads.
    return pl.multiple_of(start, block) if cfg.backend == "mosaic" else start


def _split_refs(cfg, refs, names):
    """Returns a dict name -> ref, skipping optional operands the config does not have."""
    present = [n for n in names
               if not ((n in ("bias", "dbias") and not cfg.has_bias)
                       or (n in ("key_bias", "dkey_bias") and not cfg.has_key_bias))]
    assert len(present) == len(refs), (present, len(refs))
    return dict(zip(present, refs))


def _column_valid(cfg, start_k, block_k):
    """Returns the (1, block_k) mask of real keys, or None when every key block is full."""
    if cfg.kv_len % block_k == 0:
        return None
    return _positions(start_k, block_k, 1) < cfg.kv_len


def _head_dim_valid(cfg):
    """Returns the (1, D_padded) mask of real head-dim columns on Triton, else None."""
    if not cfg.masked_io or cfg.head_dim == cfg.head_dim_padded:
        return None
    return _positions(0, cfg.head_dim_padded, 1) < cfg.head_dim


def _logits(cfg, refs, q, k, start_q, start_k, block_q, block_k, query_valid, key_valid):
    """Returns base-2 logits (q k^T * scale + bias + key_bias) * log2(e) of one (block_q, block_k) tile.

    start_q/start_k locate the tile inside the bias/key_bias refs this program sees (0 along an axis
    where the ref is already this program's own tile).
    """
    s = _dot(cfg, q, k, transpose_b=True) * (cfg.scale * LOG2_E)
    if cfg.has_key_bias:
        key_bias = _load(cfg, refs["key_bias"], cols=pl.ds(start_k, block_k), mask=key_valid)
        s = s + key_bias * LOG2_E
    if cfg.has_bias:
        tile = _load(cfg, refs["bias"], rows=pl.ds(start_q, block_q), cols=pl.ds(start_k, block_k),
                     mask=_and(query_valid, key_valid))
        s = s + tile.astype(jnp.float32) * LOG2_E
    return s


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------

def _loop(cfg, length: int, block: int, step, carry):
    """Returns `carry` after step(start, carry, is_partial) over each `block` of [0, length), a partial last one too."""
    num_full = length // block
    if num_full:
        carry = lax.fori_loop(0, num_full, lambda i, c: step(_block_start(cfg, i, block), c, False), carry)
    if length % block:
        carry = step(num_full * block, carry, True)
    return carry


def _key_tile(cfg, refs, q, start_k, block_q, block_k, query_valid, dim_valid, is_partial):
    """Returns (logits with -inf past the keys, key_valid (1, block_k), key_rows_valid (block_k, 1)) of one key tile."""
    key_valid = _column_valid(cfg, start_k, block_k) if is_partial else None
    key_rows_valid = (_positions(start_k, block_k, 0) < cfg.kv_len) if is_partial else None
    k = _load(cfg, refs["k"], rows=pl.ds(start_k, block_k), mask=_and(key_rows_valid, dim_valid))
    # This program's bias ref is its own (block_q, Nk) row tile, hence start_q = 0.
    s = _logits(cfg, refs, q, k, 0, start_k, block_q, block_k, query_valid, key_valid)
    if key_valid is not None:
        s = jnp.where(key_valid, s, -jnp.inf)
    return s, key_valid, key_rows_valid


def _forward_kernel(*refs, cfg: _Config):
    refs = _split_refs(cfg, refs, ("q", "k", "v", "bias", "key_bias", "out", "lse"))
    block_q, block_k = cfg.block_q, cfg.block_k
    start_q = pl.program_id(cfg.block_axis) * block_q
    query_valid = (_positions(start_q, block_q, 0) < cfg.q_len) if cfg.q_len % block_q else None
    dim_valid = _head_dim_valid(cfg)
    q = _load(cfg, refs["q"], mask=_and(query_valid, dim_valid))

    def step(start_k, carry, is_partial):
        accumulator, row_max, row_sum = carry
        s, _, key_rows_valid = _key_tile(cfg, refs, q, start_k, block_q, block_k, query_valid, dim_valid, is_partial)
        new_max = jnp.maximum(row_max, jnp.max(s, axis=1, keepdims=True))
        # A row whose logits are all -inf (a fully masked query) keeps max -inf; exponentiating
        # against 0 instead keeps it at p = 0 rather than NaN.
        safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)
        correction = jnp.exp2(row_max - safe_max)
        p = jnp.exp2(s - safe_max)
        row_sum = correction * row_sum + jnp.sum(p, axis=1, keepdims=True)
        v = _load(cfg, refs["v"], rows=pl.ds(start_k, block_k), mask=_and(key_rows_valid, dim_valid))
        accumulator = correction * accumulator + _dot(cfg, p.astype(v.dtype), v)
        return accumulator, new_max, row_sum

    carry = (jnp.zeros((block_q, cfg.head_dim_padded), jnp.float32),
             jnp.full((block_q, 1), -jnp.inf, jnp.float32),
             jnp.zeros((block_q, 1), jnp.float32))
    accumulator, row_max, row_sum = _loop(cfg, cfg.kv_len, block_k, step, carry)
    row_sum = jnp.where(row_sum == 0.0, 1.0, row_sum)
    lse2 = jnp.where(row_max == -jnp.inf, 0.0, row_max) + jnp.log2(row_sum)
    if cfg.softmax_clip is None:
        out = accumulator / row_sum
    else:
        out = _clipped_forward_pass(cfg, refs, q, lse2, query_valid, dim_valid)
    _store(cfg, refs["out"], out.astype(refs["out"].dtype), mask=_and(query_valid, dim_valid))
    _store(cfg, refs["lse"], lse2 * LN_2, mask=query_valid)


def _clip_tile(cfg, p, key_valid=None, query_valid=None):
    """Returns the clipped probabilities of a tile and the (0 < stretched < 1) mask their gradient passes."""
    gamma, zeta = cfg.softmax_clip
    stretched = (zeta - gamma) * p + gamma
    passes = (stretched > 0.0) & (stretched < 1.0)
    clipped = jnp.clip(stretched, 0.0, 1.0)
    # Keys past the sequence (and padded query rows) must not take the gamma > 0 floor of a clip.
    valid = _and(key_valid, query_valid)
    if valid is not None:
        clipped = jnp.where(valid, clipped, 0.0)
        passes = passes & valid
    return clipped, passes


def _clipped_forward_pass(cfg, refs, q, lse2, query_valid, dim_valid):
    """Returns sum_j clip(p_ij) v_j for one query block: a second pass over the keys with the final lse."""
    block_q, block_k = cfg.block_q, cfg.block_k

    def step(start_k, accumulator, is_partial):
        s, key_valid, key_rows_valid = _key_tile(cfg, refs, q, start_k, block_q, block_k, query_valid, dim_valid,
                                                 is_partial)
        clipped, _ = _clip_tile(cfg, jnp.exp2(s - lse2), key_valid)
        v = _load(cfg, refs["v"], rows=pl.ds(start_k, block_k), mask=_and(key_rows_valid, dim_valid))
        return accumulator + _dot(cfg, clipped.astype(v.dtype), v)

    return _loop(cfg, cfg.kv_len, block_k, step, jnp.zeros((block_q, cfg.head_dim_padded), jnp.float32))


def _dkdv_kernel(*refs, cfg: _Config):
    refs = _split_refs(cfg, refs, ("q", "k", "v", "bias", "key_bias", "do", "lse", "delta",
                                   "dk", "dv", "dbias", "dkey_bias"))
    block_q, block_k = cfg.block_q_dkv, cfg.block_k_dkv
    start_k = pl.program_id(cfg.block_axis) * block_k
    key_valid = _column_valid(cfg, start_k, block_k)
    key_rows_valid = (_positions(start_k, block_k, 0) < cfg.kv_len) if key_valid is not None else None
    dim_valid = _head_dim_valid(cfg)
    k = _load(cfg, refs["k"], mask=_and(key_rows_valid, dim_valid))
    v = _load(cfg, refs["v"], mask=_and(key_rows_valid, dim_valid))

    def step(start_q, carry, is_partial):
        dk, dv, *dkey_bias = carry
        queries = pl.ds(start_q, block_q)
        query_valid = (_positions(start_q, block_q, 0) < cfg.q_len) if is_partial else None
        q = _load(cfg, refs["q"], rows=queries, mask=_and(query_valid, dim_valid))
        do = _load(cfg, refs["do"], rows=queries, mask=_and(query_valid, dim_valid))
        lse = _load(cfg, refs["lse"], rows=queries, mask=query_valid)
        delta = _load(cfg, refs["delta"], rows=queries, mask=query_valid)
        # The bias ref is this program's (Nq, block_k) column tile and key_bias its (1, block_k) tile.
        s = _logits(cfg, refs, q, k, start_q, 0, block_q, block_k, query_valid, key_valid)
        if key_valid is not None:
            s = jnp.where(key_valid, s, -jnp.inf)
        p = jnp.exp2(s - lse * LOG2_E)
        if query_valid is not None:
            # Padded query rows have q = do = 0 but an arbitrary lse: p could overflow to inf there,
            # and inf * 0 would poison dK/dV with NaN.
            p = jnp.where(query_valid, p, 0.0)
        dp = _dot(cfg, do, v, transpose_b=True)
        if cfg.softmax_clip is None:
            dv = dv + _dot(cfg, p.astype(do.dtype).T, do)
        else:
            clipped, passes = _clip_tile(cfg, p, key_valid, query_valid)
            dv = dv + _dot(cfg, clipped.astype(do.dtype).T, do)
            dp = jnp.where(passes, dp * (cfg.softmax_clip[1] - cfg.softmax_clip[0]), 0.0)
        ds = p * (dp - delta)
        dk = dk + _dot(cfg, ds.astype(q.dtype).T, q)
        if cfg.has_bias:
            _store(cfg, refs["dbias"], ds, rows=queries, mask=_and(query_valid, key_valid))
        if cfg.has_key_bias:
            dkey_bias = [dkey_bias[0] + jnp.sum(ds, axis=0, keepdims=True)]
        return (dk, dv, *dkey_bias)

    carry = (jnp.zeros((block_k, cfg.head_dim_padded), jnp.float32),
             jnp.zeros((block_k, cfg.head_dim_padded), jnp.float32))
    if cfg.has_key_bias:
        carry += (jnp.zeros((1, block_k), jnp.float32),)
    num_full = cfg.q_len // block_q
    if num_full:
        carry = lax.fori_loop(
            0, num_full, lambda i, c: step(_block_start(cfg, i, block_q), c, False), carry)
    if cfg.q_len % block_q:
        carry = step(num_full * block_q, carry, True)
    dk, dv, *dkey_bias = carry
    out_mask = _and(key_rows_valid, dim_valid)
    _store(cfg, refs["dk"], (dk * cfg.scale).astype(refs["dk"].dtype), mask=out_mask)
    _store(cfg, refs["dv"], dv.astype(refs["dv"].dtype), mask=out_mask)
    if cfg.has_key_bias:
        _store(cfg, refs["dkey_bias"], dkey_bias[0], mask=key_valid)


def _dq_kernel(*refs, cfg: _Config):
    names = ("q", "k", "v", "bias", "key_bias", "do", "lse", "delta", "dq")
    refs = _split_refs(cfg, refs, names + (("delta_out",) if cfg.softmax_clip is not None else ()))
    block_q, block_k = cfg.block_q_dq, cfg.block_k_dq
    start_q = pl.program_id(cfg.block_axis) * block_q
    query_valid = (_positions(start_q, block_q, 0) < cfg.q_len) if cfg.q_len % block_q else None
    dim_valid = _head_dim_valid(cfg)
    q = _load(cfg, refs["q"], mask=_and(query_valid, dim_valid))
    do = _load(cfg, refs["do"], mask=_and(query_valid, dim_valid))
    lse2 = _load(cfg, refs["lse"], mask=query_valid) * LOG2_E
    delta = _load(cfg, refs["delta"], mask=query_valid)

    def probabilities(start_k, is_partial):
        """Returns (p, dP) of one key tile: dP = dO V^T, through the clip's gradient when clipping."""
        s, key_valid, key_rows_valid = _key_tile(cfg, refs, q, start_k, block_q, block_k, query_valid, dim_valid,
                                                 is_partial)
        keys = pl.ds(start_k, block_k)
        k = _load(cfg, refs["k"], rows=keys, mask=_and(key_rows_valid, dim_valid))
        v = _load(cfg, refs["v"], rows=keys, mask=_and(key_rows_valid, dim_valid))
        p = jnp.exp2(s - lse2)
        dp = _dot(cfg, do, v, transpose_b=True)
        if cfg.softmax_clip is not None:
            _, passes = _clip_tile(cfg, p, key_valid)
            dp = jnp.where(passes, dp * (cfg.softmax_clip[1] - cfg.softmax_clip[0]), 0.0)
        return p, dp, k

    def delta_step(start_k, row_delta, is_partial):
        p, dp, _ = probabilities(start_k, is_partial)
        return row_delta + jnp.sum(p * dp, axis=1, keepdims=True)

    def dq_step(start_k, dq, is_partial):
        p, dp, k = probabilities(start_k, is_partial)
        ds = p * (dp - delta)
        return dq + _dot(cfg, ds.astype(k.dtype), k)

    def over_keys(step, carry):
        return _loop(cfg, cfg.kv_len, block_k, step, carry)

    if cfg.softmax_clip is not None:
        # With clipping, delta_i = sum_j p_ij dP_ij is no longer do_i . o_i: one more pass over the keys
        # adds it to the incoming -d_lse, and the dK/dV kernel reads the total back.
        delta = over_keys(delta_step, delta)
        _store(cfg, refs["delta_out"], delta, mask=query_valid)
    dq = over_keys(dq_step, jnp.zeros((block_q, cfg.head_dim_padded), jnp.float32))
    _store(cfg, refs["dq"], (dq * cfg.scale).astype(refs["dq"].dtype), mask=_and(query_valid, dim_valid))


# ------------------------------------------------------------------------------------------------
# pallas_call plumbing: block specs per layout
# ------------------------------------------------------------------------------------------------

class _Specs:
    """BlockSpecs for one grid (block index, batch, head), in the backend's array layout.

    triton arrays: q-like (B, N, H, D); grid (blocks, B, H).
    mosaic arrays: q-like (B, H, N_padded, D_padded); grid (B, H, blocks).
    Per-row statistics (lse, delta): (B, H, N, 1). key_bias: (B, 1, Nk). bias: (B|1, H|1, Nq, Nk).
    """

    def __init__(self, cfg: _Config):
        self.cfg = cfg

    def _ids(self, grid_ids):
        """Returns (block index, batch, head) from the grid ids in the backend's order."""
        if self.cfg.backend == "triton":
            block, batch, head = grid_ids
        else:
            batch, head, block = grid_ids
        return block, batch, head

    def grid(self, num_blocks):
        """Returns the grid for `num_blocks` sequence blocks."""
        cfg = self.cfg
        # Triton: the block index varies fastest, so programs sharing a head's K/V run together.
        return ((num_blocks, cfg.batch, cfg.heads) if cfg.backend == "triton"
                else (cfg.batch, cfg.heads, num_blocks))

    def tokens(self, rows, blocked: bool):
        """Returns the spec of a (B, N, H, D) array: one `rows` tile if blocked, else the whole sequence."""
        dim = self.cfg.head_dim_padded
        if self.cfg.backend == "triton":
            def index_map(*grid_ids):
                block, batch, head = self._ids(grid_ids)
                return batch, block if blocked else 0, head, 0
            return pl.BlockSpec((None, rows, None, dim), index_map)

        def index_map(*grid_ids):
            block, batch, head = self._ids(grid_ids)
            return batch, head, block if blocked else 0, 0
        return pl.BlockSpec((None, None, rows, dim), index_map)

    def row_stats(self, rows, blocked: bool):
        """Returns the spec of an lse/delta array (B, H, Nq, 1)."""
        def index_map(*grid_ids):
            block, batch, head = self._ids(grid_ids)
            return batch, head, block if blocked else 0, 0
        return pl.BlockSpec((None, None, rows, 1), index_map)

    def key_bias(self, cols, blocked: bool):
        """Returns the spec of key_bias (B, 1, Nk)."""
        def index_map(*grid_ids):
            block, batch, _ = self._ids(grid_ids)
            return batch, 0, block if blocked else 0
        return pl.BlockSpec((None, 1, cols), index_map)

    def bias(self, rows, cols, block_rows: bool, per_batch: bool, per_head: bool):
        """Returns the spec of a (B|1, H|1, Nq, Nk) bias or dbias: a row tile or a column tile."""
        def index_map(*grid_ids):
            block, batch, head = self._ids(grid_ids)
            return (batch if per_batch else 0, head if per_head else 0,
                    block if block_rows else 0, 0 if block_rows else block)
        return pl.BlockSpec((None, None, rows, cols), index_map)


def _compiler_params(cfg: _Config, num_warps):
    """Returns the compiler params of one of the three kernels (grid: block, batch, head)."""
    return common.compiler_params(cfg.backend, 3, num_warps=num_warps, num_stages=cfg.num_stages)


def _stat_shape(cfg, length):
    return jax.ShapeDtypeStruct((cfg.batch, cfg.heads, length, 1), jnp.float32)




def _whole(length: int, block: int) -> int:
    """Returns the extent of a whole-sequence block: `length` rounded up to whole tiles.

    The in-kernel loops slice tiles of `block` rows, so the block a program sees must cover them
    (the interpreter pads to it; Triton only computes addresses from it and masks the rest).
    """
    return common.round_up(length, block)


def _forward_call(cfg: _Config, q, k, v, bias, key_bias):
    """Returns (out, lse): out like q, lse (B, H, Nq[_padded], 1) fp32 in natural-log units."""
    specs = _Specs(cfg)
    all_keys = _whole(cfg.kv_len_padded, cfg.block_k)
    in_specs = [specs.tokens(cfg.block_q, True), specs.tokens(all_keys, False), specs.tokens(all_keys, False)]
    operands = [q, k, v]
    if cfg.has_bias:
        in_specs.append(specs.bias(cfg.block_q, all_keys, True, cfg.bias_per_batch, cfg.bias_per_head))
        operands.append(bias)
    if cfg.has_key_bias:
        in_specs.append(specs.key_bias(all_keys, False))
        operands.append(key_bias)
    return pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg),
        grid=specs.grid(pl.cdiv(cfg.q_len, cfg.block_q)),
        in_specs=in_specs,
        out_specs=[specs.tokens(cfg.block_q, True), specs.row_stats(cfg.block_q, True)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), _stat_shape(cfg, cfg.q_len_padded)],
        compiler_params=_compiler_params(cfg, cfg.num_warps),
        interpret=cfg.interpret,
        name="vitjax_attention_forward",
    )(*operands)


def _dkdv_call(cfg: _Config, q, k, v, bias, key_bias, d_out, lse, delta):
    """Returns (dk, dv, dbias (B, H, Nq, Nk) fp32 or None, dkey_bias (B, H, 1, Nk) fp32 or None)."""
    specs = _Specs(cfg)
    block_k = cfg.block_k_dkv
    all_queries = _whole(cfg.q_len_padded, cfg.block_q_dkv)
    in_specs = [specs.tokens(all_queries, False), specs.tokens(block_k, True), specs.tokens(block_k, True)]
    operands = [q, k, v]
    if cfg.has_bias:
        in_specs.append(specs.bias(all_queries, block_k, False, cfg.bias_per_batch, cfg.bias_per_head))
        operands.append(bias)
    if cfg.has_key_bias:
        in_specs.append(specs.key_bias(block_k, True))
        operands.append(key_bias)
    in_specs += [specs.tokens(all_queries, False), specs.row_stats(all_queries, False),
                 specs.row_stats(all_queries, False)]
    operands += [d_out, lse, delta]
    out_specs = [specs.tokens(block_k, True), specs.tokens(block_k, True)]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    if cfg.has_bias:
        out_specs.append(specs.bias(all_queries, block_k, False, True, True))
        out_shape.append(jax.ShapeDtypeStruct(
            (cfg.batch, cfg.heads, cfg.q_len_padded, cfg.kv_len_padded), jnp.float32))
    if cfg.has_key_bias:
        out_specs.append(specs.bias(1, block_k, False, True, True))
        out_shape.append(jax.ShapeDtypeStruct((cfg.batch, cfg.heads, 1, cfg.kv_len_padded), jnp.float32))
    results = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg),
        grid=specs.grid(pl.cdiv(cfg.kv_len, block_k)),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(cfg, cfg.num_warps_backward),
        interpret=cfg.interpret,
        name="vitjax_attention_backward_dkdv",
    )(*operands)
    dk, dv, *rest = results
    dbias = rest.pop(0) if cfg.has_bias else None
    dkey_bias = rest.pop(0) if cfg.has_key_bias else None
    return dk, dv, dbias, dkey_bias


def _dq_call(cfg: _Config, q, k, v, bias, key_bias, d_out, lse, delta):
    """Returns (dq like q, delta): with clipping the delta the dK/dV kernel needs, computed here; else `delta`."""
    specs = _Specs(cfg)
    block_q = cfg.block_q_dq
    all_keys = _whole(cfg.kv_len_padded, cfg.block_k_dq)
    in_specs = [specs.tokens(block_q, True), specs.tokens(all_keys, False), specs.tokens(all_keys, False)]
    operands = [q, k, v]
    if cfg.has_bias:
        in_specs.append(specs.bias(block_q, all_keys, True, cfg.bias_per_batch, cfg.bias_per_head))
        operands.append(bias)
    if cfg.has_key_bias:
        in_specs.append(specs.key_bias(all_keys, False))
        operands.append(key_bias)
    in_specs += [specs.tokens(block_q, True), specs.row_stats(block_q, True), specs.row_stats(block_q, True)]
    operands += [d_out, lse, delta]
    out_specs, out_shape = [specs.tokens(block_q, True)], [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if cfg.softmax_clip is not None:
        out_specs.append(specs.row_stats(block_q, True))
        out_shape.append(jax.ShapeDtypeStruct(delta.shape, jnp.float32))
    results = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=specs.grid(pl.cdiv(cfg.q_len, block_q)),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(cfg, cfg.num_warps_backward),
        interpret=cfg.interpret,
        name="vitjax_attention_backward_dq",
    )(*operands)
    return results[0], (results[1] if cfg.softmax_clip is not None else delta)


# ------------------------------------------------------------------------------------------------
# custom_vjp
# ------------------------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention_core(cfg, q, k, v, bias, key_bias):
    """Returns (out, lse) on arrays already in the backend's layout."""
    return tuple(_forward_call(cfg, q, k, v, bias, key_bias))


def _attention_core_forward(cfg, q, k, v, bias, key_bias):
    out, lse = _forward_call(cfg, q, k, v, bias, key_bias)
    return (out, lse), (q, k, v, bias, key_bias, out, lse)


def _attention_core_backward(cfg, residuals, cotangents):
    q, k, v, bias, key_bias, out, lse = residuals
    d_out, d_lse = cotangents
    # delta_i = sum_j p_ij dp_ij = do_i . o_i; a gradient arriving through lse adds p_ij * d_lse_i to
    # d logits_ij, which is the same as lowering delta_i by d_lse_i.
    if cfg.softmax_clip is None:
        delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)
        if cfg.backend == "triton":
            delta = jnp.swapaxes(delta, 1, 2)  # (B, N, H) -> (B, H, N)
        delta = delta[..., None] - d_lse
    else:
        delta = -d_lse  # the dQ kernel adds sum_j p_ij dP_ij
    dq, delta = _dq_call(cfg, q, k, v, bias, key_bias, d_out, lse, delta)
    dk, dv, dbias, dkey_bias = _dkdv_call(cfg, q, k, v, bias, key_bias, d_out, lse, delta)
    if cfg.has_bias:
        broadcast_axes = tuple(axis for axis, kept in ((0, cfg.bias_per_batch), (1, cfg.bias_per_head))
                               if not kept)
        dbias = jnp.sum(dbias, axis=broadcast_axes, keepdims=True) if broadcast_axes else dbias
        dbias = dbias[:, :, :bias.shape[2], :bias.shape[3]].astype(bias.dtype)
    if cfg.has_key_bias:
        dkey_bias = jnp.sum(dkey_bias, axis=1).astype(key_bias.dtype)
    return dq, dk, dv, dbias, dkey_bias


_attention_core.defvjp(_attention_core_forward, _attention_core_backward)


# ------------------------------------------------------------------------------------------------
# Public entry point
# ------------------------------------------------------------------------------------------------

default_backend = common.default_backend


def mosaic_vmem_bytes(q_len: int, kv_len: int, head_dim: int, dtype, *, bias: bool, key_bias: bool,
                      block_sizes: Optional[BlockSizes] = None) -> int:
    """Returns the VMEM bytes the largest of the three Mosaic kernels needs (forward, dK/dV, dQ).

    Each input and output block is double-buffered and lives in (8, 128) tiles; the kernels keep the
    whole key/value sequence (forward, dQ) or the whole query sequence with its lse and delta (dK/dV)
    resident. Agrees with the TPU compiler's "Used X of 16.00M vmem" within 0.7 MiB in every failing
    case of experiments/kernel_compile_table.py.
    """
    blocks = block_sizes or BlockSizes()
    defaults = default_block_sizes("mosaic", head_dim)
    pick = lambda name: getattr(blocks, name) or getattr(defaults, name)  # noqa: E731
    lanes = common.round_up(head_dim, LANES)   # VMEM tiles pad the lanes whatever the HBM layout
    size = jnp.dtype(dtype).itemsize
    q_blocks = [common.mosaic_tile(n, pick(n), q_len, LANES) for n in ("block_q", "block_q_dkv", "block_q_dq")]
    k_blocks = [common.mosaic_tile(n, pick(n), kv_len, LANES) for n in ("block_k", "block_k_dkv", "block_k_dq")]
    q_all = common.round_up(q_len, math.lcm(*q_blocks))
    k_all = common.round_up(kv_len, math.lcm(*k_blocks))
    stat = LANES * 4  # an (N, 1) fp32 column of lse / delta fills whole 128-lane rows
    block_q, block_k_dkv, block_q_dq = q_blocks[0], k_blocks[1], q_blocks[2]
    forward = (2 * block_q * lanes * size + 2 * k_all * lanes * size + block_q * stat
               + (block_q * k_all * 4 if bias else 0) + (8 * k_all * 4 if key_bias else 0))
    dkdv = (2 * q_all * lanes * size + 4 * block_k_dkv * lanes * size + 2 * q_all * stat
            + (2 * q_all * block_k_dkv * 4 if bias else 0) + (2 * 8 * block_k_dkv * 4 if key_bias else 0))
    dq = (3 * block_q_dq * lanes * size + 2 * k_all * lanes * size + 2 * block_q_dq * stat
          + (block_q_dq * k_all * 4 if bias else 0) + (8 * k_all * 4 if key_bias else 0))
    return 2 * max(forward, dkdv, dq)


def unsupported_reason(q, k, v, *, bias=None, key_bias=None, backend: Optional[str] = None,
                       interpret: Optional[bool] = None) -> Optional[str]:
    """Returns why `flash_attention` cannot take these operands (compiled as `backend` / `interpret` say,
    by default the target platform's), or None when it can."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        return f"q, k, v must be (batch, length, heads, head_dim), got shapes {q.shape}, {k.shape}, {v.shape}"
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        return f"incompatible shapes q {q.shape}, k {k.shape}, v {v.shape}"
    if q.dtype != k.dtype or q.dtype != v.dtype:
        return f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}"
    dtype_reason = common.dtype_unsupported_reason(q.dtype, backend, interpret)
    if dtype_reason is not None:
        return dtype_reason
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if min(q.shape[1], k.shape[1]) == 0:
        return "empty sequence"
    batch, q_len, heads, _ = q.shape
    if bias is not None:
        if bias.ndim > 4 or not jnp.issubdtype(bias.dtype, jnp.floating):
            return f"bias must be a float array broadcastable to (B, H, Nq, Nk), got {bias.dtype}{bias.shape}"
        full = (1,) * (4 - bias.ndim) + tuple(bias.shape)
        for have, want in zip(full, (batch, heads, q_len, k.shape[1])):
            if have not in (1, want):
                return f"bias shape {bias.shape} is not broadcastable to {(batch, heads, q_len, k.shape[1])}"
    if key_bias is not None:
        kb_shape = (1,) * (2 - key_bias.ndim) + tuple(key_bias.shape)
        if key_bias.ndim > 2 or kb_shape[0] not in (1, batch) or kb_shape[1] != k.shape[1]:
            return f"key_bias must be (batch, Nk) = {(batch, k.shape[1])}, got {key_bias.shape}"
    triton_compiled = ((common.default_backend() if backend is None else backend) == "triton"
                       and not (common.platform() == "cpu" if interpret is None else interpret))
    if triton_compiled and jnp.dtype(q.dtype) == jnp.float32 and q.shape[-1] > MAX_TRITON_FP32_HEAD_DIM:
        return (f"fp32 with head dim {q.shape[-1]} > {MAX_TRITON_FP32_HEAD_DIM} needs 295-328 KB of shared memory "
                f"per Triton program on sm_90a, over the 227 KB an H100 has; use bf16 or 'xla'")
    if common.compiles_for_tpu(backend, interpret):
        needed = mosaic_vmem_bytes(q_len, k.shape[1], q.shape[-1], q.dtype, bias=bias is not None,
                                   key_bias=key_bias is not None)
        budget = common.tpu_vmem_budget()
        if needed > budget:
            return (f"Nq={q_len}, Nk={k.shape[1]}{' with a bias' if bias is not None else ''} needs "
                    f"{needed / 2**20:.1f} MiB of VMEM, over the {budget / 2**20:.1f} MiB of "
                    f"{common.tpu_device_kind() or 'the smallest TPU (v4)'} (the kernels keep a whole sequence "
                    f"resident); use 'xla' or shorter sequences")
    return None


def flash_attention(q, k, v, *, bias=None, key_bias=None, scale: Optional[float] = None,
                    return_lse: bool = False, block_sizes: Optional[BlockSizes] = None,
                    backend: Optional[str] = None, interpret: Optional[bool] = None, softmax_clip=None):
    """Returns the fused-attention output (B, Nq, H, D), and with return_lse also lse (B, H, Nq) fp32.

    q: (B, Nq, H, D); k, v: (B, Nk, H, D); fp32, bf16 or fp16 (fp32 accumulation either way).
    bias: broadcastable to (B, H, Nq, Nk); key_bias: (B, Nk). Gradients flow to q, k, v, bias,
    key_bias (and through lse when it is returned).
    backend: "triton" (GPU) or "mosaic" (TPU); defaults to the platform's. interpret defaults to True
    on a CPU (the same kernel evaluated op by op; logged once).
    softmax_clip: (gamma, zeta) for the clipped softmax (`clip_probabilities`): a second pass over the keys
    forward, and one more in the dQ kernel backward (lse is still the plain softmax's).
    """
    backend, interpret = common.resolve_backend("vitjax attention kernel", backend, interpret)
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    bias = None if bias is None else jnp.asarray(bias)
    key_bias = None if key_bias is None else jnp.asarray(key_bias)
    reason = unsupported_reason(q, k, v, bias=bias, key_bias=key_bias, backend=backend, interpret=interpret)
    if reason is not None:
        raise ValueError(f"flash_attention: {reason}")
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    scale = head_dim ** -0.5 if scale is None else scale
    # Broadcasting happens out here, so autodiff folds the gradients back to the caller's shapes.
    if bias is not None:
        bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
        bias = jnp.broadcast_to(bias, bias.shape[:2] + (q_len, kv_len))
    if key_bias is not None:
        key_bias = jnp.broadcast_to(key_bias.reshape((1,) * (2 - key_bias.ndim) + key_bias.shape),
                                    (batch, kv_len))
        key_bias = key_bias.astype(jnp.float32)[:, None, :]
    cfg = _make_config(q, k, bias, key_bias, scale, block_sizes or BlockSizes(), backend, interpret, softmax_clip)

    if backend == "triton":
        out, lse = _attention_core(cfg, q, k, v, bias, key_bias)
        lse = lse[..., 0]
    else:
        def to_kernel_layout(x, length):
            x = jnp.swapaxes(x, 1, 2)
            return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, cfg.head_dim_padded - head_dim)))
        q_p = to_kernel_layout(q, cfg.q_len_padded)
        k_p = to_kernel_layout(k, cfg.kv_len_padded)
        v_p = to_kernel_layout(v, cfg.kv_len_padded)
        if bias is not None:
            bias = jnp.pad(bias, ((0, 0), (0, 0), (0, cfg.q_len_padded - q_len), (0, cfg.kv_len_padded - kv_len)))
        if key_bias is not None:
            key_bias = jnp.pad(key_bias, ((0, 0), (0, 0), (0, cfg.kv_len_padded - kv_len)))
        out, lse = _attention_core(cfg, q_p, k_p, v_p, bias, key_bias)
        out = jnp.swapaxes(out[:, :, :q_len, :head_dim], 1, 2)
        lse = lse[:, :, :q_len, 0]
    return (out, lse) if return_lse else out
