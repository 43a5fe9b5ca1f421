"""Parameter-efficient adaptation behind one interface (`base`): LoRA, VPT, AdaptFormer adapters, HST, DVPT.

    model = vitjax.models.create("vit_base_patch16_224", adapt=dict(method="lora", rank=8, targets=("qkv",)))
    merged = vitjax.adapt.merge(variables, dict(method="lora", rank=8, targets=("qkv",)))  # for adapt=None

In a run, `config.adapt` (see `base.SECTION_DEFAULTS`) adapts the objective's model; only the method's
parameters and `adapt.train` (the head) are trained, and checkpoints hold only those (`vitjax.train`).
"""
from typing import Any

from vitjax.adapt import adapter, base, dvpt, hst, lora, vpt
from vitjax.adapt.base import (DEFAULT_TRAIN, SECTION_DEFAULTS, Method, ModelInfo, get_method, list_methods,
                               method_options, parse, trained_patterns)
from vitjax.adapt.lora import merge

# Model classes with the hooks of `base.Method` (a field `adapt`); registered by their modules.
HOOKED_MODELS = ("VisionTransformer (vit_*, deit_*, 'vit')",)


def attach(module: Any, settings: Any) -> Any:
    """Returns `module` with the adaptation of `settings` (a dict / Method / None) set; raises if it has no hook."""
    method = parse(settings)
    if method is None:
        return module
    if "adapt" not in getattr(type(module), "__dataclass_fields__", {}):
        raise ValueError(f"Adaptation {method.name!r} needs a model with the adaptation hook (a field 'adapt'); "
                         f"{type(module).__name__} has none. Models with it: {list(HOOKED_MODELS)}")
    if getattr(module, "adapt", None) is not None:
        raise ValueError(f"The model already has adapt={module.adapt!r}; set it in config.adapt only")
    adapted = module.clone(adapt=method)
    if hasattr(adapted, "validate"):
        adapted.validate()
    return adapted


__all__ = ["DEFAULT_TRAIN", "HOOKED_MODELS", "Method", "ModelInfo", "SECTION_DEFAULTS", "adapter", "attach", "base",
           "dvpt", "get_method", "hst", "list_methods", "lora", "merge", "method_options", "parse",
           "trained_patterns", "vpt"]
