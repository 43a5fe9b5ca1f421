"""Official SG-Former (OliverRensu/SG-Former `sgformer.py`, `SGFormer`) state dicts -> vitjax `SGFormer` params.

Key table (official -> vitjax): `patch_embed1.conv.{0,2,4}.{c,bn}` -> `patch_embed1/conv_{0,2,4}/{c,bn}` (`bn` is a
one-group GroupNorm: `scale`, `bias`), `patch_embed1.norm`; `patch_embed{i}.conv{1,2,3}.{c,bn}` ->
`patch_embed{i}/conv{1,2,3}/{c,bn}`; `pos_embed` (1, N, C) -> (N, C); `block{i}.{j}.` -> `block{i}_{j}/` with `norm1`,
`norm2`, `mlp.{fc1,fc2}`, `mlp.dwconv.dwconv` -> `mlp/dwconv`, and under `attn.`: `lepe_linear`, `lepe_conv`, `proj`,
plus per block kind `q`, `kv` (sr_ratio 1); `q1`, `kv1`, `q2`, `kv2`, `sr` (conv), `norm` (hybrid-scale); `q`, `kv1`,
`kv2`, `f1`, `f2`, `f3` (self-guided; sr_ratio 2 has no `f3`); `norm{i}`, `head`.
"""
from typing import Any, Dict

from vitjax.convert import common
from vitjax.convert.vit import classifier_params, dense_params, norm_params
from vitjax.models import sgformer


def _conv(table: common.KeyTable, prefix: str, bias: bool = True) -> Dict[str, Any]:
    out = {"kernel": table.get(f"{prefix}.weight", common.conv)}
    if bias:
        out["bias"] = table.get(f"{prefix}.bias")
    return out


def _conv_gn(table: common.KeyTable, prefix: str) -> Dict[str, Any]:
    return {"c": _conv(table, f"{prefix}.c", bias=False), "bn": norm_params(table, f"{prefix}.bn")}


def _attention(table: common.KeyTable, prefix: str, kind: str, sr_ratio: int, qkv_bias: bool) -> Dict[str, Any]:
    out = {"lepe_linear": dense_params(table, f"{prefix}.lepe_linear"),
           "lepe_conv": _conv(table, f"{prefix}.lepe_conv"), "proj": dense_params(table, f"{prefix}.proj")}
    if kind == "full":
        names = ("q", "kv")
    elif kind == "hybrid":
        names = ("q1", "kv1", "q2", "kv2")
        out["sr"] = _conv(table, f"{prefix}.sr")
        out["norm"] = norm_params(table, f"{prefix}.norm")
    else:
        names = ("q", "kv1", "kv2")
        for index in range(len(sgformer.MERGE_RUNS[sr_ratio])):
            out[f"f{index + 1}"] = dense_params(table, f"{prefix}.f{index + 1}")
    for name in names:
        out[name] = dense_params(table, f"{prefix}.{name}", bias=qkv_bias)
    return out


def convert_timm(state_dict: Dict[str, Any], model) -> Dict[str, Any]:
    """Returns {"params"} for an `SGFormer` from an official state dict (`from_torch`)."""
    table = common.KeyTable(state_dict)
    params: Dict[str, Any] = {
        "patch_embed1": {**{f"conv_{k}": _conv_gn(table, f"patch_embed1.conv.{k}") for k in (0, 2, 4)},
                         "norm": norm_params(table, "patch_embed1.norm")},
        "pos_embed": table.get("pos_embed", lambda value: value[0])}
    for stage, depth in enumerate(model.depths):
        if stage:
            params[f"patch_embed{stage + 1}"] = {name: _conv_gn(table, f"patch_embed{stage + 1}.{name}")
                                                 for name in ("conv1", "conv2", "conv3")}
        sr = model.sr_ratios[stage]
        for j in range(depth):
            kind = "full" if sr == 1 else ("hybrid" if j % 2 == 0 else "guided")
            prefix = f"block{stage + 1}.{j}"
            params[f"block{stage + 1}_{j}"] = {
                "norm1": norm_params(table, f"{prefix}.norm1"), "norm2": norm_params(table, f"{prefix}.norm2"),
                "attn": _attention(table, f"{prefix}.attn", kind, sr, model.qkv_bias),
                "mlp": {"fc1": dense_params(table, f"{prefix}.mlp.fc1"),
                        "fc2": dense_params(table, f"{prefix}.mlp.fc2"),
                        "dwconv": _conv(table, f"{prefix}.mlp.dwconv.dwconv")}}
        params[f"norm{stage + 1}"] = norm_params(table, f"norm{stage + 1}")
    classifier_params(table, params, "head", model.num_classes)
    table.finish()
    return common.checked(params, model)
