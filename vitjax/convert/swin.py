"""timm Swin Transformer v1 state dicts -> vitjax `SwinTransformer` params.

Reads timm's layout (stage i > 0 starts with its patch merging, head under `head.fc`) and the original
Microsoft layout (merging at the end of stage i, head under `head`), which timm's filter also accepts.
The non-persistent buffers (`relative_position_index`, `attn_mask`) are recomputed by the model, so they
are dropped when a checkpoint carries them.
"""
import re
from typing import Any, Dict

import numpy as np

from vitjax.convert import common
from vitjax.convert.vit import attention_params, dense_params, mlp_params, norm_params


def _to_timm_layout(state_dict: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Returns the state dict in timm's current layout (as timm's `checkpoint_filter_fn`)."""
    state = {key: value for key, value in state_dict.items()
             if not key.endswith(("relative_position_index", "attn_mask"))}
    if "layers.0.downsample.reduction.weight" not in state:
        return state
    renamed = {}
    for key, value in state.items():
        key = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", key)
        if key.startswith("head.") and not key.startswith("head.fc."):
            key = "head.fc." + key[len("head."):]
        renamed[key] = value
    return renamed


def convert_timm(state_dict: Dict[str, np.ndarray], model) -> Dict[str, Any]:
    """Returns {"params": ...} for a `SwinTransformer` from a timm (or original) Swin v1 state dict."""
    table = common.KeyTable(_to_timm_layout(state_dict))
    params: Dict[str, Any] = {
        "patch_embed": {"proj": {"kernel": table.get("patch_embed.proj.weight", common.conv),
                                 "bias": table.get("patch_embed.proj.bias")}},
        "patch_embed_norm": norm_params(table, "patch_embed.norm"),
    }
    for stage, (depth, heads) in enumerate(zip(model.depths, model.num_heads)):
        prefix = f"layers.{stage}"
        stage_params: Dict[str, Any] = {}
        if stage > 0:
            stage_params["downsample"] = {
                "norm": norm_params(table, f"{prefix}.downsample.norm"),
                "reduction": {"kernel": table.get(f"{prefix}.downsample.reduction.weight", common.linear)}}
        for index in range(depth):
            block = f"{prefix}.blocks.{index}"
            stage_params[f"blocks_{index}"] = {
                "norm1": norm_params(table, f"{block}.norm1"),
                "relative_position_bias_table": table.get(f"{block}.attn.relative_position_bias_table"),
                "attn": attention_params(table, f"{block}.attn", heads),
                "norm2": norm_params(table, f"{block}.norm2"),
                "mlp": mlp_params(table, f"{block}.mlp"),
            }
        params[f"layers_{stage}"] = stage_params
    params["norm"] = norm_params(table, "norm")
    if "head.fc.weight" in table:
        head = dense_params(table, "head.fc")
        if model.num_classes:
            params["head"] = head  # otherwise dropped: the model has no classifier
    table.finish()
    return common.checked(params, model)
