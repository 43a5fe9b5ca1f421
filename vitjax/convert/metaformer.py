"""timm MetaFormer state dicts (PoolFormer v1/v2, ConvFormer, CAFormer) -> vitjax `MetaFormer` params."""
from typing import Any, Dict

import numpy as np

from vitjax.convert import common
from vitjax.convert.convnext import conv, dense, norm


def _star_relu(table: common.KeyTable, prefix: str) -> Dict[str, np.ndarray]:
    return {"scale": table.get(f"{prefix}.scale"), "bias": table.get(f"{prefix}.bias")}


def _attention(table: common.KeyTable, prefix: str, num_heads: int) -> Dict[str, Any]:
    """Returns `layers.Attention` params (fused qkv, no biases) from timm's MetaFormer `Attention`."""
    qkv = table.get(f"{prefix}.qkv.weight")
    width = qkv.shape[1]
    head_dim = qkv.shape[0] // (3 * num_heads)
    out = {"qkv": {"kernel": qkv.T.reshape(width, 3, num_heads, head_dim)},
           "proj": {"kernel": table.get(f"{prefix}.proj.weight").T.reshape(num_heads, head_dim, -1)}}
    return out


def _block(table: common.KeyTable, prefix: str, model, stage: int) -> Dict[str, Any]:
    """Returns one `MetaFormerBlock`'s params from timm keys under `prefix` (e.g. "stages.2.blocks.0")."""
    mixer = model.token_mixers[stage]
    out: Dict[str, Any] = {"norm1": norm(table, f"{prefix}.norm1", model.norm_bias),
                           "norm2": norm(table, f"{prefix}.norm2", model.norm_bias),
                           "mlp": {"fc1": dense(table, f"{prefix}.mlp.fc1", model.mlp_bias),
                                   "fc2": dense(table, f"{prefix}.mlp.fc2", model.mlp_bias)}}
    if mixer == "sepconv":
        out["token_mixer"] = {"pwconv1": dense(table, f"{prefix}.token_mixer.pwconv1", False),
                              "act1": _star_relu(table, f"{prefix}.token_mixer.act1"),
                              "dwconv": conv(table, f"{prefix}.token_mixer.dwconv", False),
                              "pwconv2": dense(table, f"{prefix}.token_mixer.pwconv2", False)}
    elif mixer == "attention":
        num_heads = max(model.dims[stage] // model.head_dim, 1)
        out["token_mixer"] = _attention(table, f"{prefix}.token_mixer", num_heads)
    if model.mlp_activation == "starrelu":
        out["mlp_act"] = _star_relu(table, f"{prefix}.mlp.act")
    scales = (("layer_scale", model.layer_scale_init_value), ("res_scale", model.res_scale_init_values[stage]))
    for index in (1, 2):
        for kind, init_value in scales:
            if init_value is not None:
                out[f"{kind}{index}"] = {"gamma": table.get(f"{prefix}.{kind}{index}.scale").reshape(-1)}
    return out


def convert_timm(state_dict: Dict[str, np.ndarray], model) -> Dict[str, Any]:
    """Returns {"params": ...} for a `MetaFormer` from a timm state dict (raises naming bad keys/shapes)."""
    table = common.KeyTable(state_dict)
    # The stem and downsampling norms are LayerNorms without bias (timm's LayerNorm2dNoBias).
    params: Dict[str, Any] = {"stem": {"conv": conv(table, "stem.conv")}}
    if model.downsample_norm:
        params["stem"]["norm"] = norm(table, "stem.norm", bias=False)
    previous = model.dims[0]
    for stage, (depth, dim) in enumerate(zip(model.depths, model.dims)):
        stage_params: Dict[str, Any] = {}
        if dim != previous:
            stage_params["downsample"] = {"conv": conv(table, f"stages.{stage}.downsample.conv")}
            if model.downsample_norm:
                stage_params["downsample"]["norm"] = norm(table, f"stages.{stage}.downsample.norm", bias=False)
        for index in range(depth):
            stage_params[f"blocks_{index}"] = _block(table, f"stages.{stage}.blocks.{index}", model, stage)
        params[f"stages_{stage}"] = stage_params
        previous = dim
    head: Dict[str, Any] = {"norm": norm(table, "head.norm")}
    classifier_keys = [key for key in state_dict if key.startswith("head.fc.")]
    if model.num_classes:
        if model.use_mlp_head:
            head["fc"] = {"fc1": dense(table, "head.fc.fc1"), "norm": norm(table, "head.fc.norm"),
                          "fc2": dense(table, "head.fc.fc2")}
        else:
            head["fc"] = dense(table, "head.fc")
    else:
        for key in classifier_keys:  # dropped: the model has no classifier
            table.get(key)
    params["head"] = head
    table.finish()
    return common.checked(params, model)
