"""RegNetY (Radosavovic et al. 2020, "Designing Network Design Spaces"): DeiT's convolutional teacher.

A 3x3 stride-2 stem, then four stages of bottleneck blocks (1x1 conv, grouped 3x3 conv, squeeze-excite,
1x1 conv; bottleneck ratio 1) whose per-block widths follow the quantised linear rule
w_j = w0 * wm ** round(log((w0 + wa * j) / w0) / log(wm)), rounded to multiples of 8; blocks of equal
width form a stage. Every conv is followed by BatchNorm (running statistics in `batch_stats`).

Parameter names mirror timm's `RegNet`: `stem/{conv,bn}`, `s1/b1/{conv1,conv2,conv3}/{conv,bn}`,
`s1/b1/se/{fc1,fc2}`, `s1/b1/downsample/{conv,bn}`, `head/fc`. RegNetY-16GF is `regnety_160`.
"""
from typing import Any, Dict, List, NamedTuple, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import layers, param_groups
from vitjax.models.registry import register_model

# pycls / timm RegNet init: conv weights normal with std sqrt(2 / fan_out) (fan_out per group).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class StageSpec(NamedTuple):
    """One RegNet stage: output width, number of blocks and the grouped conv's group width."""
    width: int
    depth: int
    group_size: int


def regnet_stages(w0: int, wa: float, wm: float, depth: int, group_size: int, quant: int = 8) -> List[StageSpec]:
    """Returns the stages of the RegNet design (w0, wa, wm, depth, group size), computed as timm does (float32)."""
    if not (wa >= 0 and w0 > 0 and wm > 1 and w0 % quant == 0):
        raise ValueError(f"RegNet needs wa >= 0, w0 > 0 divisible by {quant} and wm > 1; got w0={w0}, wa={wa}, "
                         f"wm={wm}")
    continuous = np.arange(depth, dtype=np.float32) * np.float32(wa) + np.float32(w0)
    exponents = np.round(np.log(continuous / np.float32(w0)) / np.float32(np.log(wm)))
    widths = np.round(np.float32(w0) * np.power(np.float32(wm), exponents) / quant) * quant
    stage_widths, stage_depths = np.unique(widths.astype(np.int64), return_counts=True)
    stages = []
    for width, count in zip(stage_widths.tolist(), stage_depths.tolist()):
        group = min(group_size, width)   # bottleneck ratio 1: the bottleneck is the stage width
        width = int(round(width / group) * group)
        stages.append(StageSpec(width, count, group))
    return stages


def _conv_bn(features: int, kernel_size: int = 1, strides: int = 1, groups: int = 1, name: str = None,
             dtype: layers.Dtype = jnp.float32, param_dtype: layers.Dtype = jnp.float32) -> layers.ConvBN:
    return layers.ConvBN(features, kernel_size, strides, padding=kernel_size // 2, groups=groups,
                         kernel_init=_conv_init, dtype=dtype, param_dtype=param_dtype, name=name)


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc2(relu(fc1(mean over space of x)))); fc1 reduces to `reduced` channels."""

    reduced: int
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, kernel_init=layers.logical(_conv_init, ("embed", "mlp")),
            bias_init=layers.logical(nn.initializers.zeros, ("mlp",)), dtype=self.dtype,
            param_dtype=self.param_dtype, name=name)
        squeezed = jax.nn.relu(dense(self.reduced, "fc1")(x.mean(axis=(1, 2), keepdims=True)))
        return x * jax.nn.sigmoid(dense(x.shape[-1], "fc2")(squeezed))


class RegNetBlock(nn.Module):
    """Bottleneck with a grouped 3x3 conv and squeeze-excite; a projected shortcut where the shape changes."""

    width: int
    group_size: int
    strides: int = 1
    se_ratio: float = 0.25
    drop_path_rate: float = 0.0
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        in_width = x.shape[-1]
        y = jax.nn.relu(_conv_bn(self.width, name="conv1", **kw)(x, train))
        y = jax.nn.relu(_conv_bn(self.width, 3, self.strides, groups=self.width // self.group_size, name="conv2",
                                 **kw)(y, train))
        if self.se_ratio:
            # The squeeze width follows the block's input width, as pycls and timm.
            y = SqueezeExcite(int(round(in_width * self.se_ratio)), name="se", **kw)(y)
        # The last BN of the residual branch starts at zero (timm's zero_init_last).
        y = layers.ConvBN(self.width, bn_scale_init=0.0, kernel_init=_conv_init, name="conv3", **kw)(y, train)
        shortcut = x
        if in_width != self.width or self.strides != 1:
            shortcut = _conv_bn(self.width, 1, self.strides, name="downsample", **kw)(x, train)
        return jax.nn.relu(layers.DropPath(self.drop_path_rate)(y, train) + shortcut)


class RegNet(param_groups.LayerGroups, nn.Module):
    """RegNetY classifier; `__call__(images NHWC, train)` returns (logits, intermediates).

    The design (w0, wa, wm, depth, group_size) fixes the stages (see `regnet_stages`). intermediates:
    `stages` (list of NHWC stage outputs), `pre_logits` (B, C); `num_classes=0` returns the pooled features.
    """

    num_classes: int = 1000
    img_size: int = 224
    in_chans: int = 3
    w0: int = 24
    wa: float = 36.44
    wm: float = 2.49
    depth: int = 13
    group_size: int = 8
    se_ratio: float = 0.25
    stem_width: int = 32
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @property
    def stages(self) -> List[StageSpec]:
        """Returns the four stages of this design."""
        return regnet_stages(self.w0, self.wa, self.wm, self.depth, self.group_size)

    def validate(self) -> None:
        """Raises ValueError naming the valid ranges if the settings cannot build a model."""
        stages = self.stages
        if len(stages) != 4:
            raise ValueError(f"The RegNet design (w0={self.w0}, wa={self.wa}, wm={self.wm}, depth={self.depth}) "
                             f"gives {len(stages)} stages; timm's RegNet needs exactly 4")
        if not 0.0 <= self.se_ratio < 1.0:
            raise ValueError(f"se_ratio must be in [0, 1), got {self.se_ratio}")
        if not 0.0 <= self.drop_path_rate < 1.0 or not 0.0 <= self.drop_rate < 1.0:
            raise ValueError("drop_rate and drop_path_rate must be in [0, 1)")

    def group_matcher(self) -> param_groups.Matcher:
        """Returns timm's group_matcher(coarse=False) over vitjax param paths (see param_groups)."""
        return dict(stem=r"^stem", blocks=r"^s(\d+)/b(\d+)")

    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns regexes of the param paths not weight-decayed: none beyond biases and norms."""
        return ()

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Tuple[Any, Dict[str, Any]]:
        """Returns (logits, intermediates) for NHWC `images`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = jax.nn.relu(_conv_bn(self.stem_width, 3, 2, name="stem", **kw)(images, train))
        specs = self.stages
        total_blocks, block_index, stages = sum(spec.depth for spec in specs), 0, []
        for stage, spec in enumerate(specs):
            rates = [self.drop_path_rate * (block_index + index) / max(total_blocks - 1, 1)   # timm's linear rule
                     for index in range(spec.depth)]
            x = RegStage(spec, rates, self.se_ratio, name=f"s{stage + 1}", **kw)(x, train)
            block_index += spec.depth
            stages.append(x)
        pooled = x.mean(axis=(1, 2))
        intermediates: Dict[str, Any] = {"stages": stages, "pre_logits": pooled}
        if not self.num_classes:
            return pooled, intermediates
        pooled = nn.Dropout(self.drop_rate)(pooled, deterministic=not train)
        logits = ClassifierHead(self.num_classes, name="head", **kw)(pooled)
        return logits, intermediates


class RegStage(nn.Module):
    """`spec.depth` blocks named b1, b2, ...; the first one strides by 2."""

    spec: StageSpec
    drop_path_rates: Sequence[float]
    se_ratio: float = 0.25
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for index in range(self.spec.depth):
            x = RegNetBlock(self.spec.width, self.spec.group_size, 2 if index == 0 else 1, self.se_ratio,
                            self.drop_path_rates[index], self.dtype, self.param_dtype, name=f"b{index + 1}")(x, train)
        return x


class ClassifierHead(nn.Module):
    """The classifier Dense `fc` (timm's ClassifierHead after pooling)."""

    num_classes: int
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, pooled: jax.Array) -> jax.Array:
        # timm's RegNet init: classifier weights N(0, 0.01), zero bias.
        kernel_init = layers.logical(nn.initializers.normal(0.01), ("embed", "classes"))
        return nn.Dense(self.num_classes, kernel_init=kernel_init,
                        bias_init=layers.logical(nn.initializers.zeros, ("classes",)), dtype=self.dtype,
                        param_dtype=self.param_dtype, name="fc")(pooled)


# --- registry: timm's RegNetY designs (w0, wa, wm, depth, group size) -------------------------------------------

_TIMM_REGNETYS = {
    "regnety_002": (24, 36.44, 2.49, 13, 8), "regnety_004": (48, 27.89, 2.09, 16, 8),
    "regnety_006": (48, 32.54, 2.32, 15, 16), "regnety_008": (56, 38.84, 2.4, 14, 16),
    "regnety_016": (48, 20.71, 2.65, 27, 24), "regnety_032": (80, 42.63, 2.66, 21, 24),
    "regnety_040": (96, 31.41, 2.24, 22, 64), "regnety_064": (112, 33.22, 2.27, 25, 72),
    "regnety_080": (192, 76.82, 2.19, 17, 56), "regnety_120": (168, 73.36, 2.37, 19, 112),
    "regnety_160": (200, 106.23, 2.48, 18, 112),    # RegNetY-16GF, DeiT's teacher
    "regnety_320": (232, 115.89, 2.53, 20, 232),
}
# timm's pretrained_cfg of each name's default weights: 224 px, bicubic, ImageNet statistics.
_CROP_PCT = {"regnety_002": 0.875, "regnety_006": 0.875, "regnety_008": 0.875, "regnety_004": 0.965,
             "regnety_016": 0.965, "regnety_320": 0.965}

for _name, (_w0, _wa, _wm, _depth, _group) in _TIMM_REGNETYS.items():
    register_model(_name, RegNet, family="regnet", pretrained_cfg=dict(crop_pct=_CROP_PCT.get(_name, 0.95)),
                   w0=_w0, wa=_wa, wm=_wm, depth=_depth, group_size=_group)
