"""Hyena N-D (Zimerman & Wolf, AISTATS 2024, "Multi-Dimensional Hyena for Spatial Inductive Bias"), as the official
Itamarzimm/HyenaND code: its DeiT models (`main.py --model deit_*_patch16_224 --method hyena2d | hyena2dattn
--hyena2d_filter --directional_mode seq`, the README's Hyena-DeiT and Hyena-DeiT hybrid), whose layers live in its
bundled timm (`timm/models/layers/hyena2d.py`, `timm/models/vision_transformer.py`).

The body is DeiT's ViT without a class token: patch embedding plus a learned position embedding, pre-norm blocks, a
final LayerNorm, and the classifier on the *first patch token* (the official `x[:, 0]` without `--use_cls_token`).
The blocks' token mixer follows `method`: `hyena2d` everywhere; `hyena2dattn` Hyena in blocks 0..depth // 2 and
attention after (the hybrid); `attnhyena2d` the reverse; `onebyone` Hyena in even blocks; `attention` none.

The 2-D Hyena operator of order N on the L x L token map: `in_proj` to (N + 1) C channels, a depthwise 3x3 conv
(`short_filter`), split into gates x_0 .. x_{N-1} and the value v; for each of the N - 1 long filters (last gate
first) v = fftconv(v * x_i) and finally y = out_proj(v * x_0). The long filters are implicit: an MLP (`implicit_filter`,
Linear layers with a shared sine activation of learned frequency `freq`) of the concatenated positional features
(`z`, learned: t, cos and -sin of 2 pi 1e-4 p / L) of each row and column gives an L x L x (N - 1) C filter, times the
decay window exp(-t_row |Xdelta_c|) exp(-t_col |Ydelta_c|) (fixed buffers here and there). `fftconv` is the
zero-padded, non-circular convolution over (2L, 2L) FFTs (`fft_mixer.fft_conv2d`), divided by 2L, plus the skip
term `v * bias`. With `directional_mode="seq"` the even blocks flip the map in both axes around the first long
convolution, so they see the opposite corner. Only the official `--hyena2d_filter` filter and the `standard` / `seq`
directions are implemented; `window_mode` is `standard` or `no`.

Parameter names follow the official state dict: `patch_embed/proj`, `pos_embed`, `blocks_{i}/{norm1, attn/{in_proj,
short_filter, filter_fn/{bias, z, freq, implicit_filter_{0,2,4,6}}, out_proj} | attn/{qkv, proj}, norm2, mlp/{fc1,
fc2}}`, `norm`, `head`. The official `pos_emb.t` and `modulation.{X,Y}deltas` buffers are recomputed here from the
configuration; the converter checks the checkpoint's against them.
"""
import math
from typing import Any, Dict, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import fft_mixer, layers, param_groups
from vitjax.models.registry import register_model

_EPS = 1e-6
METHODS = ("hyena2d", "hyena2dattn", "attnhyena2d", "onebyone", "attention")
DIRECTIONAL_MODES = ("seq", "standard")
WINDOW_MODES = ("standard", "no")
_FAST_DECAY, _SLOW_DECAY, _TARGET = 0.3, 1.5, 1e-2  # the official ExponentialModulation defaults


def block_mixers(method: str, depth: int) -> Tuple[str, ...]:
    """Returns each block's token mixer ("hyena2d" or "attention") under the official `--method` schedule."""
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; valid choices: {list(METHODS)}")
    schedule = {"hyena2dattn": lambda i: "attention" if i > depth // 2 else "hyena2d",
                "attnhyena2d": lambda i: "hyena2d" if i > depth // 2 else "attention",
                "onebyone": lambda i: "hyena2d" if i % 2 == 0 else "attention"}
    return tuple(schedule.get(method, lambda i: method)(index) for index in range(depth))


def filter_times(length: int) -> np.ndarray:
    """Returns the (L,) float32 filter times linspace(0, 1, L) (the official `pos_emb.t`)."""
    return np.linspace(0.0, 1.0, length, dtype=np.float64).astype(np.float32)


def filter_deltas(channels: int) -> np.ndarray:
    """Returns the (C,) float32 decay rates linspace(log(1e-2) / 1.5, log(1e-2) / 0.3, C) (the official
    `modulation.Xdeltas` and `Ydeltas`)."""
    return np.linspace(math.log(_TARGET) / _SLOW_DECAY, math.log(_TARGET) / _FAST_DECAY, channels,
                       dtype=np.float64).astype(np.float32)


def positional_features(length: int) -> np.ndarray:
    """Returns the (L, 3) float32 initial positional features [t, cos(2 pi f p / L), -sin(2 pi f p / L)], f = 1e-4."""
    angle = 2 * math.pi * 1e-4 * np.arange(length, dtype=np.float64) / length
    return np.stack([filter_times(length).astype(np.float64), np.cos(angle), -np.sin(angle)], -1).astype(np.float32)


class ImplicitFilter2d(nn.Module):
    """The implicit 2-D long filter (the official `HyenaFilter2d` with `hyena2d_filter`); returns
    (filter (L, L, channels), skip bias (channels,))."""

    channels: int
    length: int
    filter_order: int = 64
    window_mode: str = "standard"
    sqrt_decay: bool = False
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self) -> Tuple[jax.Array, jax.Array]:
        bias = self.param("bias", layers.logical(nn.initializers.normal(1.0), ("embed",)), (self.channels,),
                          self.param_dtype)
        z = self.param("z", lambda key, shape, dtype: jnp.asarray(positional_features(self.length), dtype),
                       (self.length, 3), self.param_dtype)
        freq = self.param("freq", nn.initializers.constant(1.0), (self.filter_order,), self.param_dtype)
        size = self.length
        features = jnp.concatenate([jnp.broadcast_to(z[:, None], (size, size, 3)),
                                    jnp.broadcast_to(z[None, :], (size, size, 3))], axis=-1).astype(jnp.float32)
        hidden = features
        for index in range(3):
            hidden = nn.Dense(self.filter_order, param_dtype=self.param_dtype, name=f"implicit_filter_{2 * index}",
                              precision=jax.lax.Precision.HIGHEST)(hidden)
            hidden = jnp.sin(freq.astype(jnp.float32) * hidden)
        kernel = nn.Dense(self.channels, use_bias=False, param_dtype=self.param_dtype, name="implicit_filter_6",
                          precision=jax.lax.Precision.HIGHEST)(hidden)
        if self.window_mode == "standard":
            times = jnp.asarray(filter_times(size))[:, None]
            deltas = jnp.abs(jnp.asarray(filter_deltas(self.channels)))
            decay = jnp.exp(-times * deltas)[:, None, :] * jnp.exp(-times * deltas)[None, :, :]
            kernel = kernel * (decay ** 0.5 if self.sqrt_decay else decay)
        return kernel, bias.astype(jnp.float32)


class HyenaOperator2d(nn.Module):
    """The 2-D Hyena operator of `order` on NHWC tokens (square maps of side `length`); returns the same shape."""

    length: int
    order: int = 2
    filter_order: int = 64
    directional_mode: str = "standard"  # "seq": flip the map around the first long convolution
    window_mode: str = "standard"
    sqrt_decay: bool = False
    drop_rate: float = 0.0
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        channels = x.shape[-1]
        inner = channels * (self.order + 1)
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, kernel_init=layers.logical(layers.trunc_normal_init, ("embed", "mlp")),
            bias_init=layers.logical(nn.initializers.zeros, ("mlp",)), dtype=self.dtype,
            param_dtype=self.param_dtype, name=name)
        u = dense(inner, "in_proj")(x)
        u = nn.Conv(inner, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=inner,
                    kernel_init=layers.logical(layers.trunc_normal_init, (None, None, None, "mlp")),
                    bias_init=layers.logical(nn.initializers.zeros, ("mlp",)), dtype=self.dtype,
                    param_dtype=self.param_dtype, name="short_filter")(u)
        *gates, value = jnp.split(u, self.order + 1, axis=-1)
        kernels, biases = ImplicitFilter2d(channels * (self.order - 1), self.length, self.filter_order,
                                           self.window_mode, self.sqrt_decay, self.param_dtype, name="filter_fn")()
        kernels = kernels / (2 * self.length)  # the official rfft2(k) / fft_size
        dropout = nn.Dropout(self.drop_rate)
        for step, gate in enumerate(reversed(gates[1:])):
            value = dropout(value * gate, deterministic=not train)
            flip = self.directional_mode == "seq" and step == 0
            if flip:
                value = value[:, ::-1, ::-1]
            part = slice(step * channels, (step + 1) * channels)
            value = fft_mixer.fft_conv2d(value, kernels[..., part]) + value * biases[part].astype(value.dtype)
            if flip:
                value = value[:, ::-1, ::-1]
        return dense(channels, "out_proj")(value * gates[0])


class HyenaBlock(nn.Module):
    """A DeiT block whose mixer is `HyenaOperator2d` (`mixer="hyena2d"`) or the shared attention; (B, N, C) tokens."""

    mixer: str
    num_heads: int
    grid: int
    mlp_ratio: float = 4.0
    order: int = 2
    filter_order: int = 64
    directional_mode: str = "standard"
    window_mode: str = "standard"
    sqrt_decay: bool = False
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        batch, tokens, channels = x.shape
        drop_path = layers.DropPath(self.drop_path_rate)
        y = layers.layer_norm(_EPS, self.dtype, self.param_dtype, name="norm1")(x)
        if self.mixer == "hyena2d":
            y = HyenaOperator2d(self.grid, self.order, self.filter_order, self.directional_mode, self.window_mode,
                                self.sqrt_decay, self.drop_rate, self.dtype, self.param_dtype, name="attn")(
                y.reshape(batch, self.grid, self.grid, channels), train).reshape(x.shape)
        else:
            y, _ = layers.Attention(self.num_heads, qkv_bias=True, proj_drop_rate=self.drop_rate,
                                    attention_impl=self.attention_impl, dtype=self.dtype,
                                    param_dtype=self.param_dtype, name="attn")(y, train=train)
        x = x + drop_path(y, train)
        y = layers.Mlp(int(channels * self.mlp_ratio), drop_rate=self.drop_rate, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="mlp")(
            layers.layer_norm(_EPS, self.dtype, self.param_dtype, name="norm2")(x), train)
        return x + drop_path(y, train)


class HyenaViT(param_groups.LayerGroups, nn.Module):
    """Hyena N-D DeiT classifier; `__call__(images NHWC, train) -> (logits, intermediates)`.

    intermediates: `tokens` (B, N, C) after the final norm, `pre_logits` (B, C) the first token.
    """

    num_classes: int = 1000
    img_size: Union[int, Tuple[int, int]] = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    method: str = "hyena2d"
    order: int = 2
    filter_order: int = 64
    directional_mode: str = "seq"
    window_mode: str = "standard"
    sqrt_decay: bool = False
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    def validate(self) -> None:
        """Raises ValueError naming the valid choices if the settings cannot build a model."""
        mixers = block_mixers(self.method, self.depth)
        rows, cols = layers.to_2tuple(self.img_size)
        if rows != cols or rows % self.patch_size or rows < self.patch_size:
            raise ValueError(f"img_size {self.img_size} must be square and a positive multiple of patch_size "
                             f"{self.patch_size} (the Hyena filters cover a square token map)")
        if self.directional_mode not in DIRECTIONAL_MODES:
            raise ValueError(f"Unknown directional_mode {self.directional_mode!r}; valid choices: "
                             f"{list(DIRECTIONAL_MODES)}")
        if self.window_mode not in WINDOW_MODES:
            raise ValueError(f"Unknown window_mode {self.window_mode!r}; valid choices: {list(WINDOW_MODES)}")
        if self.order < 2:
            raise ValueError(f"order must be at least 2 (one long convolution per order above 1); got {self.order}")
        if "attention" in mixers and (self.num_heads < 1 or self.embed_dim % self.num_heads):
            raise ValueError(f"num_heads={self.num_heads} must divide embed_dim={self.embed_dim}")
        layers.check_attention_impl(self.attention_impl)

    def group_matcher(self) -> param_groups.Matcher:
        """Returns timm-style group_matcher(coarse=False) over vitjax param paths (see param_groups)."""
        return dict(stem=r"^(?:patch_embed|pos_embed)", blocks=[(r"^blocks_(\d+)", None), (r"^norm", (99999,))])

    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns the regexes of the official no_weight_decay ({pos_embed, cls_token, dist_token})."""
        return (r"^pos_embed$",)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (logits, intermediates) for NHWC `images`."""
        x, (rows, cols) = layers.PatchEmbed(self.patch_size, self.embed_dim, dtype=self.dtype,
                                            param_dtype=self.param_dtype, name="patch_embed")(images)
        grid = layers.to_2tuple(self.img_size)[0] // self.patch_size
        if (rows, cols) != (grid, grid):
            raise ValueError(f"Input {images.shape[1:3]} gives a {rows}x{cols} token map; the model (img_size "
                             f"{self.img_size}) has filters and position embeddings for {grid}x{grid}")
        pos_embed = self.param("pos_embed", layers.logical(nn.initializers.truncated_normal(0.02),
                                                           (None, "length", "embed")),
                               (1, rows * cols, self.embed_dim), self.param_dtype)
        x = nn.Dropout(self.drop_rate)(x + pos_embed.astype(x.dtype), deterministic=not train)
        rates = np.linspace(0.0, self.drop_path_rate, self.depth)
        for index, mixer in enumerate(block_mixers(self.method, self.depth)):
            direction = self.directional_mode
            if direction == "seq" and index % 2:
                direction = "standard"
            x = HyenaBlock(mixer, self.num_heads, grid, self.mlp_ratio, self.order, self.filter_order, direction,
                           self.window_mode, self.sqrt_decay, self.drop_rate, float(rates[index]),
                           self.attention_impl, self.dtype, self.param_dtype, name=f"blocks_{index}")(x, train)
        x = layers.layer_norm(_EPS, self.dtype, self.param_dtype, name="norm")(x)
        intermediates = {"tokens": x, "pre_logits": x[:, 0]}
        if not self.num_classes:
            return x[:, 0], intermediates
        return layers.classifier_head(self.num_classes, False, self.dtype, self.param_dtype)(x[:, 0]), intermediates


# --- registry: the official DeiT names under the README's two methods ---------------------------------------------

# Preprocessing: main.py's evaluation (bicubic resize, centre crop 0.875, ImageNet mean and std), the default cfg.
_SIZES = {"tiny": dict(embed_dim=192, num_heads=3), "small": dict(embed_dim=384, num_heads=6),
          "base": dict(embed_dim=768, num_heads=12)}
for _method in ("hyena2d", "hyena2dattn"):
    for _size, _settings in _SIZES.items():
        register_model(f"{_method}_deit_{_size}_patch16_224", HyenaViT, family="hyena_nd", method=_method,
                       **_settings)
