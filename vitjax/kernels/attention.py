"""FlashAttention-style fused attention in Pallas, forward and backward, with its pure-jnp reference.

`flash_attention(q, k, v, bias=..., key_bias=...)` computes softmax(q k^T / sqrt(d) + bias + key_bias) v
tile by tile with an online softmax (FlashAttention-2), so the N x N score matrix never reaches memory
(except dbias, which *is* an N x N array when a full bias needs a gradient). The backward pass is a
`jax.custom_vjp` whose work is two more Pallas kernels: one owning a block of keys (dK, dV, dkey_bias,
dbias) and one owning a block of queries (dQ); both recompute the probabilities from the saved
log-sum-exp instead of storing them.

The two lowerings share the tile math (`_logits`, `_clip_tile`, the online softmax) but not the loop:
- "triton" (GPU): one program per query (or key) block loops over the other sequence inside the kernel,
  reading HBM directly; arrays stay in the caller's (batch, length, heads, head_dim) layout, nothing is
  padded or transposed; blocks that run past the sequence or the head dim are read and written with
  masked loads and stores. Triton wants power-of-two tiles, so head dim 80 uses a 128-wide tile.
- "mosaic" (TPU): the grid streams the other sequence's blocks through VMEM as its innermost axis,
  with the running max / sum / accumulators in VMEM scratch (as jax's own TPU flash attention does), so
  VMEM use does not grow with N; lse and delta travel as compact (B, H, 1, N) rows. Arrays are
  transposed to (batch, heads, length, head_dim) and zero-padded to whole tiles (one fused copy),
  because Mosaic tiles are (8, 128)-aligned and plain loads cannot be masked.
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
    return index * block


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
    start_q = pl.program_id(0) * block_q
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
    start_k = pl.program_id(0) * block_k
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
    start_q = pl.program_id(0) * block_q
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
    """BlockSpecs of the Triton grids (block index, batch, head); the Mosaic ones are `_StreamSpecs`.

    Arrays: q-like (B, N, H, D); per-row statistics (lse, delta) (B, H, N, 1); key_bias (B, 1, Nk);
    bias (B|1, H|1, Nq, Nk).
    """

    def __init__(self, cfg: _Config):
        self.cfg = cfg

    def _ids(self, grid_ids):
        """Returns (block index, batch, head) from the grid ids."""
        block, batch, head = grid_ids
        return block, batch, head

    def grid(self, num_blocks):
        """Returns the grid for `num_blocks` sequence blocks."""
        cfg = self.cfg
        # The block index varies fastest, so programs sharing a head's K/V run together.
        return num_blocks, cfg.batch, cfg.heads

    def tokens(self, rows, blocked: bool):
        """Returns the spec of a (B, N, H, D) array: one `rows` tile if blocked, else the whole sequence."""
        def index_map(*grid_ids):
            block, batch, head = self._ids(grid_ids)
            return batch, block if blocked else 0, head, 0
        return pl.BlockSpec((None, rows, None, self.cfg.head_dim_padded), index_map)

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
# Mosaic (TPU): kernels that stream key/value (or query) blocks through VMEM
# ------------------------------------------------------------------------------------------------
# The grid's innermost ("arbitrary") axis walks the blocks of the sequence being reduced over, one tile
# of each operand in VMEM at a time (the pipeline fetches the next while this one computes); running
# statistics and accumulators live in VMEM scratch across those steps. VMEM use is therefore set by the
# tile sizes, not by N. The Triton kernels above keep the in-kernel loop: a GPU program reads HBM
# directly, there is nothing to stream into.
#
# Forward and dQ grids: (batch, head, query block, pass, key block); dK/dV: (batch, head, key block,
# query block). The pass axis has length 2 only for the clipped softmax, which needs every probability
# normalised before it is clipped: pass 0 finds the log-sum-exp (forward) or delta (dQ), pass 1 uses it.
#
# lse and delta travel as (B, H, 1, N) rows: as (B, H, N, 1) columns every value fills a 128-lane row of
# a TPU tile in HBM and in VMEM (the "lane-padded 128x" residual of issue 18).

def _row(column):
    """Returns a (n, 1) column as a (1, n) row (via one aligned (n, 128) transpose, which Mosaic lowers)."""
    return jnp.broadcast_to(column, (column.shape[0], LANES)).T[:1, :]


def _column(row):
    """Returns a (1, n) row as a (n, 1) column."""
    return jnp.broadcast_to(row, (LANES, row.shape[1])).T[:, :1]


def _stream_logits(cfg, refs, start_q, start_k, block_q, block_k):
    """Returns the base-2 logits of this step's (block_q, block_k) tile: -inf past the keys, and the query-row mask."""
    q, k = refs["q"][...], refs["k"][...]
    s = _logits(cfg, refs, q, k, 0, 0, block_q, block_k, None, None)
    key_valid = _column_valid(cfg, start_k, block_k)
    if key_valid is not None:
        s = jnp.where(key_valid, s, -jnp.inf)
    query_valid = (_positions(start_q, block_q, 0) < cfg.q_len) if cfg.q_len % block_q else None
    return s, key_valid, query_valid


def _passes(cfg) -> int:
    return 1 if cfg.softmax_clip is None else 2


def _stream_forward_kernel(*refs, cfg: _Config):
    refs, (max_ref, sum_ref, acc_ref) = refs[:-3], refs[-3:]
    refs = _split_refs(cfg, refs, ("q", "k", "v", "bias", "key_bias", "out", "lse"))
    block_q, block_k = cfg.block_q, cfg.block_k
    pass_id, key_block, last_key = pl.program_id(3), pl.program_id(4), pl.num_programs(4) - 1
    s, key_valid, _ = _stream_logits(cfg, refs, pl.program_id(2) * block_q, key_block * block_k, block_q, block_k)

    @pl.when((pass_id == 0) & (key_block == 0))
    def _():
        max_ref[...] = jnp.full(max_ref.shape, -jnp.inf, jnp.float32)
        sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(pass_id == 0)
    def _():
        row_max = max_ref[...]
        new_max = jnp.maximum(row_max, jnp.max(s, axis=1, keepdims=True))
        # A row whose logits are all -inf so far keeps max -inf; exponentiating against 0 keeps p = 0, not NaN.
        safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)
        correction = jnp.exp2(row_max - safe_max)
        p = jnp.exp2(s - safe_max)
        sum_ref[...] = correction * sum_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        max_ref[...] = new_max
        if cfg.softmax_clip is None:
            v = refs["v"][...]
            acc_ref[...] = correction * acc_ref[...] + _dot(cfg, p.astype(v.dtype), v)

    @pl.when((pass_id == 0) & (key_block == last_key))
    def _():
        row_sum = jnp.where(sum_ref[...] == 0.0, 1.0, sum_ref[...])
        lse2 = jnp.where(max_ref[...] == -jnp.inf, 0.0, max_ref[...]) + jnp.log2(row_sum)
        refs["lse"][...] = _row(lse2 * LN_2)
        if cfg.softmax_clip is None:
            refs["out"][...] = (acc_ref[...] / row_sum).astype(refs["out"].dtype)
        else:
            max_ref[...] = lse2  # pass 1 reads the final base-2 lse from here

    if cfg.softmax_clip is not None:
        @pl.when(pass_id == 1)
        def _():
            clipped, _ = _clip_tile(cfg, jnp.exp2(s - max_ref[...]), key_valid)
            v = refs["v"][...]
            acc_ref[...] += _dot(cfg, clipped.astype(v.dtype), v)

        @pl.when((pass_id == 1) & (key_block == last_key))
        def _():
            refs["out"][...] = acc_ref[...].astype(refs["out"].dtype)


def _stream_probabilities(cfg, refs, s, lse2, key_valid, query_valid):
    """Returns (p, dP) of one tile: dP = dO V^T, through the clip's gradient when clipping; p = 0 on padded queries."""
    p = jnp.exp2(s - lse2)
    if query_valid is not None:
        # Padded query rows have q = dO = 0 but an arbitrary lse: p could overflow to inf there, and
        # inf * 0 would poison dK/dV with NaN.
        p = jnp.where(query_valid, p, 0.0)
    dp = _dot(cfg, refs["do"][...], refs["v"][...], transpose_b=True)
    if cfg.softmax_clip is not None:
        _, passes = _clip_tile(cfg, p, key_valid, query_valid)
        dp = jnp.where(passes, dp * (cfg.softmax_clip[1] - cfg.softmax_clip[0]), 0.0)
    return p, dp


def _stream_dq_kernel(*refs, cfg: _Config):
    names = ("q", "k", "v", "bias", "key_bias", "do", "lse", "delta", "dq")
    refs, (dq_ref, delta_ref) = refs[:-2], refs[-2:]
    refs = _split_refs(cfg, refs, names + (("delta_out",) if cfg.softmax_clip is not None else ()))
    block_q, block_k = cfg.block_q_dq, cfg.block_k_dq
    pass_id, key_block, last_key = pl.program_id(3), pl.program_id(4), pl.num_programs(4) - 1
    last_pass = _passes(cfg) - 1
    s, key_valid, query_valid = _stream_logits(cfg, refs, pl.program_id(2) * block_q, key_block * block_k,
                                               block_q, block_k)
    p, dp = _stream_probabilities(cfg, refs, s, _column(refs["lse"][...]) * LOG2_E, key_valid, query_valid)

    @pl.when((pass_id == 0) & (key_block == 0))
    def _():
        dq_ref[...] = jnp.zeros(dq_ref.shape, jnp.float32)
        delta_ref[...] = _column(refs["delta"][...])

    if cfg.softmax_clip is not None:
        # With clipping, delta_i = sum_j p_ij dP_ij is no longer do_i . o_i: pass 0 adds it to the incoming
        # -d_lse, and the dK/dV kernel reads the total back.
        @pl.when(pass_id == 0)
        def _():
            delta_ref[...] += jnp.sum(p * dp, axis=1, keepdims=True)

    @pl.when(pass_id == last_pass)
    def _():
        ds = p * (dp - delta_ref[...])
        k = refs["k"][...]
        dq_ref[...] += _dot(cfg, ds.astype(k.dtype), k)

    @pl.when((pass_id == last_pass) & (key_block == last_key))
    def _():
        refs["dq"][...] = (dq_ref[...] * cfg.scale).astype(refs["dq"].dtype)
        if cfg.softmax_clip is not None:
            refs["delta_out"][...] = _row(delta_ref[...])


def _stream_dkdv_kernel(*refs, cfg: _Config):
    scratch = 3 if cfg.has_key_bias else 2
    refs, (dk_ref, dv_ref, *dkey_bias_ref) = refs[:-scratch], refs[-scratch:]
    refs = _split_refs(cfg, refs, ("q", "k", "v", "bias", "key_bias", "do", "lse", "delta",
                                   "dk", "dv", "dbias", "dkey_bias"))
    block_q, block_k = cfg.block_q_dkv, cfg.block_k_dkv
    query_block, last_query = pl.program_id(3), pl.num_programs(3) - 1
    s, key_valid, query_valid = _stream_logits(cfg, refs, query_block * block_q, pl.program_id(2) * block_k,
                                               block_q, block_k)
    p, dp = _stream_probabilities(cfg, refs, s, _column(refs["lse"][...]) * LOG2_E, key_valid, query_valid)
    do = refs["do"][...]

    @pl.when(query_block == 0)
    def _():
        dk_ref[...] = jnp.zeros(dk_ref.shape, jnp.float32)
        dv_ref[...] = jnp.zeros(dv_ref.shape, jnp.float32)
        if cfg.has_key_bias:
            dkey_bias_ref[0][...] = jnp.zeros(dkey_bias_ref[0].shape, jnp.float32)

    weights = p if cfg.softmax_clip is None else _clip_tile(cfg, p, key_valid, query_valid)[0]
    dv_ref[...] += _dot(cfg, weights.astype(do.dtype).T, do)
    delta = _column(refs["delta"][...])
    if query_valid is not None:
        # A query block may reach past the rows the forward and dQ grids wrote (block_q_dkv > block_q): their
        # lse and delta are whatever HBM held, and 0 * NaN would still be NaN.
        delta = jnp.where(query_valid, delta, 0.0)
    ds = p * (dp - delta)
    q = refs["q"][...]
    dk_ref[...] += _dot(cfg, ds.astype(q.dtype).T, q)
    if cfg.has_bias:
        refs["dbias"][...] = ds
    if cfg.has_key_bias:
        dkey_bias_ref[0][...] += jnp.sum(ds, axis=0, keepdims=True)

    @pl.when(query_block == last_query)
    def _():
        refs["dk"][...] = (dk_ref[...] * cfg.scale).astype(refs["dk"].dtype)
        refs["dv"][...] = dv_ref[...].astype(refs["dv"].dtype)
        if cfg.has_key_bias:
            refs["dkey_bias"][...] = dkey_bias_ref[0][...]


class _StreamSpecs:
    """BlockSpecs of the Mosaic grids, all tiles: q-like (B, H, N, D), bias (B|1, H|1, Nq, Nk),
    key_bias (B, 1, Nk), lse/delta rows (B, H, 1, Nq), dkey_bias (B, H, 1, Nk).

    `key_major` grids are (batch, head, key block, query block), else (batch, head, query block, pass, key block).
    """

    def __init__(self, cfg: _Config, block_q: int, block_k: int, key_major: bool):
        self.cfg, self.block_q, self.block_k, self.key_major = cfg, block_q, block_k, key_major

    def _ids(self, grid_ids):
        """Returns (batch, head, query block, key block) from the grid ids."""
        if self.key_major:
            batch, head, key_block, query_block = grid_ids
        else:
            batch, head, query_block, _, key_block = grid_ids
        return batch, head, query_block, key_block

    def grid(self):
        """Returns the grid, the reduced-over blocks innermost."""
        cfg = self.cfg
        num_q, num_k = pl.cdiv(cfg.q_len, self.block_q), pl.cdiv(cfg.kv_len, self.block_k)
        if self.key_major:
            return cfg.batch, cfg.heads, num_k, num_q
        return cfg.batch, cfg.heads, num_q, _passes(cfg), num_k

    def tokens(self, by_query: bool):
        """Returns the spec of one (block, D) tile of a q-like (by_query) or k-like array."""
        rows = self.block_q if by_query else self.block_k

        def index_map(*grid_ids):
            batch, head, query_block, key_block = self._ids(grid_ids)
            return batch, head, query_block if by_query else key_block, 0
        return pl.BlockSpec((None, None, rows, self.cfg.head_dim_padded), index_map)

    def row(self, by_query: bool):
        """Returns the spec of one (1, block) tile of a (B, H, 1, N) row array: lse, delta, dkey_bias."""
        def index_map(*grid_ids):
            batch, head, query_block, key_block = self._ids(grid_ids)
            return batch, head, 0, query_block if by_query else key_block
        return pl.BlockSpec((None, None, 1, self.block_q if by_query else self.block_k), index_map)

    def bias(self, per_batch: bool, per_head: bool):
        """Returns the spec of one (block_q, block_k) tile of a bias or dbias."""
        def index_map(*grid_ids):
            batch, head, query_block, key_block = self._ids(grid_ids)
            return batch if per_batch else 0, head if per_head else 0, query_block, key_block
        return pl.BlockSpec((None, None, self.block_q, self.block_k), index_map)

    def key_bias(self):
        """Returns the spec of one (1, block_k) tile of key_bias (B, 1, Nk)."""
        def index_map(*grid_ids):
            batch, _, _, key_block = self._ids(grid_ids)
            return batch, 0, key_block
        return pl.BlockSpec((None, 1, self.block_k), index_map)

    def inputs(self, bias, key_bias):
        """Returns (specs, operands) of q, k, v and the biases the config has."""
        cfg = self.cfg
        specs = [self.tokens(True), self.tokens(False), self.tokens(False)]
        extra = []
        if cfg.has_bias:
            specs.append(self.bias(cfg.bias_per_batch, cfg.bias_per_head))
            extra.append(bias)
        if cfg.has_key_bias:
            specs.append(self.key_bias())
            extra.append(key_bias)
        return specs, extra

    def call(self, kernel, name, in_specs, out_specs, out_shape, scratch):
        """Returns the pallas_call of `kernel` over this grid with VMEM `scratch` [(shape, dtype)]."""
        from jax.experimental.pallas import tpu as pltpu
        grid = self.grid()
        semantics = ("parallel",) * (len(grid) - (1 if self.key_major else 2))
        semantics += ("arbitrary",) * (len(grid) - len(semantics))
        return pl.pallas_call(
            functools.partial(kernel, cfg=self.cfg),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=0, grid=grid, in_specs=in_specs, out_specs=out_specs,
                scratch_shapes=[pltpu.VMEM(shape, jnp.float32) for shape in scratch]),
            out_shape=out_shape,
            compiler_params=common.compiler_params("mosaic", len(grid), dimension_semantics=semantics),
            interpret=self.cfg.interpret,
            name=name,
        )


def _row_shape(cfg, length):
    return jax.ShapeDtypeStruct((cfg.batch, cfg.heads, 1, length), jnp.float32)


def _stream_forward_call(cfg: _Config, q, k, v, bias, key_bias):
    """Returns (out like q, lse (B, H, 1, Nq_padded) fp32 in natural-log units)."""
    specs = _StreamSpecs(cfg, cfg.block_q, cfg.block_k, key_major=False)
    in_specs, extra = specs.inputs(bias, key_bias)
    return specs.call(
        _stream_forward_kernel, "vitjax_attention_forward", in_specs,
        [specs.tokens(True), specs.row(True)],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), _row_shape(cfg, cfg.q_len_padded)],
        [(cfg.block_q, 1), (cfg.block_q, 1), (cfg.block_q, cfg.head_dim_padded)],
    )(q, k, v, *extra)


def _stream_dq_call(cfg: _Config, q, k, v, bias, key_bias, d_out, lse, delta):
    """Returns (dq like q, delta): with clipping the delta the dK/dV kernel needs, computed here; else `delta`."""
    specs = _StreamSpecs(cfg, cfg.block_q_dq, cfg.block_k_dq, key_major=False)
    in_specs, extra = specs.inputs(bias, key_bias)
    in_specs += [specs.tokens(True), specs.row(True), specs.row(True)]
    out_specs, out_shape = [specs.tokens(True)], [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if cfg.softmax_clip is not None:
        out_specs.append(specs.row(True))
        out_shape.append(jax.ShapeDtypeStruct(delta.shape, jnp.float32))
    results = specs.call(_stream_dq_kernel, "vitjax_attention_backward_dq", in_specs, out_specs, out_shape,
                         [(cfg.block_q_dq, cfg.head_dim_padded), (cfg.block_q_dq, 1)]
                         )(q, k, v, *extra, d_out, lse, delta)
    return results[0], (results[1] if cfg.softmax_clip is not None else delta)


def _stream_dkdv_call(cfg: _Config, q, k, v, bias, key_bias, d_out, lse, delta):
    """Returns (dk, dv, dbias (B, H, Nq, Nk) fp32 or None, dkey_bias (B, H, 1, Nk) fp32 or None)."""
    block_k = cfg.block_k_dkv
    specs = _StreamSpecs(cfg, cfg.block_q_dkv, block_k, key_major=True)
    in_specs, extra = specs.inputs(bias, key_bias)
    in_specs += [specs.tokens(True), specs.row(True), specs.row(True)]
    out_specs = [specs.tokens(False), specs.tokens(False)]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    scratch = [(block_k, cfg.head_dim_padded), (block_k, cfg.head_dim_padded)]
    if cfg.has_bias:
        out_specs.append(specs.bias(True, True))
        out_shape.append(jax.ShapeDtypeStruct(
            (cfg.batch, cfg.heads, cfg.q_len_padded, cfg.kv_len_padded), jnp.float32))
    if cfg.has_key_bias:
        out_specs.append(specs.row(False))
        out_shape.append(_row_shape(cfg, cfg.kv_len_padded))
        scratch.append((1, block_k))
    dk, dv, *rest = specs.call(_stream_dkdv_kernel, "vitjax_attention_backward_dkdv", in_specs, out_specs,
                               out_shape, scratch)(q, k, v, *extra, d_out, lse, delta)
    dbias = rest.pop(0) if cfg.has_bias else None
    dkey_bias = rest.pop(0) if cfg.has_key_bias else None
    return dk, dv, dbias, dkey_bias


# ------------------------------------------------------------------------------------------------
# custom_vjp
# ------------------------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention_core(cfg, q, k, v, bias, key_bias):
    """Returns (out, lse) on arrays already in the backend's layout."""
    forward = _stream_forward_call if cfg.backend == "mosaic" else _forward_call
    return tuple(forward(cfg, q, k, v, bias, key_bias))


def _attention_core_forward(cfg, q, k, v, bias, key_bias):
    out, lse = _attention_core(cfg, q, k, v, bias, key_bias)
    return (out, lse), (q, k, v, bias, key_bias, out, lse)


def _attention_core_backward(cfg, residuals, cotangents):
    q, k, v, bias, key_bias, out, lse = residuals
    d_out, d_lse = cotangents
    # delta_i = sum_j p_ij dp_ij = do_i . o_i; a gradient arriving through lse adds p_ij * d_lse_i to
    # d logits_ij, which is the same as lowering delta_i by d_lse_i.
    if cfg.softmax_clip is None:
        delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)
        if cfg.backend == "triton":
            delta = jnp.swapaxes(delta, 1, 2)[..., None]  # (B, N, H) -> (B, H, N, 1), lse's layout
        else:
            delta = delta[:, :, None, :]  # (B, H, N) -> (B, H, 1, N), lse's layout
        delta = delta - d_lse
    else:
        delta = -d_lse  # the dQ kernel adds sum_j p_ij dP_ij
    mosaic = cfg.backend == "mosaic"
    dq, delta = (_stream_dq_call if mosaic else _dq_call)(cfg, q, k, v, bias, key_bias, d_out, lse, delta)
    dk, dv, dbias, dkey_bias = (_stream_dkdv_call if mosaic else _dkdv_call)(cfg, q, k, v, bias, key_bias, d_out,
                                                                             lse, delta)
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

    The kernels stream tiles (`_StreamSpecs`), so this depends on the tile sizes, the head dim and the
    dtype, not on the sequence length (which only caps the tiles): each input and output tile counted
    double-buffered with its lanes padded to 128, plus the fp32 scratch accumulators. An upper bound: the
    TPU compiler's own need (`vitjax.aot.mosaic_vmem_needed`, v5e) is 0.35 to 0.52 of it for head dims
    64-256 (experiments/out/kernel_compile_vmem.md), 1072 KiB at most with the default blocks.
    """
    blocks = block_sizes or BlockSizes()
    defaults = default_block_sizes("mosaic", head_dim)
    pick = lambda name: getattr(blocks, name) or getattr(defaults, name)  # noqa: E731
    lanes = common.round_up(head_dim, LANES)   # VMEM tiles pad the lanes whatever the HBM layout
    size = jnp.dtype(dtype).itemsize
    tile = {n: common.mosaic_tile(n, pick(n), q_len if "_q" in n else kv_len, LANES)
            for n in ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq")}

    def kernel(block_q, block_k, q_tiles, k_tiles, q_rows, k_rows, biases, scratch):
        """Returns double-buffered tiles + scratch: q_tiles / k_tiles (rows, D), rows (1, N) fill 8 sublanes."""
        tiles = ((q_tiles * block_q + k_tiles * block_k) * lanes * size
                 + (q_rows * block_q + k_rows * block_k) * common.SUBLANES * 4
                 + biases * block_q * block_k * 4)
        return 2 * tiles + scratch

    column = LANES * 4  # a (block, 1) fp32 scratch column fills whole 128-lane rows
    forward = kernel(tile["block_q"], tile["block_k"], 2, 2, 1, int(key_bias), int(bias),
                     tile["block_q"] * (2 * column + lanes * 4))
    dq = kernel(tile["block_q_dq"], tile["block_k_dq"], 3, 2, 3, int(key_bias), int(bias),
                tile["block_q_dq"] * (column + lanes * 4))
    dkdv = kernel(tile["block_q_dkv"], tile["block_k_dkv"], 2, 4, 2, 2 * int(key_bias), 2 * int(bias),
                  tile["block_k_dkv"] * 2 * lanes * 4 + common.SUBLANES * tile["block_k_dkv"] * 4)
    return max(forward, dq, dkdv)


def unsupported_reason(q, k, v, *, bias=None, key_bias=None, backend: Optional[str] = None,
                       interpret: Optional[bool] = None, block_sizes: Optional[BlockSizes] = None) -> Optional[str]:
    """Returns why `flash_attention` cannot take these operands (compiled as `backend` / `interpret` say,
    by default the target platform's, with `block_sizes`, by default the defaults), or None when it can."""
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
                                   key_bias=key_bias is not None, block_sizes=block_sizes)
        budget = common.tpu_vmem_budget()
        if needed > budget:
            return (f"Nq={q_len}, Nk={k.shape[1]}{' with a bias' if bias is not None else ''} needs "
                    f"{needed / 2**20:.1f} MiB of VMEM, over the {budget / 2**20:.1f} MiB of "
                    f"{common.tpu_device_kind() or 'the smallest TPU (v4)'} (an upper bound for tiles of these block "
                    f"sizes and head dim; the sequence is streamed); use smaller block sizes or 'xla'")
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
    reason = unsupported_reason(q, k, v, bias=bias, key_bias=key_bias, backend=backend, interpret=interpret,
                                block_sizes=block_sizes)
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
        lse = lse[:, :, 0, :q_len]
    return (out, lse) if return_lse else out
