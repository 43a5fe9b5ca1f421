"""Objectives: what is learned. Each owns its loss, its metrics and the model outputs it needs.

`create(name, config)` builds one by name; the trainer knows only the interface in `base.py`.
"""
import importlib

# name -> "module:Class"; modules are imported only when used.
_OBJECTIVES = {
    "supervised": "vitjax.objectives.supervised:Supervised",
    "mae": "vitjax.objectives.mae:MAE",
    "mae_finetune": "vitjax.objectives.mae:MaeFinetune",
    "mae_linprobe": "vitjax.objectives.mae:MaeLinearProbe",
    "distill": "vitjax.objectives.distill:Distillation",
}


def list_objectives():
    """Returns the sorted names of the registered objectives."""
    return sorted(_OBJECTIVES)


def create(name: str, config):
    """Returns the objective `name` built from the full run config."""
    if name not in _OBJECTIVES:
        raise ValueError(f"Unknown objective {name!r}; valid choices: {list_objectives()}")
    module_name, class_name = _OBJECTIVES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)(config)
