"""timm ResNet / ResNet-D state dicts -> vitjax `ResNet` variables (params and BatchNorm `batch_stats`)."""
from typing import Any, Dict, List, Tuple

import numpy as np

from vitjax.convert import common
from vitjax.convert.tiny_vit import bn_params, bn_stats
from vitjax.models.resnet import BLOCK_TYPES


def _layers(model) -> List[Tuple[str, str, str]]:
    """Returns (timm module, vitjax path, "conv" or "bn") for every conv and BatchNorm of `model`."""
    stem = ([("conv1.0", "conv1_0", "conv"), ("conv1.1", "conv1_1", "bn"), ("conv1.3", "conv1_3", "conv"),
             ("conv1.4", "conv1_4", "bn"), ("conv1.6", "conv1_6", "conv")] if model.deep_stem
            else [("conv1", "conv1", "conv")])
    found = stem + [("bn1", "bn1", "bn")]
    expansion = BLOCK_TYPES[model.block_type]
    in_width = 2 * model.stem_width if model.deep_stem else model.stem_width
    for stage, (depth, planes) in enumerate(zip(model.depths, model.widths)):
        for index in range(depth):
            theirs, ours = f"layer{stage + 1}.{index}", f"layer{stage + 1}_{index}"
            num_convs = 2 if model.block_type == "basic" else 3
            for conv in range(1, num_convs + 1):
                found += [(f"{theirs}.conv{conv}", f"{ours}/conv{conv}", "conv"),
                          (f"{theirs}.bn{conv}", f"{ours}/bn{conv}", "bn")]
            strides = 2 if stage > 0 and index == 0 else 1
            if strides != 1 or in_width != planes * expansion:
                first = 1 if model.avg_down else 0   # avg_down: index 0 is the (parameter-free) pool
                found += [(f"{theirs}.downsample.{first}", f"{ours}/downsample_{first}", "conv"),
                          (f"{theirs}.downsample.{first + 1}", f"{ours}/downsample_{first + 1}", "bn")]
            in_width = planes * expansion
    return found


def convert_timm(state_dict: Dict[str, np.ndarray], model) -> Dict[str, Any]:
    """Returns {"params", "batch_stats"} for a `ResNet` from a timm ResNet state dict."""
    table = common.KeyTable(state_dict, ignore=() if model.num_classes else ("fc.",))
    params: Dict[str, Any] = {}
    stats: Dict[str, Any] = {}
    for theirs, ours, kind in _layers(model):
        if kind == "conv":
            params[f"{ours}/kernel"] = table.get(f"{theirs}.weight", common.conv)
        else:
            for key, value in bn_params(table, theirs).items():
                params[f"{ours}/{key}"] = value
            for key, value in bn_stats(table, theirs).items():
                stats[f"{ours}/{key}"] = value
    if model.num_classes:  # a headless model (num_classes=0) drops the checkpoint's classifier
        params["fc/kernel"] = table.get("fc.weight", common.linear)
        params["fc/bias"] = table.get("fc.bias")
    table.finish()
    params, stats = common.unflatten(params), common.unflatten(stats)
    expected = common.expected_variables(model, (model.img_size, model.img_size, model.in_chans))
    common.check_shapes(params, expected["params"])
    common.check_shapes(stats, expected["batch_stats"])
    return {"params": params, "batch_stats": stats}
