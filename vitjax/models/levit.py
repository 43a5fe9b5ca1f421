"""LeViT (Graham et al. 2021): a conv stem, then attention stages with BN-linear layers, attention biases,
shrinking (subsampling) attention between stages, hard-swish, and a distillation head.

The parameter tree follows timm's `Levit` (linear mode) module names: `stem_conv{i}/{conv,bn}`,
`stages_{i}/downsample/{attn_downsample/{kv,q,proj,attention_biases}, mlp/{ln1,ln2}}`,
`stages_{i}/blocks_{j}/{attn/{qkv,proj,attention_biases}, mlp/{ln1,ln2}}`, `head/{bn,linear}`,
`head_dist/{bn,linear}`. timm's `levit_conv_*` models are the same network with 1x1 convs; both convert.
BatchNorm statistics live in `batch_stats`; the attention-bias index (not saved by timm) is computed here.
"""
from typing import Any, Callable, Dict, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import layers, param_groups
from vitjax.models.registry import register_model

ACTIVATIONS: Dict[str, Callable[[jax.Array], jax.Array]] = {
    "hard_swish": jax.nn.hard_swish,   # x * relu6(x + 3) / 6, as torch.nn.Hardswish
    "silu": jax.nn.silu,
}
STEM_STRIDES = {"s16": 16, "s8": 8}


def attention_bias_index(resolution: Tuple[int, int], stride: int = 1) -> np.ndarray:
    """Returns the (Nq, Nk) index |dr| * w + |dc| into a (heads, h * w) bias table.

    Keys are every position of the (h, w) grid; queries every `stride`-th row and column (stride 1: all).
    """
    height, width = resolution
    key_rows, key_cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    query_rows, query_cols = np.meshgrid(np.arange(0, height, stride), np.arange(0, width, stride), indexing="ij")
    rows = np.abs(query_rows.reshape(-1)[:, None] - key_rows.reshape(-1)[None, :])
    cols = np.abs(query_cols.reshape(-1)[:, None] - key_cols.reshape(-1)[None, :])
    return (rows * width + cols).astype(np.int32)


class LinearBN(nn.Module):
    """Bias-free Dense then BatchNorm over the channels of every token (timm's LinearNorm)."""

    features: int
    bn_scale_init: float = 1.0
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Dense(self.features, use_bias=False,
                     kernel_init=layers.logical(layers.torch_default_init, ("embed", "mlp")),
                     dtype=self.dtype, param_dtype=self.param_dtype, name="linear")(x)
        return layers.batch_norm(train, scale_init=self.bn_scale_init, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name="bn")(x)


class LevitAttention(nn.Module):
    """Attention with learned per-offset biases; `stride` 2 makes it the shrinking attention between stages.

    With stride 1 a fused `qkv` projects per-head [q (key_dim), k (key_dim), v (attn_ratio * key_dim)];
    with stride 2 `kv` projects every token and `q` only the subsampled grid. Returns (B, Nq, out_dim).
    """

    out_dim: int
    key_dim: int
    num_heads: int
    attn_ratio: float
    resolution: Tuple[int, int]
    stride: int = 1
    activation: str = "hard_swish"
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        batch, num_tokens, channels = x.shape
        value_dim = int(self.attn_ratio * self.key_dim)
        linear_bn = lambda features, name, **kw: LinearBN(  # noqa: E731
            features, dtype=self.dtype, param_dtype=self.param_dtype, name=name, **kw)
        index = attention_bias_index(self.resolution, self.stride)
        biases = self.param("attention_biases", layers.logical(nn.initializers.zeros, ("heads", None)),
                            (self.num_heads, self.resolution[0] * self.resolution[1]), self.param_dtype)
        if self.stride == 1:
            qkv = linear_bn(self.num_heads * (2 * self.key_dim + value_dim), "qkv")(x, train)
            qkv = qkv.reshape(batch, num_tokens, self.num_heads, -1)
            query, key, value = jnp.split(qkv, [self.key_dim, 2 * self.key_dim], axis=-1)
        else:
            kv = linear_bn(self.num_heads * (self.key_dim + value_dim), "kv")(x, train)
            kv = kv.reshape(batch, num_tokens, self.num_heads, -1)
            key, value = jnp.split(kv, [self.key_dim], axis=-1)
            grid = x.reshape(batch, self.resolution[0], self.resolution[1], channels)
            subsampled = grid[:, ::self.stride, ::self.stride].reshape(batch, -1, channels)
            query = linear_bn(self.num_heads * self.key_dim, "q")(subsampled, train)
            query = query.reshape(batch, -1, self.num_heads, self.key_dim)
        # The reference's scale key_dim ** -0.5 is the shared kernel's q.shape[-1] ** -0.5.
        out, _ = layers.multihead_attention(query, key, value, bias=biases[:, index][None],
                                            impl=self.attention_impl)
        out = ACTIVATIONS[self.activation](out.reshape(batch, out.shape[1], self.num_heads * value_dim))
        # The residual branch's last BN starts at zero in blocks (timm's bn_weight_init=0), not in downsampling.
        return linear_bn(self.out_dim, "proj", bn_scale_init=0.0 if self.stride == 1 else 1.0)(out, train)


class LevitMlp(nn.Module):
    """BN-linear, activation, BN-linear (last BN scale zero-init); returns the input width."""

    hidden_features: int
    activation: str = "hard_swish"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = LinearBN(self.hidden_features, dtype=self.dtype, param_dtype=self.param_dtype, name="ln1")(x, train)
        y = ACTIVATIONS[self.activation](y)
        return LinearBN(x.shape[-1], bn_scale_init=0.0, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="ln2")(y, train)


class LevitStage(nn.Module):
    """Optional shrinking attention + MLP (stages > 0), then `depth` attention + MLP blocks; (B, N, C) tokens."""

    out_dim: int
    key_dim: int
    depth: int
    num_heads: int
    attn_ratio: float
    mlp_ratio: float
    resolution: Tuple[int, int]
    downsample: bool
    activation: str = "hard_swish"
    drop_path_rate: float = 0.0
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kwargs = dict(activation=self.activation, dtype=self.dtype, param_dtype=self.param_dtype)
        resolution = self.resolution
        if self.downsample:
            in_dim = x.shape[-1]
            downsample = _Downsample(self.out_dim, self.key_dim, in_dim // self.key_dim, resolution,
                                     self.drop_path_rate, self.attention_impl, name="downsample", **kwargs)
            x = downsample(x, train)
            resolution = tuple((side - 1) // 2 + 1 for side in resolution)
        for index in range(self.depth):
            x = _Block(self.key_dim, self.num_heads, self.attn_ratio, self.mlp_ratio, resolution,
                       self.drop_path_rate, self.attention_impl, name=f"blocks_{index}", **kwargs)(x, train)
        return x


class _Block(nn.Module):
    """x + attention(x), then x + MLP(x)."""

    key_dim: int
    num_heads: int
    attn_ratio: float
    mlp_ratio: float
    resolution: Tuple[int, int]
    drop_path_rate: float = 0.0
    attention_impl: str = "xla"
    activation: str = "hard_swish"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dim = x.shape[-1]
        y = LevitAttention(dim, self.key_dim, self.num_heads, self.attn_ratio, self.resolution,
                           activation=self.activation, attention_impl=self.attention_impl, dtype=self.dtype,
                           param_dtype=self.param_dtype, name="attn")(x, train)
        x = x + layers.DropPath(self.drop_path_rate)(y, train)
        y = LevitMlp(int(dim * self.mlp_ratio), self.activation, self.dtype, self.param_dtype, name="mlp")(x, train)
        return x + layers.DropPath(self.drop_path_rate)(y, train)


class _Downsample(nn.Module):
    """Shrinking attention (stride 2, attn_ratio 4, no residual), then x + MLP (ratio 2)."""

    out_dim: int
    key_dim: int
    num_heads: int
    resolution: Tuple[int, int]
    drop_path_rate: float = 0.0
    attention_impl: str = "xla"
    activation: str = "hard_swish"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = LevitAttention(self.out_dim, self.key_dim, self.num_heads, 4.0, self.resolution, stride=2,
                           activation=self.activation, attention_impl=self.attention_impl, dtype=self.dtype,
                           param_dtype=self.param_dtype, name="attn_downsample")(x, train)
        y = LevitMlp(2 * self.out_dim, self.activation, self.dtype, self.param_dtype, name="mlp")(x, train)
        return x + layers.DropPath(self.drop_path_rate)(y, train)


class NormLinear(nn.Module):
    """BatchNorm, dropout, Dense: LeViT's classifier head."""

    features: int
    drop_rate: float = 0.0
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = layers.batch_norm(train, dtype=self.dtype, param_dtype=self.param_dtype, name="bn")(x)
        x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
        return nn.Dense(self.features, kernel_init=layers.logical(layers.trunc_normal_init, ("embed", "classes")),
                        bias_init=layers.logical(nn.initializers.zeros, ("classes",)),
                        dtype=self.dtype, param_dtype=self.param_dtype, name="linear")(x)


class Levit(param_groups.LayerGroups, nn.Module):
    """LeViT classifier; `__call__(images NHWC, train)` returns (logits, intermediates).

    intermediates: `stages` (list of per-stage NHWC maps), `pre_logits` (B, C). A `distilled` model has
    two heads and returns their mean, or, with `distilled_training` and `train`, the pair
    (cls_logits, dist_logits) as timm's `set_distilled_training`.
    """

    num_classes: int = 1000
    img_size: Union[int, Tuple[int, int]] = 224
    in_chans: int = 3
    embed_dim: Sequence[int] = (192,)
    key_dim: int = 64
    depth: Sequence[int] = (12,)
    num_heads: Sequence[int] = (3,)
    attn_ratio: Union[float, Sequence[float]] = 2.0
    mlp_ratio: Union[float, Sequence[float]] = 2.0
    stem_type: str = "s16"
    activation: str = "hard_swish"
    distilled: bool = True
    distilled_training: bool = False
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    def _per_stage(self, value) -> Tuple[float, ...]:
        if isinstance(value, (int, float)):
            return (float(value),) * len(self.embed_dim)
        return tuple(float(v) for v in value)

    @property
    def grid_size(self) -> Tuple[int, int]:
        """Returns the token grid (h, w) after the stem at `img_size`."""
        img = layers.to_2tuple(self.img_size)
        stride = STEM_STRIDES[self.stem_type]
        return img[0] // stride, img[1] // stride

    def validate(self) -> None:
        """Raises ValueError naming the valid choices if the settings cannot build a model."""
        from vitjax.kernels import ATTENTION_IMPLS
        num_stages = len(self.embed_dim)
        if self.stem_type not in STEM_STRIDES:
            raise ValueError(f"Unknown stem_type {self.stem_type!r}; valid choices: {list(STEM_STRIDES)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"Unknown activation {self.activation!r}; valid choices: {list(ACTIVATIONS)}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"Unknown attention_impl {self.attention_impl!r}; valid choices: {ATTENTION_IMPLS}")
        for field in ("depth", "num_heads"):
            if len(getattr(self, field)) != num_stages:
                raise ValueError(f"{field} {tuple(getattr(self, field))} needs one entry per stage of embed_dim "
                                 f"{tuple(self.embed_dim)}")
        for field in ("attn_ratio", "mlp_ratio"):
            if len(self._per_stage(getattr(self, field))) != num_stages:
                raise ValueError(f"{field} must be a number or one per stage ({num_stages} stages)")
        stride = STEM_STRIDES[self.stem_type]
        img = layers.to_2tuple(self.img_size)
        if img[0] % stride or img[1] % stride:
            raise ValueError(f"img_size {self.img_size} must be divisible by the {self.stem_type} stem's stride "
                             f"{stride}: the attention biases are sized for img_size / {stride}")
        for stage in range(1, num_stages):
            if self.embed_dim[stage - 1] % self.key_dim:
                raise ValueError(f"embed_dim[{stage - 1}]={self.embed_dim[stage - 1]} must be divisible by "
                                 f"key_dim {self.key_dim} (the shrinking attention has embed_dim / key_dim heads)")

    def group_matcher(self) -> param_groups.Matcher:
        """Returns timm's group_matcher(coarse=False) over vitjax param paths (see param_groups)."""
        return dict(
            stem=r"^stem",
            blocks=[(r"^stages_(\d+)/downsample", (0,)), (r"^stages_(\d+)/blocks_(\d+)", None)])

    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns regexes of the param paths not weight-decayed, as timm's no_weight_decay."""
        return (r"attention_biases$",)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Tuple[Any, Dict[str, Any]]:
        """Returns (logits, intermediates) for NHWC `images` of size `img_size`."""
        activation = ACTIVATIONS[self.activation]
        num_convs = 4 if self.stem_type == "s16" else 3
        x = images
        for index in range(num_convs):
            width = self.embed_dim[0] // 2 ** (num_convs - 1 - index)
            x = layers.ConvBN(width, kernel_size=3, strides=2, padding=1, dtype=self.dtype,
                              param_dtype=self.param_dtype, name=f"stem_conv{index + 1}")(x, train)
            if index < num_convs - 1:
                x = activation(x)
        if x.shape[1:3] != self.grid_size:
            raise ValueError(f"Input grid {x.shape[1:3]} does not match the model's {self.grid_size} "
                             f"(img_size={self.img_size}); the attention biases depend on it")
        batch, height, width, channels = x.shape
        x = x.reshape(batch, height * width, channels)
        resolution = (height, width)
        attn_ratios, mlp_ratios = self._per_stage(self.attn_ratio), self._per_stage(self.mlp_ratio)
        stages = []
        for stage, dim in enumerate(self.embed_dim):
            x = LevitStage(dim, self.key_dim, self.depth[stage], self.num_heads[stage], attn_ratios[stage],
                           mlp_ratios[stage], resolution, downsample=stage > 0, activation=self.activation,
                           drop_path_rate=self.drop_path_rate, attention_impl=self.attention_impl,
                           dtype=self.dtype, param_dtype=self.param_dtype, name=f"stages_{stage}")(x, train)
            if stage > 0:
                resolution = tuple((side - 1) // 2 + 1 for side in resolution)
            stages.append(x.reshape(batch, resolution[0], resolution[1], dim))
        pooled = x.mean(axis=1)
        intermediates: Dict[str, Any] = {"stages": stages, "pre_logits": pooled}
        if not self.num_classes:
            return pooled, intermediates
        head = lambda name: NormLinear(self.num_classes, self.drop_rate, self.dtype, self.param_dtype,  # noqa: E731
                                       name=name)
        logits = head("head")(pooled, train)
        if not self.distilled:
            return logits, intermediates
        dist_logits = head("head_dist")(pooled, train)
        if train and self.distilled_training:
            return (logits, dist_logits), intermediates
        return (logits + dist_logits) / 2, intermediates


# --- registry: timm's LeViT sizes (linear and conv modes are the same network) ---------------------------------

_TIMM_LEVITS = {
    "levit_128s": dict(embed_dim=(128, 256, 384), key_dim=16, num_heads=(4, 6, 8), depth=(2, 3, 4)),
    "levit_128": dict(embed_dim=(128, 256, 384), key_dim=16, num_heads=(4, 8, 12), depth=(4, 4, 4)),
    "levit_192": dict(embed_dim=(192, 288, 384), key_dim=32, num_heads=(3, 5, 6), depth=(4, 4, 4)),
    "levit_256": dict(embed_dim=(256, 384, 512), key_dim=32, num_heads=(4, 6, 8), depth=(4, 4, 4)),
    "levit_384": dict(embed_dim=(384, 512, 768), key_dim=32, num_heads=(6, 9, 12), depth=(4, 4, 4)),
    # timm's stride-8 stem, wider and deeper experiments (no released weights; single head).
    "levit_384_s8": dict(embed_dim=(384, 512, 768), key_dim=32, num_heads=(6, 9, 12), depth=(4, 4, 4),
                         activation="silu", stem_type="s8"),
    "levit_512_s8": dict(embed_dim=(512, 640, 896), key_dim=64, num_heads=(8, 10, 14), depth=(4, 4, 4),
                         activation="silu", stem_type="s8", distilled=False),
    "levit_512": dict(embed_dim=(512, 768, 1024), key_dim=64, num_heads=(8, 12, 16), depth=(4, 4, 4),
                      activation="silu", distilled=False),
    "levit_256d": dict(embed_dim=(256, 384, 512), key_dim=32, num_heads=(4, 6, 8), depth=(4, 8, 6),
                       activation="silu", distilled=False),
    "levit_512d": dict(embed_dim=(512, 640, 768), key_dim=64, num_heads=(8, 10, 12), depth=(4, 8, 6),
                       activation="silu", distilled=False),
}

# timm's pretrained_cfg: ImageNet statistics, crop 0.9.
for _name, _settings in _TIMM_LEVITS.items():
    register_model(_name, Levit, family="levit", pretrained_cfg=dict(crop_pct=0.9), **_settings)
    register_model(_name.replace("levit_", "levit_conv_"), Levit, family="levit", pretrained_cfg=dict(crop_pct=0.9),
                   **_settings)
