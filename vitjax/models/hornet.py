"""HorNet (Rao et al., NeurIPS 2022, "HorNet: Efficient High-Order Spatial Interactions with Recursive Gated
Convolutions"), as the official raoyongming/HorNet `hornet.py`.

A ConvNeXt-like four-stage network whose token mixer is the recursive gated convolution g^n Conv (`GnConv`):
a 1x1 projection to 2C channels splits into p0 (C / 2^(n-1) channels) and a stack q of C/2^(n-1) + ... + C
channels; q goes through a depthwise 7x7 conv (or, in the `_gf` models' last two stages, a global-local filter:
half the channels through a 3x3 depthwise conv, half multiplied by a learned filter in the 2-D FFT domain),
scaled by 1/3, and split into n gates; p_{k+1} = 1x1conv(p_k) * gate_k doubles the width each step up to C.
Orders 2, 3, 4, 5 in the four stages.

The global filter's learned complex weight is stored at the registered size (14 x 8 and 7 x 4 for 224 px,
24 x 13 and 12 x 7 for the `_img384` models) and resized, as the official code does, with torch's bilinear
`align_corners=True` interpolation when the rfft2 grid of the input differs.
Parameter names follow the official state dict: `downsample_layers_{i}/{conv,norm}`, `stages_{i}/blocks_{j}/
{norm1, gnconv/{proj_in, dwconv, pws_{k}, proj_out}, gamma1, norm2, pwconv1, pwconv2, gamma2}`, `norm`, `head`.
"""
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import fft_mixer, layers, param_groups
from vitjax.models.registry import register_model

_EPS = 1e-6


def _norm(name: str, module: nn.Module) -> nn.LayerNorm:
    return nn.LayerNorm(_EPS, dtype=module.dtype, param_dtype=module.param_dtype, name=name)


def _pointwise(module: nn.Module, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=layers.logical(layers.trunc_normal_init, ("embed", "mlp")),
                    bias_init=layers.logical(nn.initializers.zeros, ("mlp",)),
                    dtype=module.dtype, param_dtype=module.param_dtype, name=name)


def _depthwise(module: nn.Module, channels: int, kernel: int, use_bias: bool, name: str) -> nn.Conv:
    return nn.Conv(channels, (kernel, kernel), padding=[((kernel - 1) // 2,) * 2] * 2, feature_group_count=channels,
                   use_bias=use_bias, kernel_init=layers.logical(layers.trunc_normal_init, (None, None, None, "embed")),
                   bias_init=layers.logical(nn.initializers.zeros, ("embed",)),
                   dtype=module.dtype, param_dtype=module.param_dtype, name=name)


def align_corners_matrix(in_len: int, out_len: int) -> np.ndarray:
    """Returns the (out_len, in_len) weights of torch's 1-D linear interpolation with align_corners=True."""
    matrix = np.zeros((out_len, in_len), np.float64)
    scale = np.float32(in_len - 1) / np.float32(out_len - 1) if out_len > 1 else np.float32(0.0)
    for index in range(out_len):
        source = float(np.float32(scale * np.float32(index)))
        low = min(int(np.floor(source)), in_len - 1)
        high = min(low + 1, in_len - 1)
        frac = float(np.float32(source - low))
        matrix[index, low] += 1.0 - frac
        matrix[index, high] += frac
    return matrix


class GlobalLocalFilter(nn.Module):
    """HorNet's global-local filter on NHWC `x`: half the channels through a 3x3 depthwise conv, half through a learned
    filter in the rfft2 domain, interleaved channel by channel, between two LayerNorms; returns the same shape."""

    filter_size: Tuple[int, int] = (14, 8)
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        half = channels // 2
        x = _norm("pre_norm", self)(x)
        local = _depthwise(self, half, 3, False, "dw")(x[..., :half])
        weight = self.param("complex_weight", layers.logical(nn.initializers.truncated_normal(0.02),
                                                              ("embed", None, None, None)),
                            (half, *self.filter_size, 2), jnp.float32)
        grid = fft_mixer.rfft_grid(height, width)
        if tuple(self.filter_size) != tuple(grid):
            rows = jnp.asarray(align_corners_matrix(self.filter_size[0], grid[0]), jnp.float32)
            cols = jnp.asarray(align_corners_matrix(self.filter_size[1], grid[1]), jnp.float32)
            weight = jnp.einsum("oh,chwr->cowr", rows, weight, precision=jax.lax.Precision.HIGHEST)
            weight = jnp.einsum("pw,cowr->copr", cols, weight, precision=jax.lax.Precision.HIGHEST)
        filtered = fft_mixer.spectral_gate(x[..., half:].astype(jnp.float32),
                                           jnp.transpose(fft_mixer.as_complex(weight), (1, 2, 0)))
        # The official torch.cat([x1.unsqueeze(2), x2.unsqueeze(2)], 2).reshape: channels alternate local, global.
        x = jnp.stack([local, filtered.astype(local.dtype)], axis=-1).reshape(batch, height, width, 2 * half)
        return _norm("post_norm", self)(x)


class GnConv(nn.Module):
    """Recursive gated convolution of order `order` on NHWC `x`; returns the same shape."""

    order: int
    filter_size: Optional[Tuple[int, int]] = None  # None: a 7x7 depthwise conv; else a GlobalLocalFilter
    scale: float = 1.0 / 3.0
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        dims = [channels // 2 ** index for index in range(self.order)][::-1]
        fused = _pointwise(self, 2 * channels, "proj_in")(x)
        first, stack = fused[..., :dims[0]], fused[..., dims[0]:]
        if self.filter_size is None:
            gates = _depthwise(self, sum(dims), 7, True, "dwconv")(stack)
        else:
            gates = GlobalLocalFilter(tuple(self.filter_size), self.dtype, self.param_dtype, name="dwconv")(stack)
        gates = gates * self.scale
        bounds = np.cumsum(dims)[:-1]
        gates = jnp.split(gates, bounds, axis=-1)
        x = first * gates[0]
        for index in range(self.order - 1):
            x = _pointwise(self, dims[index + 1], f"pws_{index}")(x) * gates[index + 1]
        return _pointwise(self, channels, "proj_out")(x)


class HorNetBlock(nn.Module):
    """LayerNorm + g^n Conv, then LayerNorm + MLP (x4, GELU), each with a layer scale and drop path."""

    order: int
    filter_size: Optional[Tuple[int, int]] = None
    scale: float = 1.0 / 3.0
    layer_scale_init_value: float = 1e-6
    drop_path_rate: float = 0.0
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        channels = x.shape[-1]
        drop_path = layers.DropPath(self.drop_path_rate)
        y = GnConv(self.order, self.filter_size, self.scale, self.dtype, self.param_dtype,
                   name="gnconv")(_norm("norm1", self)(x))
        if self.layer_scale_init_value > 0:
            y = layers.LayerScale(self.layer_scale_init_value, self.param_dtype, name="gamma1")(y)
        x = x + drop_path(y, train)
        y = _pointwise(self, 4 * channels, "pwconv1")(_norm("norm2", self)(x))
        y = _pointwise(self, channels, "pwconv2")(layers.gelu(y))
        if self.layer_scale_init_value > 0:
            y = layers.LayerScale(self.layer_scale_init_value, self.param_dtype, name="gamma2")(y)
        return x + drop_path(y, train)


class Downsample(nn.Module):
    """The stem (conv 4x4 stride 4, then LayerNorm) or a downsampling layer (LayerNorm, then conv 2x2 stride 2)."""

    features: int
    stride: int
    is_stem: bool
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = nn.Conv(self.features, (self.stride, self.stride), strides=(self.stride, self.stride),
                       padding="VALID",
                       kernel_init=layers.logical(layers.trunc_normal_init, (None, None, None, "embed")),
                       bias_init=layers.logical(nn.initializers.zeros, ("embed",)),
                       dtype=self.dtype, param_dtype=self.param_dtype, name="conv")
        norm = _norm("norm", self)
        return norm(conv(x)) if self.is_stem else conv(norm(x))


class HorNetStage(nn.Module):
    """`depth` HorNet blocks of one order and token mixer."""

    depth: int
    order: int
    filter_size: Optional[Tuple[int, int]]
    scale: float
    layer_scale_init_value: float
    drop_path_rates: Sequence[float]
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for index in range(self.depth):
            x = HorNetBlock(self.order, self.filter_size, self.scale, self.layer_scale_init_value,
                            self.drop_path_rates[index], self.dtype, self.param_dtype, name=f"blocks_{index}")(x, train)
        return x


class HorNet(param_groups.LayerGroups, nn.Module):
    """HorNet classifier; `__call__(images NHWC, train) -> (logits, intermediates)`.

    intermediates: `stages` (the four NHWC feature maps), `pre_logits` (B, 8 * base_dim), the normed pooled features.
    """

    num_classes: int = 1000
    img_size: Union[int, Tuple[int, int]] = 224
    in_chans: int = 3
    depths: Sequence[int] = (2, 3, 18, 2)
    base_dim: int = 64
    orders: Sequence[int] = (2, 3, 4, 5)
    # Per stage: None (7x7 depthwise conv) or the (h, w) of the global filter's stored complex weight.
    filter_sizes: Sequence[Optional[Tuple[int, int]]] = (None, None, None, None)
    gnconv_scale: float = 1.0 / 3.0
    layer_scale_init_value: float = 1e-6
    head_init_scale: float = 1.0
    drop_path_rate: float = 0.0
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    def validate(self) -> None:
        """Raises ValueError naming the valid choices if the settings cannot build a model."""
        if not len(self.depths) == len(self.orders) == len(self.filter_sizes) == 4:
            raise ValueError(f"depths, orders and filter_sizes need one entry per stage (4); got {self.depths}, "
                             f"{self.orders}, {self.filter_sizes}")
        for stage, order in enumerate(self.orders):
            if order < 1 or (self.base_dim * 2 ** stage) % 2 ** (order - 1):
                raise ValueError(f"Each order must be >= 1 and each stage's width (base_dim * 2^stage, base_dim "
                                 f"{self.base_dim}) divisible by 2^(order - 1); got orders {self.orders}")
        for size in self.filter_sizes:
            if size is not None and (len(size) != 2 or min(size) < 1):
                raise ValueError(f"Each filter size is None or a positive (h, w); got {self.filter_sizes}")
        img = layers.to_2tuple(self.img_size)
        if img[0] % 32 or img[1] % 32:
            raise ValueError(f"img_size {self.img_size} must be a multiple of 32 (the network's total stride)")

    def group_matcher(self) -> param_groups.Matcher:
        """Returns timm-style group_matcher(coarse=False) over vitjax param paths (see param_groups)."""
        return dict(stem=r"^downsample_layers_0/",
                    blocks=[(r"^downsample_layers_(\d+)", (0,)), (r"^stages_(\d+)/blocks_(\d+)", None),
                            (r"^norm", (param_groups.MERGE_WITH_PREVIOUS,))])

    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns no regex: the official code decays every weight of 2 or more dimensions (timm's default)."""
        return ()

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (logits, intermediates) for NHWC `images`."""
        dims = [self.base_dim * 2 ** index for index in range(4)]
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
        x = images
        intermediates: Dict[str, Any] = {"stages": []}
        cursor = 0
        for stage in range(4):
            x = Downsample(dims[stage], 4 if stage == 0 else 2, stage == 0, self.dtype, self.param_dtype,
                           name=f"downsample_layers_{stage}")(x)
            size = self.filter_sizes[stage]
            x = HorNetStage(self.depths[stage], self.orders[stage], None if size is None else tuple(size),
                            self.gnconv_scale, self.layer_scale_init_value,
                            tuple(float(rate) for rate in rates[cursor:cursor + self.depths[stage]]),
                            self.dtype, self.param_dtype, name=f"stages_{stage}")(x, train)
            cursor += self.depths[stage]
            intermediates["stages"].append(x)
        x = nn.LayerNorm(_EPS, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x.mean(axis=(1, 2)))
        intermediates["pre_logits"] = x
        if not self.num_classes:
            return x, intermediates
        scale = self.head_init_scale
        return nn.Dense(self.num_classes,
                        kernel_init=layers.logical(lambda *a: layers.trunc_normal_init(*a) * scale,
                                                   ("embed", "classes")),
                        bias_init=layers.logical(nn.initializers.zeros, ("classes",)),
                        dtype=self.dtype, param_dtype=self.param_dtype, name="head")(x), intermediates


# --- registry: the official hornet.py names --------------------------------------------------------------------

_GF_224 = (None, None, (14, 8), (7, 4))
_GF_384 = (None, None, (24, 13), (12, 7))
_HORNETS = {
    "hornet_tiny_7x7": (64, None), "hornet_tiny_gf": (64, _GF_224),
    "hornet_small_7x7": (96, None), "hornet_small_gf": (96, _GF_224),
    "hornet_base_7x7": (128, None), "hornet_base_gf": (128, _GF_224), "hornet_base_gf_img384": (128, _GF_384),
    "hornet_large_7x7": (192, None), "hornet_large_gf": (192, _GF_224), "hornet_large_gf_img384": (192, _GF_384),
}
for _name, (_dim, _filters) in _HORNETS.items():
    _img = 384 if _name.endswith("img384") else 224
    register_model(_name, HorNet, family="hornet", base_dim=_dim, img_size=_img,
                   filter_sizes=_filters or (None, None, None, None),
                   pretrained_cfg=dict(crop_pct=1.0) if _img == 384 else None)
