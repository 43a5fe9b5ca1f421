"""MetaFormer baselines: PoolFormer v1 (Yu et al. 2022, "MetaFormer Is Actually What You Need for Vision"),
and PoolFormerV2, ConvFormer and CAFormer (Yu et al. 2023, "MetaFormer Baselines for Vision").

Every block is `x = res_scale * x + layer_scale * token_mixer(norm(x))`, then the same with an MLP. The token
mixer is what differs: pooling (`avg_pool(x) - x`), an inverted separable conv (ConvFormer), or self-attention
(CAFormer's last two stages, through `layers.Attention`, so `attention_impl` applies). Four stages at strides
4, 8, 16, 32 (a 7x7 stride-4 stem, then 3x3 stride-2 downsampling convs).

Images are NHWC, so timm's NCHW and NLC stages (1x1 convs vs Linear, LayerNorm2d vs LayerNorm) are one
computation here. Parameter names mirror timm's (`stem/conv`, `stages_1/downsample/conv`,
`stages_2/blocks_0/token_mixer/pwconv1`, `head/fc`), so a timm state dict converts by a plain key table.
"""
from typing import Any, Dict, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import layers, param_groups
from vitjax.models.registry import register_model

TOKEN_MIXERS = ("pooling", "sepconv", "attention")
NORM_TYPES = ("layernorm", "groupnorm")
MLP_ACTIVATIONS = ("starrelu", "gelu")


def _kernel_init(axes: Tuple[Optional[str], ...]) -> layers.Initializer:
    """Returns timm's MetaFormer init for convs and linears (trunc-normal, std 0.02) with logical axes."""
    return layers.logical(layers.trunc_normal_init, axes)


def _zeros(axes: Tuple[Optional[str], ...]) -> layers.Initializer:
    return layers.logical(nn.initializers.zeros, axes)


class StarReLU(nn.Module):
    """StarReLU: scale * relu(x)^2 + bias, with learned scalars `scale` (init 1) and `bias` (init 0)."""

    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (1,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (1,), self.param_dtype)
        return scale.astype(x.dtype) * jnp.square(nn.relu(x)) + bias.astype(x.dtype)


class Pooling(nn.Module):
    """PoolFormer's token mixer: 3x3 average pool (stride 1, padding excluded from the count) minus the input."""

    pool_size: int = 3

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        pad = self.pool_size // 2
        pooled = nn.avg_pool(x, (self.pool_size, self.pool_size), strides=(1, 1),
                             padding=((pad, pad), (pad, pad)), count_include_pad=False)
        return pooled - x


class SepConv(nn.Module):
    """ConvFormer's token mixer (MobileNetV2's inverted separable conv): 1x1 (x2) -> StarReLU -> 7x7 dw -> 1x1."""

    expansion_ratio: float = 2.0
    kernel_size: int = 7
    use_bias: bool = False
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        channels = x.shape[-1]
        hidden = int(self.expansion_ratio * channels)
        x = nn.Dense(hidden, use_bias=self.use_bias, kernel_init=_kernel_init(("embed", "mlp")),
                     bias_init=_zeros(("mlp",)), dtype=self.dtype, param_dtype=self.param_dtype, name="pwconv1")(x)
        x = StarReLU(self.param_dtype, name="act1")(x)
        pad = self.kernel_size // 2
        x = nn.Conv(hidden, (self.kernel_size, self.kernel_size), padding=((pad, pad), (pad, pad)),
                    feature_group_count=hidden, use_bias=self.use_bias,
                    kernel_init=_kernel_init((None, None, None, "mlp")), bias_init=_zeros(("mlp",)),
                    dtype=self.dtype, param_dtype=self.param_dtype, name="dwconv")(x)
        return nn.Dense(channels, use_bias=self.use_bias, kernel_init=_kernel_init(("mlp", "embed")),
                        bias_init=_zeros(("embed",)), dtype=self.dtype, param_dtype=self.param_dtype,
                        name="pwconv2")(x)


class MetaFormerBlock(nn.Module):
    """One MetaFormer block on NHWC: token mixer and MLP sub-blocks with optional layer / residual scales."""

    token_mixer: str = "pooling"
    mlp_ratio: float = 4.0
    mlp_activation: str = "starrelu"
    mlp_bias: bool = False
    norm_type: str = "layernorm"
    norm_eps: float = 1e-6
    norm_bias: bool = False
    layer_scale_init_value: Optional[float] = None
    res_scale_init_value: Optional[float] = None
    head_dim: int = 32
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    def _mix(self, x: jax.Array, train: bool) -> jax.Array:
        if self.token_mixer == "pooling":
            return Pooling(name="token_mixer")(x)
        if self.token_mixer == "sepconv":
            return SepConv(dtype=self.dtype, param_dtype=self.param_dtype, name="token_mixer")(x)
        batch, height, width, channels = x.shape
        tokens = layers.constrain(x.reshape(batch, height * width, channels), ("batch", "length", "embed"))
        out, _ = layers.Attention(
            max(channels // self.head_dim, 1), qkv_bias=False, proj_bias=False, attn_drop_rate=self.attn_drop_rate,
            proj_drop_rate=self.proj_drop_rate, attention_impl=self.attention_impl, dtype=self.dtype,
            param_dtype=self.param_dtype, name="token_mixer")(tokens, train=train)
        return out.reshape(batch, height, width, channels)

    def _mlp(self, x: jax.Array, train: bool) -> jax.Array:
        batch, height, width, channels = x.shape
        # The MLP runs on tokens (B, L, C), where the shared Mlp's sharding constraints apply.
        tokens = x.reshape(batch, height * width, channels)
        activation = StarReLU(self.param_dtype, name="mlp_act") if self.mlp_activation == "starrelu" else layers.gelu
        out = layers.Mlp(int(self.mlp_ratio * channels), activation=activation, drop_rate=self.proj_drop_rate,
                         use_bias=self.mlp_bias, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(
            tokens, train)
        return out.reshape(batch, height, width, channels)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        norm = lambda name: layers.ChannelNorm(self.norm_type, self.norm_eps, self.norm_bias,  # noqa: E731
                                               self.dtype, self.param_dtype, name=name)
        for index, branch in ((1, self._mix), (2, self._mlp)):
            y = branch(norm(f"norm{index}")(x), train)
            y = layers.DropPath(self.drop_path_rate)(y, train)
            if self.layer_scale_init_value is not None:
                y = layers.LayerScale(self.layer_scale_init_value, self.param_dtype, name=f"layer_scale{index}")(y)
            if self.res_scale_init_value is not None:
                x = layers.LayerScale(self.res_scale_init_value, self.param_dtype, name=f"res_scale{index}")(x)
            x = x + y
        return x


class MetaFormerStage(nn.Module):
    """[norm -> 3x3 stride-2 conv (`downsample`)] then `depth` MetaFormer blocks; NHWC in and out."""

    features: int
    depth: int
    drop_path_rates: Tuple[float, ...] = ()
    downsample_norm: bool = True
    block_kwargs: Optional[Dict[str, Any]] = None
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.shape[-1] != self.features:
            x = _Downsampling(self.features, 3, 2, 1, self.downsample_norm, self.dtype, self.param_dtype,
                              name="downsample")(x)
        for index in range(self.depth):
            x = MetaFormerBlock(drop_path_rate=self.drop_path_rates[index], dtype=self.dtype,
                                param_dtype=self.param_dtype, name=f"blocks_{index}", **(self.block_kwargs or {}))(
                x, train)
        return x


class _Downsampling(nn.Module):
    """timm's Stem / Downsampling: [norm ->] conv -> [norm] (the stem norms after, downsampling before)."""

    features: int
    kernel_size: int
    stride: int
    padding: int
    use_norm: bool = True
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32
    norm_after: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # LayerNorm without bias, eps 1e-6: timm's LayerNorm2dNoBias for the stem and downsampling layers.
        norm = lambda: layers.ChannelNorm("layernorm", 1e-6, False, self.dtype,  # noqa: E731
                                          self.param_dtype, name="norm")
        if self.use_norm and not self.norm_after:
            x = norm()(x)
        pad = self.padding
        x = nn.Conv(self.features, (self.kernel_size, self.kernel_size), strides=(self.stride, self.stride),
                    padding=((pad, pad), (pad, pad)), kernel_init=_kernel_init((None, None, None, "embed")),
                    bias_init=_zeros(("embed",)), dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
        if self.use_norm and self.norm_after:
            x = norm()(x)
        return x


class MlpHead(nn.Module):
    """MetaFormer-baselines' MLP classifier: fc1 (x4) -> squared ReLU -> LayerNorm -> dropout -> fc2; returns logits.

    `head_dropout` is the paper's "head dropout" (0.4-0.5 for CAFormer-S36/M36/B36), on the hidden layer.
    """

    num_classes: int
    mlp_ratio: float = 4.0
    head_dropout: float = 0.0
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Dense(int(self.mlp_ratio * x.shape[-1]), kernel_init=_kernel_init(("embed", "mlp")),
                     bias_init=_zeros(("mlp",)), dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x)
        x = jnp.square(nn.relu(x))
        x = layers.ChannelNorm("layernorm", 1e-6, True, self.dtype, self.param_dtype, name="norm")(x)
        x = nn.Dropout(self.head_dropout)(x, deterministic=not train)
        return nn.Dense(self.num_classes, kernel_init=_kernel_init(("mlp", "classes")),
                        bias_init=_zeros(("classes",)), dtype=self.dtype, param_dtype=self.param_dtype,
                        name="fc2")(x)


class MetaFormer(param_groups.LayerGroups, nn.Module):
    """MetaFormer classifier (PoolFormer v1/v2, ConvFormer, CAFormer) on NHWC images.

    `__call__` returns (logits, intermediates): `stem` (B, H/4, W/4, C0), `stages` (each stage's NHWC
    output), `pre_logits` (B, C, the pooled and normed features). Per-stage settings (`token_mixers`,
    `res_scale_init_values`) are tuples with one entry per stage.
    """

    num_classes: int = 1000
    img_size: Union[int, Tuple[int, int]] = 224
    in_chans: int = 3
    depths: Tuple[int, ...] = (2, 2, 6, 2)
    dims: Tuple[int, ...] = (64, 128, 320, 512)
    token_mixers: Tuple[str, ...] = ("pooling",) * 4
    mlp_ratio: float = 4.0
    mlp_activation: str = "starrelu"
    mlp_bias: bool = False
    norm_type: str = "layernorm"
    norm_eps: float = 1e-6
    norm_bias: bool = False
    downsample_norm: bool = True
    layer_scale_init_value: Optional[float] = None
    res_scale_init_values: Tuple[Optional[float], ...] = (None, None, 1.0, 1.0)
    head_dim: int = 32
    use_mlp_head: bool = True
    head_dropout: float = 0.0
    drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @property
    def total_stride(self) -> int:
        """Returns the ratio of the input size to the last stage's feature map."""
        return 4 * 2 ** (len(self.depths) - 1)

    def validate(self) -> None:
        """Raises ValueError naming the valid choices if the settings cannot build a model."""
        from vitjax.kernels import ATTENTION_IMPLS
        stages = len(self.depths)
        if not stages or len(self.dims) != stages:
            raise ValueError(f"depths {self.depths} and dims {self.dims} must be non-empty and of equal length")
        for field in ("token_mixers", "res_scale_init_values"):
            if len(getattr(self, field)) != stages:
                raise ValueError(f"{field} {getattr(self, field)} needs one entry per stage ({stages})")
        for mixer in self.token_mixers:
            if mixer not in TOKEN_MIXERS:
                raise ValueError(f"Unknown token mixer {mixer!r}; valid choices: {TOKEN_MIXERS}")
        for field, valid in (("norm_type", NORM_TYPES), ("mlp_activation", MLP_ACTIVATIONS),
                             ("attention_impl", ATTENTION_IMPLS)):
            if getattr(self, field) not in valid:
                raise ValueError(f"Unknown {field} {getattr(self, field)!r}; valid choices: {list(valid)}")
        for dim, mixer in zip(self.dims, self.token_mixers):
            if mixer == "attention" and dim % self.head_dim:
                raise ValueError(f"An attention stage's width {dim} must be divisible by head_dim={self.head_dim}")
        if self.head_dropout and not self.use_mlp_head:
            raise ValueError("head_dropout acts inside the MLP head; with use_mlp_head=False use drop_rate")
        if any(a == b for a, b in zip(self.dims[:-1], self.dims[1:])):
            raise ValueError(f"dims {self.dims}: a stage that keeps its width has no downsampling; "
                             "every stage must change the width")
        img = layers.to_2tuple(self.img_size)
        if img[0] % self.total_stride or img[1] % self.total_stride:
            raise ValueError(f"img_size {self.img_size} is not divisible by the total stride {self.total_stride}; "
                             f"valid sizes are multiples of {self.total_stride}")

    def group_matcher(self) -> param_groups.Matcher:
        """Returns the regexes that group the params for layer-wise lr decay, in timm's style."""
        # timm's MetaFormer declares no group_matcher: its fallback cuts the params, in registration order,
        # into runs of 12 tensors that straddle blocks; stages of blocks group as ConvNeXt's instead.
        return dict(
            stem=r"^stem",
            blocks=[(r"^stages_(\d+)/downsample", (0,)), (r"^stages_(\d+)/blocks_(\d+)", None)])

    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns no regex: as in timm, only the 1-D params go without weight decay."""
        return ()

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (logits (B, num_classes), intermediates); with num_classes=0, (pre_logits, intermediates)."""
        x = _Downsampling(self.dims[0], 7, 4, 2, self.downsample_norm, self.dtype, self.param_dtype,
                          norm_after=True, name="stem")(images.astype(self.dtype))
        intermediates: Dict[str, Any] = {"stem": x, "stages": []}
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
        start = 0
        for stage, (depth, dim) in enumerate(zip(self.depths, self.dims)):
            block_kwargs = dict(
                token_mixer=self.token_mixers[stage], mlp_ratio=self.mlp_ratio, mlp_activation=self.mlp_activation,
                mlp_bias=self.mlp_bias, norm_type=self.norm_type, norm_eps=self.norm_eps, norm_bias=self.norm_bias,
                layer_scale_init_value=self.layer_scale_init_value,
                res_scale_init_value=self.res_scale_init_values[stage], head_dim=self.head_dim,
                proj_drop_rate=self.proj_drop_rate, attn_drop_rate=self.attn_drop_rate,
                attention_impl=self.attention_impl)
            x = MetaFormerStage(dim, depth, tuple(float(r) for r in rates[start:start + depth]),
                                self.downsample_norm, block_kwargs, self.dtype, self.param_dtype,
                                name=f"stages_{stage}")(x, train)
            intermediates["stages"].append(x)
            start += depth
        return MetaFormerHead(self.num_classes, self.use_mlp_head, self.head_dropout, self.drop_rate, self.dtype,
                              self.param_dtype, name="head")(x, train, intermediates)


class MetaFormerHead(nn.Module):
    """Global average pool -> LayerNorm (with bias) -> dropout (`drop_rate`, timm's) -> Linear or `MlpHead`.

    Returns (logits, intermediates with `pre_logits`).
    """

    num_classes: int
    use_mlp_head: bool = True
    head_dropout: float = 0.0
    drop_rate: float = 0.0
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool,
                 intermediates: Dict[str, Any]) -> Tuple[jax.Array, Dict[str, Any]]:
        pooled = layers.ChannelNorm("layernorm", 1e-6, True, self.dtype, self.param_dtype,
                                    name="norm")(jnp.mean(x, axis=(1, 2)))
        intermediates["pre_logits"] = pooled
        pooled = nn.Dropout(self.drop_rate)(pooled, deterministic=not train)
        if not self.num_classes:
            return pooled, intermediates
        if self.use_mlp_head:
            logits = MlpHead(self.num_classes, head_dropout=self.head_dropout, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="fc")(pooled, train)
            return logits, intermediates
        logits = nn.Dense(self.num_classes, kernel_init=_kernel_init(("embed", "classes")),
                          bias_init=_zeros(("classes",)), dtype=self.dtype, param_dtype=self.param_dtype,
                          name="fc")(pooled)
        return logits, intermediates


# --- registry: every timm MetaFormer name -----------------------------------------------------------------------

_POOLFORMER_V1 = dict(downsample_norm=False, mlp_activation="gelu", mlp_bias=True, norm_type="groupnorm",
                      norm_eps=1e-5, norm_bias=True, res_scale_init_values=(None,) * 4, use_mlp_head=False)
_POOLFORMER_V2 = dict(norm_type="groupnorm", use_mlp_head=False)
_CONVFORMER = dict(token_mixers=("sepconv",) * 4)
_CAFORMER = dict(token_mixers=("sepconv", "sepconv", "attention", "attention"))
_SMALL, _MEDIUM = (64, 128, 320, 512), (96, 192, 384, 768)
_M36_BASELINES, _B36_BASELINES = (96, 192, 384, 576), (128, 256, 512, 768)

_TIMM_METAFORMERS = {
    # PoolFormer (Yu et al. 2022, Table 1).
    "poolformer_s12": dict(_POOLFORMER_V1, depths=(2, 2, 6, 2), dims=_SMALL, layer_scale_init_value=1e-5),
    "poolformer_s24": dict(_POOLFORMER_V1, depths=(4, 4, 12, 4), dims=_SMALL, layer_scale_init_value=1e-5),
    "poolformer_s36": dict(_POOLFORMER_V1, depths=(6, 6, 18, 6), dims=_SMALL, layer_scale_init_value=1e-6),
    "poolformer_m36": dict(_POOLFORMER_V1, depths=(6, 6, 18, 6), dims=_MEDIUM, layer_scale_init_value=1e-6),
    "poolformer_m48": dict(_POOLFORMER_V1, depths=(8, 8, 24, 8), dims=_MEDIUM, layer_scale_init_value=1e-6),
    # MetaFormer baselines (Yu et al. 2023, Tables 1-2).
    "poolformerv2_s12": dict(_POOLFORMER_V2, depths=(2, 2, 6, 2), dims=_SMALL),
    "poolformerv2_s24": dict(_POOLFORMER_V2, depths=(4, 4, 12, 4), dims=_SMALL),
    "poolformerv2_s36": dict(_POOLFORMER_V2, depths=(6, 6, 18, 6), dims=_SMALL),
    "poolformerv2_m36": dict(_POOLFORMER_V2, depths=(6, 6, 18, 6), dims=_MEDIUM),
    "poolformerv2_m48": dict(_POOLFORMER_V2, depths=(8, 8, 24, 8), dims=_MEDIUM),
    "convformer_s18": dict(_CONVFORMER, depths=(3, 3, 9, 3), dims=_SMALL),
    "convformer_s36": dict(_CONVFORMER, depths=(3, 12, 18, 3), dims=_SMALL),
    "convformer_m36": dict(_CONVFORMER, depths=(3, 12, 18, 3), dims=_M36_BASELINES),
    "convformer_b36": dict(_CONVFORMER, depths=(3, 12, 18, 3), dims=_B36_BASELINES),
    "caformer_s18": dict(_CAFORMER, depths=(3, 3, 9, 3), dims=_SMALL),
    "caformer_s36": dict(_CAFORMER, depths=(3, 12, 18, 3), dims=_SMALL),
    "caformer_m36": dict(_CAFORMER, depths=(3, 12, 18, 3), dims=_M36_BASELINES),
    "caformer_b36": dict(_CAFORMER, depths=(3, 12, 18, 3), dims=_B36_BASELINES),
}

# timm's pretrained_cfg: ImageNet statistics; the MetaFormer baselines (v2) uncropped, PoolFormer v1
# cropped 0.9 (S) and 0.95 (M).
_PRETRAINED_CHANGES = {"poolformer_s12": dict(crop_pct=0.9), "poolformer_s24": dict(crop_pct=0.9),
                       "poolformer_s36": dict(crop_pct=0.9), "poolformer_m36": dict(crop_pct=0.95),
                       "poolformer_m48": dict(crop_pct=0.95)}
for _name, _settings in _TIMM_METAFORMERS.items():
    register_model(_name, MetaFormer, family="metaformer",
                   pretrained_cfg=_PRETRAINED_CHANGES.get(_name, dict(crop_pct=1.0)), **_settings)
