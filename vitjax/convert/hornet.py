"""Official HorNet (raoyongming/HorNet `hornet.py`) state dicts -> vitjax `HorNet` params.

Key table (official -> vitjax): `downsample_layers.0.{0,1}` (conv, LayerNorm) and `downsample_layers.{i}.{0,1}`
(LayerNorm, conv) -> `downsample_layers_{i}/{conv,norm}`; `stages.{i}.{j}.` -> `stages_{i}/blocks_{j}/` with
`norm1`, `gnconv.proj_in` / `gnconv.pws.{k}` / `gnconv.proj_out` (1x1 convs) -> Dense kernels, `gnconv.dwconv`
(a depthwise 7x7 conv, or a global-local filter: `dw`, `complex_weight`, `pre_norm`, `post_norm`), `gamma1` /
`gamma2` -> `gamma1/gamma` / `gamma2/gamma`, `norm2`, `pwconv1`, `pwconv2`; `norm`, `head`.
"""
from typing import Any, Dict

import numpy as np

from vitjax.convert import common
from vitjax.convert.vit import classifier_params, dense_params, norm_params


def _pointwise(table: common.KeyTable, prefix: str) -> Dict[str, np.ndarray]:
    """Returns a Dense {kernel, bias} from a torch 1x1 Conv2d."""
    return {"kernel": table.get(f"{prefix}.weight", lambda w: w[:, :, 0, 0].T), "bias": table.get(f"{prefix}.bias")}


def _conv(table: common.KeyTable, prefix: str, bias: bool = True) -> Dict[str, np.ndarray]:
    out = {"kernel": table.get(f"{prefix}.weight", common.conv)}
    if bias:
        out["bias"] = table.get(f"{prefix}.bias")
    return out


def _block(table: common.KeyTable, prefix: str, order: int, global_filter: bool, layer_scale: bool) -> Dict[str, Any]:
    """Returns one `HorNetBlock`'s params from the official keys under `prefix` (e.g. "stages.2.5")."""
    gnconv = {"proj_in": _pointwise(table, f"{prefix}.gnconv.proj_in"),
              "proj_out": _pointwise(table, f"{prefix}.gnconv.proj_out")}
    for index in range(order - 1):
        gnconv[f"pws_{index}"] = _pointwise(table, f"{prefix}.gnconv.pws.{index}")
    if global_filter:
        base = f"{prefix}.gnconv.dwconv"
        gnconv["dwconv"] = {"dw": _conv(table, f"{base}.dw", bias=False),
                            "complex_weight": table.get(f"{base}.complex_weight"),
                            "pre_norm": norm_params(table, f"{base}.pre_norm"),
                            "post_norm": norm_params(table, f"{base}.post_norm")}
    else:
        gnconv["dwconv"] = _conv(table, f"{prefix}.gnconv.dwconv")
    out = {"norm1": norm_params(table, f"{prefix}.norm1"), "gnconv": gnconv,
           "norm2": norm_params(table, f"{prefix}.norm2"), "pwconv1": dense_params(table, f"{prefix}.pwconv1"),
           "pwconv2": dense_params(table, f"{prefix}.pwconv2")}
    if layer_scale:
        out["gamma1"] = {"gamma": table.get(f"{prefix}.gamma1")}
        out["gamma2"] = {"gamma": table.get(f"{prefix}.gamma2")}
    return out


def convert_timm(state_dict: Dict[str, Any], model) -> Dict[str, Any]:
    """Returns {"params": ...} for a `HorNet` from an official HorNet state dict (`from_timm` / `from_torch`)."""
    table = common.KeyTable(state_dict)
    params: Dict[str, Any] = {}
    for stage in range(4):
        conv_index, norm_index = (0, 1) if stage == 0 else (1, 0)
        params[f"downsample_layers_{stage}"] = {
            "conv": _conv(table, f"downsample_layers.{stage}.{conv_index}"),
            "norm": norm_params(table, f"downsample_layers.{stage}.{norm_index}")}
        params[f"stages_{stage}"] = {
            f"blocks_{index}": _block(table, f"stages.{stage}.{index}", model.orders[stage],
                                      model.filter_sizes[stage] is not None, model.layer_scale_init_value > 0)
            for index in range(model.depths[stage])}
    params["norm"] = norm_params(table, "norm")
    classifier_params(table, params, "head", model.num_classes)
    table.finish()
    return common.checked(params, model)
