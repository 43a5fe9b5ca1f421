"""timm LeViT state dicts (linear `levit_*` and conv `levit_conv_*` modes) -> vitjax `Levit` variables.

Both modes hold the same numbers: the conv mode's 1x1 conv weights (O, I, 1, 1) are the linear mode's
(O, I). BatchNorm running statistics go to `batch_stats`; `attention_bias_idxs` (not saved by timm,
dropped if present) is recomputed by the model.
"""
from typing import Any, Dict, Tuple

import numpy as np

from vitjax.convert import common
from vitjax.convert.tiny_vit import bn_params, bn_stats, conv_bn
from vitjax.models import layers


def linear_bn(table: common.KeyTable, prefix: str) -> Tuple[Dict, Dict]:
    """Returns (params, batch_stats) of a `levit.LinearBN` from timm's `{prefix}.linear` + `{prefix}.bn`."""
    weight = table.get(f"{prefix}.linear.weight")
    if weight.ndim == 4:  # conv mode: a 1x1 conv
        if weight.shape[2:] != (1, 1):
            raise ValueError(f"{prefix}.linear.weight: expected a 1x1 conv, got shape {weight.shape}")
        weight = weight[:, :, 0, 0]
    return ({"linear": {"kernel": common.linear(weight)}, "bn": bn_params(table, f"{prefix}.bn")},
            {"bn": bn_stats(table, f"{prefix}.bn")})


def _collect(table: common.KeyTable, prefix: str, children: Dict[str, str]) -> Tuple[Dict, Dict]:
    """Returns (params, batch_stats) of several LinearBN children: {our name: timm sub-prefix}."""
    params, stats = {}, {}
    for ours, theirs in children.items():
        params[ours], stats[ours] = linear_bn(table, f"{prefix}.{theirs}")
    return params, stats


def _attention(table: common.KeyTable, prefix: str, children: Dict[str, str]) -> Tuple[Dict, Dict]:
    params, stats = _collect(table, prefix, children)
    params["attention_biases"] = table.get(f"{prefix}.attention_biases")
    return params, stats


def _mlp(table: common.KeyTable, prefix: str) -> Tuple[Dict, Dict]:
    return _collect(table, prefix, {"ln1": "ln1", "ln2": "ln2"})


def convert_timm(state_dict: Dict[str, np.ndarray], model) -> Dict[str, Any]:
    """Returns {"params", "batch_stats"} for a `Levit` from a timm LeViT state dict (either mode)."""
    table = common.KeyTable({k: v for k, v in state_dict.items() if not k.endswith("attention_bias_idxs")})
    params: Dict[str, Any] = {}
    stats: Dict[str, Any] = {}
    num_convs = 4 if model.stem_type == "s16" else 3
    for index in range(1, num_convs + 1):
        params[f"stem_conv{index}"], stats[f"stem_conv{index}"] = conv_bn(table, f"stem.conv{index}", "linear")
    for stage, depth in enumerate(model.depth):
        prefix = f"stages.{stage}"
        stage_params, stage_stats = {}, {}
        if stage > 0:
            down = f"{prefix}.downsample"
            attn = _attention(table, f"{down}.attn_downsample", {"kv": "kv", "q": "q.ln", "proj": "proj.ln"})
            mlp = _mlp(table, f"{down}.mlp")
            stage_params["downsample"] = {"attn_downsample": attn[0], "mlp": mlp[0]}
            stage_stats["downsample"] = {"attn_downsample": attn[1], "mlp": mlp[1]}
        for index in range(depth):
            block = f"{prefix}.blocks.{index}"
            attn = _attention(table, f"{block}.attn", {"qkv": "qkv", "proj": "proj.ln"})
            mlp = _mlp(table, f"{block}.mlp")
            stage_params[f"blocks_{index}"] = {"attn": attn[0], "mlp": mlp[0]}
            stage_stats[f"blocks_{index}"] = {"attn": attn[1], "mlp": mlp[1]}
        params[f"stages_{stage}"], stats[f"stages_{stage}"] = stage_params, stage_stats
    for head in ("head", "head_dist"):
        if f"{head}.linear.weight" not in table:
            continue
        head_params = {"bn": bn_params(table, f"{head}.bn"),
                       "linear": {"kernel": table.get(f"{head}.linear.weight", common.linear),
                                  "bias": table.get(f"{head}.linear.bias")}}
        head_stats = {"bn": bn_stats(table, f"{head}.bn")}
        # A headless model (num_classes=0) or a single-head one drops the checkpoint's extra head.
        if model.num_classes and (head == "head" or model.distilled):
            params[head], stats[head] = head_params, head_stats
    table.finish()
    img = layers.to_2tuple(model.img_size)
    expected = common.expected_variables(model, (img[0], img[1], model.in_chans))
    common.check_shapes(params, expected["params"])
    common.check_shapes(stats, expected["batch_stats"])
    return {"params": params, "batch_stats": stats}
