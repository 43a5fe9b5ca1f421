"""timm CrossViT state dicts -> vitjax `CrossVit` params.

Accepts timm's layout (`pos_embed_0`, `cls_token_0`) and the original IBM one (`pos_embed.0`), which timm's
`pretrained_filter_fn` renames. Position embeddings are resampled (bicubic, as timm) when the checkpoint's
grid differs from the model's.
"""
from typing import Any, Dict

import numpy as np

from vitjax.convert import common
from vitjax.convert.vit import block_params, dense_params, norm_params
from vitjax.models import layers


def _heads(dense: Dict[str, np.ndarray], num_heads: int) -> Dict[str, np.ndarray]:
    """Returns a Dense C -> C as a DenseGeneral C -> (heads, head_dim)."""
    width = dense["kernel"].shape[0]
    out = {"kernel": dense["kernel"].reshape(width, num_heads, -1)}
    if "bias" in dense:
        out["bias"] = dense["bias"].reshape(num_heads, -1)
    return out


def _projection(table: common.KeyTable, prefix: str) -> Dict[str, Any]:
    """Returns a `Projection` (LayerNorm at `.0`, Linear at `.2` of timm's Sequential)."""
    return {"norm": norm_params(table, f"{prefix}.0"), "fc": dense_params(table, f"{prefix}.2")}


def _cross_attention_block(table: common.KeyTable, prefix: str, num_heads: int, qkv_bias: bool) -> Dict[str, Any]:
    """Returns a `CrossAttentionBlock`'s params from timm's `norm1` and `attn.{wq,wk,wv,proj}`."""
    attn = {name: _heads(dense_params(table, f"{prefix}.attn.{name}", qkv_bias), num_heads)
            for name in ("wq", "wk", "wv")}
    proj = table.get(f"{prefix}.attn.proj.weight")
    attn["proj"] = {"kernel": proj.T.reshape(num_heads, -1, proj.shape[0]),
                    "bias": table.get(f"{prefix}.attn.proj.bias")}
    return {"norm1": norm_params(table, f"{prefix}.norm1"), "attn": attn}


def convert_timm(state_dict: Dict[str, np.ndarray], model) -> Dict[str, Any]:
    """Returns {"params": ...} for a `CrossVit` from a timm CrossViT state dict."""
    state_dict = {(key.replace(".", "_") if key.startswith(("pos_embed.", "cls_token.")) else key): value
                  for key, value in state_dict.items()}
    table = common.KeyTable(state_dict)
    params: Dict[str, Any] = {}
    branches = model.num_branches
    for branch, grid in enumerate(model.branch_grids()):
        embed = f"patch_embed.{branch}.proj"
        if model.multi_conv:
            params[f"patch_embed_{branch}"] = {
                f"proj_{index}": {"kernel": table.get(f"{embed}.{torch_index}.weight", common.conv),
                                  "bias": table.get(f"{embed}.{torch_index}.bias")}
                for index, torch_index in enumerate((0, 2, 4))}
        else:
            params[f"patch_embed_{branch}"] = {"proj": {"kernel": table.get(f"{embed}.weight", common.conv),
                                                        "bias": table.get(f"{embed}.bias")}}
        params[f"cls_token_{branch}"] = table.get(f"cls_token_{branch}")
        params[f"pos_embed_{branch}"] = layers.resample_posemb(table.get(f"pos_embed_{branch}"), grid, 1)
    for index, config in enumerate(model.depth):
        prefix = f"blocks.{index}"
        block: Dict[str, Any] = {}
        for branch in range(branches):
            for inner in range(config[branch]):
                block[f"blocks_{branch}_{inner}"] = block_params(
                    table, f"{prefix}.blocks.{branch}.{inner}", model.num_heads[branch], model.qkv_bias)
            other_heads = model.num_heads[(branch + 1) % branches]
            block[f"projs_{branch}"] = _projection(table, f"{prefix}.projs.{branch}")
            block[f"revert_projs_{branch}"] = _projection(table, f"{prefix}.revert_projs.{branch}")
            if config[-1] == 0:
                block[f"fusion_{branch}"] = _cross_attention_block(
                    table, f"{prefix}.fusion.{branch}", other_heads, model.qkv_bias)
            for inner in range(config[-1]):
                block[f"fusion_{branch}_{inner}"] = _cross_attention_block(
                    table, f"{prefix}.fusion.{branch}.{inner}", other_heads, model.qkv_bias)
        params[f"blocks_{index}"] = block
    for branch in range(branches):
        params[f"norm_{branch}"] = norm_params(table, f"norm.{branch}")
        if model.num_classes:
            params[f"head_{branch}"] = dense_params(table, f"head.{branch}")
        elif f"head.{branch}.weight" in table:
            table.get(f"head.{branch}.weight"), table.get(f"head.{branch}.bias")  # a feature extractor drops it
    table.finish()
    return common.checked(params, model)
