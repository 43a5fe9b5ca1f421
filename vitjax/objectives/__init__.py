"""Objectives: what is learned. Each owns its loss, its metrics and the model outputs it needs.

`create(name, config)` builds one by name; the trainer knows only the interface in `base.py`.
A new objective (in this package or in a user's module) plugs in with
`register_objective("name", MyObjective)` or `register_objective("name", "my.module:MyObjective")`.
"""
import importlib

# name -> "module:Class"; modules are imported only when used.
_OBJECTIVES = {
    "supervised": "vitjax.objectives.supervised:Supervised",
    "mae": "vitjax.objectives.mae:MAE",
    "mae_finetune": "vitjax.objectives.mae:MaeFinetune",
    "mae_linprobe": "vitjax.objectives.mae:MaeLinearProbe",
    "distill": "vitjax.objectives.distill:Distillation",
    "clip": "vitjax.objectives.clip:Clip",
    "token_reduction": "vitjax.objectives.token_reduction:TokenReduction",
    "gmml": "vitjax.objectives.gmml:GMML",
    "sit": "vitjax.objectives.sit:SiT",
    "spark": "vitjax.objectives.spark:SparK",
    "mp3": "vitjax.objectives.mp3:MP3",
    "sdft": "vitjax.objectives.sdft:SelfDistillMAE",
    "g2sd": "vitjax.objectives.g2sd:G2SD",
    "proxy_dml": "vitjax.objectives.proxy_dml:ProxyDML",
    "satmae": "vitjax.objectives.satmae:SatMAE",
    "snnet": "vitjax.objectives.snnet:StitchSampling",
}


def register_objective(name: str, target) -> None:
    """Registers an Objective subclass (or its "module:Class" path, imported on first use) under `name`."""
    if name in _OBJECTIVES:
        raise ValueError(f"Objective {name!r} is registered twice; registered: {list_objectives()}")
    _OBJECTIVES[name] = target


def list_objectives():
    """Returns the sorted names of the registered objectives."""
    return sorted(_OBJECTIVES)


def create(name: str, config):
    """Returns the objective `name` built from the full run config, its model adapted as `config.adapt` says."""
    if name not in _OBJECTIVES:
        raise ValueError(f"Unknown objective {name!r}; valid choices: {list_objectives()}")
    target = _OBJECTIVES[name]
    if isinstance(target, str):
        module_name, class_name = target.split(":")
        target = getattr(importlib.import_module(module_name), class_name)
    objective = target(config)
    settings = config.get("adapt") if hasattr(config, "get") else None
    if settings is not None and settings.get("method") is not None:
        # The one place a run's adaptation reaches the model, whatever the objective: the trained module.
        from vitjax import adapt
        if getattr(objective, "module", None) is None:
            raise ValueError(f"config.adapt.method={settings['method']!r} needs an objective with one trained model "
                             f"(`objective.module`); objective {name!r} has none")
        objective.module = adapt.attach(objective.module, settings)
    return objective
