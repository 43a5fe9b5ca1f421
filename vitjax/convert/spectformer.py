"""Official SpectFormer (badripatro/SpectFormers) state dicts -> vitjax `SpectFormer` / `HierarchicalSpectFormer`
variables (params, and the hierarchical stem's BatchNorm `batch_stats`).

Vanilla key table (official -> vitjax): `patch_embed.proj` -> `patch_embed/proj`, `pos_embed`; spectral blocks
`blocks.{i}.{norm1, norm2, mlp.fc1, mlp.fc2}` and `blocks.{i}.filter.complex_weight` (h, w, C, 2, stored as is);
attention blocks `blocks.{i}.attn.qkv` / `.proj` (split into heads) and the same norms and MLP; `norm`, `head`.

Hierarchical key table: `patch_embed1.conv.{0,3,6}` (convs) / `.{1,4,7}` (BatchNorms) -> `patch_embed1_conv_{k}`;
`patch_embed{i}.proj` / `.norm` -> `patch_embed{i}_proj` / `_norm`; `block{i}.{j}.` -> `block{i}_{j}/` with `norm1`,
`norm2`, `attn.complex_weight` (spectral stages) or `attn.q`, `attn.kv`, `attn.proj` (attention stages),
`mlp.fc1`, `mlp.dwconv.dwconv` -> `mlp/dwconv`, `mlp.fc2`; `norm{i}`; `post_network.0.{norm1, norm2, attn.q,
attn.kv, attn.proj}` and `mlp.{fc1, fc2}` -> `post_network_0/{..., q, kv, proj, fc1, fc2}`; `head`, `aux_head`.
"""
from typing import Any, Dict

import numpy as np

from vitjax.convert import common
from vitjax.convert.tiny_vit import bn_params, bn_stats
from vitjax.convert.vit import attention_params, classifier_params, dense_params, mlp_params, norm_params
from vitjax.models import spectformer


def _conv(table: common.KeyTable, prefix: str, bias: bool = True) -> Dict[str, np.ndarray]:
    out = {"kernel": table.get(f"{prefix}.weight", common.conv)}
    if bias:
        out["bias"] = table.get(f"{prefix}.bias")
    return out


def _vanilla(table: common.KeyTable, model) -> Dict[str, Any]:
    params: Dict[str, Any] = {"patch_embed": {"proj": _conv(table, "patch_embed.proj")},
                              "pos_embed": table.get("pos_embed")}
    for index in range(model.depth):
        prefix = f"blocks.{index}"
        block = {"norm1": norm_params(table, f"{prefix}.norm1"), "norm2": norm_params(table, f"{prefix}.norm2"),
                 "mlp": mlp_params(table, f"{prefix}.mlp")}
        if index < model.spectral_depth:
            block["filter"] = {"complex_weight": table.get(f"{prefix}.filter.complex_weight")}
        else:
            block["attn"] = attention_params(table, f"{prefix}.attn", model.num_heads)
        params[f"blocks_{index}"] = block
    params["norm"] = norm_params(table, "norm")
    classifier_params(table, params, "head", model.num_classes)
    return {"params": params}


def _hierarchical(table: common.KeyTable, model) -> Dict[str, Any]:
    params: Dict[str, Any] = {}
    stats: Dict[str, Any] = {}
    for index in range(3):
        params[f"patch_embed1_conv_{3 * index}"] = _conv(table, f"patch_embed1.conv.{3 * index}", bias=False)
        bn = f"patch_embed1.conv.{3 * index + 1}"
        params[f"patch_embed1_conv_{3 * index + 1}"] = bn_params(table, bn)
        stats[f"patch_embed1_conv_{3 * index + 1}"] = bn_stats(table, bn)
    stages = len(model.depths)
    for stage in range(1, stages + 1):
        params[f"patch_embed{stage}_proj"] = _conv(table, f"patch_embed{stage}.proj")
        params[f"patch_embed{stage}_norm"] = norm_params(table, f"patch_embed{stage}.norm")
        for index in range(model.depths[stage - 1]):
            prefix = f"block{stage}.{index}"
            if stage <= model.spectral_stages:
                attn = {"complex_weight": table.get(f"{prefix}.attn.complex_weight")}
            else:
                attn = {name: dense_params(table, f"{prefix}.attn.{name}") for name in ("q", "kv", "proj")}
            params[f"block{stage}_{index}"] = {
                "norm1": norm_params(table, f"{prefix}.norm1"), "norm2": norm_params(table, f"{prefix}.norm2"),
                "attn": attn, "mlp": {"fc1": dense_params(table, f"{prefix}.mlp.fc1"),
                                      "dwconv": _conv(table, f"{prefix}.mlp.dwconv.dwconv"),
                                      "fc2": dense_params(table, f"{prefix}.mlp.fc2")}}
        params[f"norm{stage}"] = norm_params(table, f"norm{stage}")
    post = {name: norm_params(table, f"post_network.0.{name}") for name in ("norm1", "norm2")}
    post.update({name: dense_params(table, f"post_network.0.attn.{name}") for name in ("q", "kv", "proj")})
    post.update({name: dense_params(table, f"post_network.0.mlp.{name}") for name in ("fc1", "fc2")})
    params["post_network_0"] = post
    classifier_params(table, params, "head", model.num_classes)
    if model.token_label:
        classifier_params(table, params, "aux_head", model.num_classes)
    elif "aux_head.weight" in table:
        table.get("aux_head.weight"), table.get("aux_head.bias")  # a model without the token-labelling head
    return {"params": params, "batch_stats": stats}


def convert_timm(state_dict: Dict[str, Any], model) -> Dict[str, Any]:
    """Returns flax variables for a `SpectFormer` or `HierarchicalSpectFormer` from an official state dict
    (`from_torch`); the model's img_size must be the one the filters and position embeddings were trained at."""
    # float16 tensors (a half-precision checkpoint, or the parity fixture) are read as float32
    table = common.KeyTable({key: value.astype(np.float32) if getattr(value, "dtype", None) == np.float16 else value
                             for key, value in state_dict.items()})
    hierarchical = isinstance(model, spectformer.HierarchicalSpectFormer)
    variables = _hierarchical(table, model) if hierarchical else _vanilla(table, model)
    table.finish()
    img = (model.img_size, model.img_size) if isinstance(model.img_size, int) else tuple(model.img_size)
    expected = common.expected_variables(model, (img[0], img[1], model.in_chans))
    for collection, values in variables.items():
        common.check_shapes(values, expected[collection])
    return variables
