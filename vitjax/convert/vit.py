"""timm ViT / DeiT state dicts -> vitjax `VisionTransformer` params (also used for MAE encoders)."""
from typing import Any, Dict

import numpy as np

from vitjax.convert import common
from vitjax.models import layers


def attention_params(table: common.KeyTable, prefix: str, num_heads: int, qkv_bias: bool = True,
                     qk_norm: bool = False) -> Dict[str, Any]:
    """Returns the params of a fused-qkv `layers.Attention` from timm keys under `prefix` (e.g. "blocks.0.attn")."""
    qkv_weight = table.get(f"{prefix}.qkv.weight")
    width = qkv_weight.shape[1]
    head_dim = qkv_weight.shape[0] // (3 * num_heads)
    out = {"qkv": {"kernel": qkv_weight.T.reshape(width, 3, num_heads, head_dim)},
           "proj": {"kernel": table.get(f"{prefix}.proj.weight").T.reshape(num_heads, head_dim, -1),
                    "bias": table.get(f"{prefix}.proj.bias")}}
    if qkv_bias:
        out["qkv"]["bias"] = table.get(f"{prefix}.qkv.bias").reshape(3, num_heads, head_dim)
    if qk_norm:
        out["q_norm"] = norm_params(table, f"{prefix}.q_norm")
        out["k_norm"] = norm_params(table, f"{prefix}.k_norm")
    return out


def norm_params(table: common.KeyTable, prefix: str) -> Dict[str, np.ndarray]:
    """Returns LayerNorm {scale, bias} from timm's `weight`/`bias`."""
    return {"scale": table.get(f"{prefix}.weight"), "bias": table.get(f"{prefix}.bias")}


def classifier_params(table: common.KeyTable, params: Dict[str, Any], name: str, num_classes: int) -> None:
    """Puts the Dense classifier `name` into params, or reads and drops it when the model has no classifier."""
    if num_classes:
        params[name] = dense_params(table, name)
    elif f"{name}.weight" in table:
        table.get(f"{name}.weight"), table.get(f"{name}.bias")  # a feature extractor drops the classifier


def dense_params(table: common.KeyTable, prefix: str, bias: bool = True) -> Dict[str, np.ndarray]:
    """Returns Dense {kernel, bias} from a torch Linear; a missing bias is an error unless `bias=False`."""
    out = {"kernel": table.get(f"{prefix}.weight", common.linear)}
    if bias:
        out["bias"] = table.get(f"{prefix}.bias")
    return out


def mlp_params(table: common.KeyTable, prefix: str) -> Dict[str, Any]:
    """Returns `layers.Mlp` params from timm's `fc1`/`fc2`."""
    return {"fc1": dense_params(table, f"{prefix}.fc1"), "fc2": dense_params(table, f"{prefix}.fc2")}


def block_params(table: common.KeyTable, prefix: str, num_heads: int, qkv_bias: bool = True,
                 qk_norm: bool = False, layer_scale: bool = False) -> Dict[str, Any]:
    """Returns one `vit.Block`'s params from timm keys under `prefix` (e.g. "blocks.3")."""
    out = {"norm1": norm_params(table, f"{prefix}.norm1"),
           "attn": attention_params(table, f"{prefix}.attn", num_heads, qkv_bias, qk_norm),
           "norm2": norm_params(table, f"{prefix}.norm2"),
           "mlp": mlp_params(table, f"{prefix}.mlp")}
    if layer_scale:
        out["ls1"] = {"gamma": table.get(f"{prefix}.ls1.gamma")}
        out["ls2"] = {"gamma": table.get(f"{prefix}.ls2.gamma")}
    return out


def convert_timm(state_dict: Dict[str, np.ndarray], model) -> Dict[str, Any]:
    """Returns {"params": ...} for a `VisionTransformer` from a timm ViT/DeiT state dict.

    Position embeddings are resampled (bicubic, as timm) when the checkpoint's grid differs from the model's.
    """
    if GMM_VIT_KEY in state_dict:
        return convert_gmm_vit(state_dict, model)
    table = common.KeyTable(state_dict)
    params: Dict[str, Any] = {
        "patch_embed": {"proj": {"kernel": table.get("patch_embed.proj.weight", common.conv)}},
    }
    if "patch_embed.proj.bias" in table:
        params["patch_embed"]["proj"]["bias"] = table.get("patch_embed.proj.bias")
    if model.patch_embed_type == "poly":  # the official PolyViT (willding123/Shift-Equivariant-Vision-Transformers)
        params["patch_embed"]["norm"] = norm_params(table, "patch_embed.norm")
    if model.pos_embed == "conv":
        params["pos_conv"] = {"proj": {"kernel": table.get("pos_conv.proj.weight", common.conv),
                                       "bias": table.get("pos_conv.proj.bias")}}
    if model.class_token:
        params["cls_token"] = table.get("cls_token")
    if model.distilled:
        params["dist_token"] = table.get("dist_token")
    if model.pos_embed == "learn":
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        params["pos_embed"] = layers.resample_posemb(table.get("pos_embed"), model.grid_size, prefix)
    if model.pre_norm:
        params["norm_pre"] = norm_params(table, "norm_pre")
    for index in range(model.depth):
        params[f"blocks_{index}"] = block_params(table, f"blocks.{index}", model.num_heads, model.qkv_bias,
                                               model.qk_norm, model.init_values is not None)
    use_fc_norm = model.global_pool in ("avg", "ggem") if model.fc_norm is None else model.fc_norm
    norm = "fc_norm" if use_fc_norm else "norm"
    params[norm] = norm_params(table, norm)
    if model.global_pool == "ggem":  # no checkpoint holds GGeM's exponents: they start at the model's ggem_p_init
        params["ggem"] = {"p": np.full((model.ggem_groups or model.num_heads,), model.ggem_p_init, np.float32)}
    if model.global_pool == "map":
        params["attn_pool"] = {
            "latent": table.get("attn_pool.latent"),
            "q": _split_heads(dense_params(table, "attn_pool.q", model.qkv_bias), 1, model.num_heads),
            "kv": _split_heads(dense_params(table, "attn_pool.kv", model.qkv_bias), 2, model.num_heads),
            "proj": {"kernel": table.get("attn_pool.proj.weight").T.reshape(model.num_heads, -1, model.embed_dim),
                     "bias": table.get("attn_pool.proj.bias")},
            "norm": norm_params(table, "attn_pool.norm"),
            "mlp": mlp_params(table, "attn_pool.mlp"),
        }
    for head in ("head", "head_dist") if model.distilled else ("head",):
        classifier_params(table, params, head, model.num_classes)
    table.finish()
    if model.scan:
        from vitjax.models.vit import scan_params
        params = scan_params(params, model.depth)
    return common.checked(params, model)


def _split_heads(dense: Dict[str, np.ndarray], groups: int, num_heads: int) -> Dict[str, np.ndarray]:
    """Returns a Dense whose output axis is split into (groups, heads, head_dim) (groups=1 drops that axis)."""
    width = dense["kernel"].shape[0]
    shape = (num_heads, -1) if groups == 1 else (groups, num_heads, -1)
    out = {"kernel": dense["kernel"].reshape((width,) + shape)}
    if "bias" in dense:
        out["bias"] = dense["bias"].reshape(shape)
    return out


# The official GMM-ViT (CatworldLee/Gaussian-Mixture-Mask-Attention, models/vit.py, vit-pytorch's layout): no class
# token, patches flattened as (p1 p2 c) into a Linear, PreNorm blocks, a LayerNorm + Linear head on the token mean.
GMM_VIT_KEY = "transformer.layers.0.0.fn.to_qkv.weight"


def convert_gmm_vit(state_dict: Dict[str, np.ndarray], model) -> Dict[str, Any]:
    """Returns {"params": ...} for a `VisionTransformer(attention_mask="gmm", class_token=False,
    global_pool="avg", qkv_bias=False)` from the official GMM-ViT's state dict (its fixed `mask` buffers dropped)."""
    ignore = ["mask"] + [f"transformer.layers.{i}.0.fn.mask.mask" for i in range(model.depth)]
    table = common.KeyTable(state_dict, ignore=[key for key in ignore if key in state_dict])
    patch = layers.to_2tuple(model.patch_size)
    embed = table.get("to_patch_embedding.1.weight")
    params: Dict[str, Any] = {
        "patch_embed": {"proj": {"kernel": embed.T.reshape(patch[0], patch[1], model.in_chans, -1),
                                 "bias": table.get("to_patch_embedding.1.bias")}},
        "pos_embed": table.get("pos_embedding"),
        "fc_norm": norm_params(table, "mlp_head.0"),
        "head": dense_params(table, "mlp_head.1"),
    }
    heads = model.num_heads
    for index in range(model.depth):
        prefix = f"transformer.layers.{index}"
        qkv = table.get(f"{prefix}.0.fn.to_qkv.weight")
        width = qkv.shape[1]
        out = table.get(f"{prefix}.0.fn.to_out.0.weight")
        params[f"blocks_{index}"] = {
            "norm1": norm_params(table, f"{prefix}.0.norm"),
            "attn": {"qkv": {"kernel": qkv.T.reshape(width, 3, heads, -1)},
                     "proj": {"kernel": out.T.reshape(heads, -1, out.shape[0]),
                              "bias": table.get(f"{prefix}.0.fn.to_out.0.bias")}},
            "gmm": {"sigma": table.get(f"{prefix}.0.fn.mask.sigma")[:, :, 0, 0],
                    "alpha": table.get(f"{prefix}.0.fn.mask.alpha")[:, :, 0, 0]},
            "norm2": norm_params(table, f"{prefix}.1.norm"),
            "mlp": {"fc1": dense_params(table, f"{prefix}.1.fn.net.0"),
                    "fc2": dense_params(table, f"{prefix}.1.fn.net.3")},
        }
    table.finish()
    if model.scan:
        from vitjax.models.vit import scan_params
        params = scan_params(params, model.depth)
    return common.checked(params, model)
