"""Weights in: timm / Hugging Face PyTorch state dicts and official checkpoints, by explicit key tables.

    variables = vitjax.convert.from_torch("vit_tiny_patch16_224.pth", "vit_tiny_patch16_224")   # timm's layout
    variables = vitjax.convert.from_torch("crossformer-s.pth", "crossformer_small")   # the official repo's layout
    model = vitjax.models.create("vit_tiny_patch16_224")
    logits, _ = model.apply(variables, images)
    variables = vitjax.convert.from_open_clip("open_clip_model.safetensors", "clip_vit_b32")   # open_clip CLIP
    variables = vitjax.convert.from_transformers("model.safetensors", "siglip_base_patch16_224")  # SigLIP

torch is imported only to read `.pth` files (with `weights_only=True`); safetensors need no torch.
"""
import importlib
from typing import Any, Dict

from vitjax.convert.common import KeyTable, load_state_dict


def from_torch(source, name: str, **model_overrides) -> Dict[str, Any]:
    """Returns flax variables ({"params": ...}, plus "batch_stats" where the model has BatchNorm).

    The one entry for PyTorch state dicts: `source` is a state dict or a checkpoint path in the layout of timm
    where timm has the family (and Hugging Face transformers' for CvT), else of the family's official repository
    (HorNet, T2T-ViT, CrossFormer, RMT, SpectFormer, Hyena N-D, FcaFormer, SG-Former, ChannelViT, Activator,
    SN-Net v2, ...); the family's converter reads it by an explicit key table. `name` is a registered model name;
    `model_overrides` are passed to `vitjax.models.create` (e.g. `img_size=384` resamples position embeddings to that
    size). Missing, unexpected or mis-shaped keys raise an error that names them.
    """
    from vitjax import models
    family = models.model_family(name)
    try:
        converter = importlib.import_module(f"vitjax.convert.{family}")
    except ModuleNotFoundError as error:
        raise ValueError(f"No converter for the {family!r} family of {name!r}") from error
    if not hasattr(converter, "convert_timm"):
        raise ValueError(f"{name!r} ({family}) has no PyTorch key table here; convert it with "
                         f"{'from_open_clip or from_transformers' if family == 'clip' else 'its own converter'}")
    model = models.create(name, **model_overrides)
    return converter.convert_timm(load_state_dict(source), model)


def from_timm(source, name: str, **model_overrides) -> Dict[str, Any]:
    """Returns `from_torch(source, name, **model_overrides)`: the earlier name of the same entry, kept as an alias."""
    return from_torch(source, name, **model_overrides)


def _clip_model(name: str, model_overrides):
    from vitjax import models
    if models.model_family(name) != "clip":
        valid = [other for other in models.list_models() if models.model_family(other) == "clip"]
        raise ValueError(f"{name!r} is not a CLIP/SigLIP model; valid choices: {valid}")
    return models.create(name, **model_overrides)


def from_open_clip(source, name: str, **model_overrides) -> Dict[str, Any]:
    """Returns flax variables {"params": ...} of the CLIP model `name` from an open_clip CLIP state dict or file.

    `model_overrides` go to `vitjax.models.create` (e.g. `mlp_activation="quick_gelu"` for OpenAI's weights,
    `img_size=336` resamples the image position embedding). Missing, unexpected or mis-shaped keys raise.
    """
    from vitjax.convert.clip import convert_open_clip
    return convert_open_clip(load_state_dict(source), _clip_model(name, model_overrides))


def from_transformers(source, name: str, **model_overrides) -> Dict[str, Any]:
    """Returns flax variables {"params": ...} of the SigLIP model `name` from a transformers SiglipModel state dict."""
    from vitjax.convert.clip import convert_transformers
    return convert_transformers(load_state_dict(source), _clip_model(name, model_overrides))


__all__ = ["KeyTable", "from_open_clip", "from_timm", "from_torch", "from_transformers", "load_state_dict"]
