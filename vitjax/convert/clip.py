"""open_clip CLIP and transformers SigLIP state dicts -> vitjax `CLIP` params, by explicit key tables."""
from typing import Any, Dict

import flax
import jax
import numpy as np

from vitjax.convert import common
from vitjax.convert.vit import dense_params, norm_params
from vitjax.models import layers

# Not weights: open_clip's causal-mask buffer and the config scalars of OpenAI's released checkpoints.
OPEN_CLIP_IGNORED = ("attn_mask", "input_resolution", "context_length", "vocab_size")
# transformers keeps the position ids as a buffer in older checkpoints.
TRANSFORMERS_IGNORED = ("vision_model.embeddings.position_ids", "text_model.embeddings.position_ids")


def _fused_attention(in_weight: np.ndarray, in_bias: np.ndarray, out_weight: np.ndarray, out_bias: np.ndarray,
                     num_heads: int) -> Dict[str, Any]:
    """Returns `layers.Attention` params from torch's packed q/k/v projection (3W, W) and output projection."""
    width = in_weight.shape[1]
    head_dim = width // num_heads
    return {"qkv": {"kernel": in_weight.T.reshape(width, 3, num_heads, head_dim),
                    "bias": in_bias.reshape(3, num_heads, head_dim)},
            "proj": {"kernel": out_weight.T.reshape(num_heads, head_dim, width), "bias": out_bias}}


def _open_clip_block(table: common.KeyTable, prefix: str, num_heads: int) -> Dict[str, Any]:
    """Returns one block's params from open_clip's ResidualAttentionBlock keys under `prefix`."""
    attention = _fused_attention(table.get(f"{prefix}.attn.in_proj_weight"), table.get(f"{prefix}.attn.in_proj_bias"),
                                 table.get(f"{prefix}.attn.out_proj.weight"), table.get(f"{prefix}.attn.out_proj.bias"),
                                 num_heads)
    return {"norm1": norm_params(table, f"{prefix}.ln_1"), "attn": attention,
            "norm2": norm_params(table, f"{prefix}.ln_2"),
            "mlp": {"fc1": dense_params(table, f"{prefix}.mlp.c_fc"),
                    "fc2": dense_params(table, f"{prefix}.mlp.c_proj")}}


def _projection(table: common.KeyTable, key: str) -> Dict[str, np.ndarray]:
    """Returns a Dense from open_clip's projection: a (width, dim) Parameter (x @ P) or a Linear `key`.weight/bias."""
    if key in table:
        return {"kernel": table.get(key)}
    out = {"kernel": table.get(f"{key}.weight", common.linear)}
    if f"{key}.bias" in table:
        out["bias"] = table.get(f"{key}.bias")
    return out


def _check(params: Dict[str, Any], model) -> Dict[str, Any]:
    """Raises naming every path whose shape differs from `model`'s; returns {"params": params}."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *model.example_inputs(1))
    common.check_shapes(params, flax.linen.meta.unbox(shapes)["params"])
    return {"params": params}


def convert_open_clip(state_dict: Dict[str, np.ndarray], model) -> Dict[str, Any]:
    """Returns {"params": ...} for a CLIP-style `CLIP` (image_pool "token") from an open_clip CLIP state dict.

    The image position embedding is resampled (bicubic, as timm) when the checkpoint's grid differs.
    """
    if model.image_pool != "token":
        raise ValueError(f"open_clip's CLIP towers pool the class token; this model has image_pool="
                         f"{model.image_pool!r} (convert SigLIP with from_transformers)")
    table = common.KeyTable(state_dict, ignore=OPEN_CLIP_IGNORED)
    tower = model.image_tower(parent=None)
    visual = {
        "patch_embed": {"proj": {"kernel": table.get("visual.conv1.weight", common.conv)}},
        "cls_token": table.get("visual.class_embedding").reshape(1, 1, -1),
        "pos_embed": layers.resample_posemb(table.get("visual.positional_embedding")[None], tower.grid_size, 1),
        "norm_pre": norm_params(table, "visual.ln_pre"),
        "norm": norm_params(table, "visual.ln_post"),
    }
    for index in range(model.vision_depth):
        visual[f"blocks_{index}"] = _open_clip_block(table, f"visual.transformer.resblocks.{index}", model.vision_heads)
    text = {"token_embed": {"embedding": table.get("token_embedding.weight")},
            "pos_embed": table.get("positional_embedding"),
            "norm": norm_params(table, "ln_final"),
            "proj": _projection(table, "text_projection")}
    for index in range(model.text_depth):
        text[f"blocks_{index}"] = _open_clip_block(table, f"transformer.resblocks.{index}", model.text_heads)
    params = {"visual": visual, "image_proj": _projection(table, "visual.proj"), "text": text,
              "logit_scale": np.asarray(table.get("logit_scale"), np.float32).reshape(())}
    if "logit_bias" in table:
        params["logit_bias"] = np.asarray(table.get("logit_bias"), np.float32).reshape(())
    table.finish()
    return _check(params, model)


def _split_attention(table: common.KeyTable, prefix: str, num_heads: int) -> Dict[str, Any]:
    """Returns `layers.Attention` params from transformers' separate q_proj/k_proj/v_proj/out_proj under `prefix`."""
    weights = [table.get(f"{prefix}.{name}_proj.weight") for name in ("q", "k", "v")]
    biases = [table.get(f"{prefix}.{name}_proj.bias") for name in ("q", "k", "v")]
    return _fused_attention(np.concatenate(weights), np.concatenate(biases), table.get(f"{prefix}.out_proj.weight"),
                            table.get(f"{prefix}.out_proj.bias"), num_heads)


def _siglip_block(table: common.KeyTable, prefix: str, num_heads: int) -> Dict[str, Any]:
    """Returns one block's params from transformers' SiglipEncoderLayer keys under `prefix`."""
    return {"norm1": norm_params(table, f"{prefix}.layer_norm1"),
            "attn": _split_attention(table, f"{prefix}.self_attn", num_heads),
            "norm2": norm_params(table, f"{prefix}.layer_norm2"),
            "mlp": {"fc1": dense_params(table, f"{prefix}.mlp.fc1"), "fc2": dense_params(table, f"{prefix}.mlp.fc2")}}


def convert_transformers(state_dict: Dict[str, np.ndarray], model) -> Dict[str, Any]:
    """Returns {"params": ...} for a SigLIP-style `CLIP` (image_pool "map") from a transformers SiglipModel
    state dict."""
    if model.image_pool != "map" or model.text_pool != "last":
        raise ValueError("transformers' SiglipModel pools the image with an attention head and the text at its last "
                         f"position; this model has image_pool={model.image_pool!r}, text_pool={model.text_pool!r} "
                         "(convert CLIP with from_open_clip)")
    table = common.KeyTable(state_dict, ignore=TRANSFORMERS_IGNORED)
    tower = model.image_tower(parent=None)
    heads, width = model.vision_heads, model.vision_width
    vision = "vision_model"
    visual = {
        "patch_embed": {"proj": {"kernel": table.get(f"{vision}.embeddings.patch_embedding.weight", common.conv),
                                 "bias": table.get(f"{vision}.embeddings.patch_embedding.bias")}},
        "pos_embed": layers.resample_posemb(table.get(f"{vision}.embeddings.position_embedding.weight")[None],
                                            tower.grid_size, 0),
        "norm": norm_params(table, f"{vision}.post_layernorm"),
    }
    for index in range(model.vision_depth):
        visual[f"blocks_{index}"] = _siglip_block(table, f"{vision}.encoder.layers.{index}", heads)
    pool = _fused_attention(table.get(f"{vision}.head.attention.in_proj_weight"),
                            table.get(f"{vision}.head.attention.in_proj_bias"),
                            table.get(f"{vision}.head.attention.out_proj.weight"),
                            table.get(f"{vision}.head.attention.out_proj.bias"), heads)
    qkv = pool["qkv"]
    visual["attn_pool"] = {
        "latent": table.get(f"{vision}.head.probe").reshape(1, 1, width),
        "q": {"kernel": qkv["kernel"][:, 0], "bias": qkv["bias"][0]},
        "kv": {"kernel": qkv["kernel"][:, 1:], "bias": qkv["bias"][1:]},
        "proj": pool["proj"],
        "norm": norm_params(table, f"{vision}.head.layernorm"),
        "mlp": {"fc1": dense_params(table, f"{vision}.head.mlp.fc1"),
                "fc2": dense_params(table, f"{vision}.head.mlp.fc2")},
    }
    text = {"token_embed": {"embedding": table.get("text_model.embeddings.token_embedding.weight")},
            "pos_embed": table.get("text_model.embeddings.position_embedding.weight"),
            "norm": norm_params(table, "text_model.final_layer_norm"),
            "proj": dense_params(table, "text_model.head")}
    for index in range(model.text_depth):
        text[f"blocks_{index}"] = _siglip_block(table, f"text_model.encoder.layers.{index}", model.text_heads)
    params = {"visual": visual, "text": text,
              "logit_scale": np.asarray(table.get("logit_scale"), np.float32).reshape(()),
              "logit_bias": np.asarray(table.get("logit_bias"), np.float32).reshape(())}
    table.finish()
    return _check(params, model)


# --- a checkpoint's architecture, from its shapes (for init_from, which gets a file and a classifier's name) -----

def is_open_clip(state_dict: Dict[str, np.ndarray]) -> bool:
    """Returns whether `state_dict` has open_clip CLIP keys (image and text towers)."""
    return "visual.conv1.weight" in state_dict and "token_embedding.weight" in state_dict


def is_transformers_siglip(state_dict: Dict[str, np.ndarray]) -> bool:
    """Returns whether `state_dict` has transformers SiglipModel keys."""
    return "vision_model.embeddings.patch_embedding.weight" in state_dict and "text_model.head.weight" in state_dict


def _depth(state_dict, pattern: str) -> int:
    return len({key.split(".")[pattern.count(".")] for key in state_dict if key.startswith(pattern)})


def settings_from_state_dict(state_dict: Dict[str, np.ndarray], head_width: int = 64) -> Dict[str, Any]:
    """Returns the `CLIP` settings of an open_clip or transformers SigLIP state dict, read from its shapes.

    Head counts are not in the shapes: width / `head_width` (64 in every open_clip and SigLIP release).
    """
    if is_open_clip(state_dict):
        patch = state_dict["visual.conv1.weight"]
        width, grid = patch.shape[0], int(round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5))
        text_width = state_dict["token_embedding.weight"].shape[1]
        proj = state_dict["visual.proj"]
        return dict(embed_dim=proj.shape[1], img_size=grid * patch.shape[2], patch_size=patch.shape[2],
                    in_chans=patch.shape[1], vision_width=width, vision_heads=width // head_width,
                    vision_depth=_depth(state_dict, "visual.transformer.resblocks."),
                    vision_mlp_ratio=state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
                    vocab_size=state_dict["token_embedding.weight"].shape[0],
                    context_length=state_dict["positional_embedding"].shape[0], text_width=text_width,
                    text_heads=text_width // head_width, text_depth=_depth(state_dict, "transformer.resblocks."),
                    text_mlp_ratio=state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width)
    if is_transformers_siglip(state_dict):
        vision, text = "vision_model", "text_model"
        patch = state_dict[f"{vision}.embeddings.patch_embedding.weight"]
        width = patch.shape[0]
        grid = int(round(state_dict[f"{vision}.embeddings.position_embedding.weight"].shape[0] ** 0.5))
        tokens = state_dict[f"{text}.embeddings.token_embedding.weight"]
        return dict(embed_dim=width, img_size=grid * patch.shape[2], patch_size=patch.shape[2],
                    in_chans=patch.shape[1], vision_width=width, vision_heads=width // head_width,
                    vision_depth=_depth(state_dict, f"{vision}.encoder.layers."),
                    vision_mlp_ratio=state_dict[f"{vision}.encoder.layers.0.mlp.fc1.weight"].shape[0] / width,
                    vocab_size=tokens.shape[0],
                    context_length=state_dict[f"{text}.embeddings.position_embedding.weight"].shape[0],
                    text_width=tokens.shape[1], text_heads=tokens.shape[1] // head_width,
                    text_depth=_depth(state_dict, f"{text}.encoder.layers."),
                    text_mlp_ratio=state_dict[f"{text}.encoder.layers.0.mlp.fc1.weight"].shape[0] / tokens.shape[1])
    raise ValueError("Not an open_clip CLIP or transformers SiglipModel state dict (no visual.conv1.weight + "
                     "token_embedding.weight, nor vision_model.* + text_model.head.*)")
