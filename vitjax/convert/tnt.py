"""timm TNT state dicts -> vitjax `TNT` params (patch position embeddings resampled when the grid differs)."""
from typing import Any, Dict

import numpy as np

from vitjax.convert import common
from vitjax.convert.vit import classifier_params, dense_params, mlp_params, norm_params
from vitjax.models import layers


def _attention(table: common.KeyTable, prefix: str, num_heads: int, qkv_bias: bool) -> Dict[str, Any]:
    """Returns `TntAttention` params from timm's `qk`, `v`, `proj`."""
    qk = table.get(f"{prefix}.qk.weight")
    width = qk.shape[1]
    out = {"qk": {"kernel": qk.T.reshape(width, 2, num_heads, -1)},
           "v": {"kernel": table.get(f"{prefix}.v.weight").T.reshape(width, num_heads, -1)}}
    if qkv_bias:
        out["qk"]["bias"] = table.get(f"{prefix}.qk.bias").reshape(2, num_heads, -1)
        out["v"]["bias"] = table.get(f"{prefix}.v.bias").reshape(num_heads, -1)
    proj = table.get(f"{prefix}.proj.weight")
    out["proj"] = {"kernel": proj.T.reshape(num_heads, -1, proj.shape[0]), "bias": table.get(f"{prefix}.proj.bias")}
    return out


def convert_timm(state_dict: Dict[str, np.ndarray], model) -> Dict[str, Any]:
    """Returns {"params": ...} for a `TNT` from a timm TNT state dict (timm's names, after its filter)."""
    table = common.KeyTable(state_dict)
    params: Dict[str, Any] = {
        "pixel_embed_proj": {"kernel": table.get("pixel_embed.proj.weight", common.conv),
                             "bias": table.get("pixel_embed.proj.bias")},
        "pixel_pos": table.get("pixel_pos", lambda pos: np.transpose(pos, (0, 2, 3, 1))),
        "norm1_proj": norm_params(table, "norm1_proj"),
        "proj": dense_params(table, "proj"),
        "norm2_proj": norm_params(table, "norm2_proj"),
        "cls_token": table.get("cls_token"),
        "patch_pos": layers.resample_posemb(table.get("patch_pos"), model.grid_size, 1),
        "norm": norm_params(table, "norm"),
    }
    for index in range(model.depth):
        prefix = f"blocks.{index}"
        block = {
            "norm_in": norm_params(table, f"{prefix}.norm_in"),
            "attn_in": _attention(table, f"{prefix}.attn_in", model.num_heads_inner, model.qkv_bias),
            "norm_mlp_in": norm_params(table, f"{prefix}.norm_mlp_in"),
            "mlp_in": mlp_params(table, f"{prefix}.mlp_in"),
            "norm1_proj": norm_params(table, f"{prefix}.norm1_proj"),
            "proj": dense_params(table, f"{prefix}.proj", bias=model.legacy),
            "norm_out": norm_params(table, f"{prefix}.norm_out"),
            "attn_out": _attention(table, f"{prefix}.attn_out", model.num_heads_outer, model.qkv_bias),
            "norm_mlp": norm_params(table, f"{prefix}.norm_mlp"),
            "mlp": mlp_params(table, f"{prefix}.mlp"),
        }
        if not model.legacy:
            block["norm2_proj"] = norm_params(table, f"{prefix}.norm2_proj")
        params[f"blocks_{index}"] = block
    classifier_params(table, params, "head", model.num_classes)
    table.finish()
    return common.checked(params, model)
