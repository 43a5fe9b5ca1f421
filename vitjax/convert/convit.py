"""timm ConViT state dicts -> vitjax `ConViT` params."""
from typing import Any, Dict

import numpy as np

from vitjax.convert import common
from vitjax.convert.vit import attention_params, dense_params, mlp_params, norm_params
from vitjax.models import layers


def _gpsa(table: common.KeyTable, prefix: str, num_heads: int, qkv_bias: bool) -> Dict[str, Any]:
    """Returns `GPSA` params from timm keys under `prefix` (e.g. "blocks.0.attn")."""
    qk = table.get(f"{prefix}.qk.weight")
    width = qk.shape[1]
    head_dim = width // num_heads
    out: Dict[str, Any] = {
        "qk": {"kernel": qk.T.reshape(width, 2, num_heads, head_dim)},
        "v": {"kernel": table.get(f"{prefix}.v.weight").T.reshape(width, num_heads, head_dim)},
        "proj": {"kernel": table.get(f"{prefix}.proj.weight").T.reshape(num_heads, head_dim, width),
                 "bias": table.get(f"{prefix}.proj.bias")},
        "pos_proj": dense_params(table, f"{prefix}.pos_proj"),
        "gating_param": table.get(f"{prefix}.gating_param"),
    }
    if qkv_bias:
        out["qk"]["bias"] = table.get(f"{prefix}.qk.bias").reshape(2, num_heads, head_dim)
        out["v"]["bias"] = table.get(f"{prefix}.v.bias").reshape(num_heads, head_dim)
    return out


def convert_timm(state_dict: Dict[str, np.ndarray], model) -> Dict[str, Any]:
    """Returns {"params": ...} for a `ConViT` from a timm state dict (raises naming bad keys/shapes).

    The position embedding (patches only, no class token) is resampled bicubically, as timm, when the
    checkpoint's grid differs from the model's. GPSA's relative offsets are not in the state dict; the
    model computes them.
    """
    table = common.KeyTable(state_dict)
    params: Dict[str, Any] = {
        "patch_embed": {"proj": {"kernel": table.get("patch_embed.proj.weight", common.conv),
                                 "bias": table.get("patch_embed.proj.bias")}},
        "cls_token": table.get("cls_token"),
    }
    if model.use_pos_embed:
        params["pos_embed"] = layers.resample_posemb(table.get("pos_embed"), model.grid_size, 0)
    for index in range(model.depth):
        prefix = f"blocks.{index}"
        block = {"norm1": norm_params(table, f"{prefix}.norm1"), "norm2": norm_params(table, f"{prefix}.norm2"),
                 "mlp": mlp_params(table, f"{prefix}.mlp")}
        if index < model.local_up_to_layer:
            block["attn"] = _gpsa(table, f"{prefix}.attn", model.num_heads, model.qkv_bias)
        else:
            block["attn"] = attention_params(table, f"{prefix}.attn", model.num_heads, qkv_bias=model.qkv_bias)
        params[f"blocks_{index}"] = block
    params["norm"] = norm_params(table, "norm")
    if "head.weight" in table:
        if model.num_classes:
            params["head"] = dense_params(table, "head")
        else:
            table.get("head.weight"), table.get("head.bias")  # dropped: the model has no classifier
    table.finish()
    return common.checked(params, model)
