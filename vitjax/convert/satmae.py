"""Official SatMAE++ pretraining checkpoints (techmn/satmae_pp, PyTorch) -> vitjax `models.satmae.SatMAE` params.

Both of their pretraining models load:

  * group-channel (`models_mae_group_channels.py`): `patch_embed.{g}.proj.*`, `cls_token`, `blocks.{i}.*`, `norm.*`,
    `decoder_embed.*`, `mask_token`, `decoder_blocks.{i}.*`, `decoder_norm.*`, `decoder_pred.{g}.*`, and the
    up-sampling `proj_up_conv.*`, `proj_up_norm.*`, `up_block1.*`, `up_block2.*`;
  * RGB (`models_mae.py`): the MAE keys (see `vitjax.convert.mae`) and `proj_up_*`, `up_block.*`.

The fixed sin-cos tables (`pos_embed`, `channel_embed`, `decoder_pos_embed`, `decoder_channel_embed`) are checked
against the ones the model computes, not loaded. The module must be built with the checkpoint's settings (the
`satmae` objective builds it from a config).

    variables = vitjax.convert.satmae.convert_pretrain(common.load_state_dict("checkpoint-49.pth"), module)
"""
from typing import Any, Dict

import flax
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.convert import common
from vitjax.convert import mae as mae_convert
from vitjax.convert import vit as vit_convert
from vitjax.models import layers
from vitjax.models import satmae as satmae_model

_CHECK_ATOL = 1e-4  # a stored sin-cos table is float32 of the float64 formula
_UPSAMPLE_PREFIXES = ("proj_up_conv.", "proj_up_norm.", "up_block")


def _conv(table: common.KeyTable, prefix: str) -> Dict[str, np.ndarray]:
    return {"kernel": table.get(f"{prefix}.weight", common.conv), "bias": table.get(f"{prefix}.bias")}


def _norm(table: common.KeyTable, prefix: str) -> Dict[str, np.ndarray]:
    return {"scale": table.get(f"{prefix}.weight"), "bias": table.get(f"{prefix}.bias")}


def _transposed_conv(table: common.KeyTable, prefix: str) -> Dict[str, np.ndarray]:
    # torch's ConvTranspose2d weight is (in, out, kh, kw); lax.conv_transpose convolves the dilated input with an
    # (kh, kw, in, out) kernel, which is torch's flipped in space.
    weight = table.get(f"{prefix}.weight")
    return {"kernel": np.ascontiguousarray(weight.transpose(2, 3, 0, 1)[::-1, ::-1]),
            "bias": table.get(f"{prefix}.bias")}


def upsample_params(table: common.KeyTable, block_prefixes) -> Dict[str, Any]:
    """Returns the `MultiScaleHead` params from `proj_up_*` and the up-sampling blocks under `block_prefixes`."""
    params: Dict[str, Any] = {"proj": _conv(table, "proj_up_conv"), "proj_norm": _norm(table, "proj_up_norm")}
    for index, prefix in enumerate(block_prefixes):
        params[f"blocks_{index}"] = {
            "up_conv": _transposed_conv(table, f"{prefix}.up_conv"), "up_norm": _norm(table, f"{prefix}.up_norm"),
            "res_conv1": _conv(table, f"{prefix}.res_block.conv1"),
            "res_conv2": _conv(table, f"{prefix}.res_block.conv2"),
            "res_norm": _norm(table, f"{prefix}.res_norm"), "proj_out": _conv(table, f"{prefix}.proj_out")}
    return params


def _check_table(table: common.KeyTable, key: str, expected: np.ndarray) -> None:
    stored = np.asarray(table.get(key), np.float32).reshape(expected.shape)
    if not np.allclose(stored, expected, atol=_CHECK_ATOL):
        raise ValueError(f"{key} is not the fixed sin-cos table the model computes (shape {expected.shape}): the "
                         "checkpoint's group or embedding widths differ from the module's")


def _group_backbone(table: common.KeyTable, backbone: satmae_model.GroupChannelMAE) -> Dict[str, Any]:
    groups = backbone.channel_groups
    encoder: Dict[str, Any] = {"cls_token": table.get("cls_token"), "norm": _norm(table, "norm")}
    for index in range(len(groups)):
        encoder[f"patch_embed_{index}"] = {"proj": _conv(table, f"patch_embed.{index}.proj")}
    for index in range(backbone.depth):
        encoder[f"blocks_{index}"] = vit_convert.block_params(table, f"blocks.{index}", backbone.num_heads)
    decoder: Dict[str, Any] = {"embed": vit_convert.dense_params(table, "decoder_embed"),
                               "mask_token": table.get("mask_token"), "norm": _norm(table, "decoder_norm")}
    for index in range(backbone.decoder_depth):
        decoder[f"blocks_{index}"] = vit_convert.block_params(table, f"decoder_blocks.{index}",
                                                              backbone.decoder_num_heads)
    for index in range(len(groups)):
        decoder[f"pred_{index}"] = vit_convert.dense_params(table, f"decoder_pred.{index}")
    grid = backbone.grid
    for prefix, width, group_dim in (("", backbone.embed_dim, backbone.group_embed_dim),
                                     ("decoder_", backbone.decoder_embed_dim, backbone.decoder_group_embed_dim)):
        spatial = layers.posemb_sincos_2d(grid[0], grid[1], width - group_dim)
        _check_table(table, f"{prefix}pos_embed", np.concatenate([np.zeros((1, spatial.shape[1]), np.float32),
                                                                  spatial]))
        _check_table(table, f"{prefix}channel_embed",
                     satmae_model.group_embedding(len(groups) + (1 if prefix else 0), group_dim))
    return {"encoder": encoder, "decoder": decoder}


def convert_pretrain(state_dict: Dict[str, np.ndarray], module: satmae_model.SatMAE) -> Dict[str, Any]:
    """Returns {"params": {"backbone", "upsample"}} of a `SatMAE` from an official pretraining state dict."""
    if module.grouped:
        table = common.KeyTable(state_dict)
        backbone = _group_backbone(table, module.backbone)
        blocks = [f"up_block{index + 1}" for index in range(module.num_scales)]
    else:
        mae_keys = {key: value for key, value in state_dict.items() if not key.startswith(_UPSAMPLE_PREFIXES)}
        backbone = mae_convert.convert_pretrain(mae_keys, module.backbone)["params"]
        table = common.KeyTable(state_dict, ignore=tuple(mae_keys))
        if module.num_scales != 1:
            raise ValueError(f"The official RGB model has one up-sampling block; the module has {module.num_scales}")
        blocks = ["up_block"]
    params = {"backbone": backbone, "upsample": upsample_params(table, blocks)}
    table.finish()
    images = jnp.zeros((1, module.img_size, module.img_size, module.in_chans), jnp.float32)
    shapes = jax.eval_shape(lambda: module.init({"params": jax.random.key(0), "masking": jax.random.key(1)}, images))
    common.check_shapes(params, flax.linen.meta.unbox(shapes)["params"])
    return {"params": params}


__all__ = ["convert_pretrain", "upsample_params"]
