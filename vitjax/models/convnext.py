"""ConvNeXt (Liu et al. 2022, "A ConvNet for the 2020s") and ConvNeXt-V2 (Woo et al. 2023, the GRN MLP).

A ConvNeXt block is a 7x7 depthwise conv, a channels-last LayerNorm, an inverted-bottleneck MLP (x4, GELU)
and a per-channel layer scale. Four stages at strides 4, 8, 16, 32: a 4x4 patchify stem, and stages 2-4
open with a LayerNorm + 2x2 stride-2 conv. The head pools, then norms (pool -> norm -> fc, the FB
ordering), or norms first (`head_norm_first`, timm's `_hnf`).

Every size timm registers is registered here under timm's name: atto ... xxlarge, the overlapping-stem
`_ols`, RMS/Simple-norm variants, `_hnf`, `large_mlp` and the V2 models (GRN, no layer scale). Images are
NHWC, so timm's `conv_mlp` (1x1 convs on NCHW) and its Linear form are the same computation here; both
convert to Dense layers. Parameter names mirror timm's modules (`stem_0`, `stages_1/downsample_conv`,
`stages_2/blocks_3/mlp/fc1`, `head/fc`), so a timm state dict converts by a plain key table.
"""
from typing import Any, Dict, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import layers, param_groups
from vitjax.models.registry import (
    IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, register_model)

STEM_TYPES = ("patch", "overlap", "overlap_tiered", "overlap_act")
NORM_TYPES = ("layernorm", "rmsnorm", "simplenorm")


def mask_feature_map(x: jax.Array, active: Optional[jax.Array]) -> jax.Array:
    """Returns NHWC `x` times `active` ((B, h, w), 1 = kept) repeated up to x's grid; `x` itself where None."""
    if active is None:
        return x
    height, width = x.shape[1], x.shape[2]
    if height % active.shape[1] or width % active.shape[2]:
        raise ValueError(f"active mask of grid {active.shape[1:]} does not divide the feature map {(height, width)}")
    cells = jnp.repeat(jnp.repeat(active, height // active.shape[1], axis=1), width // active.shape[2], axis=2)
    return x * cells[..., None].astype(x.dtype)


def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """Returns `value` rounded to a multiple of `divisor`, never more than 10% below it (timm's rule)."""
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < round_limit * value:
        new_value += divisor
    return new_value


def _kernel_init(axes: Tuple[Optional[str], ...], scale: float = 1.0) -> layers.Initializer:
    """Returns timm's ConvNeXt conv/linear init (trunc-normal, std 0.02, times `scale`) with logical axes."""
    if scale == 1.0:
        return layers.logical(layers.trunc_normal_init, axes)
    return layers.logical(lambda key, shape, dtype=jnp.float32: layers.trunc_normal_init(key, shape, dtype) * scale,
                          axes)


def channel_norm(norm_type: str, eps: float, dtype, param_dtype, name: str) -> layers.ChannelNorm:
    """Returns ConvNeXt's channel norm: `layers.ChannelNorm`, with a bias for LayerNorm only (as timm)."""
    return layers.ChannelNorm(norm_type, eps, norm_type == "layernorm", dtype, param_dtype, name=name)


class GrnMlp(nn.Module):
    """ConvNeXt-V2's MLP on tokens (B, L, C): fc1 -> GELU -> global response norm -> fc2.

    GRN: x + bias + weight * x * (|x|_L / mean_C |x|_L), the L2 norm taken over the spatial (token) axis.
    """

    hidden_features: int
    use_bias: bool = True
    eps: float = 1e-6
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        out_features = x.shape[-1]
        x = nn.Dense(self.hidden_features, use_bias=self.use_bias, kernel_init=_kernel_init(("embed", "mlp")),
                     bias_init=layers.logical(nn.initializers.zeros, ("mlp",)), dtype=self.dtype,
                     param_dtype=self.param_dtype, name="fc1")(x)
        x = layers.constrain(layers.gelu(x), ("batch", "length", "mlp"))
        x = _GlobalResponseNorm(self.eps, self.param_dtype, name="grn")(x)
        return nn.Dense(out_features, use_bias=self.use_bias, kernel_init=_kernel_init(("mlp", "embed")),
                        bias_init=layers.logical(nn.initializers.zeros, ("embed",)), dtype=self.dtype,
                        param_dtype=self.param_dtype, name="fc2")(x)


class _GlobalResponseNorm(nn.Module):
    """GRN on tokens (B, L, C) with timm's parameter names `weight` and `bias` (zero init: starts as identity)."""

    eps: float = 1e-6
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        weight = self.param("weight", layers.logical(nn.initializers.zeros, ("mlp",)), (channels,),
                            self.param_dtype)
        bias = self.param("bias", layers.logical(nn.initializers.zeros, ("mlp",)), (channels,), self.param_dtype)
        squares = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=1, keepdims=True)
        # A channel that is zero everywhere has norm 0; keep its gradient finite (sqrt'(0) is infinite).
        positive = squares > 0
        spatial_norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, squares, 1.0)), 0.0)
        normalized = spatial_norm / (jnp.mean(spatial_norm, axis=-1, keepdims=True) + self.eps)
        return x + bias.astype(x.dtype) + weight.astype(x.dtype) * (x * normalized.astype(x.dtype))


class ConvNeXtBlock(nn.Module):
    """Depthwise conv -> norm -> MLP -> layer scale -> drop path, plus the identity shortcut; NHWC in and out."""

    kernel_size: int = 7
    mlp_ratio: float = 4.0
    conv_bias: bool = True
    use_grn: bool = False
    ls_init_value: Optional[float] = 1e-6
    norm_type: str = "layernorm"
    norm_eps: float = 1e-6
    drop_path_rate: float = 0.0
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, active: Optional[jax.Array] = None) -> jax.Array:
        batch, height, width, channels = x.shape
        shortcut = x
        pad = self.kernel_size // 2
        x = nn.Conv(channels, (self.kernel_size, self.kernel_size), padding=((pad, pad), (pad, pad)),
                    feature_group_count=channels, use_bias=self.conv_bias,
                    kernel_init=_kernel_init((None, None, None, "embed")),
                    bias_init=layers.logical(nn.initializers.zeros, ("embed",)),
                    dtype=self.dtype, param_dtype=self.param_dtype, name="conv_dw")(x)
        x = mask_feature_map(x, active)
        # The channels-last part runs on tokens (B, L, C), so the shared MLP's sharding constraints apply.
        x = x.reshape(batch, height * width, channels)
        x = channel_norm(self.norm_type, self.norm_eps, self.dtype, self.param_dtype, "norm")(x)
        hidden = int(self.mlp_ratio * channels)
        if self.use_grn:
            x = GrnMlp(hidden, use_bias=self.conv_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="mlp")(x, train)
        else:
            x = layers.Mlp(hidden, use_bias=self.conv_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="mlp")(x, train)
        if self.ls_init_value is not None:
            gamma = self.param("gamma", layers.logical(nn.initializers.constant(self.ls_init_value), ("embed",)),
                               (channels,), self.param_dtype)
            x = x * gamma.astype(x.dtype)
        x = layers.DropPath(self.drop_path_rate)(x, train)
        # Sparse mode: the branch of a masked cell (the MLP's biases) must not leak into the next conv.
        return mask_feature_map(x.reshape(batch, height, width, channels), active) + shortcut


def _conv(features: int, kernel: int, stride: int, padding: int, use_bias: bool, dtype: layers.Dtype,
          param_dtype: layers.Dtype, name: str) -> nn.Conv:
    """Returns a square conv with timm's init and explicit symmetric padding (PyTorch's `padding=p`)."""
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((padding, padding),) * 2,
                   use_bias=use_bias, kernel_init=_kernel_init((None, None, None, "embed")),
                   bias_init=layers.logical(nn.initializers.zeros, ("embed",)),
                   dtype=dtype, param_dtype=param_dtype, name=name)


class ConvNeXtStage(nn.Module):
    """[norm -> 2x2 stride-2 conv (`downsample_norm`, `downsample_conv`)] then `depth` blocks; NHWC in and out."""

    features: int
    depth: int
    stride: int = 2
    kernel_size: int = 7
    drop_path_rates: Tuple[float, ...] = ()
    block_kwargs: Optional[Dict[str, Any]] = None
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, active: Optional[jax.Array] = None) -> jax.Array:
        kwargs = dict(self.block_kwargs or {})
        if x.shape[-1] != self.features or self.stride > 1:
            x = channel_norm(kwargs["norm_type"], kwargs["norm_eps"], self.dtype, self.param_dtype,
                             "downsample_norm")(x)
            kernel = 2 if self.stride > 1 else 1
            x = _conv(self.features, kernel, self.stride, 0, kwargs["conv_bias"], self.dtype, self.param_dtype,
                      "downsample_conv")(x)
            x = mask_feature_map(x, active)
        for index in range(self.depth):
            x = ConvNeXtBlock(kernel_size=self.kernel_size, drop_path_rate=self.drop_path_rates[index],
                              dtype=self.dtype, param_dtype=self.param_dtype, name=f"blocks_{index}",
                              **kwargs)(x, train, active)
        return x


class ConvNeXt(param_groups.LayerGroups, nn.Module):
    """ConvNeXt classifier on NHWC images; `__call__` returns (logits, intermediates).

    intermediates: `stem` (B, H/4, W/4, C0), `stages` (each stage's NHWC output), `pre_logits` (B, C).
    With `num_classes=0` the output is the pre-logits features.
    """

    num_classes: int = 1000
    img_size: Union[int, Tuple[int, int]] = 224
    in_chans: int = 3
    depths: Tuple[int, ...] = (3, 3, 9, 3)
    dims: Tuple[int, ...] = (96, 192, 384, 768)
    kernel_sizes: Union[int, Tuple[int, ...]] = 7
    mlp_ratio: float = 4.0
    ls_init_value: Optional[float] = 1e-6
    stem_type: str = "patch"
    patch_size: int = 4
    head_norm_first: bool = False
    head_hidden_size: Optional[int] = None
    head_init_scale: float = 1.0
    conv_bias: bool = True
    use_grn: bool = False
    norm_type: str = "layernorm"
    norm_eps: float = 1e-6
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @property
    def stem_stride(self) -> int:
        """Returns the stride of the stem: the patch size, or 4 for the overlapping stems."""
        return self.patch_size if self.stem_type == "patch" else 4

    @property
    def stage_strides(self) -> Tuple[int, ...]:
        """Returns each stage's stride (timm's rule: 2 after the first stage, or also there after a stride-2 stem)."""
        return tuple(2 if (index > 0 or self.stem_stride == 2) else 1 for index in range(len(self.depths)))

    @property
    def total_stride(self) -> int:
        """Returns the ratio of the input size to the last stage's feature map."""
        return self.stem_stride * int(np.prod(self.stage_strides))

    def stage_kernel_sizes(self) -> Tuple[int, ...]:
        """Returns the depthwise kernel size of each stage."""
        if isinstance(self.kernel_sizes, int):
            return (self.kernel_sizes,) * len(self.depths)
        return tuple(self.kernel_sizes)

    def validate(self) -> None:
        """Raises ValueError naming the valid choices if the settings cannot build a model."""
        for field, valid in (("stem_type", STEM_TYPES), ("norm_type", NORM_TYPES)):
            if getattr(self, field) not in valid:
                raise ValueError(f"Unknown {field} {getattr(self, field)!r}; valid choices: {list(valid)}")
        if not self.depths or len(self.depths) != len(self.dims):
            raise ValueError(f"depths {self.depths} and dims {self.dims} must be non-empty and of equal length")
        if len(self.stage_kernel_sizes()) != len(self.depths):
            raise ValueError(f"kernel_sizes {self.kernel_sizes} needs one entry per stage ({len(self.depths)})")
        if any(size % 2 == 0 for size in self.stage_kernel_sizes()):
            raise ValueError(f"kernel_sizes must be odd (same padding), got {self.kernel_sizes}")
        if self.stem_type != "patch" and self.patch_size != 4:
            raise ValueError(f"stem_type={self.stem_type!r} has a fixed stride of 4; patch_size must be 4")
        if self.head_norm_first and self.head_hidden_size:
            raise ValueError("head_norm_first=True has no hidden head layer; set head_hidden_size=None")
        img = layers.to_2tuple(self.img_size)
        if img[0] % self.total_stride or img[1] % self.total_stride:
            raise ValueError(f"img_size {self.img_size} is not divisible by the total stride {self.total_stride}; "
                             f"valid sizes are multiples of {self.total_stride}")

    def _norm(self, name: str) -> layers.ChannelNorm:
        return channel_norm(self.norm_type, self.norm_eps, self.dtype, self.param_dtype, name)

    def stem(self, images: jax.Array) -> jax.Array:
        """Returns the stem's NHWC feature map; module names follow timm's `stem.{index}`."""
        conv = lambda features, kernel, stride, padding, name: _conv(  # noqa: E731
            features, kernel, stride, padding, self.conv_bias, self.dtype, self.param_dtype, name)
        first = self.dims[0]
        if self.stem_type == "patch":
            return self._norm("stem_1")(conv(first, self.patch_size, self.patch_size, 0, "stem_0")(images))
        mid = make_divisible(first // 2) if "tiered" in self.stem_type else first
        x = conv(mid, 3, 2, 1, "stem_0")(images)
        if self.stem_type == "overlap_act":
            return self._norm("stem_3")(conv(first, 3, 2, 1, "stem_2")(layers.gelu(x)))
        return self._norm("stem_2")(conv(first, 3, 2, 1, "stem_1")(x))

    def group_matcher(self) -> param_groups.Matcher:
        """Returns timm's group_matcher(coarse=False) over vitjax param paths (see param_groups)."""
        return dict(
            stem=r"^stem",
            blocks=[(r"^stages_(\d+)/downsample", (0,)), (r"^stages_(\d+)/blocks_(\d+)", None),
                    (r"^norm_pre", (param_groups.MERGE_WITH_PREVIOUS,))])

    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns no regex: as in timm, only the 1-D params go without weight decay."""
        return ()

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False,
                 active: Optional[jax.Array] = None) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (logits (B, num_classes), intermediates); with num_classes=0, (pre_logits, intermediates).

        `active` (default None: the dense model) is a sparse mode for masked inputs: a (B, h, w) 0/1 mask of
        kept cells on a grid that divides every feature map (e.g. the last stage's). Every feature map is
        multiplied by it after the stem, after each downsampling conv and on each block's residual branch,
        so masked cells stay zero and never reach kept ones through the convs: sparse convolution emulated
        with dense ops (SparK). The channel norms act per position, so they normalise kept cells only. The
        pooled head then averages zeros too; sparse callers read `intermediates["stages"]`.
        """
        if active is not None and (self.stem_type != "patch" or self.use_grn):
            # Overlapping stems mix cells before the first mask, and GRN normalises over all positions.
            raise ValueError(f"active (the sparse mode) needs stem_type='patch' and no GRN, got stem_type="
                             f"{self.stem_type!r}, use_grn={self.use_grn}")
        x = mask_feature_map(self.stem(images.astype(self.dtype)), active)
        intermediates: Dict[str, Any] = {"stem": x, "stages": []}
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
        block_kwargs = dict(mlp_ratio=self.mlp_ratio, conv_bias=self.conv_bias, use_grn=self.use_grn,
                            ls_init_value=self.ls_init_value, norm_type=self.norm_type, norm_eps=self.norm_eps)
        start = 0
        for stage, (depth, dim, kernel, stride) in enumerate(
                zip(self.depths, self.dims, self.stage_kernel_sizes(), self.stage_strides)):
            x = ConvNeXtStage(dim, depth, stride, kernel, tuple(float(r) for r in rates[start:start + depth]),
                              block_kwargs, self.dtype, self.param_dtype, name=f"stages_{stage}")(x, train, active)
            intermediates["stages"].append(x)
            start += depth
        if self.head_norm_first:
            x = self._norm("norm_pre")(x)
        pooled = jnp.mean(x, axis=(1, 2))
        return ConvNeXtHead(self.num_classes, self.head_norm_first, self.head_hidden_size, self.head_init_scale,
                            self.norm_type, self.norm_eps, self.drop_rate, self.dtype, self.param_dtype,
                            name="head")(pooled, train, intermediates)


class ConvNeXtHead(nn.Module):
    """timm's NormMlpClassifierHead on pooled features: norm -> [fc + GELU] -> dropout -> fc.

    With `norm_first` (the `_hnf` models) the norm was applied before pooling, so this is dropout -> fc.
    Returns (logits, intermediates with `pre_logits`).
    """

    num_classes: int
    norm_first: bool = False
    hidden_size: Optional[int] = None
    init_scale: float = 1.0
    norm_type: str = "layernorm"
    norm_eps: float = 1e-6
    drop_rate: float = 0.0
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, pooled: jax.Array, train: bool,
                 intermediates: Dict[str, Any]) -> Tuple[jax.Array, Dict[str, Any]]:
        if not self.norm_first:
            pooled = channel_norm(self.norm_type, self.norm_eps, self.dtype, self.param_dtype, "norm")(pooled)
            if self.hidden_size:
                pooled = layers.gelu(nn.Dense(
                    self.hidden_size, kernel_init=_kernel_init(("embed", "mlp")),
                    bias_init=layers.logical(nn.initializers.zeros, ("mlp",)), dtype=self.dtype,
                    param_dtype=self.param_dtype, name="pre_logits_fc")(pooled))
        intermediates["pre_logits"] = pooled
        pooled = nn.Dropout(self.drop_rate)(pooled, deterministic=not train)
        if not self.num_classes:
            return pooled, intermediates
        # head_init_scale scales both weight and (zero) bias in timm, so only the kernel changes.
        logits = nn.Dense(self.num_classes, kernel_init=_kernel_init(("embed", "classes"), self.init_scale),
                          bias_init=layers.logical(nn.initializers.zeros, ("classes",)), dtype=self.dtype,
                          param_dtype=self.param_dtype, name="fc")(pooled)
        return logits, intermediates


# --- registry: every timm ConvNeXt name -------------------------------------------------------------------------

_TIMM_CONVNEXTS = {
    # timm originals (atto ... nano, `_ols` overlapping stems, RMS / Simple norms).
    "convnext_zepto_rms": dict(depths=(2, 2, 4, 2), dims=(32, 64, 128, 256), norm_type="simplenorm"),
    "convnext_zepto_rms_ols": dict(depths=(2, 2, 4, 2), dims=(32, 64, 128, 256), norm_type="simplenorm",
                                   stem_type="overlap_act"),
    "convnext_atto": dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320)),
    "convnext_atto_ols": dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), stem_type="overlap_tiered"),
    "convnext_atto_rms": dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), norm_type="rmsnorm"),
    "convnext_femto": dict(depths=(2, 2, 6, 2), dims=(48, 96, 192, 384)),
    "convnext_femto_ols": dict(depths=(2, 2, 6, 2), dims=(48, 96, 192, 384), stem_type="overlap_tiered"),
    "convnext_pico": dict(depths=(2, 2, 6, 2), dims=(64, 128, 256, 512)),
    "convnext_pico_ols": dict(depths=(2, 2, 6, 2), dims=(64, 128, 256, 512), stem_type="overlap_tiered"),
    "convnext_nano": dict(depths=(2, 2, 8, 2), dims=(80, 160, 320, 640)),
    "convnext_nano_ols": dict(depths=(2, 2, 8, 2), dims=(80, 160, 320, 640), stem_type="overlap"),
    "convnext_tiny_hnf": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), head_norm_first=True),
    # The paper's models (Liu et al. 2022, Table 1 / Sec. 3).
    "convnext_tiny": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
    "convnext_small": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)),
    "convnext_base": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
    "convnext_large": dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536)),
    "convnext_large_mlp": dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536), head_hidden_size=1536),
    "convnext_xlarge": dict(depths=(3, 3, 27, 3), dims=(256, 512, 1024, 2048)),
    "convnext_xxlarge": dict(depths=(3, 4, 30, 3), dims=(384, 768, 1536, 3072), norm_eps=1e-5),
}
_V2_DIMS = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)), "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)), "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)), "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)), "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "huge": ((3, 3, 27, 3), (352, 704, 1408, 2816)),
}
for _size, (_depths, _dims) in _V2_DIMS.items():
    # ConvNeXt-V2 (Woo et al. 2023): GRN in the MLP replaces layer scale.
    _TIMM_CONVNEXTS[f"convnextv2_{_size}"] = dict(depths=_depths, dims=_dims, use_grn=True, ls_init_value=None)

# timm's pretrained_cfg of each name's default weights: ImageNet statistics, crop 0.875, except these
# (the in12k fine-tunes and newer timm recipes crop 0.95; the CLIP LAION fine-tunes are larger, uncropped
# and use CLIP's statistics; the "ra4" zepto weights take inputs in [-1, 1]).
_CLIP_PRETRAINED = dict(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, crop_pct=1.0)
_PRETRAINED_CHANGES = {
    "convnext_zepto_rms": dict(mean=IMAGENET_INCEPTION_MEAN, std=IMAGENET_INCEPTION_STD),
    "convnext_zepto_rms_ols": dict(mean=IMAGENET_INCEPTION_MEAN, std=IMAGENET_INCEPTION_STD, crop_pct=0.9),
    "convnext_nano": dict(crop_pct=0.95),
    "convnext_nano_ols": dict(crop_pct=0.95),
    "convnext_pico_ols": dict(crop_pct=0.95),
    "convnext_tiny_hnf": dict(crop_pct=0.95),
    "convnext_tiny": dict(crop_pct=0.95),
    "convnext_small": dict(crop_pct=0.95),
    "convnext_large_mlp": dict(_CLIP_PRETRAINED, input_size=(3, 320, 320)),
    "convnext_xxlarge": dict(_CLIP_PRETRAINED, input_size=(3, 256, 256)),
    "convnextv2_huge": dict(input_size=(3, 384, 384), crop_pct=1.0),
}
for _name, _settings in _TIMM_CONVNEXTS.items():
    register_model(_name, ConvNeXt, family="convnext", pretrained_cfg=_PRETRAINED_CHANGES.get(_name), **_settings)

