"""CrossFormer (Wang et al., ICLR 2022, "CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale
Attention") and CrossFormer++ (Wang et al., TPAMI 2023), as the official cheerss/CrossFormer `models/crossformer.py`.

A pyramid of stages. Each embedding layer is cross-scale: several convolutions with one stride and different kernel
sizes (4, 8, 16, 32 px in the stem, 2 and 4 between stages) whose outputs are concatenated along channels, the larger
kernels getting fewer channels. Blocks alternate short-distance attention (SDA: G x G groups of adjacent tokens) and
long-distance attention (LDA: G x G groups of tokens `interval` apart); a map smaller than a group is attended whole.
Maps whose sides are not multiples of the group extent are padded at the bottom/right and the padded keys masked with
-1e6 (the official constant, added, so a group of padding alone stays finite). The dynamic position bias is an MLP over
the (2G - 1)^2 relative offsets giving one bias per head; it and the padding mask go to the shared attention as an
additive `bias` and `key_bias`, so every `attention_impl` runs them. CrossFormer++ adds (`use_acl`) a depthwise 3x3
conv + LayerNorm (the activation cooling layer) after every third block but the last of a stage.

Parameter names follow the official state dict: `patch_embed/{projs_{k}, norm}`, `layers_{i}/blocks_{j}/{norm1, attn/
{pos/{pos_proj, pos1_norm, pos1_fc, pos2_norm, pos2_fc, pos3_norm, pos3_fc}, qkv, proj}, norm2, mlp/{fc1, fc2},
ex_conv, ex_ln}`, `layers_{i}/downsample/{norm, reductions_{k}}`, `norm`, `head`.
"""
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import layers, param_groups
from vitjax.models.registry import register_model

_EPS = 1e-5  # torch nn.LayerNorm's default, which the official code uses everywhere
_PAD_BIAS = -1e6  # the official NEG_INF: added to padded keys' logits


def _norm(module: nn.Module, name: str) -> nn.LayerNorm:
    # Two-pass variance: the position-bias MLP normalises 1-8 features with means far from 0, where flax's default
    # E[x^2] - E[x]^2 cancels (7x the official code's fp32 error on the parity fixture).
    return nn.LayerNorm(epsilon=_EPS, use_fast_variance=False, dtype=module.dtype, param_dtype=module.param_dtype,
                        scale_init=layers.logical(nn.initializers.ones, ("embed",)),
                        bias_init=layers.logical(nn.initializers.zeros, ("embed",)), name=name)


def _dense(module: nn.Module, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=layers.logical(layers.trunc_normal_init, ("embed", "mlp")),
                    bias_init=layers.logical(nn.initializers.zeros, ("mlp",)),
                    dtype=module.dtype, param_dtype=module.param_dtype, name=name)


def cross_scale_dims(dim: int, num_kernels: int) -> Tuple[int, ...]:
    """Returns the output channels of each kernel of a cross-scale embedding of total width `dim`: dim/2, dim/4, ...,
    the last kernel taking what the one before it took (the official split, larger kernels narrower)."""
    return tuple(dim // 2 ** (index + 1) if index < num_kernels - 1 else dim // 2 ** index
                 for index in range(num_kernels))


def cross_scale_convs(module: nn.Module, x: jax.Array, features: int, kernel_sizes: Sequence[int], stride: int,
                      name: str) -> jax.Array:
    """Returns convolutions `{name}_{k}` of `module` (one stride, the kernel sizes, padding (k - stride) / 2) on NHWC
    `x`, concatenated along channels: (B, H / stride, W / stride, features). Call inside a compact __call__."""
    outs = []
    for index, (kernel, width) in enumerate(zip(kernel_sizes, cross_scale_dims(features, len(kernel_sizes)))):
        pad = (kernel - stride) // 2
        outs.append(nn.Conv(width, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                            kernel_init=layers.logical(layers.trunc_normal_init, (None, None, None, "embed")),
                            bias_init=layers.logical(nn.initializers.zeros, ("embed",)),
                            dtype=module.dtype, param_dtype=module.param_dtype, name=f"{name}_{index}")(x))
    return jnp.concatenate(outs, axis=-1)


class PatchEmbed(nn.Module):
    """The cross-scale stem: convolutions of stride `kernel_sizes[0]`, concatenated, then LayerNorm; NHWC in and out."""

    features: int
    kernel_sizes: Sequence[int]
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = cross_scale_convs(self, x, self.features, self.kernel_sizes, self.kernel_sizes[0], "projs")
        return _norm(self, "norm")(x)


def relative_offsets(group: int) -> Tuple[np.ndarray, np.ndarray]:
    """Returns ((2G-1)^2, 2) float offsets (dh, dw), row-major, and the (G^2, G^2) index of each query-key pair's
    offset among them."""
    span = np.arange(1 - group, group)
    offsets = np.stack(np.meshgrid(span, span, indexing="ij"), axis=-1).reshape(-1, 2).astype(np.float32)
    coords = np.stack(np.meshgrid(np.arange(group), np.arange(group), indexing="ij"), axis=-1).reshape(-1, 2)
    relative = coords[:, None, :] - coords[None, :, :] + (group - 1)
    return offsets, relative[..., 0] * (2 * group - 1) + relative[..., 1]


class DynamicPosBias(nn.Module):
    """The dynamic position bias: Linear(2, d), then three (LayerNorm, ReLU, Linear) steps to `num_heads`, over every
    relative offset of a G x G group; returns the (num_heads, G^2, G^2) attention bias."""

    pos_dim: int
    num_heads: int
    group: int
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self) -> jax.Array:
        offsets, index = relative_offsets(self.group)
        pos = _dense(self, self.pos_dim, "pos_proj")(jnp.asarray(offsets))
        for step in (1, 2, 3):
            pos = nn.relu(_norm(self, f"pos{step}_norm")(pos))
            pos = _dense(self, self.num_heads if step == 3 else self.pos_dim, f"pos{step}_fc")(pos)
        return jnp.transpose(pos[jnp.asarray(index)], (2, 0, 1))


class GroupAttention(nn.Module):
    """Multi-head self-attention within groups (B', G^2, C) with a dynamic position bias; returns the same shape."""

    num_heads: int
    group: int
    qkv_bias: bool = True
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, key_bias: Optional[jax.Array], train: bool = False) -> jax.Array:
        channels = x.shape[-1]
        head_dim = channels // self.num_heads
        qkv = nn.DenseGeneral((3, self.num_heads, head_dim), use_bias=self.qkv_bias,
                              kernel_init=layers.logical(layers.trunc_normal_init, ("embed", None, "heads", "kv")),
                              bias_init=layers.logical(nn.initializers.zeros, (None, "heads", "kv")),
                              dtype=self.dtype, param_dtype=self.param_dtype, name="qkv")(x)
        bias = DynamicPosBias(channels // 16, self.num_heads, self.group, self.dtype, self.param_dtype,
                              name="pos")()
        out, _ = layers.attend(self, qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], train=train,
                               bias=bias[None], key_bias=key_bias)
        return layers.project_heads(self, out, channels, train=train)


def group_tokens(x: jax.Array, group: int, interval: int, long_distance: bool) -> jax.Array:
    """Returns the (B * groups, G^2, C) groups of a padded NHWC map: adjacent G x G patches (SDA), or, for LDA, the
    G x G tokens `interval` apart inside each (G * interval)^2 region, ordered as the official code."""
    batch, height, width, channels = x.shape
    if not long_distance:
        x = x.reshape(batch, height // group, group, width // group, group, channels)
        return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, group * group, channels)
    rows, cols = height // (group * interval), width // (group * interval)
    x = x.reshape(batch, rows, group, interval, cols, group, interval, channels)
    return x.transpose(0, 1, 4, 3, 6, 2, 5, 7).reshape(-1, group * group, channels)


def ungroup_tokens(x: jax.Array, batch: int, height: int, width: int, group: int, interval: int,
                   long_distance: bool) -> jax.Array:
    """Returns the (batch, height, width, C) map that `group_tokens` split into groups."""
    channels = x.shape[-1]
    if not long_distance:
        x = x.reshape(batch, height // group, width // group, group, group, channels)
        return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height, width, channels)
    rows, cols = height // (group * interval), width // (group * interval)
    x = x.reshape(batch, rows, cols, interval, interval, group, group, channels)
    return x.transpose(0, 1, 5, 3, 2, 6, 4, 7).reshape(batch, height, width, channels)


def block_geometry(resolution: int, group: int, interval: int, long_distance: bool) -> Tuple[int, bool, int]:
    """Returns (group, long_distance, padding) of a block on a resolution x resolution map, as the official block:
    a map no larger than a group is one SDA group; sides pad up to a multiple of G (SDA) or G * interval (LDA)."""
    if resolution <= group:
        return resolution, False, 0
    extent = group * interval if long_distance else group
    return group, long_distance, (extent - resolution % extent) % extent


class CrossFormerBlock(nn.Module):
    """LayerNorm + SDA or LDA group attention, then LayerNorm + MLP, each residual; CrossFormer++'s cooling layer
    (depthwise 3x3 conv + LayerNorm, no residual) after when `extra_conv`. Tokens (B, H * W, C) in and out."""

    resolution: int
    num_heads: int
    group: int
    interval: int
    long_distance: bool
    mlp_ratio: float = 4.0
    extra_conv: bool = False
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        batch, length, channels = x.shape
        side = self.resolution
        group, long_distance, pad = block_geometry(side, self.group, self.interval, self.long_distance)
        drop_path = layers.DropPath(self.drop_path_rate)
        y = _norm(self, "norm1")(x).reshape(batch, side, side, channels)
        y = jnp.pad(y, ((0, 0), (0, pad), (0, pad), (0, 0)))
        groups = group_tokens(y, group, self.interval, long_distance)
        key_bias = None
        if pad:
            valid = np.zeros((1, side + pad, side + pad, 1), np.float32)
            valid[:, side:, :] = valid[:, :, side:] = _PAD_BIAS
            mask = np.asarray(group_tokens(valid, group, self.interval, long_distance))[..., 0]
            key_bias = jnp.asarray(np.tile(mask, (batch, 1)))
        groups = GroupAttention(self.num_heads, group, self.qkv_bias, self.attn_drop_rate, self.drop_rate,
                                self.attention_impl, self.dtype, self.param_dtype,
                                name="attn")(groups, key_bias, train)
        y = ungroup_tokens(groups, batch, side + pad, side + pad, group, self.interval, long_distance)
        y = y[:, :side, :side].reshape(batch, length, channels)
        x = x + drop_path(y, train)
        y = layers.Mlp(int(channels * self.mlp_ratio), drop_rate=self.drop_rate, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="mlp")(_norm(self, "norm2")(x), train)
        x = x + drop_path(y, train)
        if self.extra_conv:
            x = nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=channels,
                        kernel_init=layers.logical(layers.trunc_normal_init, (None, None, None, "embed")),
                        bias_init=layers.logical(nn.initializers.zeros, ("embed",)),
                        dtype=self.dtype, param_dtype=self.param_dtype,
                        name="ex_conv")(x.reshape(batch, side, side, channels))
            x = _norm(self, "ex_ln")(x.reshape(batch, length, channels))
        return x


class PatchMerging(nn.Module):
    """LayerNorm, then a cross-scale embedding of stride 2 to `features` channels; tokens in, NHWC map out."""

    resolution: int
    features: int
    kernel_sizes: Sequence[int]
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, _, channels = x.shape
        x = _norm(self, "norm")(x).reshape(batch, self.resolution, self.resolution, channels)
        return cross_scale_convs(self, x, self.features, self.kernel_sizes, 2, "reductions")


class CrossFormerStage(nn.Module):
    """`depth` blocks alternating SDA and LDA on a resolution x resolution map of tokens (B, H * W, C), then (unless
    `merge_sizes` is empty, the last stage) the patch merging; returns (the stage's NHWC map, the merged NHWC map)."""

    resolution: int
    depth: int
    num_heads: int
    group: int
    interval: int
    merge_sizes: Sequence[int]
    mlp_ratio: float
    use_acl: bool
    qkv_bias: bool
    drop_rate: float
    attn_drop_rate: float
    drop_path_rates: Sequence[float]
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> Tuple[jax.Array, Optional[jax.Array]]:
        for index in range(self.depth):
            x = CrossFormerBlock(self.resolution, self.num_heads, self.group, self.interval, index % 2 == 1,
                                 self.mlp_ratio, self.use_acl and (index + 1) % 3 == 0 and index < self.depth - 1,
                                 self.qkv_bias, self.drop_rate, self.attn_drop_rate, self.drop_path_rates[index],
                                 self.attention_impl, self.dtype, self.param_dtype, name=f"blocks_{index}")(x, train)
        stage_map = x.reshape(x.shape[0], self.resolution, self.resolution, x.shape[-1])
        if not self.merge_sizes:
            return stage_map, None
        return stage_map, PatchMerging(self.resolution, 2 * x.shape[-1], tuple(self.merge_sizes), self.dtype,
                                       self.param_dtype, name="downsample")(x)


class CrossFormer(param_groups.LayerGroups, nn.Module):
    """CrossFormer classifier; `__call__(images NHWC, train) -> (logits, intermediates)`.

    intermediates: `stages` (each stage's NHWC output before its patch merging), `pre_logits` (B, C), the normed
    pooled features.
    """

    num_classes: int = 1000
    img_size: Union[int, Tuple[int, int]] = 224
    in_chans: int = 3
    patch_sizes: Sequence[int] = (4, 8, 16, 32)
    merge_sizes: Sequence[Sequence[int]] = ((2, 4), (2, 4), (2, 4))
    embed_dim: int = 64
    depths: Sequence[int] = (1, 1, 8, 6)
    num_heads: Sequence[int] = (2, 4, 8, 16)
    group_sizes: Sequence[int] = (7, 7, 7, 7)
    intervals: Sequence[int] = (8, 4, 2, 1)
    mlp_ratio: float = 4.0
    use_acl: bool = False  # CrossFormer++'s activation cooling layers
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    def validate(self) -> None:
        """Raises ValueError naming the valid choices if the settings cannot build a model."""
        stages = len(self.depths)
        if not (stages >= 1 and len(self.num_heads) == len(self.group_sizes) == len(self.intervals) == stages
                and len(self.merge_sizes) == stages - 1):
            raise ValueError(f"depths, num_heads, group_sizes and intervals need one entry per stage and merge_sizes "
                             f"one per stage but the first; got depths {self.depths}, num_heads {self.num_heads}, "
                             f"group_sizes {self.group_sizes}, intervals {self.intervals}, merge_sizes "
                             f"{self.merge_sizes}")
        img = layers.to_2tuple(self.img_size)
        stride = self.patch_sizes[0] * 2 ** (stages - 1) if self.patch_sizes else 0
        if img[0] != img[1] or not stride or img[0] % stride:
            raise ValueError(f"img_size {self.img_size} must be square and a multiple of {stride or 'the stride'} "
                             f"(the stem stride {tuple(self.patch_sizes)[:1]} times 2 per later stage)")
        kernels = [tuple(self.patch_sizes), *map(tuple, self.merge_sizes)]
        for index, sizes in enumerate(kernels):
            first = 4 if index == 0 else 2
            if not sizes or any(size < sizes[0] or (size - sizes[0]) % 2 for size in sizes) or (
                    index and sizes[0] != first):
                raise ValueError(f"Each cross-scale embedding's kernel sizes start at its stride (the first patch "
                                 f"size; 2 between stages) and grow by even steps; got patch_sizes "
                                 f"{self.patch_sizes}, merge_sizes {self.merge_sizes}")
        for stage in range(stages):
            dim = self.embed_dim * 2 ** stage
            if dim % self.num_heads[stage] or dim < 16:
                raise ValueError(f"Stage {stage}'s width {dim} (embed_dim * 2^stage) must be >= 16 (the position-bias "
                                 f"MLP is width / 16) and divisible by its num_heads ({self.num_heads[stage]}); got "
                                 f"embed_dim {self.embed_dim}, num_heads {self.num_heads}")
            split = cross_scale_dims(dim, len(kernels[stage]))
            if min(split) < 1 or sum(split) != dim:
                raise ValueError(f"Stage {stage}'s width {dim} does not split over {len(kernels[stage])} kernels as "
                                 f"{dim}/2, {dim}/4, ...; use an embed_dim divisible by 2^(kernels - 1)")
            if self.group_sizes[stage] < 1 or self.intervals[stage] < 1:
                raise ValueError(f"group_sizes and intervals must be >= 1; got {self.group_sizes}, {self.intervals}")
        layers.check_attention_impl(self.attention_impl)

    def group_matcher(self) -> param_groups.Matcher:
        """Returns timm-style group_matcher(coarse=False) over vitjax param paths (see param_groups)."""
        return dict(stem=r"^patch_embed/",
                    blocks=[(r"^layers_(\d+)/blocks_(\d+)", None),
                            # the merging ends stage i: it joins stage i's last block
                            (r"^layers_(\d+)/downsample", (param_groups.MERGE_WITH_PREVIOUS,)),
                            (r"^norm", (param_groups.MERGE_WITH_PREVIOUS,))])

    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns no regex: the official optimizer decays every weight of 2 or more dimensions (and no bias/norm)."""
        return ()

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (logits, intermediates) for NHWC `images`."""
        stages = len(self.depths)
        x = PatchEmbed(self.embed_dim, tuple(self.patch_sizes), self.dtype, self.param_dtype,
                       name="patch_embed")(images)
        x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
        intermediates: Dict[str, Any] = {"stages": []}
        cursor = 0
        for stage in range(stages):
            batch, side = x.shape[0], x.shape[1]
            depth = self.depths[stage]
            stage_map, merged = CrossFormerStage(
                side, depth, self.num_heads[stage], self.group_sizes[stage], self.intervals[stage],
                tuple(self.merge_sizes[stage]) if stage < stages - 1 else (), self.mlp_ratio, self.use_acl,
                self.qkv_bias, self.drop_rate, self.attn_drop_rate,
                tuple(float(rate) for rate in rates[cursor:cursor + depth]), self.attention_impl, self.dtype,
                self.param_dtype, name=f"layers_{stage}")(x.reshape(batch, side * side, -1), train)
            cursor += depth
            intermediates["stages"].append(stage_map)
            x = stage_map if merged is None else merged
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        x = _norm(self, "norm")(x).mean(axis=1)
        intermediates["pre_logits"] = x
        if not self.num_classes:
            return x, intermediates
        return nn.Dense(self.num_classes, kernel_init=layers.logical(layers.trunc_normal_init, ("embed", "classes")),
                        bias_init=layers.logical(nn.initializers.zeros, ("classes",)),
                        dtype=self.dtype, param_dtype=self.param_dtype, name="head")(x), intermediates


# --- registry: the official configs/crossformer/*.yaml and configs/crossformer_pp/*.yaml --------------------------

_CROSSFORMERS = {
    "crossformer_tiny": dict(embed_dim=64, depths=(1, 1, 8, 6), num_heads=(2, 4, 8, 16)),
    "crossformer_small": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "crossformer_base": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "crossformer_large": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}
# CrossFormer++: constant progressive group sizes, smaller intervals and the cooling layers.
_PP = dict(group_sizes=(4, 4, 14, 7), intervals=(4, 2, 1, 1), use_acl=True)
_CROSSFORMERS.update({
    "crossformer_pp_small": dict(embed_dim=64, depths=(2, 2, 18, 2), num_heads=(2, 4, 8, 16), **_PP),
    "crossformer_pp_base": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), **_PP),
    "crossformer_pp_large": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), **_PP),
    "crossformer_pp_huge": dict(embed_dim=128, depths=(6, 6, 18, 2), num_heads=(4, 8, 16, 32), **_PP),
})
for _name, _settings in _CROSSFORMERS.items():
    register_model(_name, CrossFormer, family="crossformer", **_settings)
