"""Attention and token-merge kernels, with their pure-jnp references.

Models call `dot_product_attention` and pick the implementation with `impl` (one of ATTENTION_IMPLS);
an explicit "cudnn" or "pallas" that cannot run a call raises `UnsupportedAttentionError`, only "auto"
falls back. Shared Pallas plumbing lives in `common`.
"""
from vitjax.kernels.attention import BlockSizes, attention_reference, flash_attention
from vitjax.kernels.dispatch import (ATTENTION_IMPLS, UnsupportedAttentionError, choose_impl, dot_product_attention,
                                     unsupported_reason)

__all__ = ["ATTENTION_IMPLS", "BlockSizes", "UnsupportedAttentionError", "attention_reference", "choose_impl",
           "dot_product_attention", "flash_attention", "unsupported_reason"]
