"""timm TinyViT state dicts -> vitjax `TinyVit` variables (params and BatchNorm batch_stats).

timm's attention projects to per-head [q, k, v] chunks (`qkv.view(B, N, heads, 3 * head_dim)`), while
`layers.Attention` holds (3, heads, head_dim): the kernel is regrouped. `attention_bias_idxs` is not saved
by timm (and dropped if a checkpoint has it); the model recomputes it.
"""
from typing import Any, Dict, Tuple

import numpy as np

from vitjax.convert import common
from vitjax.convert.vit import dense_params, norm_params
from vitjax.models import layers


def conv_bn(table: common.KeyTable, prefix: str, conv_name: str = "conv") -> Tuple[Dict, Dict]:
    """Returns (params, batch_stats) of a `layers.ConvBN` from timm's `{prefix}.{conv_name}` + `{prefix}.bn`.

    A 2-D (Linear) weight is taken as a 1x1 conv.
    """
    weight = table.get(f"{prefix}.{conv_name}.weight")
    if weight.ndim == 2:
        weight = weight[:, :, None, None]
    params = {"conv": {"kernel": common.conv(weight)}, "bn": bn_params(table, f"{prefix}.bn")}
    return params, {"bn": bn_stats(table, f"{prefix}.bn")}


def bn_params(table: common.KeyTable, prefix: str) -> Dict[str, np.ndarray]:
    """Returns BatchNorm {scale, bias} from torch's `weight`/`bias`."""
    return {"scale": table.get(f"{prefix}.weight"), "bias": table.get(f"{prefix}.bias")}


def bn_stats(table: common.KeyTable, prefix: str) -> Dict[str, np.ndarray]:
    """Returns BatchNorm batch_stats {mean, var} from torch's running statistics."""
    return {"mean": table.get(f"{prefix}.running_mean"), "var": table.get(f"{prefix}.running_var")}


def _per_head_qkv(table: common.KeyTable, prefix: str, num_heads: int) -> Dict[str, Any]:
    """Returns `layers.Attention` params from a qkv whose output is grouped per head as [q, k, v]."""
    weight = table.get(f"{prefix}.qkv.weight")            # (heads * 3 * head_dim, C)
    width = weight.shape[1]
    head_dim = weight.shape[0] // (3 * num_heads)
    kernel = weight.T.reshape(width, num_heads, 3, head_dim).transpose(0, 2, 1, 3)
    bias = table.get(f"{prefix}.qkv.bias").reshape(num_heads, 3, head_dim).transpose(1, 0, 2)
    proj = table.get(f"{prefix}.proj.weight")             # (C, heads * head_dim)
    return {"qkv": {"kernel": kernel, "bias": bias},
            "proj": {"kernel": proj.T.reshape(num_heads, head_dim, -1), "bias": table.get(f"{prefix}.proj.bias")}}


def _convs(table: common.KeyTable, prefix: str, names) -> Tuple[Dict, Dict]:
    """Returns (params, batch_stats) for several ConvBN children of one module."""
    params, stats = {}, {}
    for name in names:
        params[name], stats[name] = conv_bn(table, f"{prefix}.{name}")
    return params, stats


def convert_timm(state_dict: Dict[str, np.ndarray], model) -> Dict[str, Any]:
    """Returns {"params", "batch_stats"} for a `TinyVit` from a timm TinyViT state dict."""
    table = common.KeyTable({k: v for k, v in state_dict.items() if not k.endswith("attention_bias_idxs")})
    params: Dict[str, Any] = {}
    stats: Dict[str, Any] = {}
    for index in (1, 2):
        params[f"patch_embed_conv{index}"], stats[f"patch_embed_conv{index}"] = conv_bn(
            table, f"patch_embed.conv{index}")
    for stage, (depth, heads) in enumerate(zip(model.depths, model.num_heads)):
        prefix = f"stages.{stage}"
        stage_params, stage_stats = {}, {}
        if stage > 0:
            stage_params["downsample"], stage_stats["downsample"] = _convs(
                table, f"{prefix}.downsample", ("conv1", "conv2", "conv3"))
        for index in range(depth):
            block = f"{prefix}.blocks.{index}"
            if stage == 0:
                stage_params[f"blocks_{index}"], stage_stats[f"blocks_{index}"] = _convs(
                    table, block, ("conv1", "conv2", "conv3"))
                continue
            local_params, local_stats = conv_bn(table, f"{block}.local_conv")
            stage_params[f"blocks_{index}"] = {
                "attn_norm": norm_params(table, f"{block}.attn.norm"),
                "attention_biases": table.get(f"{block}.attn.attention_biases"),
                "attn": _per_head_qkv(table, f"{block}.attn", heads),
                "local_conv": local_params,
                "mlp_norm": norm_params(table, f"{block}.mlp.norm"),
                "mlp": {"fc1": dense_params(table, f"{block}.mlp.fc1"),
                        "fc2": dense_params(table, f"{block}.mlp.fc2")},
            }
            stage_stats[f"blocks_{index}"] = {"local_conv": local_stats}
        params[f"stages_{stage}"], stats[f"stages_{stage}"] = stage_params, stage_stats
    params["head_norm"] = norm_params(table, "head.norm")
    if "head.fc.weight" in table:
        head = dense_params(table, "head.fc")
        if model.num_classes:
            params["head"] = head  # otherwise dropped: the model has no classifier
    table.finish()
    img = layers.to_2tuple(model.img_size)
    expected = common.expected_variables(model, (img[0], img[1], model.in_chans))
    common.check_shapes(params, expected["params"])
    common.check_shapes(stats, expected["batch_stats"])
    return {"params": params, "batch_stats": stats}
