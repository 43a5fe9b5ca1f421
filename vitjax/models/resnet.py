"""ResNet (He et al. 2016) and the ResNet-D tweaks (He et al. 2019, "Bag of Tricks"): convolutional teachers.

Four stages of basic (two 3x3 convs) or bottleneck (1x1, 3x3, 1x1 x4) blocks at strides 4, 8, 16, 32 after a
7x7 stride-2 conv and a 3x3 stride-2 max pool. The `d` variants replace the 7x7 conv by three 3x3 convs
(`deep_stem`, widths 32, 32, 64) and downsample the shortcut by a 2x2 average pool before its 1x1 conv
(`avg_down`). Every conv is followed by BatchNorm, whose running statistics live in `batch_stats`.

Parameter names mirror timm's `ResNet` ("." -> "/", a list index ".3" -> "_3"): `conv1` (or `conv1_0`,
`conv1_1`, `conv1_3`, `conv1_4`, `conv1_6` for the deep stem), `bn1`, `layer2_0/{conv1,bn1,...,downsample_0,
downsample_1}` (`downsample_1`, `downsample_2` with `avg_down`), `fc`.
"""
from typing import Any, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.models import layers, param_groups
from vitjax.models.registry import register_model

BLOCK_TYPES = {"basic": 1, "bottleneck": 4}   # block type -> expansion of its output width

# timm's ResNet init: Kaiming normal, fan-out, for ReLU.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(features: int, kernel_size: int, strides: int = 1, groups: int = 1, name: str = None,
         dtype: layers.Dtype = jnp.float32, param_dtype: layers.Dtype = jnp.float32) -> nn.Conv:
    """Returns a bias-free conv with torch's symmetric padding kernel_size // 2."""
    pad = kernel_size // 2
    return nn.Conv(features, (kernel_size, kernel_size), strides=(strides, strides), padding=[(pad, pad)] * 2,
                   feature_group_count=groups, use_bias=False,
                   kernel_init=layers.logical(_conv_init, (None, None, None, "embed")),
                   dtype=dtype, param_dtype=param_dtype, name=name)


def avg_pool_ceil(x: jax.Array) -> jax.Array:
    """Returns a 2x2 stride-2 average pool of NHWC `x` as torch's AvgPool2d(ceil_mode, count_include_pad=False).

    An odd side gets a last, partial window averaged over its valid pixels only.
    """
    pad = [(0, 0), (0, x.shape[1] % 2), (0, x.shape[2] % 2), (0, 0)]
    window = dict(window_shape=(2, 2), strides=(2, 2), padding="VALID")
    total = nn.pool(jnp.pad(x, pad), 0.0, jax.lax.add, **window)
    count = nn.pool(jnp.pad(jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype), pad), 0.0, jax.lax.add, **window)
    return total / count


class ResNetBlock(nn.Module):
    """A basic or bottleneck residual block; `downsample` adds the projected (strided) shortcut."""

    planes: int
    block_type: str = "basic"
    strides: int = 1
    downsample: bool = False
    avg_down: bool = False
    drop_path_rate: float = 0.0
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name, scale_init=1.0: layers.batch_norm(train, scale_init=scale_init, name=name, **kw)  # noqa
        out_width = self.planes * BLOCK_TYPES[self.block_type]
        if self.block_type == "basic":
            y = jax.nn.relu(norm("bn1")(conv(self.planes, 3, self.strides, name="conv1", **kw)(x)))
            # The last BN of the residual branch starts at zero (timm's zero_init_last).
            y = norm("bn2", 0.0)(conv(out_width, 3, name="conv2", **kw)(y))
        else:
            y = jax.nn.relu(norm("bn1")(conv(self.planes, 1, name="conv1", **kw)(x)))
            y = jax.nn.relu(norm("bn2")(conv(self.planes, 3, self.strides, name="conv2", **kw)(y)))
            y = norm("bn3", 0.0)(conv(out_width, 1, name="conv3", **kw)(y))
        shortcut = x
        if self.downsample:
            if self.avg_down:
                if self.strides > 1:
                    shortcut = avg_pool_ceil(shortcut)
                shortcut = norm("downsample_2")(conv(out_width, 1, name="downsample_1", **kw)(shortcut))
            else:
                shortcut = norm("downsample_1")(conv(out_width, 1, self.strides, name="downsample_0", **kw)(shortcut))
        return jax.nn.relu(layers.DropPath(self.drop_path_rate)(y, train) + shortcut)


class ResNet(param_groups.LayerGroups, nn.Module):
    """ResNet classifier; `__call__(images NHWC, train)` returns (logits, intermediates).

    intermediates: `stages` (list of the four NHWC stage outputs), `pre_logits` (B, C). With
    `num_classes=0` the pooled features are returned in place of logits.
    """

    num_classes: int = 1000
    img_size: int = 224
    in_chans: int = 3
    block_type: str = "basic"
    depths: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)
    deep_stem: bool = False
    stem_width: int = 64
    avg_down: bool = False
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    def validate(self) -> None:
        """Raises ValueError naming the valid choices if the settings cannot build a model."""
        if self.block_type not in BLOCK_TYPES:
            raise ValueError(f"Unknown block_type {self.block_type!r}; valid choices: {list(BLOCK_TYPES)}")
        if len(self.depths) != len(self.widths) or not self.depths:
            raise ValueError(f"depths {tuple(self.depths)} and widths {tuple(self.widths)} need one entry per stage")
        if min(self.depths) < 1:
            raise ValueError(f"every stage needs at least one block; got depths {tuple(self.depths)}")
        if not 0.0 <= self.drop_path_rate < 1.0 or not 0.0 <= self.drop_rate < 1.0:
            raise ValueError("drop_rate and drop_path_rate must be in [0, 1)")

    def group_matcher(self) -> param_groups.Matcher:
        """Returns timm's group_matcher(coarse=False) over vitjax param paths (see param_groups)."""
        return dict(stem=r"^conv1|^bn1", blocks=r"^layer(\d+)_(\d+)")

    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns regexes of the param paths not weight-decayed: none beyond biases and norms."""
        return ()

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Tuple[Any, Dict[str, Any]]:
        """Returns (logits, intermediates) for NHWC `images`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = images
        if self.deep_stem:
            x = jax.nn.relu(layers.batch_norm(train, name="conv1_1", **kw)(
                conv(self.stem_width, 3, 2, name="conv1_0", **kw)(x)))
            x = jax.nn.relu(layers.batch_norm(train, name="conv1_4", **kw)(
                conv(self.stem_width, 3, name="conv1_3", **kw)(x)))
            x = conv(2 * self.stem_width, 3, name="conv1_6", **kw)(x)
        else:
            x = conv(self.stem_width, 7, 2, name="conv1", **kw)(x)
        x = jax.nn.relu(layers.batch_norm(train, name="bn1", **kw)(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        total_blocks, block_index = sum(self.depths), 0
        in_width, stages = x.shape[-1], []
        for stage, (depth, planes) in enumerate(zip(self.depths, self.widths)):
            for index in range(depth):
                strides = 2 if stage > 0 and index == 0 else 1
                out_width = planes * BLOCK_TYPES[self.block_type]
                rate = self.drop_path_rate * block_index / max(total_blocks - 1, 1)   # timm's linear rule
                x = ResNetBlock(planes, self.block_type, strides, downsample=strides != 1 or in_width != out_width,
                                avg_down=self.avg_down, drop_path_rate=rate, name=f"layer{stage + 1}_{index}",
                                **kw)(x, train)
                in_width, block_index = out_width, block_index + 1
            stages.append(x)
        pooled = x.mean(axis=(1, 2))
        intermediates: Dict[str, Any] = {"stages": stages, "pre_logits": pooled}
        if not self.num_classes:
            return pooled, intermediates
        pooled = nn.Dropout(self.drop_rate)(pooled, deterministic=not train)
        logits = nn.Dense(self.num_classes, kernel_init=layers.logical(layers.torch_default_init, ("embed", "classes")),
                          bias_init=layers.logical(nn.initializers.zeros, ("classes",)), name="fc", **kw)(pooled)
        return logits, intermediates


# --- registry: timm's ResNet and ResNet-D sizes ----------------------------------------------------------------

_DEPTHS = {18: ("basic", (2, 2, 2, 2)), 26: ("bottleneck", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
           50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3)), 152: ("bottleneck", (3, 8, 36, 3))}
# timm's pretrained_cfg of each name's default weights: 224 px, bicubic, ImageNet statistics.
_CROP_PCT = {"resnet18": 0.95, "resnet34": 0.95, "resnet50": 0.95, "resnet101": 0.95, "resnet152": 0.95,
             "resnet101d": 0.95, "resnet152d": 0.95}
_IMG_SIZE = {"resnet101d": 256, "resnet152d": 256}

for _depth, (_block, _depths) in _DEPTHS.items():
    for _suffix, _extra in (("", {}), ("d", dict(deep_stem=True, stem_width=32, avg_down=True))):
        _name = f"resnet{_depth}{_suffix}"
        register_model(_name, ResNet, family="resnet", pretrained_cfg=dict(crop_pct=_CROP_PCT.get(_name, 0.875)),
                       block_type=_block, depths=_depths, img_size=_IMG_SIZE.get(_name, 224), **_extra)
