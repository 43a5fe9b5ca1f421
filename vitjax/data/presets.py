"""Preprocessing that matches pretrained weights: pp strings from a model's pretrained cfg.

    cfg = vitjax.models.pretrained_cfg("vit_base_patch16_224")   # or a converted checkpoint's meta
    pretrained_pp(cfg)   # "decode|resize_small(248, method='bicubic', antialias=True)|central_crop(224)|"
                         # "normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))"
    pretrained_pp(cfg, image_size=32, channels=1)            # the bundled gray digits, at 32x32
    pretrained_pp(cfg, train=True)                           # inception crop | flip | normalize

Eval follows timm's `transforms_factory` for eval: the shorter side resized to floor(size / crop_pct),
then the central `size` crop, then the cfg's mean and std. Pure Python: no TensorFlow here.
"""
import math
from typing import Any, Mapping, Optional, Tuple, Union

_CFG_KEYS = ("input_size", "mean", "std", "crop_pct", "interpolation")


def _size_pair(image_size: Union[int, Tuple[int, int], None], input_size) -> Tuple[int, int]:
    """Returns (height, width) of `image_size` (int or pair), else of the cfg's (C, H, W) input size."""
    if image_size is None:
        return int(input_size[1]), int(input_size[2])
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


def _floats(values) -> str:
    return "(" + ", ".join(repr(float(value)) for value in values) + ")"


def pretrained_pp(cfg: Mapping[str, Any], *, image_size: Union[int, Tuple[int, int], None] = None,
                  channels: int = 3, train: bool = False) -> str:
    """Returns the pp string preprocessing images as the weights of `cfg` (a model's pretrained cfg) expect.

    `image_size` (int or (height, width)) replaces the cfg's input size, e.g. for fine-tuning at another
    resolution; `channels` is the dataset's (1: gray images, repeated to RGB after decoding when the
    model takes 3 channels). `train`: random-resized (inception) crop, horizontal flip, normalisation.
    """
    missing = [key for key in _CFG_KEYS if key not in cfg]
    if missing:
        raise ValueError(f"pretrained cfg {dict(cfg)} lacks {missing}; it needs {list(_CFG_KEYS)} "
                         "(see vitjax.models.pretrained_cfg)")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3 (the dataset's image channels), got {channels!r}")
    model_channels = int(cfg["input_size"][0])
    if model_channels == 1 and channels == 3:
        raise ValueError("The model takes gray images (input_size channels 1) but the dataset has 3 channels")
    height, width = _size_pair(image_size, cfg["input_size"])
    size = height if height == width else (height, width)
    method = f"method={cfg['interpolation']!r}, antialias=True"
    decode = "decode" if channels == 3 else "decode(channels=1)"
    if channels == 1 and model_channels == 3:
        decode += "|gray_to_rgb"
    normalize = f"normalize(mean={_floats(cfg['mean'])}, std={_floats(cfg['std'])})"
    if train:
        return f"{decode}|inception_crop({size!r}, {method})|flip_lr|{normalize}"
    crop_pct = float(cfg["crop_pct"])
    if height == width:
        resize = f"resize_small({math.floor(height / crop_pct)}, {method})"
    else:  # as timm: both sides scaled, the aspect ratio not kept
        resize = f"resize(({math.floor(height / crop_pct)}, {math.floor(width / crop_pct)}), {method})"
    return f"{decode}|{resize}|central_crop({size!r})|{normalize}"


def with_input_size(cfg: Mapping[str, Any], image_size: Optional[Union[int, Tuple[int, int]]] = None,
                    channels: Optional[int] = None) -> dict:
    """Returns a copy of `cfg` whose input size is (channels, image_size) where these are given."""
    result = dict(cfg)
    old = tuple(result["input_size"])
    height, width = _size_pair(image_size, old)
    result["input_size"] = (int(channels if channels is not None else old[0]), height, width)
    return result
