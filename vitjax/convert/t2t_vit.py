"""Official T2T-ViT (yitu-opensource/T2T-ViT `models/t2t_vit.py`) state dicts -> vitjax `T2TViT` params.

Key table (official -> vitjax): `tokens_to_token.attention{i}.` -> `tokens_to_token/attention{i}/` with, for a
token transformer, `norm1`, `attn.qkv` (no bias; its 3*out rows split as q, k, v) -> `qkv`, `attn.proj` -> `proj`,
`norm2`, `mlp.fc1`, `mlp.fc2`; for a token performer `kqv`, `proj`, `norm1`, `norm2`, `mlp.0` -> `fc1`, `mlp.2` ->
`fc2` and the frozen random features `w`; `tokens_to_token.project`, `cls_token`, `pos_embed` (the frozen sin-cos
table), `blocks.{i}` (timm's ViT block layout), `norm`, `head`.
"""
from typing import Any, Dict

from vitjax.convert import common
from vitjax.convert.vit import block_params, classifier_params, dense_params, mlp_params, norm_params


def _token_transformer(table: common.KeyTable, prefix: str) -> Dict[str, Any]:
    """Returns a `TokenTransformer`'s params from the official `Token_transformer` keys under `prefix`."""
    qkv = table.get(f"{prefix}.attn.qkv.weight")
    return {"norm1": norm_params(table, f"{prefix}.norm1"),
            "qkv": {"kernel": qkv.T.reshape(qkv.shape[1], 3, qkv.shape[0] // 3)},
            "proj": dense_params(table, f"{prefix}.attn.proj"),
            "norm2": norm_params(table, f"{prefix}.norm2"),
            "mlp": mlp_params(table, f"{prefix}.mlp")}


def _token_performer(table: common.KeyTable, prefix: str) -> Dict[str, Any]:
    """Returns a `TokenPerformer`'s params from the official `Token_performer` keys under `prefix`."""
    return {"w": table.get(f"{prefix}.w"), "kqv": dense_params(table, f"{prefix}.kqv"),
            "proj": dense_params(table, f"{prefix}.proj"), "norm1": norm_params(table, f"{prefix}.norm1"),
            "norm2": norm_params(table, f"{prefix}.norm2"), "fc1": dense_params(table, f"{prefix}.mlp.0"),
            "fc2": dense_params(table, f"{prefix}.mlp.2")}


def convert_timm(state_dict: Dict[str, Any], model) -> Dict[str, Any]:
    """Returns {"params": ...} for a `T2TViT` from an official T2T-ViT state dict (`from_timm` / `from_torch`)."""
    table = common.KeyTable(state_dict)
    token_module = _token_transformer if model.tokens_type == "transformer" else _token_performer
    params: Dict[str, Any] = {
        "tokens_to_token": {f"attention{index}": token_module(table, f"tokens_to_token.attention{index}")
                            for index in (1, 2)},
        "cls_token": table.get("cls_token"),
        "pos_embed": table.get("pos_embed"),
        "norm": norm_params(table, "norm"),
    }
    params["tokens_to_token"]["project"] = dense_params(table, "tokens_to_token.project")
    for index in range(model.depth):
        params[f"blocks_{index}"] = block_params(table, f"blocks.{index}", model.num_heads, model.qkv_bias)
    classifier_params(table, params, "head", model.num_classes)
    table.finish()
    return common.checked(params, model)
