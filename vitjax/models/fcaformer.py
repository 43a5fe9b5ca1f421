"""FcaFormer (Zhang et al., ICCV 2023, "FcaFormer: Forward Cross Attention in Hybrid Vision Transformer"), as the
official hkzhang-git/FcaFormer `image_classification/models/fcaformer.py`.

A hybrid four-stage pyramid on a conv stem (two 3x3 stride-2 conv + BatchNorm, GELU between). The first two stages
are ConvNeXt blocks (depthwise 7x7, channels-last LayerNorm, MLP, layer scale); the last two are Fca blocks. Every
stage but the last ends with a patch merging (1x1 conv, depthwise 3x3 stride-2 conv, 1x1 conv, each with BatchNorm,
GELU between).

Forward cross attention: block i > 0 of an Fca stage attends from its tokens to its own tokens plus the "cross
tokens" carried from the (at most `cab_max_d`) earlier blocks of the stage. Each earlier block made them after its
attention (the token merge: a depthwise 7x7 stride-4 conv of the map, ceil(H/4) x ceil(W/4) tokens); block i
multiplies them by learned per-token scale factors, normalises them with its own LayerNorm (the calibration) and
projects them with its qkv (their keys and values only). The attention logits carry LeViT's bias table over
(|dy|, |dx|) between the block's tokens and a learned per-head, per-cross-token bias; both go to the shared
attention as one additive (heads, N, N + cross) `bias`, so every `attention_impl` runs them. After the attention
residual the map goes through a depthwise 3x3 conv + BatchNorm (no residual), then LayerNorm + MLP (whose own
first layer is a second LayerNorm) with a layer scale. The head averages the tokens, LayerNorm, Linear.

Parameter names follow the official state dict: `patch_embed_seq_{0,2}/{conv,bn}`, `layer_{0,1}/blocks_{j}/{dwconv,
norm, pwconv1, pwconv2, gamma}`, `layer_{2,3}/blocks_{j}/{norm1, qkv, proj, attention_biases, s_norm, s_token_bias,
s_scale_factors, dw_conv, local_conv/{conv,bn}, norm2, mlp/{norm, fc1, fc2}, gamma_1, gamma_2}`,
`layer_{i}/downsample/conv{1,2,3}/{conv,bn}`, `norm_head`, `head`.
"""
import itertools
import math
from typing import Any, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import layers, param_groups
from vitjax.models.registry import register_model


def _dense(module: nn.Module, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=layers.logical(layers.trunc_normal_init, ("embed", "mlp")),
                    bias_init=layers.logical(nn.initializers.zeros, ("mlp",)),
                    dtype=module.dtype, param_dtype=module.param_dtype, name=name)


def _norm(module: nn.Module, eps: float, name: str) -> nn.LayerNorm:
    return layers.layer_norm(eps, module.dtype, module.param_dtype, name=name)


def _depthwise(module: nn.Module, kernel: int, stride: int, name: str, use_bias: bool = True) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(module.dim, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   feature_group_count=module.dim, use_bias=use_bias,
                   kernel_init=layers.logical(layers.trunc_normal_init, (None, None, None, "embed")),
                   bias_init=layers.logical(nn.initializers.zeros, ("embed",)),
                   dtype=module.dtype, param_dtype=module.param_dtype, name=name)


def attention_bias_index(height: int, width: int) -> np.ndarray:
    """Returns the (N, N) index into the bias table of every token pair's (|dy|, |dx|), offsets numbered in order of
    first appearance over row-major pairs (LeViT's table, as the official code builds it)."""
    points = list(itertools.product(range(height), range(width)))
    offsets: Dict[Tuple[int, int], int] = {}
    index = np.empty((len(points), len(points)), np.int32)
    for i, (y1, x1) in enumerate(points):
        for j, (y2, x2) in enumerate(points):
            index[i, j] = offsets.setdefault((abs(y1 - y2), abs(x1 - x2)), len(offsets))
    return index


def cross_tokens_per_block(height: int, width: int) -> int:
    """Returns how many cross tokens one block makes from an H x W map: its depthwise 7x7 stride-4 conv's outputs."""
    return math.ceil(height / 4) * math.ceil(width / 4)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv, LayerNorm (eps 1e-6), Linear 4x, GELU, Linear, layer scale, residual; NHWC in and out."""

    dim: int
    drop_path_rate: float = 0.0
    layer_scale: float = 1e-6
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = _depthwise(self, 7, 1, "dwconv")(x)
        y = _norm(self, 1e-6, "norm")(y)
        y = _dense(self, self.dim, "pwconv2")(layers.gelu(_dense(self, 4 * self.dim, "pwconv1")(y)))
        gamma = self.param("gamma", layers.logical(nn.initializers.constant(self.layer_scale), ("embed",)),
                           (self.dim,), self.param_dtype)
        return x + layers.DropPath(self.drop_path_rate)(y * gamma.astype(y.dtype), train)


class PatchMerging(nn.Module):
    """1x1 conv + BN, GELU, depthwise 3x3 stride-2 conv + BN, GELU, 1x1 conv + BN; NHWC (H, W) -> (H/2, W/2)."""

    out_dim: int
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=layers.trunc_normal_init)
        x = layers.gelu(layers.ConvBN(self.out_dim, name="conv1", **kw)(x, train))
        x = layers.gelu(layers.ConvBN(self.out_dim, 3, 2, 1, groups=self.out_dim, name="conv2", **kw)(x, train))
        return layers.ConvBN(self.out_dim, name="conv3", **kw)(x, train)


class FcaBlock(nn.Module):
    """An Fca block on an NHWC map; returns (the map, the cross tokens it makes (B, M, C), or None for the stage's
    last block). `cross` (B, K, C) are the earlier blocks' cross tokens it attends to (None for the first block)."""

    dim: int
    num_heads: int
    num_cross: int  # K, the cross tokens this block attends to (0 for the first block)
    makes_cross: bool
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    layer_scale: float = 1e-6
    attention_impl: str = "xla"
    attn_drop_rate: float = 0.0  # the official default; `layers.attend` reads it
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cross: Any = None, train: bool = False):
        batch, height, width, channels = x.shape
        tokens = height * width
        heads, head_dim = self.num_heads, channels // self.num_heads
        drop_path = layers.DropPath(self.drop_path_rate)
        qkv = _dense(self, 3 * channels, "qkv")
        shortcut = x.reshape(batch, tokens, channels)
        q, k, v = jnp.moveaxis(qkv(_norm(self, 1e-5, "norm1")(shortcut)).reshape(batch, tokens, 3, heads, head_dim),
                               2, 0)
        index = attention_bias_index(height, width)
        table = self.param("attention_biases", layers.logical(nn.initializers.zeros, ("heads", None)),
                           (heads, int(index.max()) + 1), self.param_dtype)
        bias_dtype = jnp.promote_types(x.dtype, jnp.float32)
        bias = table.astype(bias_dtype)[:, index]
        if self.num_cross:
            scales = self.param("s_scale_factors", layers.logical(nn.initializers.ones, (None, None)),
                                (self.num_cross, 1), self.param_dtype)
            cross = _norm(self, 1e-5, "s_norm")(cross * scales.astype(cross.dtype))
            _, k_s, v_s = jnp.moveaxis(qkv(cross).reshape(batch, self.num_cross, 3, heads, head_dim), 2, 0)
            k, v = jnp.concatenate([k, k_s], axis=1), jnp.concatenate([v, v_s], axis=1)
            cross_bias = self.param("s_token_bias", layers.logical(nn.initializers.zeros, ("heads", None)),
                                    (heads, self.num_cross), self.param_dtype)
            bias = jnp.concatenate([bias, jnp.broadcast_to(cross_bias.astype(bias_dtype)[:, None, :],
                                                           (heads, tokens, self.num_cross))], axis=-1)
        out, _ = layers.attend(self, q, k, v, train=train, bias=bias[None])
        out = _dense(self, channels, "proj")(out.reshape(batch, tokens, channels))
        gamma_1 = self.param("gamma_1", layers.logical(nn.initializers.constant(self.layer_scale), ("embed",)),
                             (channels,), self.param_dtype)
        x = (shortcut + drop_path(out * gamma_1.astype(out.dtype), train)).reshape(batch, height, width, channels)
        made = None
        if self.makes_cross:
            made = _depthwise(self, 7, 4, "dw_conv", use_bias=False)(x)
            made = made.reshape(batch, -1, channels)
        x = layers.ConvBN(channels, 3, 1, 1, groups=channels, kernel_init=layers.trunc_normal_init, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="local_conv")(x, train)
        x = x.reshape(batch, tokens, channels)
        y = _norm(self, 1e-5, "norm2")(x)
        y = Mlp(int(channels * self.mlp_ratio), dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(y)
        gamma_2 = self.param("gamma_2", layers.logical(nn.initializers.constant(self.layer_scale), ("embed",)),
                             (channels,), self.param_dtype)
        x = x + drop_path(y * gamma_2.astype(y.dtype), train)
        return x.reshape(batch, height, width, channels), made


class Mlp(nn.Module):
    """LayerNorm (eps 1e-5), Linear, GELU, Linear: the official Mlp normalises its own input."""

    hidden: int
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = layers.gelu(_dense(self, self.hidden, "fc1")(_norm(self, 1e-5, "norm")(x)))
        return _dense(self, x.shape[-1], "fc2")(y)


class ConvStage(nn.Module):
    """`depth` ConvNeXt blocks, then (unless `out_dim` is 0) a patch merging; returns (stage output, next input)."""

    dim: int
    depth: int
    num_heads: int  # read by FcaStage; the conv stages have no attention (the official lists hold 0 there)
    drop_path_rates: Sequence[float]
    out_dim: int
    mlp_ratio: float = 4.0
    cab_max_d: int = 12
    layer_scale: float = 1e-6
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> Tuple[jax.Array, jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.depth):
            x = ConvNeXtBlock(self.dim, self.drop_path_rates[j], self.layer_scale, name=f"blocks_{j}", **kw)(x, train)
        if not self.out_dim:
            return x, x
        return x, PatchMerging(self.out_dim, name="downsample", **kw)(x, train)


class FcaStage(ConvStage):
    """`depth` Fca blocks, each attending to the cross tokens of the (at most `cab_max_d`) blocks before it, then
    (unless `out_dim` is 0) a patch merging; returns (stage output, next input)."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> Tuple[jax.Array, jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        per_block = cross_tokens_per_block(x.shape[1], x.shape[2])
        made = []
        for j in range(self.depth):
            carried = made[-self.cab_max_d:]
            cross = jnp.concatenate(carried, axis=1) if carried else None
            x, new = FcaBlock(self.dim, self.num_heads, per_block * len(carried), j < self.depth - 1,
                              self.mlp_ratio, self.drop_path_rates[j], self.layer_scale, self.attention_impl,
                              name=f"blocks_{j}", **kw)(x, cross, train)
            made.append(new)
        if not self.out_dim:
            return x, x
        return x, PatchMerging(self.out_dim, name="downsample", **kw)(x, train)


class FcaFormer(param_groups.LayerGroups, nn.Module):
    """FcaFormer classifier; `__call__(images NHWC, train) -> (logits, intermediates)`.

    intermediates: `stages` (the four NHWC stage outputs before downsampling), `pre_logits` (B, C).
    """

    num_classes: int = 1000
    img_size: Any = 224
    in_chans: int = 3
    embed_dims: Sequence[int] = (64, 128, 192, 320)
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (0, 0, 6, 10)  # the conv stages have none (0, as the official lists)
    mlp_ratio: float = 4.0
    cab_max_d: int = 12  # the official name: at most this many earlier blocks' cross tokens are attended to
    layer_scale: float = 1e-6
    drop_path_rate: float = 0.0
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    def validate(self) -> None:
        """Raises ValueError naming the valid choices if the settings cannot build a model."""
        if not len(self.embed_dims) == len(self.depths) == len(self.num_heads) == 4:
            raise ValueError(f"embed_dims, depths and num_heads need one entry per stage, 4 stages (2 conv, 2 Fca); "
                             f"got {self.embed_dims}, {self.depths}, {self.num_heads}")
        if min(self.depths) < 1:
            raise ValueError(f"every stage needs at least one block; got depths {self.depths}")
        for dim, heads in zip(self.embed_dims[2:], self.num_heads[2:]):
            if heads < 1 or dim % heads:
                raise ValueError(f"The Fca stages' embed_dims {self.embed_dims[2:]} must split into num_heads "
                                 f"{self.num_heads[2:]} heads")
        if self.cab_max_d < 1:
            raise ValueError(f"cab_max_d must be >= 1 (earlier blocks attended to), got {self.cab_max_d}")
        img = layers.to_2tuple(self.img_size)
        if any(side % 32 for side in img):
            raise ValueError(f"img_size {self.img_size} must be a multiple of 32 (the official stages take the "
                             f"stem's H/4 halved three times as their resolutions)")
        layers.check_attention_impl(self.attention_impl)

    def group_matcher(self) -> param_groups.Matcher:
        """Returns timm-style group_matcher(coarse=False) over vitjax param paths (see param_groups)."""
        return dict(stem=r"^patch_embed_",
                    blocks=[(r"^layer_(\d+)/blocks_(\d+)", None),
                            # the merging ends stage i: it joins stage i's last block
                            (r"^layer_(\d+)/downsample", (param_groups.MERGE_WITH_PREVIOUS,)),
                            (r"^norm_head", (param_groups.MERGE_WITH_PREVIOUS,))])

    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns no regex: the official (ConvNeXt) optimizer decays every weight of 2 or more dimensions."""
        return ()

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (logits, intermediates) for NHWC `images`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = self.embed_dims[0]
        x = layers.ConvBN(dim // 2, 3, 2, 1, kernel_init=layers.trunc_normal_init, name="patch_embed_seq_0",
                          **kw)(images, train)
        x = layers.ConvBN(dim, 3, 2, 1, kernel_init=layers.trunc_normal_init, name="patch_embed_seq_2",
                          **kw)(layers.gelu(x), train)
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
        cursor = 0
        intermediates: Dict[str, Any] = {"stages": []}
        for stage, depth in enumerate(self.depths):
            stage_rates = tuple(float(rate) for rate in rates[cursor:cursor + depth])
            cursor += depth
            out_dim = self.embed_dims[stage + 1] if stage < 3 else 0
            stage_class = ConvStage if stage < 2 else FcaStage
            stage_out, x = stage_class(self.embed_dims[stage], depth, self.num_heads[stage], stage_rates, out_dim,
                                       self.mlp_ratio, self.cab_max_d, self.layer_scale, self.attention_impl,
                                       name=f"layer_{stage}", **kw)(x, train)
            intermediates["stages"].append(stage_out)
        x = x.mean(axis=(1, 2))
        x = _norm(self, 1e-5, "norm_head")(x)
        intermediates["pre_logits"] = x
        if not self.num_classes:
            return x, intermediates
        return nn.Dense(self.num_classes, kernel_init=layers.logical(layers.trunc_normal_init, ("embed", "classes")),
                        bias_init=layers.logical(nn.initializers.zeros, ("classes",)),
                        dtype=self.dtype, param_dtype=self.param_dtype, name="head")(x), intermediates


# --- registry: the official image_classification/models/fcaformer.py constructors --------------------------------

_FCAFORMERS = {  # the official names
    "fcaformer_l1": dict(embed_dims=(64, 128, 192, 320), depths=(2, 2, 6, 2), num_heads=(0, 0, 6, 10)),
    "fcaformer_l2": dict(embed_dims=(96, 192, 320, 480), depths=(2, 2, 7, 2), num_heads=(0, 0, 10, 15)),
    "fcaformer_l3": dict(embed_dims=(96, 192, 320, 512), depths=(3, 6, 12, 3), num_heads=(0, 0, 10, 16)),
    "fcaformer_l4": dict(embed_dims=(128, 256, 512, 768), depths=(3, 6, 12, 3), num_heads=(0, 0, 16, 24)),
}
for _name, _settings in _FCAFORMERS.items():
    register_model(_name, FcaFormer, family="fcaformer", **_settings)
