"""Official FcaFormer (hkzhang-git/FcaFormer `image_classification/models/fcaformer.py`) state dicts -> vitjax
`FcaFormer` variables (params and BatchNorm `batch_stats`).

Key table (official -> vitjax): `patch_embed.seq.{0,2}.{c,bn}` -> `patch_embed_seq_{0,2}/{conv,bn}`;
`layer_{i}.blocks.{j}.` -> `layer_{i}/blocks_{j}/` with, in the conv stages, `dwconv`, `norm`, `pwconv1`,
`pwconv2`, `gamma`; in the Fca stages `norm1`, `qkv`, `proj`, `attention_biases` (heads, offsets),
`s_norm`, `s_token_bias` (1, heads, 1, K) -> (heads, K), `s_scale_factors` (1, K, 1) -> (K, 1), `dw_conv`,
`local_conv.{c,bn}` -> `local_conv/{conv,bn}`, `norm2`, `mlp.{norm,fc1,fc2}`, `gamma_{1,2}`;
`layer_{i}.downsample.conv{1,2,3}.{c,bn}` -> `layer_{i}/downsample/conv{1,2,3}/{conv,bn}`; `norm_head`, `head`.
The `attention_bias_idxs` buffer is not saved by the official code (non-persistent); the model recomputes it.
"""
from typing import Any, Dict, Tuple

from vitjax.convert import common
from vitjax.convert.tiny_vit import conv_bn
from vitjax.convert.vit import classifier_params, dense_params, norm_params


def _conv(table: common.KeyTable, prefix: str, bias: bool = True) -> Dict[str, Any]:
    out = {"kernel": table.get(f"{prefix}.weight", common.conv)}
    if bias:
        out["bias"] = table.get(f"{prefix}.bias")
    return out


def _merging(table: common.KeyTable, prefix: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    params, stats = {}, {}
    for name in ("conv1", "conv2", "conv3"):
        params[name], stats[name] = conv_bn(table, f"{prefix}.{name}", "c")
    return params, stats


def _conv_block(table: common.KeyTable, prefix: str) -> Dict[str, Any]:
    return {"dwconv": _conv(table, f"{prefix}.dwconv"), "norm": norm_params(table, f"{prefix}.norm"),
            "pwconv1": dense_params(table, f"{prefix}.pwconv1"), "pwconv2": dense_params(table, f"{prefix}.pwconv2"),
            "gamma": table.get(f"{prefix}.gamma")}


def _fca_block(table: common.KeyTable, prefix: str, first: bool,
               last: bool) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    params = {name: norm_params(table, f"{prefix}.{name}") for name in ("norm1", "norm2")}
    params.update(qkv=dense_params(table, f"{prefix}.qkv"), proj=dense_params(table, f"{prefix}.proj"),
                  attention_biases=table.get(f"{prefix}.attention_biases"),
                  gamma_1=table.get(f"{prefix}.gamma_1"), gamma_2=table.get(f"{prefix}.gamma_2"),
                  mlp={"norm": norm_params(table, f"{prefix}.mlp.norm"),
                       "fc1": dense_params(table, f"{prefix}.mlp.fc1"),
                       "fc2": dense_params(table, f"{prefix}.mlp.fc2")})
    if not first:
        params["s_norm"] = norm_params(table, f"{prefix}.s_norm")
        params["s_token_bias"] = table.get(f"{prefix}.s_token_bias", lambda value: value[0, :, 0, :])
        params["s_scale_factors"] = table.get(f"{prefix}.s_scale_factors", lambda value: value[0])
    if not last:
        params["dw_conv"] = _conv(table, f"{prefix}.dw_conv", bias=False)
    params["local_conv"], stats = conv_bn(table, f"{prefix}.local_conv", "c")
    return params, {"local_conv": stats}


def convert_timm(state_dict: Dict[str, Any], model) -> Dict[str, Any]:
    """Returns {"params", "batch_stats"} for a `FcaFormer` from an official state dict (`from_torch`)."""
    table = common.KeyTable(state_dict)
    params: Dict[str, Any] = {}
    stats: Dict[str, Any] = {}
    for index in (0, 2):
        params[f"patch_embed_seq_{index}"], stats[f"patch_embed_seq_{index}"] = conv_bn(
            table, f"patch_embed.seq.{index}", "c")
    for stage, depth in enumerate(model.depths):
        prefix = f"layer_{stage}"
        layer: Dict[str, Any] = {}
        layer_stats: Dict[str, Any] = {}
        for j in range(depth):
            block = f"{prefix}.blocks.{j}"
            if stage < 2:
                layer[f"blocks_{j}"] = _conv_block(table, block)
            else:
                layer[f"blocks_{j}"], layer_stats[f"blocks_{j}"] = _fca_block(table, block, j == 0, j == depth - 1)
        if stage < 3:
            layer["downsample"], layer_stats["downsample"] = _merging(table, f"{prefix}.downsample")
        params[prefix] = layer
        stats[prefix] = layer_stats
    params["norm_head"] = norm_params(table, "norm_head")
    classifier_params(table, params, "head", model.num_classes)
    table.finish()
    img = (model.img_size, model.img_size) if isinstance(model.img_size, int) else tuple(model.img_size)
    expected = common.expected_variables(model, (img[0], img[1], model.in_chans))
    common.check_shapes(params, expected["params"])
    common.check_shapes(stats, expected["batch_stats"])
    return {"params": params, "batch_stats": stats}
