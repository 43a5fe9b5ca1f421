"""Attention and token-merge kernels, with their pure-jnp references.

Models call `dot_product_attention` and pick the implementation with `impl`.
"""
from vitjax.kernels.dispatch import ATTENTION_IMPLS, dot_product_attention

__all__ = ["ATTENTION_IMPLS", "dot_product_attention"]
