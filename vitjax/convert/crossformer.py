"""Official CrossFormer / CrossFormer++ (cheerss/CrossFormer `models/crossformer.py`) state dicts -> vitjax
`CrossFormer` params.

Key table (official -> vitjax): `patch_embed.projs.{k}` (convs) / `patch_embed.norm` -> `patch_embed/projs_{k}` /
`patch_embed/norm`; `layers.{i}.blocks.{j}.` -> `layers_{i}/blocks_{j}/` with `norm1`, `attn.qkv` (Linear -> the
(C, 3, heads, head_dim) DenseGeneral), `attn.proj`, `attn.pos.pos_proj`, `attn.pos.pos{s}.0` (LayerNorm) /
`attn.pos.pos{s}.2` (Linear) -> `attn/pos/pos{s}_norm` / `attn/pos/pos{s}_fc`, `norm2`, `mlp.fc1`, `mlp.fc2`,
`ex_conv` (depthwise conv) and `ex_ln` (CrossFormer++); `layers.{i}.downsample.norm` / `.reductions.{k}` ->
`layers_{i}/downsample/norm` / `reductions_{k}`; `norm`, `head`. The position-bias index buffers are not persistent.
"""
from typing import Any, Dict

from vitjax.convert import common
from vitjax.convert.vit import attention_params, classifier_params, dense_params, mlp_params, norm_params


def _conv(table: common.KeyTable, prefix: str) -> Dict[str, Any]:
    return {"kernel": table.get(f"{prefix}.weight", common.conv), "bias": table.get(f"{prefix}.bias")}


def _block(table: common.KeyTable, prefix: str, num_heads: int, extra_conv: bool) -> Dict[str, Any]:
    """Returns one `CrossFormerBlock`'s params from the official keys under `prefix` (e.g. "layers.2.blocks.5")."""
    attn = attention_params(table, f"{prefix}.attn", num_heads)
    pos = {"pos_proj": dense_params(table, f"{prefix}.attn.pos.pos_proj")}
    for step in (1, 2, 3):
        pos[f"pos{step}_norm"] = norm_params(table, f"{prefix}.attn.pos.pos{step}.0")
        pos[f"pos{step}_fc"] = dense_params(table, f"{prefix}.attn.pos.pos{step}.2")
    attn["pos"] = pos
    out = {"norm1": norm_params(table, f"{prefix}.norm1"), "attn": attn,
           "norm2": norm_params(table, f"{prefix}.norm2"), "mlp": mlp_params(table, f"{prefix}.mlp")}
    if extra_conv:
        out["ex_conv"] = _conv(table, f"{prefix}.ex_conv")
        out["ex_ln"] = norm_params(table, f"{prefix}.ex_ln")
    return out


def convert_timm(state_dict: Dict[str, Any], model) -> Dict[str, Any]:
    """Returns {"params": ...} for a `CrossFormer` from an official state dict (`from_timm` / `from_torch`)."""
    table = common.KeyTable(state_dict)
    params: Dict[str, Any] = {"patch_embed": {f"projs_{k}": _conv(table, f"patch_embed.projs.{k}")
                                              for k in range(len(model.patch_sizes))}}
    params["patch_embed"]["norm"] = norm_params(table, "patch_embed.norm")
    stages = len(model.depths)
    for stage in range(stages):
        depth = model.depths[stage]
        layer = {f"blocks_{j}": _block(table, f"layers.{stage}.blocks.{j}", model.num_heads[stage],
                                       model.use_acl and (j + 1) % 3 == 0 and j < depth - 1) for j in range(depth)}
        if stage < stages - 1:
            layer["downsample"] = {"norm": norm_params(table, f"layers.{stage}.downsample.norm")}
            for k in range(len(model.merge_sizes[stage])):
                layer["downsample"][f"reductions_{k}"] = _conv(table, f"layers.{stage}.downsample.reductions.{k}")
        params[f"layers_{stage}"] = layer
    params["norm"] = norm_params(table, "norm")
    classifier_params(table, params, "head", model.num_classes)
    table.finish()
    return common.checked(params, model)
