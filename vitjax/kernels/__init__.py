"""Attention and token-merge kernels, with their pure-jnp references.

Models call `dot_product_attention` and pick the implementation with `impl` (one of ATTENTION_IMPLS).
"""
from vitjax.kernels.attention import BlockSizes, attention_reference, flash_attention
from vitjax.kernels.dispatch import ATTENTION_IMPLS, choose_impl, dot_product_attention

__all__ = ["ATTENTION_IMPLS", "BlockSizes", "attention_reference", "choose_impl", "dot_product_attention",
           "flash_attention"]
