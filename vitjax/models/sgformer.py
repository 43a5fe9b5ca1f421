"""SG-Former (Ren et al., ICCV 2023, "SG-Former: Self-guided Transformer with Evolving Token Reallocation"), as the
official OliverRensu/SG-Former `sgformer.py` (`SGFormer`).

A four-stage pyramid on a conv stem (three 3x3 convs with one-group GroupNorm, strides 2, 1, 2, GELU between, then
LayerNorm) plus a learned position embedding; later stages start with a patch merging (1x1 conv, depthwise 3x3
stride-2 conv, 1x1 conv, each with a one-group GroupNorm, GELU between). Blocks are pre-norm attention + an MLP whose
hidden layer adds a depthwise 3x3 conv of itself before the GELU; every attention adds LePE (Linear, then depthwise
3x3 conv of the block input) to its output before the projection. In the stages with `sr_ratio > 1` blocks alternate:

- hybrid-scale attention (even blocks): half the heads attend globally to the map pooled by an sr x sr stride-sr conv
  (+ LayerNorm, GELU), the other half within 7x7 windows. The attention each token *receives* (averaged over heads
  and queries, without gradient) forms the significance map: the global half's, nearest-upsampled from the pooled
  grid, plus the local half's.
- self-guided attention (odd blocks): the tokens are sorted by the previous block's significance (ascending), and
  runs of consecutive sorted tokens are merged by learned linear layers over the run (`f1`, `f2`, `f3`): the least
  significant quarter in runs of f1 tokens, the middle half in runs of f2, the most significant quarter in runs of f3
  (smaller runs, finer tokens; sr 2: two halves, runs of 2 and 1). Half the heads attend to the tokens merged in
  row-major order (`kv1`), the other half to the same merging of the column-major order (`kv2`).

Static shapes: the significance ordering is data-dependent, but every count is fixed by the map size and `sr_ratio`
(the official code derives the runs from H * W alone), so the reallocation is an argsort, a gather of all tokens in
that order (`take_along_axis`) and a reshape of each fixed-length segment into (runs, run length), followed by the
merge (a dot product over the run). This is the official sort + gather + reshape + Linear exactly, with no padding
or masking, so it jits. Ties between significances are broken by position here (a stable sort) and arbitrarily by
torch; in float32, significances of thousands of tokens do tie or come within rounding of one another, which is
why parity is checked in float64 (see tests/test_sgformer.py).

The hybrid-scale blocks need the attention weights for the significance maps, so they always run the "xla" path
of the shared attention (it materialises them); the self-guided blocks and the full attention of the last stage
take any `attention_impl`.

Parameter names follow the official state dict: `patch_embed1/{conv_0,conv_2,conv_4}/{c,bn}`, `patch_embed1/norm`,
`patch_embed{2,3,4}/conv{1,2,3}/{c,bn}`, `pos_embed` (N, C), `block{i}_{j}/{norm1, attn/{q, kv | q1, kv1, q2, kv2,
sr, norm | q, kv1, kv2, f1, f2, f3}, attn/{lepe_linear, lepe_conv, proj}, norm2, mlp/{fc1, dwconv, fc2}}`,
`norm{i}`, `head`.
"""
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import layers, param_groups
from vitjax.models.registry import register_model

WINDOW = 7  # the official local attention's window (and query window), fixed
# The official merge lengths per sr_ratio (f1, f2, f3): the widths of Linear(run, 1) layers, fixed for 224 px maps.
MERGE_RUNS = {8: (196, 56, 28), 4: (49, 14, 7), 2: (2, 1)}


def _dense(module: nn.Module, features: int, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias,
                    kernel_init=layers.logical(layers.trunc_normal_init, ("embed", "mlp")),
                    bias_init=layers.logical(nn.initializers.zeros, ("mlp",)),
                    dtype=module.dtype, param_dtype=module.param_dtype, name=name)


def _conv(module: nn.Module, features: int, kernel: int, stride: int, pad: int, name: str, groups: int = 1,
          use_bias: bool = True) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   feature_group_count=groups, use_bias=use_bias,
                   kernel_init=layers.logical(layers.trunc_normal_init, (None, None, None, "embed")),
                   bias_init=layers.logical(nn.initializers.zeros, ("embed",)),
                   dtype=module.dtype, param_dtype=module.param_dtype, name=name)


def segments(tokens: int, sr_ratio: int) -> Tuple[Tuple[int, int], ...]:
    """Returns ((segment length, run length), ...) of the self-guided merging of `tokens` sorted tokens, least
    significant segment first, as the official code splits them; raises ValueError where they do not fit."""
    runs = MERGE_RUNS[sr_ratio]
    if sr_ratio == 2:
        lengths = (tokens // 2, tokens - tokens // 2)
        counts = (tokens // 2 // 2, tokens // 1 // 2)
    else:
        quarter = tokens // 4
        lengths = (quarter, quarter * 3 - quarter, tokens - quarter * 3)
        counts = (tokens // runs[0] // 4, tokens // runs[1] // 2, tokens // runs[2] // 4)
    if any(count * run != length for length, run, count in zip(lengths, runs, counts)):
        raise ValueError(f"A {tokens}-token map cannot be merged with sr_ratio {sr_ratio}: the official merge "
                         f"lengths {runs} fit the maps of 224 px inputs only (56x56 at sr 8, 14x14 at sr 4 and 2)")
    return tuple(zip(lengths, runs))


def nearest_index(in_size: int, out_size: int) -> np.ndarray:
    """Returns torch's F.interpolate(mode="nearest") source index of each output position (float32 scale)."""
    scale = np.float32(in_size) / np.float32(out_size)
    return np.minimum(np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64), in_size - 1)


class GroupNorm1(nn.Module):
    """GroupNorm with one group (over H, W and C of each image, per-channel scale and bias), computed in at least
    float32 (float64 inputs stay float64); params `scale`, `bias`."""

    eps: float = 1e-5
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        compute = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        centred = compute - compute.mean(axis=(1, 2, 3), keepdims=True)
        out = centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=(1, 2, 3), keepdims=True) + self.eps)
        scale = self.param("scale", layers.logical(nn.initializers.ones, ("embed",)), (channels,), self.param_dtype)
        bias = self.param("bias", layers.logical(nn.initializers.zeros, ("embed",)), (channels,), self.param_dtype)
        return (out * scale.astype(out.dtype) + bias.astype(out.dtype)).astype(self.dtype)


class ConvGN(nn.Module):
    """Bias-free conv (`c`) then one-group GroupNorm (`bn`, as the official names it); NHWC in and out."""

    features: int
    kernel: int = 1
    stride: int = 1
    pad: int = 0
    groups: int = 1
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _conv(self, self.features, self.kernel, self.stride, self.pad, "c", self.groups, use_bias=False)(x)
        return GroupNorm1(dtype=self.dtype, param_dtype=self.param_dtype, name="bn")(x)


class Stem(nn.Module):
    """The official `Head`: 3x3 convs (strides 2, 1, 2) with one-group GroupNorm, GELU between, then LayerNorm
    (eps 1e-5); NHWC, /4."""

    dim: int
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.gelu(ConvGN(self.dim, 3, 2, 1, name="conv_0", **kw)(x))
        x = layers.gelu(ConvGN(self.dim, 3, 1, 1, name="conv_2", **kw)(x))
        x = ConvGN(self.dim, 3, 2, 1, name="conv_4", **kw)(x)
        return layers.layer_norm(1e-5, self.dtype, self.param_dtype, name="norm")(x)


class PatchMerging(nn.Module):
    """1x1 conv, depthwise 3x3 stride-2 conv, 1x1 conv, each with one-group GroupNorm, GELU between; NHWC, /2."""

    dim: int
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.gelu(ConvGN(self.dim, name="conv1", **kw)(x))
        x = layers.gelu(ConvGN(self.dim, 3, 2, 1, groups=self.dim, name="conv2", **kw)(x))
        return ConvGN(self.dim, name="conv3", **kw)(x)


def _half_up(size: int) -> int:
    return -(-size // 2)


class SGAttention(nn.Module):
    """SG-Former attention on tokens (B, H * W, C) of an H x W map; `kind` is "full" (sr_ratio 1), "hybrid" or
    "guided". Returns (output, significance (B, H, W) for "hybrid", else None)."""

    num_heads: int
    sr_ratio: int
    kind: str
    qkv_bias: bool = True
    attention_impl: str = "xla"
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0  # the official default; `layers.attend` reads it
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, height: int, width: int, significance: Optional[jax.Array] = None,
                 train: bool = False) -> Tuple[jax.Array, Optional[jax.Array]]:
        batch, tokens, channels = x.shape
        heads, head_dim = self.num_heads, channels // self.num_heads
        lepe = _conv(self, channels, 3, 1, 1, "lepe_conv", groups=channels)(
            _dense(self, channels, "lepe_linear")(x).reshape(batch, height, width, channels))
        lepe = lepe.reshape(batch, tokens, channels)

        def split(t, count):  # (B, N, count * head_dim) -> (B, N, count, head_dim)
            return t.reshape(t.shape[0], t.shape[1], count, head_dim)

        made = None
        if self.kind == "full":
            query = split(_dense(self, channels, "q", self.qkv_bias)(x), heads)
            key, value = jnp.split(_dense(self, 2 * channels, "kv", self.qkv_bias)(x).reshape(
                batch, tokens, 2, heads, head_dim), 2, axis=2)
            out, _ = layers.attend(self, query, key[:, :, 0], value[:, :, 0], train=train)
            out = out.reshape(batch, tokens, channels)
        elif self.kind == "hybrid":
            out, made = self._hybrid(x, height, width, train)
        else:
            out = self._guided(x, height, width, significance, train)
        out = _dense(self, channels, "proj")(out + lepe)
        return nn.Dropout(self.proj_drop_rate)(out, deterministic=not train), made

    def _weights_attention(self, query, key, value, train):
        """Returns (output (B, Nq, h, d), weights (B, h, Nq, Nk)) of the shared attention's "xla" path."""
        rate = self.attn_drop_rate if train else 0.0
        out, aux = layers.multihead_attention(
            query, key, value, impl="xla", capture_attention=True, dropout_rate=rate,
            dropout_rng=self.make_rng("dropout") if rate > 0 else None)
        return out, aux["attention"]

    def _hybrid(self, x, height, width, train):
        batch, tokens, channels = x.shape
        half, head_dim = self.num_heads // 2, channels // self.num_heads
        sr = self.sr_ratio
        grid = x.reshape(batch, height, width, channels)
        # global half: keys and values from the sr x sr pooled map
        pooled = _conv(self, channels, sr, sr, 0, "sr")(grid)
        pooled_h, pooled_w = pooled.shape[1:3]
        pooled = layers.gelu(layers.layer_norm(1e-5, self.dtype, self.param_dtype, name="norm")(
            pooled.reshape(batch, -1, channels)))
        query = _dense(self, channels // 2, "q1", self.qkv_bias)(x).reshape(batch, tokens, half, head_dim)
        kv = _dense(self, channels, "kv1", self.qkv_bias)(pooled).reshape(batch, -1, 2, half, head_dim)
        out_global, weights = self._weights_attention(query, kv[:, :, 0], kv[:, :, 1], train)
        received = jax.lax.stop_gradient(weights.astype(jnp.promote_types(weights.dtype, jnp.float32)))
        received = received.mean(axis=1).mean(axis=1).reshape(batch, pooled_h, pooled_w)
        global_map = received[:, nearest_index(pooled_h, height)][:, :, nearest_index(pooled_w, width)]
        # local half: 7x7 windows of the map
        query = _dense(self, channels // 2, "q2", self.qkv_bias)(x).reshape(batch, height, width, -1)
        kv = _dense(self, channels, "kv2", self.qkv_bias)(x).reshape(batch, height, width, -1)

        def windows(t):  # (B, H, W, n * d) -> (B * windows, 49, n, d)
            return layers.window_partition(t, (WINDOW, WINDOW)).reshape(-1, WINDOW * WINDOW, t.shape[-1] // head_dim,
                                                                        head_dim)

        key, value = jnp.split(kv.reshape(batch, height, width, 2, -1), 2, axis=3)
        out_local, weights = self._weights_attention(windows(query), windows(key[:, :, :, 0]),
                                                     windows(value[:, :, :, 0]), train)
        out_local = layers.window_reverse(out_local.reshape(-1, WINDOW * WINDOW, channels // 2), (WINDOW, WINDOW),
                                          height, width).reshape(batch, tokens, channels // 2)
        received = jax.lax.stop_gradient(weights.astype(jnp.promote_types(weights.dtype, jnp.float32)))
        received = received.mean(axis=1).mean(axis=1)[..., None]
        local_map = layers.window_reverse(received, (WINDOW, WINDOW), height, width)[..., 0]
        out = jnp.concatenate([out_global.reshape(batch, tokens, channels // 2), out_local], axis=-1)
        return out, local_map + global_map

    def _guided(self, x, height, width, significance, train):
        batch, tokens, channels = x.shape
        heads, head_dim = self.num_heads, channels // self.num_heads
        query = _dense(self, channels, "q", self.qkv_bias)(x).reshape(batch, tokens, heads, head_dim)
        parts = segments(tokens, self.sr_ratio)
        merges = [nn.Dense(1, kernel_init=layers.logical(layers.trunc_normal_init, (None, None)),
                           bias_init=layers.logical(nn.initializers.zeros, (None,)), dtype=self.dtype,
                           param_dtype=self.param_dtype, name=f"f{index + 1}") for index in range(len(parts))]

        def reallocate(t, order):  # tokens (B, N, C) in `order`, each segment merged in runs -> (B, M, C)
            ordered = jnp.take_along_axis(t, order[:, :, None], axis=1)
            merged, start = [], 0
            for (length, run), merge in zip(parts, merges):
                piece = ordered[:, start:start + length].reshape(batch, length // run, run, channels)
                merged.append(merge(jnp.swapaxes(piece, 2, 3))[..., 0])
                start += length
            return jnp.concatenate(merged, axis=1)

        row_major = significance.reshape(batch, tokens)
        column_major = jnp.swapaxes(significance, 1, 2).reshape(batch, tokens)
        x_columns = jnp.swapaxes(x.reshape(batch, height, width, channels), 1, 2).reshape(batch, tokens, channels)
        merged_rows = reallocate(x, jnp.argsort(row_major, axis=1, stable=True))
        merged_columns = reallocate(x_columns, jnp.argsort(column_major, axis=1, stable=True))
        kv1 = _dense(self, channels, "kv1", self.qkv_bias)(merged_rows).reshape(batch, -1, 2, heads // 2, head_dim)
        kv2 = _dense(self, channels, "kv2", self.qkv_bias)(merged_columns).reshape(batch, -1, 2, heads // 2, head_dim)
        kv = jnp.concatenate([kv1, kv2], axis=3)
        out, _ = layers.attend(self, query, kv[:, :, 0], kv[:, :, 1], train=train)
        return out.reshape(batch, tokens, channels)


class Mlp(nn.Module):
    """fc1, plus a depthwise 3x3 conv of itself, GELU, fc2; tokens (B, H * W, C) of an H x W map."""

    hidden: int
    drop_rate: float = 0.0
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, height: int, width: int, train: bool = False) -> jax.Array:
        batch, tokens, channels = x.shape
        y = _dense(self, self.hidden, "fc1")(x)
        conv = _conv(self, self.hidden, 3, 1, 1, "dwconv", groups=self.hidden)(y.reshape(batch, height, width, -1))
        y = layers.gelu(y + conv.reshape(batch, tokens, -1))
        y = nn.Dropout(self.drop_rate)(y, deterministic=not train)
        y = _dense(self, channels, "fc2")(y)
        return nn.Dropout(self.drop_rate)(y, deterministic=not train)


class Block(nn.Module):
    """LayerNorm (eps 1e-6) + SG attention and LayerNorm + Mlp, each a residual; returns (tokens, significance)."""

    num_heads: int
    sr_ratio: int
    kind: str
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, height, width, significance=None, train=False):
        """Returns (tokens, the significance map a hybrid-scale block makes, else None)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        drop_path = layers.DropPath(self.drop_path_rate)
        y, made = SGAttention(self.num_heads, self.sr_ratio, self.kind, self.qkv_bias, self.attention_impl,
                              self.drop_rate, name="attn", **kw)(
            layers.layer_norm(1e-6, self.dtype, self.param_dtype, name="norm1")(x), height, width, significance, train)
        x = x + drop_path(y, train)
        y = Mlp(int(x.shape[-1] * self.mlp_ratio), self.drop_rate, name="mlp", **kw)(
            layers.layer_norm(1e-6, self.dtype, self.param_dtype, name="norm2")(x), height, width, train)
        return x + drop_path(y, train), made


class SGFormer(param_groups.LayerGroups, nn.Module):
    """SG-Former classifier; `__call__(images NHWC, train) -> (logits, intermediates)`.

    intermediates: `stages` (the four NHWC stage outputs after their LayerNorm), `significance` (the maps of the
    hybrid-scale blocks, (B, H, W) each, in order), `pre_logits` (B, C).
    """

    num_classes: int = 1000
    img_size: Any = 224
    in_chans: int = 3
    embed_dims: Sequence[int] = (64, 128, 256, 512)
    depths: Sequence[int] = (2, 4, 16, 1)
    num_heads: Sequence[int] = (2, 4, 8, 16)
    mlp_ratios: Sequence[float] = (4, 4, 4, 4)
    sr_ratios: Sequence[int] = (8, 4, 2, 1)
    qkv_bias: bool = True
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    def stage_sizes(self) -> Tuple[Tuple[int, int], ...]:
        """Returns each stage's (H, W): the stem's /4, then each patch merging's stride-2 conv (padding 1)."""
        height, width = layers.to_2tuple(self.img_size)
        height, width = _half_up(_half_up(height)), _half_up(_half_up(width))
        sizes = [(height, width)]
        for _ in self.depths[1:]:
            height, width = _half_up(height), _half_up(width)
            sizes.append((height, width))
        return tuple(sizes)

    def validate(self) -> None:
        """Raises ValueError naming the valid choices if the settings cannot build a model."""
        fields = dict(embed_dims=self.embed_dims, depths=self.depths, num_heads=self.num_heads,
                      mlp_ratios=self.mlp_ratios, sr_ratios=self.sr_ratios)
        if len({len(value) for value in fields.values()}) != 1 or not self.depths:
            raise ValueError(f"{sorted(fields)} need one entry per stage each; got {fields}")
        img = layers.to_2tuple(self.img_size)
        if img[0] != img[1] or img[0] % 4:
            raise ValueError(f"img_size must be square and a multiple of 4 (the position embedding covers the "
                             f"(img_size / 4)^2 stem tokens); got {self.img_size}")
        for stage, ((height, width), dim, heads, depth, sr) in enumerate(zip(
                self.stage_sizes(), self.embed_dims, self.num_heads, self.depths, self.sr_ratios)):
            if sr not in (1, *MERGE_RUNS):
                raise ValueError(f"sr_ratios must each be one of {[1, *MERGE_RUNS]} (the official merge layers); "
                                 f"got {self.sr_ratios}")
            if heads < 1 or dim % heads:
                raise ValueError(f"embed_dims {self.embed_dims} must split into num_heads {self.num_heads} heads")
            if sr == 1:
                continue
            if heads % 2:
                raise ValueError(f"stage {stage} (sr_ratio {sr}) splits its heads between global and local "
                                 f"attention: num_heads must be even there; got {self.num_heads}")
            if depth % 2:
                raise ValueError(f"stage {stage} (sr_ratio {sr}) alternates hybrid-scale and self-guided blocks: its "
                                 f"depth must be even; got depths {self.depths}")
            if height % WINDOW or width % WINDOW or height < sr:
                raise ValueError(f"stage {stage}'s {height}x{width} map must split into {WINDOW}x{WINDOW} windows "
                                 f"and pool by sr_ratio {sr} (img_size 224 fits the official sr_ratios)")
            segments(height * width, sr)
        layers.check_attention_impl(self.attention_impl)

    def group_matcher(self) -> param_groups.Matcher:
        """Returns timm-style group_matcher(coarse=False) over vitjax param paths (see param_groups)."""
        return dict(stem=r"^(?:patch_embed1|pos_embed)",
                    blocks=[(r"^patch_embed(\d+)", (0,)), (r"^block(\d+)_(\d+)", None),
                            (r"^norm(\d+)", (param_groups.MERGE_WITH_PREVIOUS,))])

    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns the position embedding, as the official `no_weight_decay` (its other names do not exist)."""
        return (r"^pos_embed$",)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (logits, intermediates) for NHWC `images`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch = images.shape[0]
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
        intermediates: Dict[str, Any] = {"stages": [], "significance": []}
        x, cursor = images, 0
        for stage, depth in enumerate(self.depths):
            dim = self.embed_dims[stage]
            if stage == 0:
                x = Stem(dim, name="patch_embed1", **kw)(x)
            else:
                x = PatchMerging(dim, name=f"patch_embed{stage + 1}", **kw)(x)
            height, width = x.shape[1:3]
            x = x.reshape(batch, height * width, dim)
            if stage == 0:
                pos_embed = self.param("pos_embed", layers.logical(
                    lambda key, shape, dtype: jnp.asarray(layers.posemb_sincos_2d(height, width, dim), dtype),
                    ("length", "embed")), (height * width, dim), self.param_dtype)
                x = x + pos_embed.astype(x.dtype)
            significance = None
            for j in range(depth):
                sr = self.sr_ratios[stage]
                kind = "full" if sr == 1 else ("hybrid" if j % 2 == 0 else "guided")
                x, made = Block(self.num_heads[stage], sr, kind, float(self.mlp_ratios[stage]), self.qkv_bias,
                                self.drop_rate, float(rates[cursor + j]), self.attention_impl,
                                name=f"block{stage + 1}_{j}", **kw)(x, height, width, significance, train)
                if made is not None:
                    intermediates["significance"].append(made)
                significance = made
            cursor += depth
            x = layers.layer_norm(1e-6, self.dtype, self.param_dtype, name=f"norm{stage + 1}")(x)
            x = x.reshape(batch, height, width, dim)
            intermediates["stages"].append(x)
        x = x.mean(axis=(1, 2))
        intermediates["pre_logits"] = x
        if not self.num_classes:
            return x, intermediates
        return nn.Dense(self.num_classes, kernel_init=layers.logical(layers.trunc_normal_init, ("embed", "classes")),
                        bias_init=layers.logical(nn.initializers.zeros, ("classes",)),
                        dtype=self.dtype, param_dtype=self.param_dtype, name="head")(x), intermediates


# --- registry: the official sgformer.py constructors --------------------------------------------------------------

_SGFORMERS = {  # the official names
    "sgformer_s": dict(embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16), depths=(2, 4, 16, 1)),
    "sgformer_m": dict(embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16), depths=(2, 6, 28, 2)),
    "sgformer_b": dict(embed_dims=(96, 192, 384, 768), num_heads=(4, 6, 12, 24), depths=(4, 6, 24, 2)),
}
for _name, _settings in _SGFORMERS.items():
    register_model(_name, SGFormer, family="sgformer", **_settings)
