"""RMT (Fan et al., CVPR 2024, "RMT: Retentive Networks Meet Vision Transformers"), as the official qhfan/RMT
`classfication_release/RMT.py` (`VisRetNet`).

A four-stage pyramid on a conv stem (four 3x3 convs with BatchNorm, stride 4 in all) with 3x3 stride-2 conv +
BatchNorm downsampling. Each block adds a depthwise 3x3 conv position encoding, then Manhattan self-attention (MaSA)
and a feed-forward network whose hidden layer adds a depthwise 3x3 conv of itself. MaSA rotates queries and keys by
position (xPos-style angles over the row-major token index) and adds the spatial decay mask
`|dh| + |dw|` times a per-head log decay `log(1 - 2^(-init - range * h / heads))` to the attention logits, then
adds LCE (a depthwise 5x5 conv of the values) to the output. Early stages (`decomposed`) attend along each row,
then along each column, with the 1-D decay `|dw|` then `|dh|`; later stages attend over the whole map with the 2-D
mask. The masks go to the shared attention as an additive `bias`, so every `attention_impl` runs them. The head is
Linear to `projection` (1024) channels, BatchNorm, swish, average pooling and the classifier.

Parameter names follow the official state dict: `patch_embed_proj_{0,1,3,4,6,7,9,10}` (convs and BatchNorms),
`layers_{i}/blocks_{j}/{pos, retention_layer_norm, retention/{q_proj, k_proj, v_proj, lepe, out_proj},
final_layer_norm, ffn/{fc1, dwconv, fc2}, gamma_1, gamma_2}`, `layers_{i}/downsample_{reduction, norm}`, `proj`,
`norm`, `head`. The official angle and decay buffers are recomputed here from the configuration (in float64, rounded
to float32); the converter checks the checkpoint's against them.
"""
from typing import Any, Dict, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import layers, param_groups
from vitjax.models.registry import register_model

_EPS = 1e-6  # the official LayerNorms'; its BatchNorms keep torch's 1e-5


def _norm(module: nn.Module, name: str) -> nn.LayerNorm:
    return layers.layer_norm(_EPS, module.dtype, module.param_dtype, name=name)


def _dense(module: nn.Module, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=layers.logical(layers.trunc_normal_init, ("embed", "mlp")),
                    bias_init=layers.logical(nn.initializers.zeros, ("mlp",)),
                    dtype=module.dtype, param_dtype=module.param_dtype, name=name)


def _conv(module: nn.Module, features: int, kernel: int, stride: int, name: str, depthwise: bool = False) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   feature_group_count=features if depthwise else 1,
                   kernel_init=layers.logical(layers.trunc_normal_init, (None, None, None, "embed")),
                   bias_init=layers.logical(nn.initializers.zeros, ("embed",)),
                   dtype=module.dtype, param_dtype=module.param_dtype, name=name)


def retention_angle(key_dim: int) -> np.ndarray:
    """Returns the (key_dim,) float32 rotation frequencies 1 / 10000^linspace(0, 1, key_dim / 2), each twice."""
    angle = 1.0 / 10000.0 ** np.linspace(0.0, 1.0, key_dim // 2)
    return np.repeat(angle, 2).astype(np.float32)


def retention_decay(num_heads: int, init_value: float, heads_range: float) -> np.ndarray:
    """Returns the (num_heads,) float32 log decays log(1 - 2^(-init - range * h / num_heads))."""
    exponent = -init_value - heads_range * np.arange(num_heads, dtype=np.float64) / num_heads
    return np.log(1.0 - 2.0 ** exponent).astype(np.float32)


def rotation(height: int, width: int, key_dim: int) -> Tuple[np.ndarray, np.ndarray]:
    """Returns (sin, cos), each (height, width, key_dim) float64, of the row-major token index times the (float32)
    angles; the model casts them to its dtype."""
    angles = np.arange(height * width, dtype=np.float64)[:, None] * retention_angle(key_dim).astype(np.float64)
    shape = (height, width, key_dim)
    return np.sin(angles).reshape(shape), np.cos(angles).reshape(shape)


def decay_mask_1d(length: int, decay: np.ndarray) -> np.ndarray:
    """Returns the (heads, length, length) bias |i - j| * decay[h] (decay's dtype)."""
    index = np.arange(length, dtype=decay.dtype)
    return np.abs(index[:, None] - index[None, :])[None] * decay[:, None, None]


def decay_mask_2d(height: int, width: int, decay: np.ndarray) -> np.ndarray:
    """Returns the (heads, H * W, H * W) bias (|dh| + |dw|) * decay[h] over row-major tokens (decay's dtype)."""
    grid = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing="ij"), -1).reshape(-1, 2)
    distance = np.abs(grid[:, None, :] - grid[None, :, :]).sum(-1).astype(decay.dtype)
    return distance[None] * decay[:, None, None]


def _rotate(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotates each (even, odd) channel pair of x (B, H, W, heads, D) by the position's angle."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class ManhattanSelfAttention(nn.Module):
    """MaSA on an NHWC map: whole-map attention with the 2-D decay, or (`decomposed`) along rows then columns with
    the 1-D decays; plus LCE, a depthwise 5x5 conv of the values. Returns the same shape."""

    num_heads: int
    init_value: float
    heads_range: float
    decomposed: bool
    attention_impl: str = "xla"
    attn_drop_rate: float = 0.0  # the official code has none; `layers.attend` reads it
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        batch, height, width, channels = x.shape
        heads, key_dim = self.num_heads, channels // self.num_heads
        query = _dense(self, channels, "q_proj")(x)
        key = _dense(self, channels, "k_proj")(x)
        value = _dense(self, channels, "v_proj")(x)
        lepe = _conv(self, channels, 5, 1, "lepe", depthwise=True)(value)
        sin, cos = (jnp.asarray(table, x.dtype) for table in rotation(height, width, key_dim))
        # The shared attention scales q.k by key_dim^-0.5, the official `k *= scaling` (rotation is linear).
        query = _rotate(query.reshape(batch, height, width, heads, key_dim), sin, cos)
        key = _rotate(key.reshape(batch, height, width, heads, key_dim), sin, cos)
        value = value.reshape(batch, height, width, heads, key_dim)
        decay = retention_decay(heads, self.init_value, self.heads_range)
        bias_dtype = jnp.promote_types(x.dtype, jnp.float32)  # decays of far tokens need more than bf16's 8 bits
        if self.decomposed:
            def rows(t):  # (B, H, W, heads, D) -> (B * H, W, heads, D)
                return t.reshape(batch * height, width, heads, -1)

            out, _ = layers.attend(self, rows(query), rows(key), rows(value), train=train,
                                   bias=jnp.asarray(decay_mask_1d(width, decay), bias_dtype)[None])
            out = out.reshape(batch, height, width, heads, key_dim)

            def columns(t):  # (B, H, W, heads, D) -> (B * W, H, heads, D)
                return jnp.swapaxes(t, 1, 2).reshape(batch * width, height, heads, -1)

            out, _ = layers.attend(self, columns(query), columns(key), columns(out), train=train,
                                   bias=jnp.asarray(decay_mask_1d(height, decay), bias_dtype)[None])
            out = jnp.swapaxes(out.reshape(batch, width, height, channels), 1, 2)
        else:
            def tokens(t):  # (B, H, W, heads, D) -> (B, H * W, heads, D)
                return t.reshape(batch, height * width, heads, -1)

            out, _ = layers.attend(self, tokens(query), tokens(key), tokens(value), train=train,
                                   bias=jnp.asarray(decay_mask_2d(height, width, decay), bias_dtype)[None])
            out = out.reshape(batch, height, width, channels)
        return _dense(self, channels, "out_proj")(out + lepe)


class FeedForward(nn.Module):
    """fc1, GELU, plus a depthwise 3x3 conv of itself, fc2; NHWC in and out."""

    hidden: int
    drop_rate: float = 0.0
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        channels = x.shape[-1]
        x = layers.gelu(_dense(self, self.hidden, "fc1")(x))
        x = x + _conv(self, self.hidden, 3, 1, "dwconv", depthwise=True)(x)
        x = _dense(self, channels, "fc2")(x)
        return nn.Dropout(self.drop_rate)(x, deterministic=not train)


class RetBlock(nn.Module):
    """Depthwise 3x3 conv position encoding, then LayerNorm + MaSA and LayerNorm + FFN (layer scales optional)."""

    num_heads: int
    init_value: float
    heads_range: float
    decomposed: bool
    hidden: int
    layer_scale: float = 0.0  # 0: none, else the layer scales' initial value
    drop_path_rate: float = 0.0
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        channels = x.shape[-1]
        drop_path = layers.DropPath(self.drop_path_rate)
        x = x + _conv(self, channels, 3, 1, "pos", depthwise=True)(x)
        y = ManhattanSelfAttention(self.num_heads, self.init_value, self.heads_range, self.decomposed,
                                   self.attention_impl, 0.0, self.dtype, self.param_dtype,
                                   name="retention")(_norm(self, "retention_layer_norm")(x), train)
        if self.layer_scale:
            y = layers.LayerScale(self.layer_scale, self.param_dtype, name="gamma_1")(y)
        x = x + drop_path(y, train)
        y = FeedForward(self.hidden, 0.0, self.dtype, self.param_dtype, name="ffn")(_norm(self, "final_layer_norm")(x),
                                                                                  train)
        if self.layer_scale:
            y = layers.LayerScale(self.layer_scale, self.param_dtype, name="gamma_2")(y)
        return x + drop_path(y, train)


class RMTStage(nn.Module):
    """`depth` RetBlocks, then (unless `out_dim` is 0) a 3x3 stride-2 conv + BatchNorm to `out_dim` channels."""

    depth: int
    num_heads: int
    init_value: float
    heads_range: float
    decomposed: bool
    hidden: int
    layer_scale: float
    drop_path_rates: Sequence[float]
    out_dim: int
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> Tuple[jax.Array, jax.Array]:
        """Returns (the stage's NHWC output, the downsampled map or that output where there is no downsampling)."""
        for index in range(self.depth):
            x = RetBlock(self.num_heads, self.init_value, self.heads_range, self.decomposed, self.hidden,
                         self.layer_scale, self.drop_path_rates[index], self.attention_impl, self.dtype,
                         self.param_dtype, name=f"blocks_{index}")(x, train)
        if not self.out_dim:
            return x, x
        y = _conv(self, self.out_dim, 3, 2, "downsample_reduction")(x)
        return x, layers.batch_norm(train, dtype=self.dtype, param_dtype=self.param_dtype, name="downsample_norm")(y)


class RMT(param_groups.LayerGroups, nn.Module):
    """RMT classifier; `__call__(images NHWC, train) -> (logits, intermediates)`.

    intermediates: `stages` (the four NHWC stage outputs before downsampling), `pre_logits` (B, projection).
    """

    num_classes: int = 1000
    img_size: Union[int, Tuple[int, int]] = 224
    in_chans: int = 3
    embed_dims: Sequence[int] = (64, 128, 256, 512)
    depths: Sequence[int] = (2, 2, 8, 2)
    num_heads: Sequence[int] = (4, 4, 8, 16)
    init_values: Sequence[float] = (2, 2, 2, 2)
    heads_ranges: Sequence[float] = (4, 4, 6, 6)
    mlp_ratios: Sequence[float] = (3, 3, 3, 3)
    decomposed: Sequence[bool] = (True, True, False, False)  # the official `chunkwise_recurrents`
    layer_scales: Sequence[bool] = (False, False, False, False)
    layer_init_value: float = 1e-6
    projection: int = 1024
    drop_path_rate: float = 0.0
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    def validate(self) -> None:
        """Raises ValueError naming the valid choices if the settings cannot build a model."""
        fields = dict(embed_dims=self.embed_dims, depths=self.depths, num_heads=self.num_heads,
                      init_values=self.init_values, heads_ranges=self.heads_ranges, mlp_ratios=self.mlp_ratios,
                      decomposed=self.decomposed, layer_scales=self.layer_scales)
        if len({len(value) for value in fields.values()}) != 1 or not self.depths:
            raise ValueError(f"{sorted(fields)} need one entry per stage each; got {fields}")
        for dim, heads in zip(self.embed_dims, self.num_heads):
            if heads < 1 or dim % heads or (dim // heads) % 2:
                raise ValueError(f"Each embed_dim must split into num_heads heads of an even width (the rotation "
                                 f"pairs channels); got embed_dims {self.embed_dims}, num_heads {self.num_heads}")
        if self.embed_dims[0] % 2:
            raise ValueError(f"embed_dims[0] must be even (the stem's first convs are half as wide); got "
                             f"{self.embed_dims[0]}")
        img = layers.to_2tuple(self.img_size)
        if min(img) < 4 * 2 ** (len(self.depths) - 1):
            raise ValueError(f"img_size {self.img_size} must be at least {4 * 2 ** (len(self.depths) - 1)} "
                             f"(the stem's stride 4 and a stride 2 per later stage)")
        layers.check_attention_impl(self.attention_impl)

    def group_matcher(self) -> param_groups.Matcher:
        """Returns timm-style group_matcher(coarse=False) over vitjax param paths (see param_groups)."""
        return dict(stem=r"^patch_embed_",
                    blocks=[(r"^layers_(\d+)/blocks_(\d+)", None),
                            # the merging ends stage i: it joins stage i's last block
                            (r"^layers_(\d+)/downsample", (param_groups.MERGE_WITH_PREVIOUS,)),
                            (r"^(?:proj|norm)", (param_groups.MERGE_WITH_PREVIOUS,))])

    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns no regex: the official DeiT-based optimizer decays every weight of 2 or more dimensions."""
        return ()

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (logits, intermediates) for NHWC `images`."""
        dim = self.embed_dims[0]
        x = images
        for index, (features, stride) in enumerate(((dim // 2, 2), (dim // 2, 1), (dim, 2), (dim, 1))):
            x = _conv(self, features, 3, stride, f"patch_embed_proj_{3 * index}")(x)
            x = layers.batch_norm(train, dtype=self.dtype, param_dtype=self.param_dtype,
                                  name=f"patch_embed_proj_{3 * index + 1}")(x)
            if index < 3:
                x = layers.gelu(x)
        stages = len(self.depths)
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
        intermediates: Dict[str, Any] = {"stages": []}
        cursor = 0
        for stage in range(stages):
            depth = self.depths[stage]
            stage_out, x = RMTStage(
                depth, self.num_heads[stage], float(self.init_values[stage]), float(self.heads_ranges[stage]),
                bool(self.decomposed[stage]), int(self.mlp_ratios[stage] * self.embed_dims[stage]),
                self.layer_init_value if self.layer_scales[stage] else 0.0,
                tuple(float(rate) for rate in rates[cursor:cursor + depth]),
                self.embed_dims[stage + 1] if stage < stages - 1 else 0, self.attention_impl, self.dtype,
                self.param_dtype, name=f"layers_{stage}")(x, train)
            cursor += depth
            intermediates["stages"].append(stage_out)
        x = _dense(self, self.projection, "proj")(x)
        x = layers.batch_norm(train, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
        x = jax.nn.silu(x).mean(axis=(1, 2))
        intermediates["pre_logits"] = x
        if not self.num_classes:
            return x, intermediates
        return nn.Dense(self.num_classes, kernel_init=layers.logical(layers.trunc_normal_init, ("embed", "classes")),
                        bias_init=layers.logical(nn.initializers.zeros, ("classes",)),
                        dtype=self.dtype, param_dtype=self.param_dtype, name="head")(x), intermediates


# --- registry: the official classfication_release/RMT.py constructors ----------------------------------------------

_RMTS = {  # our name: (official constructor, settings)
    "rmt_t": ("RMT_T3", dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 8, 2), num_heads=(4, 4, 8, 16),
                             heads_ranges=(4, 4, 6, 6), mlp_ratios=(3, 3, 3, 3),
                             decomposed=(True, True, False, False))),
    "rmt_s": ("RMT_S", dict(embed_dims=(64, 128, 256, 512), depths=(3, 4, 18, 4), num_heads=(4, 4, 8, 16),
                            heads_ranges=(4, 4, 6, 6), mlp_ratios=(4, 4, 3, 3), decomposed=(True, True, True, False))),
    "rmt_b": ("RMT_M2", dict(embed_dims=(80, 160, 320, 512), depths=(4, 8, 25, 8), num_heads=(5, 5, 10, 16),
                             heads_ranges=(5, 5, 6, 6), mlp_ratios=(4, 4, 3, 3), decomposed=(True, True, True, False),
                             layer_scales=(False, False, True, True))),
    "rmt_l": ("RMT_L6", dict(embed_dims=(112, 224, 448, 640), depths=(4, 8, 25, 8), num_heads=(7, 7, 14, 20),
                             heads_ranges=(6, 6, 6, 6), mlp_ratios=(4, 4, 3, 3), decomposed=(True, True, True, False),
                             layer_scales=(False, False, True, True))),
}
OFFICIAL_NAMES = {name: official for name, (official, _) in _RMTS.items()}
for _name, (_, _settings) in _RMTS.items():
    register_model(_name, RMT, family="rmt", **_settings)
