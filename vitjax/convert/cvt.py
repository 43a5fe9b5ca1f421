"""Hugging Face transformers CvT state dicts -> vitjax `ConvolutionalVisionTransformer` variables.

timm has no CvT, so `vitjax.convert.from_timm(path, "cvt_13")` reads a `CvtForImageClassification` (or bare
`CvtModel`) state dict from the transformers hub layout (`cvt.encoder.stages.{i}.layers.{j}...`).
BatchNorm statistics of the conv projections become the `batch_stats` collection.
"""
from typing import Any, Dict

import numpy as np

from vitjax.convert import common
from vitjax.convert.vit import dense_params, norm_params
from vitjax.models import layers


def _dense_heads(table: common.KeyTable, prefix: str, num_heads: int, bias: bool) -> Dict[str, np.ndarray]:
    """Returns a DenseGeneral C -> (heads, head_dim) from a torch Linear."""
    weight = table.get(f"{prefix}.weight")
    out = {"kernel": weight.T.reshape(weight.shape[1], num_heads, -1)}
    if bias:
        out["bias"] = table.get(f"{prefix}.bias").reshape(num_heads, -1)
    return out


def convert_timm(state_dict: Dict[str, np.ndarray], model) -> Dict[str, Any]:
    """Returns {"params", "batch_stats"} for a CvT from a Hugging Face `CvtForImageClassification` state dict."""
    # load_state_dict drops BatchNorm step counters; a raw state dict passed here may still hold them.
    state_dict = {key: value for key, value in state_dict.items() if not key.endswith("num_batches_tracked")}
    prefix = "cvt." if any(key.startswith("cvt.") for key in state_dict) else ""
    table = common.KeyTable(state_dict)
    params: Dict[str, Any] = {}
    batch_stats: Dict[str, Any] = {}
    for stage in range(model.num_stages):
        source = f"{prefix}encoder.stages.{stage}"
        embed = f"{source}.embedding.convolution_embeddings"
        stage_params: Dict[str, Any] = {
            "patch_embed": {"proj": {"kernel": table.get(f"{embed}.projection.weight", common.conv),
                                     "bias": table.get(f"{embed}.projection.bias")},
                            "norm": norm_params(table, f"{embed}.normalization")}}
        stage_stats: Dict[str, Any] = {}
        if model.cls_token[stage]:
            stage_params["cls_token"] = table.get(f"{source}.cls_token")
        heads = model.num_heads[stage]
        for index in range(model.depths[stage]):
            layer = f"{source}.layers.{index}"
            attention = f"{layer}.attention.attention"
            attn_params: Dict[str, Any] = {}
            attn_stats: Dict[str, Any] = {}
            for short, long in (("q", "query"), ("k", "key"), ("v", "value")):
                attn_params[f"proj_{short}"] = _dense_heads(table, f"{attention}.projection_{long}", heads,
                                                           model.qkv_bias)
                if model.qkv_projection != "dw_bn":
                    continue
                projection = f"{attention}.convolution_projection_{long}.convolution_projection"
                bn = f"{projection}.normalization"
                attn_params[f"conv_proj_{short}"] = {
                    "conv": {"kernel": table.get(f"{projection}.convolution.weight", common.conv)},
                    "bn": norm_params(table, bn)}
                attn_stats[f"conv_proj_{short}"] = {"bn": {"mean": table.get(f"{bn}.running_mean"),
                                                           "var": table.get(f"{bn}.running_var")}}
            output = table.get(f"{layer}.attention.output.dense.weight")
            attn_params["proj"] = {"kernel": output.T.reshape(heads, -1, output.shape[0]),
                                   "bias": table.get(f"{layer}.attention.output.dense.bias")}
            stage_params[f"blocks_{index}"] = {
                "norm1": norm_params(table, f"{layer}.layernorm_before"),
                "attn": attn_params,
                "norm2": norm_params(table, f"{layer}.layernorm_after"),
                "mlp": {"fc1": dense_params(table, f"{layer}.intermediate.dense"),
                        "fc2": dense_params(table, f"{layer}.output.dense")}}
            if attn_stats:
                stage_stats[f"blocks_{index}"] = {"attn": attn_stats}
        params[f"stages_{stage}"] = stage_params
        if stage_stats:
            batch_stats[f"stages_{stage}"] = stage_stats
    params["norm"] = norm_params(table, "layernorm")
    if model.num_classes:
        params["head"] = dense_params(table, "classifier")
    elif "classifier.weight" in table:
        table.get("classifier.weight"), table.get("classifier.bias")  # a feature extractor drops the classifier
    table.finish()
    img = layers.to_2tuple(model.img_size)
    expected = common.expected_variables(model, (img[0], img[1], model.in_chans))
    common.check_shapes(params, expected["params"])
    common.check_shapes(batch_stats, expected.get("batch_stats", {}))
    return {"params": params, "batch_stats": batch_stats}


# The reference for CvT is Hugging Face transformers; `from_timm` dispatches here by family.
from_huggingface = convert_timm
