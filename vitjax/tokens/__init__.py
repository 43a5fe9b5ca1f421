"""Token reduction as model-agnostic transforms: ToMe (token merging) and its visualisation.

    model = vitjax.models.create("vit_base_patch16_224", tome=dict(r=16))

`visualize` (imported on demand: it needs Pillow) paints each merged group of patches over the image.
"""
from vitjax.tokens import tome
from vitjax.tokens.tome import ToMeConfig, merge_schedule, parse_config, token_counts

__all__ = ["ToMeConfig", "merge_schedule", "parse_config", "tome", "token_counts"]
