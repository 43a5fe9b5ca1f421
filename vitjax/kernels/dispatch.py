"""One entry point for attention: `dot_product_attention(q, k, v, impl=...)`."""
from typing import Optional

import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("xla",)


def attention_reference(q, k, v, *, bias=None, key_bias=None, return_weights=False):
    """Returns softmax(q k^T / sqrt(d) + bias + key_bias) v, in layout (batch, length, heads, head_dim).

    q: (B, Nq, H, D); k, v: (B, Nk, H, D).
    bias: broadcastable to (B, H, Nq, Nk) (e.g. Swin's relative position bias plus mask).
    key_bias: (B, Nk), added to every query's logit for that key (ToMe's log token size).
    The softmax is computed in fp32 whatever the input dtype.
    """
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if key_bias is not None:
        logits = logits + key_bias.astype(jnp.float32)[:, None, None, :]
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
    if return_weights:
        return out, weights
    return out


def dot_product_attention(q, k, v, *, bias=None, key_bias=None, impl: str = "xla",
                          return_weights: bool = False):
    """Returns attention output (B, Nq, H, D), and the (B, H, Nq, Nk) weights when asked.

    `return_weights` forces the XLA path: fused kernels never materialise the weights.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"Unknown attention_impl {impl!r}; valid choices: {ATTENTION_IMPLS}")
    result = attention_reference(q, k, v, bias=bias, key_bias=key_bias, return_weights=return_weights)
    return result
