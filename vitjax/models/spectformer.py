"""SpectFormer (Patro, Namboodiri & Agneeswaran, 2023, "SpectFormer: Frequency and Attention is what you need in a
Vision Transformer"), as the official badripatro/SpectFormers code: both of its architectures.

**Vanilla** (`SpectFormer`, `vanilla_architecture/spectformer.py`, built by `main_spectformer.py --arch
spectformer-{xs,ti,s,b}`): a 16 px patch embedding plus a learned position embedding (no class token), then
`spectral_depth` (4) spectral blocks and attention blocks for the rest, a final LayerNorm, the mean over tokens and
the head. A spectral block is `x + MLP(LN2(gate(LN1(x))))` (GFNet's block: no residual around the gate alone), the
gate the ortho rfft2 of the token map times a learned complex filter of the (H, W // 2 + 1) grid
(`fft_mixer.GlobalFilter`); an attention block is the pre-norm ViT block through the shared attention.

*The official attention blocks hardcode 6 heads* (`num_heads= 6 # 4 for tiny, 6 for small and 12 for base`), whatever
the width. The registered `spectformer-xs` / `spectformer-s` (width 384) keep those 6 heads, as the code runs; at the
widths 256 (`-ti`) and 512 (`-b`) 6 heads do not divide the width and the official model fails at its first
attention block, so those register the head width 64 of the others (4 and 8 heads). `num_heads` overrides it; the
parameter count does not depend on it.

**Hierarchical** (`HierarchicalSpectFormer`, `hierarchical_architecture/spectformer.py`, timm names
`spectformer_{s,b,l}`): a conv stem (7x7 stride 2, two 3x3, each with BatchNorm + ReLU, then a 3x3 stride-2 conv and
LayerNorm), four stages each opened (after the first) by a 3x3 stride-2 conv + LayerNorm, blocks
`x + mixer(LN1(x))`, `x + FFN(LN2(x))` where the FFN adds a depthwise 3x3 conv after fc1 (PVTv2's), the mixer the
spectral gate in stages 1-2 and multi-head attention (separate q and kv projections) in stages 3-4; each stage but
the last ends in a LayerNorm. After the last stage a class token (the mean of the tokens) is prepended and one
class-attention block (CaiT's: only the class token attends and is updated) runs; the final LayerNorm covers all
tokens. The official evaluation output, which is what this model returns, is `head(cls) + 0.5 * max over tokens of
aux_head(token)` (the token-labelling head); intermediates give `cls_logits` and `aux_logits` separately. Token
labelling's MixToken and dense targets are not implemented here. The official filter sizes are fixed per width
(56 x 29 at widths 64 / 96, 28 x 15 at 128 / 192: a 224 px input); here they follow `img_size`.

Parameter names follow the official state dicts: vanilla `patch_embed/proj`, `pos_embed`, `blocks_{i}/{norm1,
filter/complex_weight | attn/{qkv, proj}, norm2, mlp/{fc1, fc2}}`, `norm`, `head`; hierarchical
`patch_embed1_conv_{0,1,3,4,6,7}` (the stem's convs and BatchNorms), `patch_embed{i}_{proj, norm}`,
`block{i}_{j}/{norm1, attn/{complex_weight | q, kv, proj}, norm2, mlp/{fc1, dwconv, fc2}}`, `norm{i}`,
`post_network_0/{norm1, q, kv, proj, norm2, fc1, fc2}`, `head`, `aux_head`.
"""
from typing import Any, Dict, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import fft_mixer, layers, param_groups
from vitjax.models.registry import register_model

_EPS = 1e-6  # the official blocks' and final norms' (partial(nn.LayerNorm, eps=1e-6))
_TORCH_EPS = 1e-5  # the hierarchical stem's and downsamplings' nn.LayerNorm(out_channels)


def _dense(module: nn.Module, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=layers.logical(layers.trunc_normal_init, ("embed", "mlp")),
                    bias_init=layers.logical(nn.initializers.zeros, ("mlp",)),
                    dtype=module.dtype, param_dtype=module.param_dtype, name=name)


def _conv(module: nn.Module, features: int, kernel: int, stride: int, name: str, use_bias: bool = True,
          groups: int = 1) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   feature_group_count=groups, use_bias=use_bias,
                   kernel_init=layers.logical(layers.trunc_normal_init, (None, None, None, "embed")),
                   bias_init=layers.logical(nn.initializers.zeros, ("embed",)),
                   dtype=module.dtype, param_dtype=module.param_dtype, name=name)


def _heads(module: nn.Module, x: jax.Array, num_heads: int, name: str, parts: int = 1) -> jax.Array:
    """Returns a Dense `name` of x as (B, N, parts, heads, head_dim) (the official reshape of q / kv / qkv)."""
    channels = x.shape[-1]
    out = _dense(module, parts * channels, name)(x)
    return out.reshape(*x.shape[:-1], parts, num_heads, channels // num_heads)


class SpectralBlock(nn.Module):
    """The vanilla SpectFormer spectral block: x + MLP(LN2(gate(LN1(x)))) on NHWC tokens."""

    filter_size: Tuple[int, int]
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = layers.layer_norm(_EPS, self.dtype, self.param_dtype, name="norm1")(x)
        y = fft_mixer.GlobalFilter(tuple(self.filter_size), name="filter")(y)
        y = layers.layer_norm(_EPS, self.dtype, self.param_dtype, name="norm2")(y)
        y = layers.Mlp(int(x.shape[-1] * self.mlp_ratio), drop_rate=self.drop_rate, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="mlp")(y, train)
        return x + layers.DropPath(self.drop_path_rate)(y, train)


class AttentionBlock(nn.Module):
    """The vanilla SpectFormer attention block (pre-norm ViT block with the shared attention) on (B, N, C) tokens."""

    num_heads: int
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        drop_path = layers.DropPath(self.drop_path_rate)
        y, _ = layers.Attention(self.num_heads, qkv_bias=True, attn_drop_rate=self.drop_rate,
                                proj_drop_rate=self.drop_rate, attention_impl=self.attention_impl, dtype=self.dtype,
                                param_dtype=self.param_dtype, name="attn")(
            layers.layer_norm(_EPS, self.dtype, self.param_dtype, name="norm1")(x), train=train)
        x = x + drop_path(y, train)
        y = layers.Mlp(int(x.shape[-1] * self.mlp_ratio), drop_rate=self.drop_rate, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="mlp")(
            layers.layer_norm(_EPS, self.dtype, self.param_dtype, name="norm2")(x), train)
        return x + drop_path(y, train)


class SpectFormer(param_groups.LayerGroups, nn.Module):
    """Vanilla SpectFormer classifier; `__call__(images NHWC, train) -> (logits, intermediates)`.

    intermediates: `tokens` (B, N, C) after the final norm, `pre_logits` (B, C) their mean.
    """

    num_classes: int = 1000
    img_size: Union[int, Tuple[int, int]] = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 384
    depth: int = 12
    spectral_depth: int = 4  # the official `alpha`: the first blocks are spectral
    num_heads: int = 6  # the official hardcoded value (see the module docstring)
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    def validate(self) -> None:
        """Raises ValueError naming the valid choices if the settings cannot build a model."""
        img = layers.to_2tuple(self.img_size)
        if min(img) < self.patch_size or any(side % self.patch_size for side in img):
            raise ValueError(f"img_size {self.img_size} must be a positive multiple of patch_size {self.patch_size}")
        if not 0 <= self.spectral_depth <= self.depth:
            raise ValueError(f"spectral_depth must be in [0, depth={self.depth}]; got {self.spectral_depth}")
        if self.spectral_depth < self.depth and (self.num_heads < 1 or self.embed_dim % self.num_heads):
            valid = [heads for heads in range(1, self.embed_dim + 1) if self.embed_dim % heads == 0][:12]
            raise ValueError(f"num_heads={self.num_heads} does not divide embed_dim={self.embed_dim}; valid choices "
                             f"include {valid}")
        layers.check_attention_impl(self.attention_impl)

    def group_matcher(self) -> param_groups.Matcher:
        """Returns timm-style group_matcher(coarse=False) over vitjax param paths (see param_groups)."""
        return dict(stem=r"^(?:patch_embed|pos_embed)", blocks=[(r"^blocks_(\d+)", None), (r"^norm", (99999,))])

    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns the regexes of the official no_weight_decay ({pos_embed, cls_token}): the position embedding."""
        return (r"^pos_embed$",)

    def grid(self) -> Tuple[int, int]:
        """Returns the (rows, cols) of the token map at img_size."""
        img = layers.to_2tuple(self.img_size)
        return img[0] // self.patch_size, img[1] // self.patch_size

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (logits, intermediates) for NHWC `images`."""
        x, (rows, cols) = layers.PatchEmbed(self.patch_size, self.embed_dim, dtype=self.dtype,
                                            param_dtype=self.param_dtype, name="patch_embed")(images)
        if (rows, cols) != self.grid():
            raise ValueError(f"Input {images.shape[1:3]} gives a {rows}x{cols} token map; the model (img_size "
                             f"{self.img_size}) has filters and position embeddings for {self.grid()}")
        pos_embed = self.param("pos_embed", layers.logical(nn.initializers.truncated_normal(0.02),
                                                           (None, "length", "embed")),
                               (1, rows * cols, self.embed_dim), self.param_dtype)
        x = nn.Dropout(self.drop_rate)(x + pos_embed.astype(x.dtype), deterministic=not train)
        rates = np.linspace(0.0, self.drop_path_rate, self.depth)
        filter_size = fft_mixer.rfft_grid(rows, cols)
        for index in range(self.depth):
            if index < self.spectral_depth:
                grid = x.reshape(x.shape[0], rows, cols, self.embed_dim)
                x = SpectralBlock(filter_size, self.mlp_ratio, self.drop_rate, float(rates[index]), self.dtype,
                                  self.param_dtype, name=f"blocks_{index}")(grid, train).reshape(x.shape)
            else:
                x = AttentionBlock(self.num_heads, self.mlp_ratio, self.drop_rate, float(rates[index]),
                                   self.attention_impl, self.dtype, self.param_dtype, name=f"blocks_{index}")(x, train)
        x = layers.layer_norm(_EPS, self.dtype, self.param_dtype, name="norm")(x)
        pooled = x.mean(axis=1)
        intermediates = {"tokens": x, "pre_logits": pooled}
        if not self.num_classes:
            return pooled, intermediates
        return layers.classifier_head(self.num_classes, False, self.dtype, self.param_dtype)(pooled), intermediates


# --- the hierarchical architecture -------------------------------------------------------------------------------

class PVTFeedForward(nn.Module):
    """fc1, depthwise 3x3 conv (with bias), GELU, fc2 on NHWC tokens (PVTv2's FFN, the official `PVT2FFN`)."""

    hidden: int
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        y = _dense(self, self.hidden, "fc1")(x)
        y = _conv(self, self.hidden, 3, 1, "dwconv", groups=self.hidden)(y)
        return _dense(self, channels, "fc2")(layers.gelu(y))


class QKVAttention(nn.Module):
    """Multi-head self-attention with separate `q` and `kv` projections (the official hierarchical `Attention`),
    through the shared attention; on (B, N, C) tokens."""

    num_heads: int
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        query = _heads(self, x, self.num_heads, "q")[:, :, 0]
        kv = _heads(self, x, self.num_heads, "kv", parts=2)
        out, _ = layers.multihead_attention(query, kv[:, :, 0], kv[:, :, 1], impl=self.attention_impl)
        return _dense(self, x.shape[-1], "proj")(out.reshape(x.shape))


class HierarchicalBlock(nn.Module):
    """x + mixer(LN1(x)), x + FFN(LN2(x)) on NHWC tokens: the mixer the spectral gate or `QKVAttention`."""

    num_heads: int
    mlp_ratio: float
    spectral: bool
    filter_size: Tuple[int, int] = (0, 0)
    drop_path_rate: float = 0.0
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        batch, height, width, channels = x.shape
        drop_path = layers.DropPath(self.drop_path_rate)
        y = layers.layer_norm(_EPS, self.dtype, self.param_dtype, name="norm1")(x)
        if self.spectral:
            y = fft_mixer.GlobalFilter(tuple(self.filter_size), name="attn")(y)
        else:
            y = QKVAttention(self.num_heads, self.attention_impl, self.dtype, self.param_dtype, name="attn")(
                y.reshape(batch, height * width, channels)).reshape(x.shape)
        x = x + drop_path(y, train)
        y = PVTFeedForward(int(channels * self.mlp_ratio), self.dtype, self.param_dtype, name="mlp")(
            layers.layer_norm(_EPS, self.dtype, self.param_dtype, name="norm2")(x))
        return x + drop_path(y, train)


class ClassBlock(nn.Module):
    """CaiT's class-attention block on (B, 1 + N, C): the class token (first) attends to all tokens; returns the
    tokens with the class token updated."""

    num_heads: int
    mlp_ratio: float
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        cls = x[:, :1]
        normed = layers.layer_norm(_EPS, self.dtype, self.param_dtype, name="norm1")(x)
        query = _heads(self, normed[:, :1], self.num_heads, "q")[:, :, 0]
        kv = _heads(self, normed, self.num_heads, "kv", parts=2)
        out, _ = layers.multihead_attention(query, kv[:, :, 0], kv[:, :, 1], impl=self.attention_impl)
        cls = cls + _dense(self, channels, "proj")(out.reshape(cls.shape))
        hidden = layers.layer_norm(_EPS, self.dtype, self.param_dtype, name="norm2")(cls)
        hidden = _dense(self, int(channels * self.mlp_ratio), "fc1")(hidden)
        cls = cls + _dense(self, channels, "fc2")(layers.gelu(hidden))
        return jnp.concatenate([cls, x[:, 1:]], axis=1)


class HierarchicalSpectFormer(param_groups.LayerGroups, nn.Module):
    """Hierarchical SpectFormer classifier; `__call__(images NHWC, train) -> (logits, intermediates)`.

    intermediates: `stages` (the NHWC stage outputs, normed as the next stage sees them), `cls_logits`, `aux_logits`
    (B, N, classes), `pre_logits` (B, C) the normed class token.
    """

    num_classes: int = 1000
    img_size: Union[int, Tuple[int, int]] = 224
    in_chans: int = 3
    stem_hidden_dim: int = 32
    embed_dims: Sequence[int] = (64, 128, 320, 448)
    num_heads: Sequence[int] = (2, 4, 10, 14)
    mlp_ratios: Sequence[float] = (8, 8, 4, 4)
    depths: Sequence[int] = (3, 4, 6, 3)
    spectral_stages: int = 2  # the official `'wave' if i < 2 else 'std_att'`
    token_label: bool = True  # the aux head and the official eval output head(cls) + 0.5 * max(aux_head(tokens))
    drop_path_rate: float = 0.0
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    def validate(self) -> None:
        """Raises ValueError naming the valid choices if the settings cannot build a model."""
        fields = dict(embed_dims=self.embed_dims, num_heads=self.num_heads, mlp_ratios=self.mlp_ratios,
                      depths=self.depths)
        if len({len(value) for value in fields.values()}) != 1 or not self.depths:
            raise ValueError(f"{sorted(fields)} need one entry per stage each; got {fields}")
        if not 0 <= self.spectral_stages < len(self.depths):
            raise ValueError(f"spectral_stages must be in [0, {len(self.depths) - 1}] (the last stage attends, its "
                             f"class block too); got {self.spectral_stages}")
        for dim, heads in zip(self.embed_dims, self.num_heads):
            if heads < 1 or dim % heads:
                raise ValueError(f"Each embed_dim must be divisible by its num_heads; got embed_dims "
                                 f"{self.embed_dims}, num_heads {self.num_heads}")
        img = layers.to_2tuple(self.img_size)
        if min(img) < 4 * 2 ** (len(self.depths) - 1):
            raise ValueError(f"img_size {self.img_size} must be at least {4 * 2 ** (len(self.depths) - 1)} "
                             f"(the stem's stride 4 and a stride 2 per later stage)")
        layers.check_attention_impl(self.attention_impl)

    def group_matcher(self) -> param_groups.Matcher:
        """Returns timm-style group_matcher(coarse=False) over vitjax param paths (see param_groups)."""
        return dict(stem=r"^patch_embed1_",  # one group per stage: its downsampling, blocks and norm
                    blocks=[(r"^(?:patch_embed|block|norm)(\d+)", None), (r"^post_network", (99999,))])

    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns no regex: the official model declares no no_weight_decay (timm's optimizer then exempts only
        biases and norm scales, the trainer's default)."""
        return ()

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (logits, intermediates) for NHWC `images`."""
        x = images
        hidden = self.stem_hidden_dim
        for index, (kernel, stride) in enumerate(((7, 2), (3, 1), (3, 1))):
            x = _conv(self, hidden, kernel, stride, f"patch_embed1_conv_{3 * index}", use_bias=False)(x)
            x = jax.nn.relu(layers.batch_norm(train, dtype=self.dtype, param_dtype=self.param_dtype,
                                              name=f"patch_embed1_conv_{3 * index + 1}")(x))
        stages = len(self.depths)
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
        intermediates: Dict[str, Any] = {"stages": []}
        cursor = 0
        for stage in range(stages):
            x = _conv(self, self.embed_dims[stage], 3, 2, f"patch_embed{stage + 1}_proj")(x)
            x = layers.layer_norm(_TORCH_EPS, self.dtype, self.param_dtype, name=f"patch_embed{stage + 1}_norm")(x)
            spectral = stage < self.spectral_stages
            filter_size = fft_mixer.rfft_grid(*x.shape[1:3]) if spectral else (0, 0)
            for index in range(self.depths[stage]):
                x = HierarchicalBlock(self.num_heads[stage], float(self.mlp_ratios[stage]), spectral, filter_size,
                                      float(rates[cursor + index]), self.attention_impl, self.dtype,
                                      self.param_dtype, name=f"block{stage + 1}_{index}")(x, train)
            cursor += self.depths[stage]
            if stage < stages - 1:
                x = layers.layer_norm(_EPS, self.dtype, self.param_dtype, name=f"norm{stage + 1}")(x)
            intermediates["stages"].append(x)
        tokens = x.reshape(x.shape[0], -1, x.shape[-1])
        tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
        tokens = ClassBlock(self.num_heads[-1], float(self.mlp_ratios[-1]), self.attention_impl, self.dtype,
                            self.param_dtype, name="post_network_0")(tokens)
        tokens = layers.layer_norm(_EPS, self.dtype, self.param_dtype, name=f"norm{stages}")(tokens)
        intermediates["pre_logits"] = tokens[:, 0]
        if not self.num_classes:
            return tokens[:, 0], intermediates
        logits = layers.classifier_head(self.num_classes, False, self.dtype, self.param_dtype)(tokens[:, 0])
        intermediates["cls_logits"] = logits
        if self.token_label:
            aux = layers.classifier_head(self.num_classes, False, self.dtype, self.param_dtype,
                                         name="aux_head")(tokens[:, 1:])
            intermediates["aux_logits"] = aux
            logits = logits + 0.5 * aux.max(axis=1)
        return logits, intermediates


# --- registry ---------------------------------------------------------------------------------------------------

_VANILLA = {  # the official --arch names of main_spectformer.py
    "spectformer-xs": dict(embed_dim=384, depth=12),
    "spectformer-ti": dict(embed_dim=256, depth=12, num_heads=4),  # 6 heads do not divide 256 (see above)
    "spectformer-s": dict(embed_dim=384, depth=19, drop_path_rate=0.15),
    "spectformer-b": dict(embed_dim=512, depth=19, drop_path_rate=0.25, num_heads=8),  # nor 512
}
_HIERARCHICAL = {  # the official timm-registered names
    "spectformer_s": dict(stem_hidden_dim=32, embed_dims=(64, 128, 320, 448), num_heads=(2, 4, 10, 14),
                          mlp_ratios=(8, 8, 4, 4), depths=(3, 4, 6, 3)),
    "spectformer_b": dict(stem_hidden_dim=64, embed_dims=(64, 128, 320, 512), num_heads=(2, 4, 10, 16),
                          mlp_ratios=(8, 8, 4, 4), depths=(3, 4, 12, 3)),
    "spectformer_l": dict(stem_hidden_dim=64, embed_dims=(96, 192, 384, 512), num_heads=(3, 6, 12, 16),
                          mlp_ratios=(8, 8, 4, 4), depths=(3, 6, 18, 3)),
}
# Preprocessing: the official datasets.py evaluation (bicubic resize, centre crop, ImageNet mean and std): crop 224 of
# 256 in the vanilla code, of int(224 / 0.96) = 233 in the hierarchical code.
for _name, _settings in _VANILLA.items():
    register_model(_name, SpectFormer, family="spectformer", **_settings)
for _name, _settings in _HIERARCHICAL.items():
    register_model(_name, HierarchicalSpectFormer, family="spectformer", pretrained_cfg=dict(crop_pct=0.96),
                   **_settings)
