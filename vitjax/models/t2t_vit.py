"""T2T-ViT: Tokens-to-Token ViT (Yuan et al., ICCV 2021), as the official yitu-opensource/T2T-ViT `models/t2t_vit.py`.

The tokens-to-token module replaces the patch embedding: a soft split (overlapping 7x7 patches, stride 4,
padding 2, i.e. torch's `nn.Unfold`) gives 56x56 tokens of 3*49 values; a token transformer (`transformer`:
one-head attention whose values are the skip path, then an MLP) or a token performer (`performer`: the same
with Performer's positive-random-feature linear attention) maps them to `token_dim`; they are folded back to a
grid and soft-split again (3x3, stride 2, padding 1), twice, and the last split is projected to `embed_dim`.
A ViT (class token, fixed sin-cos position table) follows.

Two tensors the official code keeps as `nn.Parameter(requires_grad=False)` are params here too, so the
parameter counts equal the official ones and checkpoints convert key by key: the sin-cos `pos_embed` and each
performer's random-feature matrix `w`. Both are frozen: the forward pass stops their gradients and
`no_weight_decay()` lists them, so no optimizer moves them.

The released checkpoints were trained with `qk_scale = embed_dim ** -0.5` in the ViT blocks (the official
constructors set it when `pretrained=True`); built by name, as here, the scale is head_dim ** -0.5. Pass
`qk_scale=embed_dim ** -0.5` to run the released weights. The performers' dropouts (0.1 after the
attention projection and after the MLP) are fixed in the official code and are fixed here.
Not included: the official `convolution` tokens type (left unfinished there: "you need change forward") and
the SE / dense / ghost variants of the other files.
Parameter names follow the official state dict: `tokens_to_token/attention{1,2}/...`, `tokens_to_token/project`,
`cls_token`, `pos_embed`, `blocks_{i}`, `norm`, `head`.
"""
from typing import Any, Dict, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import layers, param_groups
from vitjax.models.registry import register_model

TOKENS_TYPES = ("transformer", "performer")
# (kernel, stride, padding) of the three soft splits: the total stride is 16.
SOFT_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))


def soft_split(x: jax.Array, kernel: int, stride: int, padding: int) -> Tuple[jax.Array, Tuple[int, int]]:
    """Returns overlapping patches of NHWC `x` as tokens (B, h*w, C*k*k), channel-major as nn.Unfold, and (h, w)."""
    patches = jax.lax.conv_general_dilated_patches(
        x, (kernel, kernel), (stride, stride), [(padding, padding)] * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
    batch, height, width, features = patches.shape
    return patches.reshape(batch, height * width, features), (height, width)


def sinusoid_table(num_positions: int, dim: int) -> np.ndarray:
    """Returns the (1, num_positions, dim) sin-cos table of the official `get_sinusoid_encoding` (sin on even dims)."""
    positions = np.arange(num_positions, dtype=np.float64)[:, None]
    rates = np.power(10000.0, 2 * (np.arange(dim) // 2) / dim)[None, :]
    angles = positions / rates
    angles[:, 0::2] = np.sin(angles[:, 0::2])
    angles[:, 1::2] = np.cos(angles[:, 1::2])
    return angles[None].astype(np.float32)


def _dense(module: nn.Module, features: int, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, kernel_init=layers.logical(layers.trunc_normal_init, ("embed", "mlp")),
                    bias_init=layers.logical(nn.initializers.zeros, ("mlp",)),
                    dtype=module.dtype, param_dtype=module.param_dtype, name=name)


class TokenTransformer(nn.Module):
    """The official `Token_transformer`: one-head attention C -> `out_dim` with the values as the skip, then an MLP."""

    out_dim: int
    mlp_ratio: float = 1.0
    norm_eps: float = 1e-5
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        norm = lambda name: nn.LayerNorm(self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa: E731
                                         name=name)
        y = norm("norm1")(x)
        qkv = nn.DenseGeneral((3, self.out_dim), use_bias=False,
                              kernel_init=layers.logical(layers.trunc_normal_init, ("embed", None, "mlp")),
                              dtype=self.dtype, param_dtype=self.param_dtype, name="qkv")(y)
        query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        # The official scale is that of one head of the *input* width, not of out_dim.
        logits = jnp.einsum("bqd,bkd->bqk", query * jnp.asarray(x.shape[-1] ** -0.5, query.dtype), key)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(value.dtype)
        out = _dense(self, self.out_dim, "proj")(jnp.einsum("bqk,bkd->bqd", weights, value))
        x = value + out
        y = layers.Mlp(int(self.out_dim * self.mlp_ratio), dtype=self.dtype, param_dtype=self.param_dtype,
                       name="mlp")(norm("norm2")(x), train)
        return x + y


class TokenPerformer(nn.Module):
    """The official `Token_performer`: linear attention through positive random features (FAVOR+), values as the
    skip, then an MLP; `w` is the frozen (m, out_dim) random-feature matrix, m = out_dim * kernel_ratio."""

    out_dim: int
    kernel_ratio: float = 0.5
    drop_rate: float = 0.1
    norm_eps: float = 1e-5
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        features = int(self.out_dim * self.kernel_ratio)
        norm = lambda name: nn.LayerNorm(self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa: E731
                                         name=name)
        # Orthogonal rows scaled by sqrt(m), as torch's orthogonal_(randn(m, emb)) * sqrt(m).
        w = self.param("w", layers.logical(nn.initializers.orthogonal(np.sqrt(features)), (None, "mlp")),
                       (features, self.out_dim), self.param_dtype)
        w = jax.lax.stop_gradient(w).astype(jnp.float32)
        kqv = _dense(self, 3 * self.out_dim, "kqv")(norm("norm1")(x))
        key, query, value = jnp.split(kqv, 3, axis=-1)

        def random_features(t):
            # exp(w^T t - |t|^2 / 2) / sqrt(m): a positive estimate of the softmax kernel.
            t = t.astype(jnp.float32)
            half_norm = jnp.sum(t * t, axis=-1, keepdims=True) / 2
            return jnp.exp(jnp.einsum("bti,mi->btm", t, w) - half_norm) / np.sqrt(features)

        key_features, query_features = random_features(key), random_features(query)
        normaliser = jnp.einsum("btm,bm->bt", query_features, key_features.sum(axis=1))[..., None]
        key_values = jnp.einsum("bin,bim->bnm", value.astype(jnp.float32), key_features)
        y = jnp.einsum("btm,bnm->btn", query_features, key_values) / (normaliser + 1e-8)
        y = _dense(self, self.out_dim, "proj")(y.astype(value.dtype))
        x = value + nn.Dropout(self.drop_rate)(y, deterministic=not train)
        y = _dense(self, self.out_dim, "fc1")(norm("norm2")(x))
        y = _dense(self, self.out_dim, "fc2")(layers.gelu(y))
        return x + nn.Dropout(self.drop_rate)(y, deterministic=not train)


class TokensToToken(nn.Module):
    """Soft split, token transformer/performer, fold, twice, then a last soft split and projection; returns
    (tokens (B, N, embed_dim), grid (h, w))."""

    embed_dim: int
    tokens_type: str = "performer"
    token_dim: int = 64
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Tuple[jax.Array, Tuple[int, int]]:
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x, grid = soft_split(images, *SOFT_SPLITS[0])
        for index in (1, 2):
            if self.tokens_type == "transformer":
                x = TokenTransformer(self.token_dim, name=f"attention{index}", **common)(x, train)
            else:
                x = TokenPerformer(self.token_dim, name=f"attention{index}", **common)(x, train)
            x = x.reshape(x.shape[0], grid[0], grid[1], x.shape[-1])
            x, grid = soft_split(x, *SOFT_SPLITS[index])
        return _dense(self, self.embed_dim, "project")(x), grid


class T2TBlock(nn.Module):
    """Pre-norm ViT block of the official `transformer_block.Block` (qkv without bias, `qk_scale` settable)."""

    num_heads: int
    mlp_ratio: float = 3.0
    qkv_bias: bool = False
    qk_scale: Optional[float] = None
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-5
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        channels = x.shape[-1]
        head_dim = channels // self.num_heads
        norm = lambda name: nn.LayerNorm(self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa: E731
                                         name=name)
        drop_path = layers.DropPath(self.drop_path_rate)
        attn = _Attention(self.num_heads, self.qkv_bias, self.qk_scale, self.proj_drop_rate, self.attn_drop_rate,
                          self.attention_impl, self.dtype, self.param_dtype, name="attn")
        x = x + drop_path(attn(norm("norm1")(x), head_dim, train), train)
        y = layers.Mlp(int(channels * self.mlp_ratio), drop_rate=self.proj_drop_rate, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="mlp")(norm("norm2")(x), train)
        return x + drop_path(y, train)


class _Attention(nn.Module):
    """Fused-qkv attention with `layers.Attention`'s parameter layout and an optional explicit qk scale."""

    num_heads: int
    qkv_bias: bool
    qk_scale: Optional[float]
    proj_drop_rate: float
    attn_drop_rate: float
    attention_impl: str
    dtype: layers.Dtype
    param_dtype: layers.Dtype

    @nn.compact
    def __call__(self, x: jax.Array, head_dim: int, train: bool) -> jax.Array:
        qkv = nn.DenseGeneral(
            (3, self.num_heads, head_dim), use_bias=self.qkv_bias,
            kernel_init=layers.logical(layers.trunc_normal_init, ("embed", None, "heads", "kv")),
            bias_init=layers.logical(nn.initializers.zeros, (None, "heads", "kv")),
            dtype=self.dtype, param_dtype=self.param_dtype, name="qkv")(x)
        query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.qk_scale is not None:
            # The shared attention scales by head_dim ** -0.5; fold the ratio into the queries.
            query = query * jnp.asarray(self.qk_scale * head_dim ** 0.5, query.dtype)
        out, _ = layers.attend(self, query, key, value, train=train)
        return layers.project_heads(self, out, x.shape[-1], train=train)


class T2TViT(param_groups.LayerGroups, nn.Module):
    """T2T-ViT classifier; `__call__(images NHWC, train) -> (logits, intermediates)`.

    intermediates: `tokens` (B, N, embed_dim) out of the tokens-to-token module, `features` (B, 1 + N, C) the
    normed output tokens, `pre_logits` (B, C) the class token.
    """

    num_classes: int = 1000
    img_size: Union[int, Tuple[int, int]] = 224
    in_chans: int = 3
    tokens_type: str = "performer"
    token_dim: int = 64
    embed_dim: int = 384
    depth: int = 14
    num_heads: int = 6
    mlp_ratio: float = 3.0
    qkv_bias: bool = False
    qk_scale: Optional[float] = None
    norm_eps: float = 1e-5
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    def grid(self) -> Tuple[int, int]:
        """Returns the (h, w) token grid after the three soft splits."""
        size = list(layers.to_2tuple(self.img_size))
        for kernel, stride, padding in SOFT_SPLITS:
            size = [(side + 2 * padding - kernel) // stride + 1 for side in size]
        return tuple(size)

    def validate(self) -> None:
        """Raises ValueError naming the valid choices if the settings cannot build a model."""
        from vitjax.kernels import ATTENTION_IMPLS
        if self.tokens_type not in TOKENS_TYPES:
            raise ValueError(f"Unknown tokens_type {self.tokens_type!r}; valid choices: {list(TOKENS_TYPES)}")
        img = layers.to_2tuple(self.img_size)
        if img[0] % 16 or img[1] % 16 or min(img) < 16:
            raise ValueError(f"img_size {self.img_size} must be a positive multiple of 16 (the soft splits' stride)")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"Unknown attention_impl {self.attention_impl!r}; valid choices: "
                             f"{list(ATTENTION_IMPLS)}")

    def group_matcher(self) -> param_groups.Matcher:
        """Returns timm-style group_matcher(coarse=False) over vitjax param paths (see param_groups)."""
        return dict(stem=r"^(?:cls_token|pos_embed|tokens_to_token)",
                    blocks=[(r"^blocks_(\d+)", None), (r"^norm", (param_groups.MERGE_WITH_PREVIOUS,))])

    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns regexes of the param paths not weight-decayed: the class token and the frozen tensors."""
        return (r"^cls_token$", r"^pos_embed$", r"^tokens_to_token/attention\d/w$")

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (logits, intermediates) for NHWC `images` of `img_size`."""
        img = layers.to_2tuple(self.img_size)
        if tuple(images.shape[1:3]) != img:
            raise ValueError(f"Input size {tuple(images.shape[1:3])} does not match the model's img_size {img}")
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x, grid = TokensToToken(self.embed_dim, self.tokens_type, self.token_dim, name="tokens_to_token",
                                **common)(images, train)
        intermediates: Dict[str, Any] = {"tokens": x}
        batch, length, channels = x.shape
        cls_token = self.param("cls_token", layers.logical(layers.trunc_normal_init, (None, None, "embed")),
                               (1, 1, channels), self.param_dtype)
        table = sinusoid_table(length + 1, channels)
        pos_embed = self.param("pos_embed", layers.logical(lambda *_: jnp.asarray(table), (None, None, "embed")),
                               table.shape, self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(x.dtype), (batch, 1, channels)), x], axis=1)
        x = x + jax.lax.stop_gradient(pos_embed).astype(x.dtype)
        x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
        for index, rate in enumerate(np.linspace(0.0, self.drop_path_rate, self.depth)):
            x = T2TBlock(self.num_heads, self.mlp_ratio, qkv_bias=self.qkv_bias, qk_scale=self.qk_scale,
                         proj_drop_rate=self.drop_rate, attn_drop_rate=self.attn_drop_rate,
                         drop_path_rate=float(rate), norm_eps=self.norm_eps, attention_impl=self.attention_impl,
                         name=f"blocks_{index}", **common)(x, train)
        x = nn.LayerNorm(self.norm_eps, name="norm", **common)(x)
        intermediates["features"] = x
        intermediates["pre_logits"] = x[:, 0]
        if not self.num_classes:
            return x[:, 0], intermediates
        return layers.classifier_head(self.num_classes, False, self.dtype, self.param_dtype)(x[:, 0]), intermediates


# --- registry: the official models/t2t_vit.py names --------------------------------------------------------------

_T2T = {
    "t2t_vit_7": ("performer", 256, 7, 4, 2.0),
    "t2t_vit_10": ("performer", 256, 10, 4, 2.0),
    "t2t_vit_12": ("performer", 256, 12, 4, 2.0),
    "t2t_vit_14": ("performer", 384, 14, 6, 3.0),
    "t2t_vit_19": ("performer", 448, 19, 7, 3.0),
    "t2t_vit_24": ("performer", 512, 24, 8, 3.0),
    "t2t_vit_t_14": ("transformer", 384, 14, 6, 3.0),
    "t2t_vit_t_19": ("transformer", 448, 19, 7, 3.0),
    "t2t_vit_t_24": ("transformer", 512, 24, 8, 3.0),
    "t2t_vit_14_resnext": ("performer", 384, 14, 32, 3.0),
    "t2t_vit_14_wide": ("performer", 768, 4, 12, 3.0),
}

# The official default_cfgs: ImageNet statistics, crop 0.9, bicubic.
for _name, (_tokens, _dim, _depth, _heads, _ratio) in _T2T.items():
    register_model(_name, T2TViT, family="t2t_vit", tokens_type=_tokens, embed_dim=_dim, depth=_depth,
                   num_heads=_heads, mlp_ratio=_ratio, pretrained_cfg=dict(crop_pct=0.9))
