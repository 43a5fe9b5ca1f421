"""Official RMT (qhfan/RMT `classfication_release/RMT.py`, `VisRetNet`) state dicts -> vitjax `RMT` variables
(params and BatchNorm `batch_stats`).

Key table (official -> vitjax): `patch_embed.proj.{0,3,6,9}` (convs) and `.{1,4,7,10}` (BatchNorms) ->
`patch_embed_proj_{k}`; `layers.{i}.blocks.{j}.` -> `layers_{i}/blocks_{j}/` with `pos.conv` -> `pos`,
`retention_layer_norm`, `retention.{q,k,v,out}_proj`, `retention.lepe.conv` -> `retention/lepe`,
`final_layer_norm`, `ffn.fc1`, `ffn.dwconv.conv` -> `ffn/dwconv`, `ffn.fc2`, `gamma_{1,2}` (1, 1, 1, C) ->
`gamma_{1,2}/gamma` (C,); `layers.{i}.downsample.reduction` / `.norm` -> `layers_{i}/downsample_reduction` /
`downsample_norm`; `proj`, `norm` (BatchNorm), `head`. `layers.{i}.Relpos.angle` / `.decay` are buffers the model
recomputes from its configuration: they are checked against it (a mismatch means other init_values / heads_ranges).
"""
from typing import Any, Dict

import numpy as np

from vitjax.convert import common
from vitjax.convert.tiny_vit import bn_params, bn_stats
from vitjax.convert.vit import classifier_params, dense_params, norm_params
from vitjax.models import rmt


def _conv(table: common.KeyTable, prefix: str) -> Dict[str, np.ndarray]:
    return {"kernel": table.get(f"{prefix}.weight", common.conv), "bias": table.get(f"{prefix}.bias")}


def _check_buffer(table: common.KeyTable, key: str, expected: np.ndarray) -> None:
    value = table.get(key)
    if value.shape != expected.shape or not np.allclose(value, expected, rtol=1e-5, atol=0.0):
        raise ValueError(f"{key} {np.asarray(value).ravel()[:4]}... differs from the model's {expected.ravel()[:4]}...: "
                         f"the checkpoint was made with other num_heads / init_values / heads_ranges")


def _block(table: common.KeyTable, prefix: str, layer_scale: bool) -> Dict[str, Any]:
    """Returns one `RetBlock`'s params from the official keys under `prefix` (e.g. "layers.2.blocks.5")."""
    retention = {name: dense_params(table, f"{prefix}.retention.{name}")
                 for name in ("q_proj", "k_proj", "v_proj", "out_proj")}
    retention["lepe"] = _conv(table, f"{prefix}.retention.lepe.conv")
    out = {"pos": _conv(table, f"{prefix}.pos.conv"),
           "retention_layer_norm": norm_params(table, f"{prefix}.retention_layer_norm"), "retention": retention,
           "final_layer_norm": norm_params(table, f"{prefix}.final_layer_norm"),
           "ffn": {"fc1": dense_params(table, f"{prefix}.ffn.fc1"), "fc2": dense_params(table, f"{prefix}.ffn.fc2"),
                   "dwconv": _conv(table, f"{prefix}.ffn.dwconv.conv")}}
    if layer_scale:
        for name in ("gamma_1", "gamma_2"):
            out[name] = {"gamma": table.get(f"{prefix}.{name}", lambda value: value.reshape(-1))}
    return out


def convert_timm(state_dict: Dict[str, Any], model) -> Dict[str, Any]:
    """Returns {"params", "batch_stats"} for an `RMT` from an official state dict (`from_timm` / `from_torch`)."""
    table = common.KeyTable(state_dict)
    params: Dict[str, Any] = {}
    stats: Dict[str, Any] = {}
    for index in range(4):
        params[f"patch_embed_proj_{3 * index}"] = _conv(table, f"patch_embed.proj.{3 * index}")
        bn = f"patch_embed.proj.{3 * index + 1}"
        params[f"patch_embed_proj_{3 * index + 1}"] = bn_params(table, bn)
        stats[f"patch_embed_proj_{3 * index + 1}"] = bn_stats(table, bn)
    stages = len(model.depths)
    for stage in range(stages):
        prefix = f"layers.{stage}"
        heads = model.num_heads[stage]
        _check_buffer(table, f"{prefix}.Relpos.angle", rmt.retention_angle(model.embed_dims[stage] // heads))
        _check_buffer(table, f"{prefix}.Relpos.decay", rmt.retention_decay(heads, model.init_values[stage],
                                                                           model.heads_ranges[stage]))
        layer = {f"blocks_{j}": _block(table, f"{prefix}.blocks.{j}", bool(model.layer_scales[stage]))
                 for j in range(model.depths[stage])}
        if stage < stages - 1:
            layer["downsample_reduction"] = _conv(table, f"{prefix}.downsample.reduction")
            layer["downsample_norm"] = bn_params(table, f"{prefix}.downsample.norm")
            stats[f"layers_{stage}"] = {"downsample_norm": bn_stats(table, f"{prefix}.downsample.norm")}
        params[f"layers_{stage}"] = layer
    params["proj"] = dense_params(table, "proj")
    params["norm"] = bn_params(table, "norm")
    stats["norm"] = bn_stats(table, "norm")
    classifier_params(table, params, "head", model.num_classes)
    table.finish()
    img = (model.img_size, model.img_size) if isinstance(model.img_size, int) else tuple(model.img_size)
    expected = common.expected_variables(model, (img[0], img[1], model.in_chans))
    common.check_shapes(params, expected["params"])
    common.check_shapes(stats, expected["batch_stats"])
    return {"params": params, "batch_stats": stats}
