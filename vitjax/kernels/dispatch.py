"""One entry point for attention: `dot_product_attention(q, k, v, impl=...)`.

impl chooses among:
- "xla": the pure-jnp reference (einsum, softmax, einsum); XLA fuses what it can. Works everywhere.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused flash attention.
- "pallas": our fused kernel, `vitjax.kernels.attention.flash_attention`. On a CPU it runs in Pallas
  interpret mode: the same kernel evaluated op by op (logged once), not a fallback; numerics, not speed.
- "auto": the fastest expected for the platform and shape (see `AUTO_PREFERENCES`).
What runs is what was asked: "cudnn" or "pallas" that cannot take the call (cuDNN on a CPU, fp32 on
cuDNN, a head dim or dtype the kernel lacks, attention weights requested, ...) raises
`UnsupportedAttentionError` at trace time, naming the reason and the valid alternatives. Only "auto"
falls back (down its preference list, ending at "xla"), logging the reason once per distinct message.

Under a sharded `jax.jit` (a mesh set with `jax.set_mesh` and flax logical-axis rules active, as the
trainer does) the Pallas kernel runs inside `jax.shard_map`: each device attends over its own
batch shard and head shard. Without it XLA cannot partition the custom call and would gather
q, k and v onto every device.
"""
import math
from typing import List, Optional, Tuple

import jax
import jax.numpy as jnp
from absl import logging
from flax import linen as nn
from jax.sharding import PartitionSpec

from vitjax.kernels import common
from vitjax.kernels.attention import attention_reference, flash_attention
from vitjax.kernels.attention import unsupported_reason as pallas_unsupported_reason

ATTENTION_IMPLS = ("xla", "cudnn", "pallas", "auto")
FUSED_IMPLS = ("cudnn", "pallas")

# What "auto" tries, per platform, by sequence length: rows (max_length, preferences), first row whose
# max_length >= max(Nq, Nk) wins (None: any length); within a row the first supported impl is used.
# Untuned defaults: re-rank from experiments/gpu_report.py (or bench_attention.py) on the target accelerator.
# GPU (the Hopper plan, README "Speed"): cuDNN's fused attention first, where it takes the call (bf16 /
# fp16, head dim <= 128); the Pallas Triton kernel (a backend jax 0.11 deprecates) only for what cuDNN
# refuses in half precision (head dims 129-256, odd lengths with a bias); fp32 goes to XLA.
AUTO_PREFERENCES = {
    "gpu": ((None, ("cudnn", "pallas", "xla")),),
    # The Mosaic lowering has not been run on a TPU yet; XLA stays the default there until it has.
    "tpu": ((None, ("xla",)),),
    "cpu": ((None, ("xla",)),),
}

_logged_reasons = set()


class UnsupportedAttentionError(ValueError):
    """An explicitly requested attention implementation cannot run the call it was given."""


def _unsupported(impl: str, reason: str) -> UnsupportedAttentionError:
    """Returns the error for an explicit `impl` that cannot run: the reason and what would run instead."""
    return UnsupportedAttentionError(
        f"attention_impl={impl!r} cannot run this call: {reason}. Valid choices: {ATTENTION_IMPLS}; "
        f"'xla' runs every call, 'auto' picks the fastest that can run it (falling back to 'xla', logged once).")


def _log_fallback(chosen: str, skipped: Tuple[Tuple[str, str], ...]) -> None:
    """Logs which impl "auto" chose and why it skipped the ones it prefers, once per distinct message."""
    message = f"attention_impl 'auto' runs {chosen!r}: " + "; ".join(f"not {impl!r}: {why}" for impl, why in skipped)
    if message not in _logged_reasons:
        _logged_reasons.add(message)
        logging.warning(message)


def _platform() -> str:
    platform = common.platform()
    return platform if platform in AUTO_PREFERENCES else "cpu"


def cudnn_unsupported_reason(q, k, v, *, bias=None, key_bias=None, return_lse=False,
                             softmax_clip=None) -> Optional[str]:
    """Returns why the cuDNN path cannot take these operands, or None when it can."""
    if softmax_clip is not None:
        return "cuDNN's fused attention has no clipped softmax"
    if common.platform() != "gpu":
        return f"cuDNN needs a CUDA GPU, the platform is {common.platform()}"
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        return f"incompatible shapes q {q.shape}, k {k.shape}, v {v.shape}"
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"cuDNN takes bf16/fp16 inputs only, got {q.dtype}"
    head_dim = q.shape[-1]
    if head_dim % 8 or head_dim > 128:
        return f"cuDNN needs a head dim that is a multiple of 8 and <= 128, got {head_dim}"
    if return_lse:
        return "the cuDNN path does not return the log-sum-exp"
    if (bias is not None or key_bias is not None) and (q.shape[1] % 2 or k.shape[1] % 2):
        # cuDNN's backward with a bias requires even sequence lengths.
        return f"cuDNN with a bias needs even sequence lengths, got Nq={q.shape[1]}, Nk={k.shape[1]}"
    return None


def _cudnn_attention(q, k, v, bias, key_bias):
    """Returns cuDNN flash attention with bias and key_bias folded into one 4-D bias."""
    batch, q_len, heads, _ = q.shape
    kv_len = k.shape[1]
    combined = None
    if bias is not None:
        combined = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
        combined = jnp.broadcast_to(combined, combined.shape[:2] + (q_len, kv_len)).astype(q.dtype)
    if key_bias is not None:
        key_term = jnp.broadcast_to(key_bias, (batch, kv_len))[:, None, None, :].astype(q.dtype)
        key_term = jnp.broadcast_to(key_term, (batch, 1, q_len, kv_len))
        combined = key_term if combined is None else combined + key_term
    return jax.nn.dot_product_attention(q, k, v, bias=combined, implementation="cudnn")


def _mesh_axes(logical_name: str, mesh, dim: int):
    """Returns the mesh axes the active rules give `logical_name`, or None when they do not divide `dim`."""
    axes = nn.logical_to_mesh_axes((logical_name,))[0]
    if axes is None:
        return None
    axes_tuple = axes if isinstance(axes, tuple) else (axes,)
    axes_tuple = tuple(axis for axis in axes_tuple if axis in mesh.axis_names and mesh.shape[axis] > 1)
    if not axes_tuple or dim % math.prod(mesh.shape[axis] for axis in axes_tuple):
        return None
    return axes_tuple if len(axes_tuple) > 1 else axes_tuple[0]


def kernel_partition(q, *, bias=None, key_bias=None) -> Optional[Tuple[object, object]]:
    """Returns the (batch, heads) mesh axes a fused kernel should be shard_mapped over, or None.

    None when no multi-device mesh is set or the rules shard neither dim (then the kernel is called
    as is). Batch follows the logical name "batch", heads "heads", each only where its size divides.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    batch_axes = _mesh_axes("batch", mesh, q.shape[0])
    head_axes = _mesh_axes("heads", mesh, q.shape[2])
    if batch_axes is None and head_axes is None:
        return None
    return batch_axes, head_axes


def _shard_mapped_flash_attention(q, k, v, bias, key_bias, return_lse, partition, softmax_clip=None):
    """Returns `flash_attention` run per (batch shard, head shard) inside jax.shard_map."""
    batch_axes, head_axes = partition
    batch, heads = q.shape[0], q.shape[2]
    qkv_spec = PartitionSpec(batch_axes, None, head_axes, None)
    operands, specs = [q, k, v], [qkv_spec, qkv_spec, qkv_spec]
    if bias is not None:
        bias = jnp.reshape(bias, (1,) * (4 - bias.ndim) + bias.shape)
        specs.append(PartitionSpec(batch_axes if bias.shape[0] == batch else None, head_axes if bias.shape[1] == heads
                                   else None, None, None))
        operands.append(bias)
    if key_bias is not None:
        key_bias = jnp.reshape(key_bias, (1,) * (2 - key_bias.ndim) + key_bias.shape)
        specs.append(PartitionSpec(batch_axes if key_bias.shape[0] == batch else None, None))
        operands.append(key_bias)
    has_bias, has_key_bias = bias is not None, key_bias is not None

    def local(q, k, v, *rest):
        rest = list(rest)
        local_bias = rest.pop(0) if has_bias else None
        local_key_bias = rest.pop(0) if has_key_bias else None
        return flash_attention(q, k, v, bias=local_bias, key_bias=local_key_bias, return_lse=return_lse,
                               softmax_clip=softmax_clip)

    out_specs = (qkv_spec, PartitionSpec(batch_axes, head_axes, None)) if return_lse else qkv_spec
    # check_vma=False: pallas_call does not declare how its outputs vary over the mesh axes.
    return jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(), in_specs=tuple(specs),
                         out_specs=out_specs, check_vma=False)(*operands)


_WEIGHTS_REASON = "attention weights were requested (return_weights=True) and fused kernels never materialise them"


def unsupported_reason(impl: str, q, k, v, *, bias=None, key_bias=None, return_lse=False,
                       return_weights=False, softmax_clip=None) -> Optional[str]:
    """Returns why `impl` cannot run this call, or None when it can ("xla" always can)."""
    if impl not in ATTENTION_IMPLS:
        return f"unknown attention_impl {impl!r}; valid choices: {ATTENTION_IMPLS}"
    if impl in FUSED_IMPLS and return_weights:
        return _WEIGHTS_REASON
    if impl == "cudnn":
        return cudnn_unsupported_reason(q, k, v, bias=bias, key_bias=key_bias, return_lse=return_lse,
                                        softmax_clip=softmax_clip)
    if impl == "pallas":
        return pallas_unsupported_reason(q, k, v, bias=bias, key_bias=key_bias)
    return None


def _preferences(q, k) -> Tuple[str, ...]:
    """Returns the impls "auto" tries, in order, for this platform, dtype and sequence length; "xla" last."""
    length = max(q.shape[1], k.shape[1])
    platform = _platform()
    for max_length, preferences in AUTO_PREFERENCES[platform]:
        if max_length is None or length <= max_length:
            preferences = tuple(preferences)
            if platform == "gpu" and jnp.dtype(q.dtype) == jnp.float32:
                # The Hopper plan: fp32 runs without tensor cores in the Triton kernel (register spills,
                # ~25 s compiles in the issue-18 review); XLA's fp32 attention is the better default.
                preferences = tuple(impl for impl in preferences if impl != "pallas")
            return preferences + (() if "xla" in preferences else ("xla",))
    return ("xla",)


def _auto_plan(q, k, v, bias, key_bias, return_lse, return_weights,
               softmax_clip=None) -> List[Tuple[str, Optional[str]]]:
    """Returns [(impl, why it cannot run this call or None)] in the order "auto" tries them."""
    return [(impl, unsupported_reason(impl, q, k, v, bias=bias, key_bias=key_bias, return_lse=return_lse,
                                      return_weights=return_weights, softmax_clip=softmax_clip))
            for impl in _preferences(q, k)]


def choose_impl(q, k, v, *, bias=None, key_bias=None, return_lse=False, return_weights=False,
                softmax_clip=None) -> str:
    """Returns the implementation "auto" resolves to for these operands on this platform."""
    return next(impl for impl, reason in _auto_plan(q, k, v, bias, key_bias, return_lse, return_weights,
                                                    softmax_clip) if reason is None)


def _refusal(error: Exception) -> str:
    """Returns the reason cuDNN gave for refusing a call, on one line."""
    lines = str(error).strip().splitlines() or [""]
    return f"cuDNN refused it: {type(error).__name__}: {lines[0]}"


def _run(impl, q, k, v, bias, key_bias, return_weights, return_lse, softmax_clip=None):
    """Returns what `dot_product_attention` returns, computed by `impl` (already known to take the call)."""
    if impl == "cudnn":
        return _cudnn_attention(q, k, v, bias, key_bias)
    if impl == "pallas":
        partition = kernel_partition(q, bias=bias, key_bias=key_bias)
        if partition is not None:
            return _shard_mapped_flash_attention(q, k, v, bias, key_bias, return_lse, partition, softmax_clip)
        return flash_attention(q, k, v, bias=bias, key_bias=key_bias, return_lse=return_lse, softmax_clip=softmax_clip)
    return attention_reference(q, k, v, bias=bias, key_bias=key_bias, return_weights=return_weights,
                               return_lse=return_lse, softmax_clip=softmax_clip)


# cuDNN checks more than we mirror (library version, compute capability, shape limits) and refuses at
# trace time with one of these.
_CUDNN_REFUSALS = (NotImplementedError, RuntimeError, ValueError, TypeError)


def dot_product_attention(q, k, v, *, bias=None, key_bias=None, impl: str = "xla",
                          return_weights: bool = False, return_lse: bool = False, softmax_clip=None):
    """Returns attention output (B, Nq, H, D); with return_weights/return_lse a tuple adding them in that order.

    q: (B, Nq, H, D); k, v: (B, Nk, H, D). bias: broadcastable to (B, H, Nq, Nk); key_bias: (B, Nk).
    weights are (B, H, Nq, Nk) fp32, lse (B, H, Nq) fp32. Only "xla" materialises the weights: with
    return_weights, "auto" runs "xla" and "cudnn"/"pallas" raise. An explicit "cudnn" or "pallas" that
    cannot take the call raises `UnsupportedAttentionError` with the reason; only "auto" falls back.
    softmax_clip: (gamma, zeta) for the clipped softmax (weights clipped too); "xla" and "pallas" take it, not "cudnn".
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"Unknown attention_impl {impl!r}; valid choices: {ATTENTION_IMPLS}")
    if impl != "auto":
        reason = unsupported_reason(impl, q, k, v, bias=bias, key_bias=key_bias, return_lse=return_lse,
                                    return_weights=return_weights, softmax_clip=softmax_clip)
        if reason is not None:
            raise _unsupported(impl, reason)
        if impl != "cudnn":
            return _run(impl, q, k, v, bias, key_bias, return_weights, return_lse, softmax_clip)
        try:
            return _run(impl, q, k, v, bias, key_bias, return_weights, return_lse)
        except _CUDNN_REFUSALS as error:
            raise _unsupported(impl, _refusal(error)) from error
    skipped = []
    for chosen, reason in _auto_plan(q, k, v, bias, key_bias, return_lse, return_weights, softmax_clip):
        if reason is not None:
            skipped.append((chosen, reason))
            continue
        try:
            result = _run(chosen, q, k, v, bias, key_bias, return_weights, return_lse, softmax_clip)
        except _CUDNN_REFUSALS as error:
            if chosen != "cudnn":
                raise
            skipped.append((chosen, _refusal(error)))
            continue
        if skipped:
            _log_fallback(chosen, tuple(skipped))
        return result
    raise AssertionError("unreachable: 'xla' runs every call")  # _preferences always ends with "xla"
