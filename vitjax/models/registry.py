"""The model registry: every architecture variant registered by name, built with `create`.

Each name also carries the preprocessing its released weights expect (timm's `pretrained_cfg`):
input size, normalisation mean and std, centre-crop fraction and resize interpolation.
"""
import dataclasses
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple

# Normalisation statistics (as timm.data.constants).
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
IMAGENET_INCEPTION_MEAN = (0.5, 0.5, 0.5)   # inputs in [-1, 1]: the big_vision / AugReg ViTs
IMAGENET_INCEPTION_STD = (0.5, 0.5, 0.5)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "area", "lanczos3", "lanczos5")
# What timm's `_cfg()` gives a name without other settings; a family states its differences.
DEFAULT_PRETRAINED_CFG = dict(input_size=(3, 224, 224), mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                              crop_pct=0.875, interpolation="bicubic")


class ModelEntry(NamedTuple):
    """How to build one registered model, and how its pretrained weights want their inputs."""
    builder: Callable[..., Any]      # a linen Module class, or a function returning a Module
    module_class: type              # the Module class built (its fields are the valid overrides)
    family: str                     # the file in vitjax/models/ (and vitjax/convert/) it belongs to
    defaults: Dict[str, Any]        # the registered settings
    extra_args: Tuple[str, ...]     # builder arguments that are not Module fields (e.g. "variant")
    pretrained_cfg: Dict[str, Any]  # the released weights' preprocessing, see `make_pretrained_cfg`


_REGISTRY: Dict[str, ModelEntry] = {}


def make_pretrained_cfg(changes: Optional[Mapping[str, Any]] = None, *, img_size: Any = None,
                        in_chans: int = 3) -> Dict[str, Any]:
    """Returns a full pretrained cfg: `DEFAULT_PRETRAINED_CFG` with `changes`; raises ValueError naming valid keys.

    Without an `input_size` in `changes` the input is (in_chans, img_size, img_size) where `img_size` is
    given (the registered resolution: a `_384` model's weights were fine-tuned at 384), else 224.
    """
    changes = dict(changes or {})
    unknown = sorted(set(changes) - set(DEFAULT_PRETRAINED_CFG))
    if unknown:
        raise ValueError(f"Unknown pretrained_cfg key(s) {unknown}; valid keys: {sorted(DEFAULT_PRETRAINED_CFG)}")
    cfg = {**DEFAULT_PRETRAINED_CFG, **changes}
    if "input_size" not in changes:
        height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size or (224, 224))
        cfg["input_size"] = (int(in_chans), int(height), int(width))
    cfg["input_size"] = tuple(int(value) for value in cfg["input_size"])
    cfg["mean"] = tuple(float(value) for value in cfg["mean"])
    cfg["std"] = tuple(float(value) for value in cfg["std"])
    cfg["crop_pct"] = float(cfg["crop_pct"])
    if len(cfg["input_size"]) != 3 or not len(cfg["mean"]) == len(cfg["std"]) == cfg["input_size"][0]:
        raise ValueError(f"pretrained_cfg input_size must be (channels, height, width) with one mean and std per "
                         f"channel; got {cfg}")
    if not 0.0 < cfg["crop_pct"] <= 1.0:
        raise ValueError(f"pretrained_cfg crop_pct must be in (0, 1], got {cfg['crop_pct']}")
    if cfg["interpolation"] not in INTERPOLATIONS:
        raise ValueError(f"pretrained_cfg interpolation {cfg['interpolation']!r} is not valid; valid choices: "
                         f"{list(INTERPOLATIONS)}")
    return cfg


def register_model(name: str, builder: Callable[..., Any], *, family: str, module_class: Optional[type] = None,
                   extra_args: Tuple[str, ...] = (), pretrained_cfg: Optional[Mapping[str, Any]] = None,
                   **defaults) -> None:
    """Registers `name`; `defaults` are passed to `builder` and may be overridden in `create`.

    `pretrained_cfg` holds the changes from `DEFAULT_PRETRAINED_CFG` of the weights released under this name
    (see `make_pretrained_cfg`; the input size follows the registered `img_size` unless given).
    """
    if name in _REGISTRY:
        raise ValueError(f"Model {name!r} is registered twice")
    module_class = module_class or builder
    cfg = make_pretrained_cfg(pretrained_cfg, img_size=defaults.get("img_size"),
                              in_chans=defaults.get("in_chans", 3))
    _REGISTRY[name] = ModelEntry(builder, module_class, family, dict(defaults), tuple(extra_args), cfg)


def module_fields(module_class: type) -> Tuple[str, ...]:
    """Returns the constructor fields of a linen Module class (its valid overrides)."""
    return tuple(f.name for f in dataclasses.fields(module_class) if f.name not in ("parent", "name") and f.init)


def registry() -> Dict[str, ModelEntry]:
    """Returns the registry dict (name -> ModelEntry)."""
    return _REGISTRY
