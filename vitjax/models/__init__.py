"""Models: Flax linen modules, one file per architecture family, registered by name.

    model = vitjax.models.create("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4)
    logits, intermediates = model.apply(variables, images)      # images: NHWC
    vitjax.models.pretrained_cfg("vit_tiny_patch16_224")        # input_size, mean, std, crop_pct, interpolation

`pretrained_cfg(name)` is the preprocessing the weights released under `name` expect (timm's
`pretrained_cfg`); `vitjax.data.pretrained_pp(cfg)` turns it into pp strings.
"""
import difflib
import importlib
import importlib.util
from typing import List

from vitjax.models.registry import ModelEntry, module_fields, register_model, registry

# Architecture families; each module registers its variants when imported.
_FAMILIES = ("vit", "swin", "convnext", "cvt", "crossvit", "tnt", "convit", "metaformer", "tiny_vit", "levit",
             "clip", "resnet", "regnet", "lookupvit", "t2t_vit", "hornet",
             "crossformer", "rmt", "spectformer", "hyena_nd", "fcaformer", "sgformer", "channelvit",
             "activator", "snnet")
_loaded = False


def _load_families() -> None:
    global _loaded
    if _loaded:
        return
    for family in _FAMILIES:
        module_name = f"vitjax.models.{family}"
        if importlib.util.find_spec(module_name) is not None:
            importlib.import_module(module_name)
    _loaded = True


def list_models(pattern: str = "") -> List[str]:
    """Returns the sorted registered model names containing `pattern`."""
    _load_families()
    return sorted(name for name in registry() if pattern in name)


def get_entry(name: str) -> ModelEntry:
    """Returns the registry entry of `name`, or raises ValueError listing close and valid names."""
    _load_families()
    if name not in registry():
        close = difflib.get_close_matches(name, registry(), n=5, cutoff=0.5)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(f"Unknown model {name!r}.{hint} Valid choices: {list_models()}")
    return registry()[name]


def create(name: str, **overrides):
    """Returns the linen Module `name` with `overrides` applied; bad names or values fail here, before tracing."""
    entry = get_entry(name)
    valid = module_fields(entry.module_class) + entry.extra_args
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown} for model {name!r}; valid choices: {sorted(valid)}")
    model = entry.builder(**{**entry.defaults, **overrides})
    if hasattr(model, "validate"):
        model.validate()
    return model


def pretrained_cfg(name: str) -> dict:
    """Returns dict(input_size=(C, H, W), mean, std, crop_pct, interpolation) of the weights released as `name`."""
    cfg = get_entry(name).pretrained_cfg
    return dict(cfg)


def model_family(name: str) -> str:
    """Returns the architecture family (file name) of a registered model."""
    return get_entry(name).family


__all__ = ["create", "list_models", "get_entry", "model_family", "pretrained_cfg", "register_model"]
