"""Official ChannelViT (insitro/ChannelViT `channelvit/backbone/{channel_vit,hcs_channel_vit}.py`) state dicts ->
vitjax `ChannelViT` params.

Key table (official -> vitjax): `patch_embed.proj` (Conv3d (D, 1, 1, p, p)) -> `patch_embed/proj` (p, p, 1, D);
`patch_embed.channel_embed` -> `channel_embed` (in_chans, D), from the plain models' parameter (1, D, C, 1, 1) or
the HCS models' `nn.Embedding` `.weight` (C, D); `cls_token`, `pos_embed`; `blocks.{i}.{norm1, attn.qkv, attn.proj,
norm2, mlp.fc1, mlp.fc2}` -> `blocks_{i}/...` (timm's ViT block layout); `norm`. The backbone has no classifier of
its own (the official supervised wrapper adds `classifier`): `head.*` or `classifier.*` keys become `head`, and a
`backbone.` prefix (the wrapper's state dict) is dropped.
"""
from typing import Any, Dict

import numpy as np

from vitjax.convert import common
from vitjax.convert.vit import block_params, classifier_params, norm_params


def _strip_wrapper(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """Returns the state dict without the supervised wrapper's `backbone.` prefix and with `classifier` as `head`."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("backbone."):
            key = key[len("backbone."):]
        elif key.startswith("classifier."):
            key = "head." + key[len("classifier."):]
        out[key] = value
    return out


def _channel_embed(value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    if value.ndim == 5:  # the plain models' (1, D, C, 1, 1) parameter
        return value[0, :, :, 0, 0].T
    return value


def convert_timm(state_dict: Dict[str, Any], model) -> Dict[str, Any]:
    """Returns {"params"} for a `ChannelViT` from an official backbone or supervised-wrapper state dict."""
    table = common.KeyTable(_strip_wrapper(state_dict))
    embed_key = ("patch_embed.channel_embed.weight" if "patch_embed.channel_embed.weight" in table
                 else "patch_embed.channel_embed")
    # Conv3d (D, 1, 1, p, p) -> a 1-channel Conv2d's (p, p, 1, D)
    kernel = table.get("patch_embed.proj.weight", lambda weight: common.conv(weight[:, :, 0]))
    params: Dict[str, Any] = {
        "patch_embed": {"proj": {"kernel": kernel, "bias": table.get("patch_embed.proj.bias")}},
        "channel_embed": table.get(embed_key, _channel_embed),
        "cls_token": table.get("cls_token"),
        "pos_embed": table.get("pos_embed"),
        "norm": norm_params(table, "norm"),
    }
    for index in range(model.depth):
        params[f"blocks_{index}"] = block_params(table, f"blocks.{index}", model.num_heads, model.qkv_bias)
    classifier_params(table, params, "head", model.num_classes)
    table.finish()
    return common.checked(params, model)
