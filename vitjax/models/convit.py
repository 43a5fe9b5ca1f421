"""ConViT (d'Ascoli et al. 2021, "ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases").

A DeiT whose first `local_up_to_layer` blocks use gated positional self-attention (GPSA): each head mixes
content attention softmax(q k^T / sqrt(d)) with positional attention softmax(r_ij . w_h), where r_ij =
(dx, dy, dx^2 + dy^2) is the relative offset of patches i and j, through a learned gate sigmoid(lambda_h).
At init, the positional part attends to a fixed offset per head (a convolution), as the paper's local init.
The class token joins only after the GPSA blocks; the remaining blocks are plain multi-head attention.

Both attentions go through `layers.multihead_attention`, so `attention_impl` applies: the positional part
is an attention whose logits are the bias alone (zero queries and keys). Gating the two normalised
outputs equals gating the attention maps, because each map's rows sum to one; timm's renormalisation
of the mixed map is the identity up to rounding (~1e-7).

`embed_dim` here is the model width (192 for convit_tiny); timm's constructor takes the per-head width
(48) and multiplies it by `num_heads`. Parameter names mirror timm's (`blocks_0/attn/qk`, `pos_proj`,
`gating_param`), so a timm state dict converts by a plain key table.
"""
from typing import Any, Dict, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import layers, param_groups
from vitjax.models.registry import register_model


def relative_indices(grid_h: int, grid_w: int) -> np.ndarray:
    """Returns (N, N, 3) float32 offsets (dx, dy, dx^2 + dy^2) from patch i to patch j, row-major patches."""
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    dx = cols[None, :] - cols[:, None]
    dy = rows[None, :] - rows[:, None]
    return np.stack([dx, dy, dx ** 2 + dy ** 2], axis=-1).astype(np.float32)


def local_pos_proj_init(num_heads: int, locality_strength: float) -> layers.Initializer:
    """Returns the init of GPSA's `pos_proj` kernel (3, heads): head h attends to offset h of a sqrt(H) grid.

    As the paper's local init: for the first k*k heads (k = floor(sqrt(H))), weights (2 dx_h, 2 dy_h, -1),
    i.e. logits -|r - delta_h|^2 up to a constant; other heads keep the trunc-normal init; all scaled by
    `locality_strength`.
    """
    kernel_size = int(num_heads ** 0.5)
    center = (kernel_size - 1) / 2 if kernel_size % 2 == 0 else kernel_size // 2
    local = np.zeros((3, num_heads), np.float32)
    is_local = np.zeros((1, num_heads), bool)
    for h1 in range(kernel_size):
        for h2 in range(kernel_size):
            position = h1 + kernel_size * h2
            local[:, position] = (2.0 * (h2 - center), 2.0 * (h1 - center), -1.0)
            is_local[0, position] = True

    def init(key, shape, dtype=jnp.float32):
        kernel = jnp.where(is_local, local, layers.trunc_normal_init(key, shape, jnp.float32))
        return (kernel * locality_strength).astype(dtype)
    return init


def _identity_value_init(key, shape, dtype=jnp.float32):
    """Returns an identity (C, heads, head_dim) kernel: GPSA's value projection starts as the identity."""
    channels = shape[0]
    return jnp.eye(channels, dtype=dtype).reshape(shape)


class GPSA(nn.Module):
    """Gated positional self-attention; returns (output (B, N, C), aux with `attention` when captured)."""

    num_heads: int
    qkv_bias: bool = False
    locality_strength: float = 1.0
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, grid: Tuple[int, int], train: bool = False,
                 capture_attention: bool = False) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        batch, length, channels = x.shape
        heads = self.num_heads
        head_dim = channels // heads
        dense = lambda features, init, axes, name: nn.DenseGeneral(  # noqa: E731
            features, use_bias=self.qkv_bias, kernel_init=layers.logical(init, axes),
            bias_init=layers.logical(nn.initializers.zeros, axes[1:]), dtype=self.dtype,
            param_dtype=self.param_dtype, name=name)
        query_key = dense((2, heads, head_dim), layers.trunc_normal_init, ("embed", None, "heads", "kv"), "qk")(x)
        value = dense((heads, head_dim), _identity_value_init, ("embed", "heads", "kv"), "v")(x)
        query, key = query_key[:, :, 0], query_key[:, :, 1]

        offsets = jnp.asarray(relative_indices(*grid), self.dtype)
        positional_logits = nn.Dense(
            heads, kernel_init=layers.logical(local_pos_proj_init(heads, self.locality_strength), (None, "heads")),
            bias_init=layers.logical(nn.initializers.zeros, ("heads",)), dtype=self.dtype,
            param_dtype=self.param_dtype, name="pos_proj")(offsets)               # (N, N, H)
        positional_logits = jnp.transpose(positional_logits, (2, 0, 1))[None]     # (1, H, N, N)
        gating = self.param("gating_param", layers.logical(nn.initializers.ones, ("heads",)), (heads,),
                            self.param_dtype)
        gate = jax.nn.sigmoid(gating.astype(jnp.float32))[:, None]                  # (H, 1)

        # Zero queries and keys leave the positional bias as the only logits.
        zeros = jnp.zeros((batch, length, heads, head_dim), query.dtype)
        need_weights = capture_attention or (train and self.attn_drop_rate > 0)
        # The dropout below acts on the weights, which only the XLA path forms: a fused impl must not pretend.
        layers.check_attention_dropout(self.attention_impl, self.attn_drop_rate if train else 0.0)
        content_out, content_aux = layers.multihead_attention(
            query, key, value, impl=self.attention_impl, capture_attention=need_weights)
        positional_out, positional_aux = layers.multihead_attention(
            zeros, zeros, value, bias=positional_logits, impl=self.attention_impl, capture_attention=need_weights)
        aux: Dict[str, jax.Array] = {}
        if need_weights:
            # The mixed map itself is needed: dropout acts on it, and callers may inspect it.
            weights = ((1.0 - gate[None, :, :, None]) * content_aux["attention"]
                       + gate[None, :, :, None] * positional_aux["attention"])
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
            if capture_attention:
                aux["attention"] = weights
            if train and self.attn_drop_rate > 0:
                keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.attn_drop_rate, weights.shape)
                weights = jnp.where(keep, weights / (1.0 - self.attn_drop_rate), 0.0)
            out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(value.dtype), value)
        else:
            out = ((1.0 - gate).astype(content_out.dtype) * content_out
                   + gate.astype(positional_out.dtype) * positional_out)
        return layers.project_heads(self, out, channels, train=train), aux


class ConViTBlock(nn.Module):
    """Pre-norm block with GPSA (`use_gpsa`) or plain multi-head attention; returns (tokens, aux)."""

    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    use_gpsa: bool = True
    locality_strength: float = 1.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-6
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, grid: Tuple[int, int], train: bool = False,
                 capture_attention: bool = False) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        norm = lambda name: layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, name)  # noqa: E731
        if self.use_gpsa:
            y, aux = GPSA(self.num_heads, self.qkv_bias, self.locality_strength, self.attn_drop_rate,
                          self.proj_drop_rate, self.attention_impl, self.dtype, self.param_dtype, name="attn")(
                norm("norm1")(x), grid, train, capture_attention)
        else:
            y, aux = layers.Attention(self.num_heads, qkv_bias=self.qkv_bias, attn_drop_rate=self.attn_drop_rate,
                                      proj_drop_rate=self.proj_drop_rate, attention_impl=self.attention_impl,
                                      dtype=self.dtype, param_dtype=self.param_dtype, name="attn")(
                norm("norm1")(x), train=train, capture_attention=capture_attention)
        x = x + layers.DropPath(self.drop_path_rate)(y, train)
        y = layers.Mlp(int(x.shape[-1] * self.mlp_ratio), drop_rate=self.proj_drop_rate, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="mlp")(norm("norm2")(x), train)
        x = x + layers.DropPath(self.drop_path_rate)(y, train)
        return layers.constrain(x, ("batch", "length", "embed")), aux


class ConViT(param_groups.LayerGroups, nn.Module):
    """ConViT classifier on NHWC images; `__call__` returns (logits, intermediates).

    intermediates: `patch_embed` (B, N, C), `blocks` (each block's tokens; the class token is first from
    block `local_up_to_layer` on), `attention` (per-block maps, when `capture_attention`), `pre_logits` (B, C).
    """

    num_classes: int = 1000
    img_size: Union[int, Tuple[int, int]] = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    local_up_to_layer: int = 10
    locality_strength: float = 1.0
    use_pos_embed: bool = True
    global_pool: str = "token"
    norm_eps: float = 1e-6
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    POOLING_TYPES = ("token", "avg", "")

    @property
    def grid_size(self) -> Tuple[int, int]:
        """Returns the patch grid (h, w) at `img_size`."""
        img = layers.to_2tuple(self.img_size)
        return img[0] // self.patch_size, img[1] // self.patch_size

    def validate(self) -> None:
        """Raises ValueError naming the valid choices if the settings cannot build a model."""
        from vitjax.kernels import ATTENTION_IMPLS
        img = layers.to_2tuple(self.img_size)
        if img[0] % self.patch_size or img[1] % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads} "
                             "(embed_dim is the full width; timm's embed_dim is the per-head width)")
        for field, valid in (("global_pool", self.POOLING_TYPES), ("attention_impl", ATTENTION_IMPLS)):
            if getattr(self, field) not in valid:
                raise ValueError(f"Unknown {field} {getattr(self, field)!r}; valid choices: {list(valid)}")
        if not 0 <= self.local_up_to_layer <= self.depth:
            raise ValueError(f"local_up_to_layer must be in [0, depth={self.depth}], got {self.local_up_to_layer}")
        if self.global_pool == "token" and self.local_up_to_layer >= self.depth:
            raise ValueError("global_pool='token' needs the class token, which joins at block local_up_to_layer; "
                             f"set local_up_to_layer < depth ({self.depth}) or global_pool='avg'")

    def group_matcher(self) -> param_groups.Matcher:
        """Returns timm's group_matcher(coarse=False) over vitjax param paths (see param_groups)."""
        return dict(
            stem=r"^(?:cls_token|pos_embed|patch_embed)",
            blocks=[(r"^blocks_(\d+)", None), (r"^norm", (param_groups.MERGE_WITH_PREVIOUS,))])

    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns regexes of the param paths not weight-decayed, as timm's no_weight_decay."""
        return (r"^(?:pos_embed|cls_token)$",)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False,
                 capture_attention: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (logits (B, num_classes), intermediates); with num_classes=0, (pre_logits, intermediates)."""
        x, grid = layers.PatchEmbed(self.patch_size, self.embed_dim, dtype=self.dtype,
                                    param_dtype=self.param_dtype, name="patch_embed")(images.astype(self.dtype))
        if grid != self.grid_size:
            raise ValueError(f"Input grid {grid} does not match the model's {self.grid_size} "
                             f"(img_size={self.img_size}); resample position embeddings to change resolution")
        batch, length, channels = x.shape
        intermediates: Dict[str, Any] = {"patch_embed": x, "blocks": []}
        if capture_attention:
            intermediates["attention"] = []
        if self.use_pos_embed:
            posemb = self.param("pos_embed", layers.logical(layers.trunc_normal_init, (None, None, "embed")),
                                (1, length, channels), self.param_dtype)
            x = x + posemb.astype(x.dtype)
        x = nn.Dropout(self.pos_drop_rate)(x, deterministic=not train)
        cls_token = self.param("cls_token", layers.logical(layers.trunc_normal_init, (None, None, "embed")),
                               (1, 1, channels), self.param_dtype)
        rates = np.linspace(0.0, self.drop_path_rate, self.depth)
        for index in range(self.depth):
            if index == self.local_up_to_layer:
                x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(x.dtype), (batch, 1, channels)), x], axis=1)
            x, aux = ConViTBlock(
                self.num_heads, self.mlp_ratio, self.qkv_bias, index < self.local_up_to_layer,
                self.locality_strength, self.proj_drop_rate, self.attn_drop_rate, float(rates[index]),
                self.norm_eps, self.attention_impl, self.dtype, self.param_dtype, name=f"blocks_{index}")(
                x, grid, train, capture_attention)
            intermediates["blocks"].append(x)
            if capture_attention:
                intermediates["attention"].append(aux["attention"])
        x = layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, name="norm")(x)
        intermediates["encoded"] = x
        num_prefix = int(self.local_up_to_layer < self.depth)
        pooled = layers.pool_tokens(x, self.global_pool, num_prefix)
        intermediates["pre_logits"] = pooled
        pooled = nn.Dropout(self.drop_rate)(pooled, deterministic=not train)
        if not self.num_classes:
            return pooled, intermediates
        return layers.classifier_head(self.num_classes, False, self.dtype, self.param_dtype)(pooled), intermediates


# --- registry: timm names -----------------------------------------------------------------------------------------

# ConViT paper Table 1: 48 channels per head; Ti/S/B have 4/9/16 heads, 10 GPSA blocks out of 12.
_TIMM_CONVITS = {
    "convit_tiny": dict(embed_dim=48 * 4, num_heads=4),
    "convit_small": dict(embed_dim=48 * 9, num_heads=9),
    "convit_base": dict(embed_dim=48 * 16, num_heads=16),
}

for _name, _settings in _TIMM_CONVITS.items():
    # timm's pretrained_cfg: the ImageNet defaults (statistics, crop 0.875, bicubic).
    register_model(_name, ConViT, family="convit", depth=12, local_up_to_layer=10, locality_strength=1.0,
                   pretrained_cfg={}, **_settings)
