"""timm ConvNeXt / ConvNeXt-V2 state dicts -> vitjax `ConvNeXt` params."""
from typing import Any, Dict

import numpy as np

from vitjax.convert import common


def dense(table: common.KeyTable, prefix: str, bias: bool = True) -> Dict[str, np.ndarray]:
    """Returns Dense {kernel, bias} from a torch Linear or a 1x1 Conv2d (timm's `conv_mlp`)."""
    weight = table.get(f"{prefix}.weight")
    out = {"kernel": weight.reshape(weight.shape[0], -1).T}
    if bias:
        out["bias"] = table.get(f"{prefix}.bias")
    return out


def conv(table: common.KeyTable, prefix: str, bias: bool = True) -> Dict[str, np.ndarray]:
    """Returns Conv {kernel, bias} from a torch Conv2d (depthwise kernels become (kh, kw, 1, C))."""
    out = {"kernel": table.get(f"{prefix}.weight", common.conv)}
    if bias:
        out["bias"] = table.get(f"{prefix}.bias")
    return out


def norm(table: common.KeyTable, prefix: str, bias: bool = True) -> Dict[str, np.ndarray]:
    """Returns norm params {scale, bias} from timm's `weight`/`bias` (no bias for RMS/Simple norms)."""
    out = {"scale": table.get(f"{prefix}.weight")}
    if bias:
        out["bias"] = table.get(f"{prefix}.bias")
    return out


def _block(table: common.KeyTable, prefix: str, model) -> Dict[str, Any]:
    """Returns one `ConvNeXtBlock`'s params from timm keys under `prefix` (e.g. "stages.1.blocks.0")."""
    bias, norm_bias = model.conv_bias, model.norm_type == "layernorm"
    out = {"conv_dw": conv(table, f"{prefix}.conv_dw", bias), "norm": norm(table, f"{prefix}.norm", norm_bias),
           "mlp": {"fc1": dense(table, f"{prefix}.mlp.fc1", bias), "fc2": dense(table, f"{prefix}.mlp.fc2", bias)}}
    if model.use_grn:
        # Older timm / FB checkpoints store GRN params as (1, 1, 1, C).
        out["mlp"]["grn"] = {name: table.get(f"{prefix}.mlp.grn.{name}").reshape(-1) for name in ("weight", "bias")}
    if model.ls_init_value is not None:
        out["gamma"] = table.get(f"{prefix}.gamma")
    return out


def convert_timm(state_dict: Dict[str, np.ndarray], model) -> Dict[str, Any]:
    """Returns {"params": ...} for a `ConvNeXt` from a timm state dict (raises naming bad keys/shapes)."""
    table = common.KeyTable(state_dict)
    stem_layout = {"patch": (("stem_0", "stem_1"), "stem_1"),
                   "overlap": (("stem_0", "stem_1", "stem_2"), "stem_2"),
                   "overlap_tiered": (("stem_0", "stem_1", "stem_2"), "stem_2"),
                   "overlap_act": (("stem_0", "stem_2", "stem_3"), "stem_3")}[model.stem_type]
    norm_bias = model.norm_type == "layernorm"
    params: Dict[str, Any] = {}
    for name in stem_layout[0]:
        key = name.replace("_", ".")
        params[name] = (norm(table, key, norm_bias) if name == stem_layout[1]
                        else conv(table, key, model.conv_bias))
    previous = model.dims[0]
    for stage, (depth, dim, stride) in enumerate(zip(model.depths, model.dims, model.stage_strides)):
        stage_params: Dict[str, Any] = {}
        if previous != dim or stride > 1:
            stage_params["downsample_norm"] = norm(table, f"stages.{stage}.downsample.0", norm_bias)
            stage_params["downsample_conv"] = conv(table, f"stages.{stage}.downsample.1", model.conv_bias)
        for index in range(depth):
            stage_params[f"blocks_{index}"] = _block(table, f"stages.{stage}.blocks.{index}", model)
        params[f"stages_{stage}"] = stage_params
        previous = dim
    if model.head_norm_first:
        params["norm_pre"] = norm(table, "norm_pre", norm_bias)
    head: Dict[str, Any] = {}
    if not model.head_norm_first:
        head["norm"] = norm(table, "head.norm", norm_bias)
        if model.head_hidden_size:
            head["pre_logits_fc"] = dense(table, "head.pre_logits.fc")
    if "head.fc.weight" in table:
        if model.num_classes:
            head["fc"] = dense(table, "head.fc")
        else:
            table.get("head.fc.weight"), table.get("head.fc.bias")  # dropped: the model has no classifier
    if head:
        params["head"] = head
    table.finish()
    return common.checked(params, model)
