"""TinyViT (Wu et al. 2022): a convolutional MBConv stage, then window-attention stages with attention biases.

The parameter tree follows timm's `TinyVit` module names so weights convert by a key table:
`patch_embed_conv{1,2}` (timm's `patch_embed.conv{1,2}`), `stages_0/blocks_{j}/{conv1,conv2,conv3}` (MBConv),
`stages_{i}/downsample`, `stages_{i}/blocks_{j}/{attn_norm, attention_biases, attn, local_conv, mlp_norm, mlp}`
(timm's `attn.norm`, `attn.attention_biases` and `mlp.norm` sit at the block level here), `head_norm` (timm's
`head.norm`), `head`.
BatchNorm statistics live in `batch_stats`; the attention-bias index, which timm does not save, is a
numpy constant computed from the window size.
"""
import itertools
from typing import Any, Dict, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import layers, param_groups
from vitjax.models.registry import register_model


def attention_bias_index(resolution: Tuple[int, int]) -> np.ndarray:
    """Returns the (N, N) index of each token pair's |row offset|, |column offset| into the bias table.

    Offsets are numbered in order of first appearance over row-major pairs, as the reference does, so a
    converted `attention_biases` table lines up column for column.
    """
    points = list(itertools.product(range(resolution[0]), range(resolution[1])))
    offsets: Dict[Tuple[int, int], int] = {}
    index = []
    for first in points:
        for second in points:
            offset = (abs(first[0] - second[0]), abs(first[1] - second[1]))
            index.append(offsets.setdefault(offset, len(offsets)))
    return np.asarray(index, np.int32).reshape(len(points), len(points))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project (BN scale zero-init), residual, GELU."""

    expand_ratio: float = 4.0
    drop_path_rate: float = 0.0
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        channels = x.shape[-1]
        hidden = int(channels * self.expand_ratio)
        conv = lambda features, name, **kw: layers.ConvBN(  # noqa: E731
            features, dtype=self.dtype, param_dtype=self.param_dtype, name=name, **kw)
        y = layers.gelu(conv(hidden, "conv1")(x, train))
        y = layers.gelu(conv(hidden, "conv2", kernel_size=3, padding=1, groups=hidden)(y, train))
        y = conv(channels, "conv3", bn_scale_init=0.0)(y, train)
        return layers.gelu(x + layers.DropPath(self.drop_path_rate)(y, train))


class PatchMerging(nn.Module):
    """1x1 conv, 3x3 depthwise stride-2 conv, 1x1 conv (GELU between); halves the map, NHWC in and out."""

    out_dim: int
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv = lambda name, **kw: layers.ConvBN(  # noqa: E731
            self.out_dim, dtype=self.dtype, param_dtype=self.param_dtype, name=name, **kw)
        x = layers.gelu(conv("conv1")(x, train))
        x = layers.gelu(conv("conv2", kernel_size=3, strides=2, padding=1, groups=self.out_dim)(x, train))
        return conv("conv3")(x, train)


class TinyVitBlock(nn.Module):
    """Window attention with learned attention biases, a 3x3 depthwise conv+BN, and an MLP; NHWC in and out."""

    num_heads: int
    window_size: int
    mlp_ratio: float = 4.0
    local_conv_size: int = 3
    proj_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        batch, height, width, channels = x.shape
        window = (self.window_size, self.window_size)
        index = attention_bias_index(window)
        biases = self.param("attention_biases", layers.logical(nn.initializers.zeros, ("heads", None)),
                            (self.num_heads, int(index.max()) + 1), self.param_dtype)
        # The reference pads with zeros before its attention's LayerNorm, so padded tokens are real keys.
        pad_h, pad_w = (-height) % self.window_size, (-width) % self.window_size
        y = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        windows = layers.window_partition(y, window)
        windows = layers.layer_norm(1e-5, self.dtype, self.param_dtype, name="attn_norm")(windows)
        y, _ = layers.Attention(self.num_heads, attention_impl=self.attention_impl, dtype=self.dtype,
                                param_dtype=self.param_dtype, name="attn")(
            windows, bias=biases[:, index][None], train=train)
        y = layers.window_reverse(y, window, height + pad_h, width + pad_w)[:, :height, :width]
        x = x + layers.DropPath(self.drop_path_rate)(y, train)
        x = layers.ConvBN(channels, kernel_size=self.local_conv_size, padding=self.local_conv_size // 2,
                          groups=channels, dtype=self.dtype, param_dtype=self.param_dtype,
                          name="local_conv")(x, train)
        y = layers.layer_norm(1e-5, self.dtype, self.param_dtype, name="mlp_norm")(x)
        y = layers.Mlp(int(channels * self.mlp_ratio), drop_rate=self.proj_drop_rate, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="mlp")(y, train)
        x = x + layers.DropPath(self.drop_path_rate)(y, train)
        return layers.constrain(x, ("batch", None, None, "embed"))


class TinyVitStage(nn.Module):
    """Stage 0: MBConv blocks; stage i > 0: patch merging, then TinyViT blocks. NHWC in and out."""

    out_dim: int
    depth: int
    convolutional: bool
    num_heads: int = 1
    window_size: int = 7
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    proj_drop_rate: float = 0.0
    drop_path_rates: Tuple[float, ...] = ()
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        rates = self.drop_path_rates or (0.0,) * self.depth
        if self.convolutional:
            for index in range(self.depth):
                x = MBConv(self.mbconv_expand_ratio, rates[index], self.dtype, self.param_dtype,
                           name=f"blocks_{index}")(x, train)
            return x
        x = PatchMerging(self.out_dim, self.dtype, self.param_dtype, name="downsample")(x, train)
        for index in range(self.depth):
            x = TinyVitBlock(self.num_heads, self.window_size, mlp_ratio=self.mlp_ratio,
                             local_conv_size=self.local_conv_size, proj_drop_rate=self.proj_drop_rate,
                             drop_path_rate=rates[index], attention_impl=self.attention_impl, dtype=self.dtype,
                             param_dtype=self.param_dtype, name=f"blocks_{index}")(x, train)
        return x


class TinyVit(param_groups.LayerGroups, nn.Module):
    """TinyViT classifier; `__call__(images NHWC, train)` returns (logits, intermediates).

    intermediates: `stages` (list of per-stage NHWC maps), `pre_logits` (B, C). Any input size works
    (maps are padded to whole windows, as the reference); `img_size` is the size the model is built for.
    With `num_classes=0` the model returns the normed pooled features.
    """

    num_classes: int = 1000
    img_size: Union[int, Tuple[int, int]] = 224
    in_chans: int = 3
    embed_dims: Sequence[int] = (96, 192, 384, 768)
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window_sizes: Sequence[int] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    def validate(self) -> None:
        """Raises ValueError naming the valid choices if the settings cannot build a model."""
        from vitjax.kernels import ATTENTION_IMPLS
        num_stages = len(self.depths)
        for field in ("embed_dims", "num_heads", "window_sizes"):
            if len(getattr(self, field)) != num_stages:
                raise ValueError(f"{field} {tuple(getattr(self, field))} needs one entry per stage of depths "
                                 f"{tuple(self.depths)}")
        if num_stages < 2:
            raise ValueError(f"TinyViT needs the MBConv stage and at least one attention stage; depths={self.depths}")
        for dim, heads in zip(self.embed_dims[1:], self.num_heads[1:]):
            if dim % heads:
                raise ValueError(f"stage width {dim} is not divisible by its num_heads {heads}")
        if any(w < 1 for w in self.window_sizes):
            raise ValueError(f"window_sizes must be positive, got {tuple(self.window_sizes)}")
        if min(layers.to_2tuple(self.img_size)) < 1:
            raise ValueError(f"img_size must be positive, got {self.img_size}")
        if self.local_conv_size % 2 != 1:
            raise ValueError(f"local_conv_size must be odd (same padding), got {self.local_conv_size}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"Unknown attention_impl {self.attention_impl!r}; valid choices: {ATTENTION_IMPLS}")

    def group_matcher(self) -> param_groups.Matcher:
        """Returns timm's group_matcher(coarse=False) over vitjax param paths (see param_groups)."""
        return dict(
            stem=r"^patch_embed",
            blocks=[(r"^stages_(\d+)/downsample", (0,)), (r"^stages_(\d+)/blocks_(\d+)", None)])

    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns regexes of the param paths not weight-decayed, as timm's no_weight_decay."""
        return (r"attention_biases$",)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (logits, intermediates) for NHWC `images`."""
        half = self.embed_dims[0] // 2
        x = layers.ConvBN(half, kernel_size=3, strides=2, padding=1, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="patch_embed_conv1")(images, train)
        x = layers.ConvBN(self.embed_dims[0], kernel_size=3, strides=2, padding=1, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="patch_embed_conv2")(layers.gelu(x), train)
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
        ends = np.cumsum(self.depths)
        stages = []
        for stage, (dim, depth, heads, window) in enumerate(zip(self.embed_dims, self.depths, self.num_heads,
                                                                self.window_sizes)):
            x = TinyVitStage(
                dim, depth, convolutional=stage == 0, num_heads=heads, window_size=window,
                mlp_ratio=self.mlp_ratio, mbconv_expand_ratio=self.mbconv_expand_ratio,
                local_conv_size=self.local_conv_size, proj_drop_rate=self.proj_drop_rate,
                drop_path_rates=tuple(float(r) for r in rates[ends[stage] - depth:ends[stage]]),
                attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype,
                name=f"stages_{stage}")(x, train)
            stages.append(x)
        pooled = layers.layer_norm(1e-5, self.dtype, self.param_dtype, name="head_norm")(x.mean(axis=(1, 2)))
        intermediates: Dict[str, Any] = {"stages": stages, "pre_logits": pooled}
        pooled = nn.Dropout(self.drop_rate)(pooled, deterministic=not train)
        if not self.num_classes:
            return pooled, intermediates
        logits = layers.classifier_head(self.num_classes, False, self.dtype, self.param_dtype)(pooled)
        return logits, intermediates


# --- registry: timm's TinyViT sizes ------------------------------------------------------------------------------

_TIMM_TINY_VITS = {
    "tiny_vit_5m_224": dict(embed_dims=(64, 128, 160, 320), num_heads=(2, 4, 5, 10)),
    "tiny_vit_11m_224": dict(embed_dims=(64, 128, 256, 448), num_heads=(2, 4, 8, 14)),
    "tiny_vit_21m_224": dict(embed_dims=(96, 192, 384, 576), num_heads=(3, 6, 12, 18)),
    "tiny_vit_21m_384": dict(embed_dims=(96, 192, 384, 576), num_heads=(3, 6, 12, 18),
                             window_sizes=(12, 12, 24, 12), img_size=384),
    "tiny_vit_21m_512": dict(embed_dims=(96, 192, 384, 576), num_heads=(3, 6, 12, 18),
                             window_sizes=(16, 16, 32, 16), img_size=512),
}

for _name, _settings in _TIMM_TINY_VITS.items():
    # timm's pretrained_cfg: ImageNet statistics, crop 0.95 at 224; the 384 / 512 fine-tunes uncropped.
    register_model(_name, TinyVit, family="tiny_vit", **{"depths": (2, 2, 6, 2), "window_sizes": (7, 7, 14, 7),
                                                          **_settings},
                   pretrained_cfg=dict(crop_pct=1.0 if "img_size" in _settings else 0.95))
