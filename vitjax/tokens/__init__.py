"""Token reduction behind one per-block interface (`base`): ToMe, EViT, ATS, MCTF, Zero-TPrune registered by name.

    model = vitjax.models.create("deit_small_patch16_224", token_reduction=dict(method="evit", base_keep_rate=0.7))
    model = vitjax.models.create("vit_base_patch16_224", tome=dict(r=16))   # = dict(method="tome", r=16)

`visualize` (imported on demand: it needs Pillow) paints which patches each token holds over the image.
"""
from typing import Any, Optional

from vitjax.tokens import ats, base, evit, mctf, tome, zero_tprune
from vitjax.tokens.base import (AFTER_ATTENTION, AFTER_MLP, BEFORE_ATTENTION, AttentionView, BlockReducer, Method,
                                Plan, get_method, list_methods, method_options, parse, query_attention,
                                weighted_average)
from vitjax.tokens.tome import ToMeConfig, merge_schedule, parse_config, token_counts


def resolve(token_reduction: Any = None, tome_settings: Any = None) -> Optional[Method]:
    """Returns the Method of a model's `token_reduction` (or its `tome` shorthand), or None; raises if both."""
    if tome_settings is not None and token_reduction is not None:
        raise ValueError("Give token_reduction=dict(method='tome', ...) or tome=dict(...), not both")
    if tome_settings is not None:
        return tome.parse_config(tome_settings)
    return parse(token_reduction)


__all__ = ["AFTER_ATTENTION", "AFTER_MLP", "BEFORE_ATTENTION", "AttentionView", "BlockReducer", "Method", "Plan",
           "ToMeConfig", "ats", "base", "evit", "get_method", "list_methods", "mctf", "merge_schedule",
           "method_options", "parse", "parse_config", "query_attention", "resolve", "tome", "token_counts",
           "weighted_average", "zero_tprune"]
