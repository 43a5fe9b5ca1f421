"""Weights in: timm / Hugging Face PyTorch state dicts and official checkpoints, by explicit key tables.

    variables = vitjax.convert.from_timm("vit_tiny_patch16_224.pth", "vit_tiny_patch16_224")
    model = vitjax.models.create("vit_tiny_patch16_224")
    logits, _ = model.apply(variables, images)

torch is imported only to read `.pth` files (with `weights_only=True`); safetensors need no torch.
"""
import importlib
from typing import Any, Dict

from vitjax.convert.common import KeyTable, load_state_dict


def from_timm(source, name: str, **model_overrides) -> Dict[str, Any]:
    """Returns flax variables ({"params": ...}, plus "batch_stats" where the model has BatchNorm).

    `source` is a state dict or a checkpoint path; `name` a registered model name; `model_overrides` are
    passed to `vitjax.models.create` (e.g. `img_size=384` resamples position embeddings to that size).
    Missing, unexpected or mis-shaped keys raise an error that names them.
    """
    from vitjax import models
    family = models.model_family(name)
    try:
        converter = importlib.import_module(f"vitjax.convert.{family}")
    except ModuleNotFoundError as error:
        raise ValueError(f"No converter for the {family!r} family of {name!r}") from error
    model = models.create(name, **model_overrides)
    return converter.convert_timm(load_state_dict(source), model)


__all__ = ["KeyTable", "from_timm", "load_state_dict"]
