"""One entry point for attention: `dot_product_attention(q, k, v, impl=...)`.

impl chooses among:
- "xla": the pure-jnp reference (einsum, softmax, einsum); XLA fuses what it can. Works everywhere.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused flash attention.
- "pallas": our fused kernel, `vitjax.kernels.attention.flash_attention` (interpret mode on a CPU).
- "auto": the fastest expected for the platform and shape (see `AUTO_PREFERENCES`).
An implementation that cannot take the call (cuDNN on a CPU, fp32 on cuDNN, a bias with an odd
length on cuDNN, ...) falls back to "xla" with the reason logged once, never an error.

Under a sharded `jax.jit` (a mesh set with `jax.set_mesh` and flax logical-axis rules active, as the
trainer does) the Pallas kernel runs inside `jax.shard_map`: each device attends over its own
batch shard and head shard. Without it XLA cannot partition the custom call and would gather
q, k and v onto every device.
"""
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from absl import logging
from flax import linen as nn
from jax.sharding import PartitionSpec

from vitjax.kernels.attention import attention_reference, flash_attention, unsupported_reason

ATTENTION_IMPLS = ("xla", "cudnn", "pallas", "auto")

# What "auto" tries, per platform, by sequence length: rows (max_length, preferences), first row whose
# max_length >= max(Nq, Nk) wins (None: any length); within a row the first supported impl is used.
# Untuned defaults: re-rank from experiments/bench_attention.py on the target accelerator.
AUTO_PREFERENCES = {
    "gpu": ((None, ("cudnn", "pallas", "xla")),),
    # The Mosaic lowering has not been run on a TPU yet; XLA stays the default there until it has.
    "tpu": ((None, ("xla",)),),
    "cpu": ((None, ("xla",)),),
}

_logged_reasons = set()


def _log_fallback(requested: str, used: str, reason: str) -> None:
    """Logs why `requested` was replaced by `used`, once per distinct message per process."""
    message = f"attention impl {requested!r} falls back to {used!r}: {reason}"
    if message not in _logged_reasons:
        _logged_reasons.add(message)
        logging.warning(message)


def _platform() -> str:
    platform = jax.default_backend()
    return platform if platform in AUTO_PREFERENCES else "cpu"


def cudnn_unsupported_reason(q, k, v, *, bias=None, key_bias=None, return_lse=False) -> Optional[str]:
    """Returns why the cuDNN path cannot take these operands, or None when it can."""
    if jax.default_backend() != "gpu":
        return f"cuDNN needs a CUDA GPU, the platform is {jax.default_backend()}"
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


def _shard_mapped_flash_attention(q, k, v, bias, key_bias, return_lse, partition):
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
        return flash_attention(q, k, v, bias=local_bias, key_bias=local_key_bias, return_lse=return_lse)

    out_specs = (qkv_spec, PartitionSpec(batch_axes, head_axes, None)) if return_lse else qkv_spec
    # check_vma=False: pallas_call does not declare how its outputs vary over the mesh axes.
    return jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(), in_specs=tuple(specs),
                         out_specs=out_specs, check_vma=False)(*operands)


def _supported(impl, q, k, v, bias, key_bias, return_lse) -> Optional[str]:
    """Returns why `impl` cannot run this call, or None."""
    if impl == "cudnn":
        return cudnn_unsupported_reason(q, k, v, bias=bias, key_bias=key_bias, return_lse=return_lse)
    if impl == "pallas":
        return unsupported_reason(q, k, v, bias=bias, key_bias=key_bias)
    return None


def choose_impl(q, k, v, *, bias=None, key_bias=None, return_lse=False) -> str:
    """Returns the implementation "auto" resolves to for these operands on this platform."""
    length = max(q.shape[1], k.shape[1])
    for max_length, preferences in AUTO_PREFERENCES[_platform()]:
        if max_length is None or length <= max_length:
            for impl in preferences:
                if _supported(impl, q, k, v, bias, key_bias, return_lse) is None:
                    return impl
            break
    return "xla"


def dot_product_attention(q, k, v, *, bias=None, key_bias=None, impl: str = "xla",
                          return_weights: bool = False, return_lse: bool = False):
    """Returns attention output (B, Nq, H, D); with return_weights/return_lse a tuple adding them in that order.

    q: (B, Nq, H, D); k, v: (B, Nk, H, D). bias: broadcastable to (B, H, Nq, Nk); key_bias: (B, Nk).
    weights are (B, H, Nq, Nk) fp32, lse (B, H, Nq) fp32. `return_weights` forces the XLA path:
    fused kernels never materialise the weights.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"Unknown attention_impl {impl!r}; valid choices: {ATTENTION_IMPLS}")
    requested = impl
    if return_weights and impl != "xla":
        if impl != "auto":
            _log_fallback(impl, "xla", "attention weights were requested; fused kernels never materialise them")
        impl = "xla"
    if impl == "auto":
        impl = choose_impl(q, k, v, bias=bias, key_bias=key_bias, return_lse=return_lse)
    reason = _supported(impl, q, k, v, bias, key_bias, return_lse)
    if reason is not None:
        _log_fallback(requested, "xla", reason)
        impl = "xla"
    if impl == "cudnn":
        try:
            return _cudnn_attention(q, k, v, bias, key_bias)
        except (NotImplementedError, RuntimeError, ValueError) as error:
            # cuDNN checks more than we mirror (library version, compute capability); trace-time
            # refusals land here.
            _log_fallback(requested, "xla", f"cuDNN refused the call: {error}")
            impl = "xla"
    if impl == "pallas":
        partition = kernel_partition(q, bias=bias, key_bias=key_bias)
        if partition is not None:
            return _shard_mapped_flash_attention(q, k, v, bias, key_bias, return_lse, partition)
        return flash_attention(q, k, v, bias=bias, key_bias=key_bias, return_lse=return_lse)
    return attention_reference(q, k, v, bias=bias, key_bias=key_bias,
                               return_weights=return_weights, return_lse=return_lse)
