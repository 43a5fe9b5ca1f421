"""timm RegNetY state dicts -> vitjax `RegNet` variables (params and BatchNorm `batch_stats`).

timm's squeeze-excite convs (1x1, with bias) become Dense layers; `final_conv` is an identity for RegNetY.
"""
from typing import Any, Dict

import numpy as np

from vitjax.convert import common
from vitjax.convert.tiny_vit import conv_bn


def convert_timm(state_dict: Dict[str, np.ndarray], model) -> Dict[str, Any]:
    """Returns {"params", "batch_stats"} for a `RegNet` from a timm RegNet(Y) state dict."""
    table = common.KeyTable(state_dict, ignore=() if model.num_classes else ("head.fc.",))
    params: Dict[str, Any] = {}
    stats: Dict[str, Any] = {}
    params["stem"], stats["stem"] = conv_bn(table, "stem")
    in_width = model.stem_width
    for stage, spec in enumerate(model.stages):
        stage_params, stage_stats = {}, {}
        for index in range(spec.depth):
            prefix = f"s{stage + 1}.b{index + 1}"
            block_params, block_stats = {}, {}
            for conv in ("conv1", "conv2", "conv3"):
                block_params[conv], block_stats[conv] = conv_bn(table, f"{prefix}.{conv}")
            if model.se_ratio:
                block_params["se"] = {
                    fc: {"kernel": table.get(f"{prefix}.se.{fc}.weight", lambda w: w[:, :, 0, 0].T),
                         "bias": table.get(f"{prefix}.se.{fc}.bias")} for fc in ("fc1", "fc2")}
            if in_width != spec.width or index == 0:
                block_params["downsample"], block_stats["downsample"] = conv_bn(table, f"{prefix}.downsample")
            stage_params[f"b{index + 1}"], stage_stats[f"b{index + 1}"] = block_params, block_stats
            in_width = spec.width
        params[f"s{stage + 1}"], stats[f"s{stage + 1}"] = stage_params, stage_stats
    if model.num_classes:  # a headless model (num_classes=0) drops the checkpoint's classifier
        params["head"] = {"fc": {"kernel": table.get("head.fc.weight", common.linear),
                                 "bias": table.get("head.fc.bias")}}
    table.finish()
    expected = common.expected_variables(model, (model.img_size, model.img_size, model.in_chans))
    common.check_shapes(params, expected["params"])
    common.check_shapes(stats, expected["batch_stats"])
    return {"params": params, "batch_stats": stats}
