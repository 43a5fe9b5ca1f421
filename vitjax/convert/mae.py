"""Official MAE checkpoints (facebookresearch/mae, PyTorch) -> vitjax variables.

Three kinds of released file load, told apart by their keys:

  * pretrain with decoder (`mae_visualize_vit_large.pth`, or a `main_pretrain.py` checkpoint):
    keys `cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.{i}.*`, `norm.*`, `mask_token`,
    `decoder_embed.*`, `decoder_pos_embed`, `decoder_blocks.{i}.*`, `decoder_norm.*`, `decoder_pred.*`
    -> variables of a `models.mae.MaskedAutoencoder` ({"params": {"encoder": ..., "decoder": ...}});
  * encoder-only pretrain (`mae_pretrain_vit_base.pth`): the same without the decoder keys
    -> {"params": {"encoder": ...}}, for fine-tuning or linear probing;
  * fine-tuned classifier (`mae_finetuned_vit_base.pth`: `fc_norm`, `head`)
    -> variables of a `VisionTransformer(global_pool="avg", fc_norm=True)`.

    import vitjax.convert.mae as mae_convert
    variables = mae_convert.from_official("mae_visualize_vit_large.pth")            # variables only
    module, variables = mae_convert.load_official("mae_visualize_vit_large.pth")    # and the module
    # fine-tune or probe: config.init_from = "mae_pretrain_vit_base.pth" (see vitjax.weights)

The architecture (width, depth, patch and image size) is read from the shapes; the number of heads
is not in the shapes, so it defaults to the paper's (ViT-B 12, L and H 16; decoder 16) and must be
given for other widths. The fixed sin-cos tables (`pos_embed`, `decoder_pos_embed`) are checked
against the ones the model computes, not loaded.
"""
from typing import Any, Dict, Optional, Tuple

import flax
import jax
import numpy as np

from vitjax.convert import common, vit as vit_convert
from vitjax.models import layers

# Heads of the paper's encoders and decoder, by width (models_mae.py / models_vit.py).
DEFAULT_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
DEFAULT_DECODER_HEADS = {512: 16}
_CHECK_ATOL = 1e-4  # a released sin-cos table is float32 of the float64 formula


def checkpoint_kind(state_dict: Dict[str, np.ndarray]) -> str:
    """Returns "pretrain" (with decoder), "encoder" (pretrain without decoder) or "finetuned" (has a head)."""
    if "decoder_embed.weight" in state_dict:
        return "pretrain"
    if "head.weight" in state_dict:
        return "finetuned"
    if "patch_embed.proj.weight" in state_dict:
        return "encoder"
    raise ValueError("Not an MAE checkpoint: no 'patch_embed.proj.weight' key; keys start with "
                     f"{sorted(state_dict)[:8]}")


def is_official_mae(state_dict: Dict[str, np.ndarray]) -> bool:
    """Returns whether a state dict is an MAE pretraining checkpoint (with decoder, or an encoder whose
    position embeddings are MAE's fixed sin-cos table); timm-style classifiers are not."""
    if "decoder_embed.weight" in state_dict:
        return True
    if "head.weight" in state_dict or "patch_embed.proj.weight" not in state_dict or "pos_embed" not in state_dict:
        return False
    try:
        settings = encoder_settings(state_dict, num_heads=1)
    except (KeyError, ValueError):
        return False
    if "img_size" not in settings:
        return False
    side = settings["img_size"] // settings["patch_size"]
    try:
        _check_sincos(common.KeyTable(state_dict), "pos_embed", (side, side), settings["embed_dim"])
    except ValueError:
        return False
    return True


def _heads(width: int, given: Optional[int], table: Dict[int, int], what: str) -> int:
    """Returns `given`, or the paper's number of heads for `width`."""
    if given is not None:
        return int(given)
    if width not in table:
        raise ValueError(f"Cannot infer the {what} number of heads for width {width}: pass {what}num_heads= "
                         f"(known widths: {sorted(table)})")
    return table[width]


def encoder_settings(state_dict: Dict[str, np.ndarray], num_heads: Optional[int] = None) -> Dict[str, Any]:
    """Returns `VisionTransformer` settings (width, depth, heads, patch, image size, channels) read from the keys."""
    patch_weight = state_dict["patch_embed.proj.weight"]
    width, in_chans, patch, _ = patch_weight.shape
    depth = 1 + max(int(key.split(".")[1]) for key in state_dict if key.startswith("blocks."))
    num_positions = state_dict["pos_embed"].shape[1] - 1 if "pos_embed" in state_dict else None
    side = int(round(np.sqrt(num_positions))) if num_positions else None
    if num_positions and side * side != num_positions:
        raise ValueError(f"pos_embed has {num_positions} patch positions, not a square grid")
    mlp_dim = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    settings = dict(embed_dim=int(width), depth=depth, num_heads=_heads(int(width), num_heads, DEFAULT_HEADS, ""),
                    mlp_dim=int(mlp_dim), patch_size=int(patch), in_chans=int(in_chans),
                    qkv_bias="blocks.0.attn.qkv.bias" in state_dict)
    if side:
        settings["img_size"] = int(side * patch)
    return settings


def _check_sincos(table: common.KeyTable, key: str, grid: Tuple[int, int], width: int) -> None:
    """Reads `key` and raises if it is not the fixed 2-D sin-cos table (cls row zero) the model computes."""
    stored = np.asarray(table.get(key), np.float32).reshape(-1, width)
    expected = np.concatenate([np.zeros((1, width), np.float32), layers.posemb_sincos_2d(grid[0], grid[1], width)])
    if stored.shape != expected.shape or not np.allclose(stored, expected, atol=_CHECK_ATOL):
        raise ValueError(f"{key} is not MAE's fixed sin-cos table for a {grid} grid (shape {stored.shape}); "
                         "a checkpoint with learned position embeddings needs pos_embed='learn' "
                         "(convert it with vitjax.convert.vit.convert_timm)")


def convert_encoder(state_dict: Dict[str, np.ndarray], encoder) -> Dict[str, Any]:
    """Returns the params of an MAE encoder (`VisionTransformer`, sin-cos posemb, no head) from official keys."""
    encoder_keys = {k: v for k, v in state_dict.items()
                    if k.split(".")[0] in ("cls_token", "pos_embed", "patch_embed", "blocks", "norm")}
    if encoder.pos_embed == "sincos2d":
        _check_sincos(common.KeyTable(encoder_keys), "pos_embed", encoder.grid_size, encoder.embed_dim)
        encoder_keys.pop("pos_embed")
    return vit_convert.convert_timm(encoder_keys, encoder)["params"]


def convert_pretrain(state_dict: Dict[str, np.ndarray], module) -> Dict[str, Any]:
    """Returns {"params": {"encoder", "decoder"}} of a `MaskedAutoencoder` from an official pretrain state dict."""
    table = common.KeyTable(state_dict, ignore=("cls_token", "pos_embed", "patch_embed", "blocks.", "norm."))
    decoder: Dict[str, Any] = {
        "embed": vit_convert.dense_params(table, "decoder_embed"),
        "mask_token": table.get("mask_token"),
        "norm": vit_convert.norm_params(table, "decoder_norm"),
        "pred": vit_convert.dense_params(table, "decoder_pred"),
    }
    for index in range(module.decoder_depth):
        decoder[f"blocks_{index}"] = vit_convert.block_params(table, f"decoder_blocks.{index}",
                                                              module.decoder_num_heads)
    _check_sincos(table, "decoder_pos_embed", module.encoder.grid_size, module.decoder_embed_dim)
    table.finish()
    if module.encoder.scan:
        from vitjax.models.vit import scan_params
        decoder = scan_params(decoder, module.decoder_depth)
    params = {"encoder": convert_encoder(state_dict, module.encoder), "decoder": decoder}
    common.check_shapes(params, _expected_mae_params(module))
    return {"params": params}


def _expected_mae_params(module) -> Dict[str, Any]:
    """Returns the MAE module's param shapes (no computation)."""
    import jax.numpy as jnp
    img = layers.to_2tuple(module.encoder.img_size)
    images = jnp.zeros((1, img[0], img[1], module.encoder.in_chans), jnp.float32)
    shapes = jax.eval_shape(lambda: module.init({"params": jax.random.key(0), "masking": jax.random.key(1)},
                                                images))
    return flax.linen.meta.unbox(shapes)["params"]


def build_module(state_dict: Dict[str, np.ndarray], *, num_heads: Optional[int] = None,
                 decoder_num_heads: Optional[int] = None, mask_ratio: float = 0.75, **encoder_overrides):
    """Returns the `MaskedAutoencoder` (kind "pretrain") or `VisionTransformer` whose shapes match the checkpoint."""
    from vitjax.models.mae import MaskedAutoencoder, mae_encoder_settings
    from vitjax.models.vit import VisionTransformer
    kind = checkpoint_kind(state_dict)
    settings = encoder_settings(state_dict, num_heads)
    if kind == "finetuned":
        settings.update(num_classes=int(state_dict["head.weight"].shape[0]),
                        global_pool="avg" if "fc_norm.weight" in state_dict else "token",
                        fc_norm="fc_norm.weight" in state_dict, weight_init="timm")
        settings.update(encoder_overrides)
        model = VisionTransformer(**settings)
        model.validate()
        return model
    encoder = VisionTransformer(**mae_encoder_settings(**settings, **encoder_overrides))
    if kind == "encoder":
        encoder.validate()
        return encoder
    decoder_width = int(state_dict["decoder_embed.weight"].shape[0])
    decoder_depth = 1 + max(int(key.split(".")[1]) for key in state_dict if key.startswith("decoder_blocks."))
    module = MaskedAutoencoder(
        encoder=encoder, decoder_embed_dim=decoder_width, decoder_depth=decoder_depth,
        decoder_num_heads=_heads(decoder_width, decoder_num_heads, DEFAULT_DECODER_HEADS, "decoder_"),
        decoder_mlp_ratio=state_dict["decoder_blocks.0.mlp.fc1.weight"].shape[0] / decoder_width,
        mask_ratio=mask_ratio)
    module.validate()
    return module


def load_official(source: common.StateDictSource, *, num_heads: Optional[int] = None,
                  decoder_num_heads: Optional[int] = None, mask_ratio: float = 0.75, **encoder_overrides):
    """Returns (module, variables) of an official MAE checkpoint (path or state dict); see the module doc.

    `encoder_overrides` are `VisionTransformer` settings (e.g. `scan=True`, `dtype=jnp.bfloat16`).
    """
    state_dict = common.load_state_dict(source)
    module = build_module(state_dict, num_heads=num_heads, decoder_num_heads=decoder_num_heads,
                          mask_ratio=mask_ratio, **encoder_overrides)
    kind = checkpoint_kind(state_dict)
    if kind == "pretrain":
        return module, convert_pretrain(state_dict, module)
    if kind == "encoder":
        return module, {"params": {"encoder": convert_encoder(state_dict, module)}}
    return module, vit_convert.convert_timm(state_dict, module)


def from_official(source: common.StateDictSource, **kwargs) -> Dict[str, Any]:
    """Returns the flax variables of an official MAE checkpoint (pretrain, encoder-only or fine-tuned)."""
    return load_official(source, **kwargs)[1]


__all__ = ["build_module", "checkpoint_kind", "is_official_mae", "convert_encoder", "convert_pretrain",
           "from_official", "load_official"]
