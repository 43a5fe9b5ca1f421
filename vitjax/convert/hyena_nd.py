"""Official Hyena N-D (Itamarzimm/HyenaND, its bundled timm's `VisionTransformer` with `--method hyena2d*`) state
dicts -> vitjax `HyenaViT` params.

Key table (official -> vitjax): `patch_embed.proj` -> `patch_embed/proj`, `pos_embed`, `norm`, `head`; per block
`blocks.{i}.{norm1, norm2, mlp.fc1, mlp.fc2}`; attention blocks `attn.qkv` / `attn.proj` (split into heads); Hyena
blocks `attn.in_proj`, `attn.short_filter` (depthwise conv), `attn.out_proj`, `attn.filter_fn.bias`,
`attn.filter_fn.pos_emb.z` (1, L, 3) -> `filter_fn/z` (L, 3), `attn.filter_fn.implicit_filter.{0,2,4,6}` ->
`filter_fn/implicit_filter_{k}` (6 without bias), `attn.filter_fn.implicit_filter.{1,3,5}.freq` (one shared sine
activation, so three keys of one tensor; they must agree) -> `filter_fn/freq` (order,). The buffers
`attn.filter_fn.pos_emb.t` and `attn.filter_fn.modulation.{X,Y}deltas` are recomputed by the model and checked.
"""
from typing import Any, Dict

import numpy as np

from vitjax.convert import common
from vitjax.convert.vit import attention_params, classifier_params, dense_params, mlp_params, norm_params
from vitjax.models import hyena_nd


def _check(table: common.KeyTable, key: str, expected: np.ndarray) -> None:
    value = np.asarray(table.get(key)).reshape(-1)
    if value.shape != expected.shape or not np.allclose(value, expected, rtol=1e-5, atol=1e-7):
        raise ValueError(f"{key} {value[:4]}... differs from the model's {expected[:4]}...: the checkpoint was made "
                         f"with another img_size / patch_size / embed_dim / order")


def _hyena(table: common.KeyTable, prefix: str, model) -> Dict[str, Any]:
    grid = (model.img_size if isinstance(model.img_size, int) else model.img_size[0]) // model.patch_size
    channels = model.embed_dim * (model.order - 1)
    filt = f"{prefix}.filter_fn"
    _check(table, f"{filt}.pos_emb.t", hyena_nd.filter_times(grid))
    for axis in ("X", "Y"):
        _check(table, f"{filt}.modulation.{axis}deltas", hyena_nd.filter_deltas(channels))
    freqs = [table.get(f"{filt}.implicit_filter.{index}.freq", lambda value: value.reshape(-1))
             for index in (1, 3, 5)]
    if any(not np.array_equal(freqs[0], other) for other in freqs[1:]):
        raise ValueError(f"{filt}.implicit_filter.{{1,3,5}}.freq differ: the official filter shares one sine "
                         f"activation")
    filter_fn = {"bias": table.get(f"{filt}.bias"), "z": table.get(f"{filt}.pos_emb.z", lambda value: value[0]),
                 "freq": freqs[0]}
    for index in (0, 2, 4):
        filter_fn[f"implicit_filter_{index}"] = dense_params(table, f"{filt}.implicit_filter.{index}")
    filter_fn["implicit_filter_6"] = dense_params(table, f"{filt}.implicit_filter.6", bias=False)
    return {"in_proj": dense_params(table, f"{prefix}.in_proj"), "out_proj": dense_params(table, f"{prefix}.out_proj"),
            "short_filter": {"kernel": table.get(f"{prefix}.short_filter.weight", common.conv),
                             "bias": table.get(f"{prefix}.short_filter.bias")},
            "filter_fn": filter_fn}


def convert_timm(state_dict: Dict[str, Any], model) -> Dict[str, Any]:
    """Returns {"params"} for a `HyenaViT` from an official state dict (`from_torch`); the model's img_size must be
    the one it was trained at (the filters and position embedding cover that token map)."""
    table = common.KeyTable(state_dict)
    params: Dict[str, Any] = {
        "patch_embed": {"proj": {"kernel": table.get("patch_embed.proj.weight", common.conv),
                                 "bias": table.get("patch_embed.proj.bias")}},
        "pos_embed": table.get("pos_embed")}
    for index, mixer in enumerate(hyena_nd.block_mixers(model.method, model.depth)):
        prefix = f"blocks.{index}"
        block = {"norm1": norm_params(table, f"{prefix}.norm1"), "norm2": norm_params(table, f"{prefix}.norm2"),
                 "mlp": mlp_params(table, f"{prefix}.mlp")}
        if mixer == "hyena2d":
            block["attn"] = _hyena(table, f"{prefix}.attn", model)
        else:
            block["attn"] = attention_params(table, f"{prefix}.attn", model.num_heads)
        params[f"blocks_{index}"] = block
    params["norm"] = norm_params(table, "norm")
    classifier_params(table, params, "head", model.num_classes)
    table.finish()
    return common.checked(params, model)
