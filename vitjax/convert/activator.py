"""Official Activator (Abdullah-88/Activator `ACTIVATORImageClassification` of `train.py` / `train_only_GEGLU.py`)
state dicts -> vitjax `Activator` params.

Key table (official -> vitjax): `patcher` (Conv2d) -> `patcher/proj`; `model.{i}.norm` -> `blocks_{i}/norm`;
`model.{i}.actgu.{proj_1, proj_2, proj_3, norm}` -> `blocks_{i}/gating/...`; `model.{i}.ffn.net.0` / `.net.3` ->
`blocks_{i}/mlp/fc1` / `fc2` (absent in the only-GEGLU models); `classifier` -> `head`.
"""
from typing import Any, Dict

from vitjax.convert import common
from vitjax.convert.vit import classifier_params, dense_params, norm_params


def convert_timm(state_dict: Dict[str, Any], model) -> Dict[str, Any]:
    """Returns {"params"} for an `Activator` from an official state dict (`from_torch`)."""
    renamed = {("head." + key[len("classifier."):] if key.startswith("classifier.") else key): value
               for key, value in state_dict.items()}
    table = common.KeyTable(renamed)
    params: Dict[str, Any] = {"patcher": {"proj": {"kernel": table.get("patcher.weight", common.conv),
                                                   "bias": table.get("patcher.bias")}}}
    for index in range(model.depth):
        prefix = f"model.{index}"
        block = {"norm": norm_params(table, f"{prefix}.norm"),
                 "gating": {name: dense_params(table, f"{prefix}.actgu.{name}")
                            for name in ("proj_1", "proj_2", "proj_3")}}
        block["gating"]["norm"] = norm_params(table, f"{prefix}.actgu.norm")
        if not model.only_geglu:
            block["mlp"] = {"fc1": dense_params(table, f"{prefix}.ffn.net.0"),
                            "fc2": dense_params(table, f"{prefix}.ffn.net.3")}
        params[f"blocks_{index}"] = block
    classifier_params(table, params, "head", model.num_classes)
    table.finish()
    return common.checked(params, model)
