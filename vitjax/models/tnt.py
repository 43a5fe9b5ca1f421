"""TNT: Transformer in Transformer (Han et al. 2021), as timm's `tnt.py`.

Each 16x16 patch is cut into 4x4 "pixels" (a 7x7 stride-4 conv) embedded at `inner_dim`; every block runs an
inner transformer over the pixels of each patch, adds their flattened projection to the patch token, then an
outer transformer over the patch tokens (plus a cls token).

`legacy=True` is timm's `tnt_s_legacy_patch16_224` layout: the conv runs over the whole image before
patches are cut, and the per-block pixel-to-patch projection has a per-pixel LayerNorm and a bias.
Parameter names follow timm (`pixel_embed`, `pixel_pos`, `patch_pos`, `blocks_{i}/attn_in/qk`, ...).
"""
import math
from typing import Any, Dict, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import layers, param_groups
from vitjax.models.registry import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD, register_model


class TntAttention(nn.Module):
    """timm's TNT attention: a fused `qk` projection, a separate `v`, heads of width dim / num_heads."""

    num_heads: int
    qkv_bias: bool = False
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        channels = x.shape[-1]
        head_dim = channels // self.num_heads
        dense = lambda features, axes, name: nn.DenseGeneral(  # noqa: E731
            features, use_bias=self.qkv_bias, kernel_init=layers.logical(layers.trunc_normal_init, axes),
            bias_init=layers.logical(nn.initializers.zeros, axes[1:]),
            dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        qk = dense((2, self.num_heads, head_dim), ("embed", None, "heads", "kv"), "qk")(x)
        value = dense((self.num_heads, head_dim), ("embed", "heads", "kv"), "v")(x)
        out, _ = layers.attend(self, qk[:, :, 0], qk[:, :, 1], value, train=train)
        return layers.project_heads(self, out, channels, train=train)


class TntBlock(nn.Module):
    """Inner transformer over pixels, pixel-to-patch projection, outer transformer over patches.

    `__call__(pixels (B*N, P, inner_dim), patches (B, 1 + N, C)) -> (pixels, patches)`.
    """

    num_heads_inner: int = 4
    num_heads_outer: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-5
    legacy: bool = False
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array, patches: jax.Array, train: bool = False) -> Tuple[jax.Array, jax.Array]:
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, name)  # noqa: E731
        drop_path = layers.DropPath(self.drop_path_rate)
        attention = lambda heads, name: TntAttention(  # noqa: E731
            heads, qkv_bias=self.qkv_bias, attn_drop_rate=self.attn_drop_rate, proj_drop_rate=self.proj_drop_rate,
            attention_impl=self.attention_impl, name=name, **common)
        inner_dim = pixels.shape[-1]
        pixels = pixels + drop_path(attention(self.num_heads_inner, "attn_in")(norm("norm_in")(pixels), train), train)
        pixels = pixels + drop_path(layers.Mlp(inner_dim * 4, drop_rate=self.proj_drop_rate, name="mlp_in",
                                               **common)(norm("norm_mlp_in")(pixels), train), train)
        batch, length, channels = patches.shape
        if self.legacy:
            flat = norm("norm1_proj")(pixels).reshape(batch, length - 1, -1)
            update = nn.Dense(channels, kernel_init=layers.logical(layers.trunc_normal_init, ("mlp", "embed")),
                              bias_init=layers.logical(nn.initializers.zeros, ("embed",)), name="proj", **common)(flat)
        else:
            flat = norm("norm1_proj")(pixels.reshape(batch, length - 1, -1))
            update = nn.Dense(channels, use_bias=False, name="proj",
                              kernel_init=layers.logical(layers.trunc_normal_init, ("mlp", "embed")), **common)(flat)
            update = norm("norm2_proj")(update)
        patches = jnp.concatenate([patches[:, :1], patches[:, 1:] + update], axis=1)
        patches = patches + drop_path(attention(self.num_heads_outer, "attn_out")(norm("norm_out")(patches), train),
                                      train)
        patches = patches + drop_path(layers.Mlp(int(channels * self.mlp_ratio), drop_rate=self.proj_drop_rate,
                                                 name="mlp", **common)(norm("norm_mlp")(patches), train), train)
        return pixels, layers.constrain(patches, ("batch", "length", "embed"))


class TNT(param_groups.LayerGroups, nn.Module):
    """Transformer in Transformer classifier; `__call__(images NHWC, train) -> (logits, intermediates)`.

    intermediates: `blocks` (per-block patch tokens (B, 1 + N, C)), `encoded` (normed tokens),
    `pre_logits` (B, C).
    """

    num_classes: int = 1000
    img_size: Union[int, Tuple[int, int]] = 224
    patch_size: Union[int, Tuple[int, int]] = 16
    in_chans: int = 3
    global_pool: str = "token"
    embed_dim: int = 768
    inner_dim: int = 48
    depth: int = 12
    num_heads_inner: int = 4
    num_heads_outer: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    first_stride: int = 4
    legacy: bool = False
    norm_eps: float = 1e-5
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    GLOBAL_POOLS = ("token", "avg", "")

    @property
    def grid_size(self) -> Tuple[int, int]:
        """Returns the patch grid (h, w)."""
        img, patch = layers.to_2tuple(self.img_size), layers.to_2tuple(self.patch_size)
        return img[0] // patch[0], img[1] // patch[1]

    @property
    def pixel_grid(self) -> Tuple[int, int]:
        """Returns the pixel grid inside one patch: ceil(patch / first_stride) per side."""
        patch = layers.to_2tuple(self.patch_size)
        return math.ceil(patch[0] / self.first_stride), math.ceil(patch[1] / self.first_stride)

    def validate(self) -> None:
        """Raises ValueError naming the valid choices if the settings cannot build a model."""
        from vitjax.kernels import ATTENTION_IMPLS
        img, patch = layers.to_2tuple(self.img_size), layers.to_2tuple(self.patch_size)
        if img[0] % patch[0] or img[1] % patch[1]:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.legacy and (patch[0] % self.first_stride or patch[1] % self.first_stride):
            raise ValueError(f"legacy=True needs patch_size {self.patch_size} divisible by first_stride "
                             f"{self.first_stride}")
        for dim, heads in ((self.embed_dim, self.num_heads_outer), (self.inner_dim, self.num_heads_inner)):
            if dim % heads:
                raise ValueError(f"width {dim} is not divisible by its number of heads {heads}")
        if self.global_pool not in self.GLOBAL_POOLS:
            raise ValueError(f"Unknown global_pool {self.global_pool!r}; valid choices: {list(self.GLOBAL_POOLS)}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"Unknown attention_impl {self.attention_impl!r}; valid choices: "
                             f"{list(ATTENTION_IMPLS)}")

    def pixel_embed(self, images: jax.Array) -> jax.Array:
        """Returns pixel embeddings (B * N, ph * pw, inner_dim), patches row-major, pixels row-major."""
        batch, height, width, channels = images.shape
        patch = layers.to_2tuple(self.patch_size)
        grid_h, grid_w = self.grid_size
        conv = nn.Conv(self.inner_dim, (7, 7), strides=(self.first_stride,) * 2, padding=[(3, 3), (3, 3)],
                       kernel_init=layers.logical(layers.torch_default_init, (None, None, None, "embed")),
                       bias_init=layers.logical(nn.initializers.zeros, ("embed",)),
                       dtype=self.dtype, param_dtype=self.param_dtype, name="pixel_embed_proj")

        def cut(x, ph, pw):  # (B, gh*ph, gw*pw, C) -> (B * gh * gw, ph, pw, C), as nn.Unfold orders patches
            x = x.reshape(batch, grid_h, ph, grid_w, pw, x.shape[-1]).transpose(0, 1, 3, 2, 4, 5)
            return x.reshape(batch * grid_h * grid_w, ph, pw, x.shape[-1])

        if self.legacy:
            x = cut(conv(images), *self.pixel_grid)
        else:
            x = conv(cut(images, *patch))
        return x

    def group_matcher(self) -> param_groups.Matcher:
        """Returns timm's group_matcher(coarse=False) over vitjax param paths (see param_groups)."""
        return dict(
            stem=r"^(?:cls_token|patch_pos|pixel_pos|pixel_embed|norm[12]_proj|proj)",
            blocks=[(r"^blocks_(\d+)", None), (r"^norm", (param_groups.MERGE_WITH_PREVIOUS,))])

    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns regexes of the param paths not weight-decayed, as timm's no_weight_decay."""
        return (r"^(?:cls_token|patch_pos|pixel_pos)$",)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (logits, intermediates) for NHWC `images` of `img_size`."""
        img = layers.to_2tuple(self.img_size)
        if tuple(images.shape[1:3]) != img:
            raise ValueError(f"Input size {tuple(images.shape[1:3])} does not match the model's img_size {img}")
        batch = images.shape[0]
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        num_patches = self.grid_size[0] * self.grid_size[1]
        pixel_h, pixel_w = self.pixel_grid
        init = layers.logical(layers.trunc_normal_init, (None, None, None, "embed"))
        pixel_pos = self.param("pixel_pos", init, (1, pixel_h, pixel_w, self.inner_dim), self.param_dtype)
        pixels = self.pixel_embed(images) + pixel_pos.astype(self.dtype)
        pixels = pixels.reshape(batch * num_patches, pixel_h * pixel_w, self.inner_dim)

        norm = lambda name: layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, name)  # noqa: E731
        patches = norm("norm1_proj")(pixels.reshape(batch, num_patches, -1))
        patches = nn.Dense(self.embed_dim, kernel_init=layers.logical(layers.trunc_normal_init, ("mlp", "embed")),
                           bias_init=layers.logical(nn.initializers.zeros, ("embed",)), name="proj", **common)(patches)
        patches = norm("norm2_proj")(patches)
        token_init = layers.logical(layers.trunc_normal_init, (None, None, "embed"))
        cls_token = self.param("cls_token", token_init, (1, 1, self.embed_dim), self.param_dtype)
        patch_pos = self.param("patch_pos", token_init, (1, num_patches + 1, self.embed_dim), self.param_dtype)
        patches = jnp.concatenate(
            [jnp.broadcast_to(cls_token.astype(patches.dtype), (batch, 1, self.embed_dim)), patches], axis=1)
        patches = nn.Dropout(self.pos_drop_rate)(patches + patch_pos.astype(patches.dtype), deterministic=not train)

        intermediates: Dict[str, Any] = {"blocks": []}
        rates = np.linspace(0.0, self.drop_path_rate, self.depth)
        for index in range(self.depth):
            pixels, patches = TntBlock(
                self.num_heads_inner, self.num_heads_outer, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
                proj_drop_rate=self.proj_drop_rate, attn_drop_rate=self.attn_drop_rate,
                drop_path_rate=float(rates[index]), norm_eps=self.norm_eps, legacy=self.legacy,
                attention_impl=self.attention_impl, name=f"blocks_{index}", **common)(pixels, patches, train)
            intermediates["blocks"].append(patches)
        patches = norm("norm")(patches)
        intermediates["encoded"] = patches
        pooled = layers.pool_tokens(patches, self.global_pool, 1)
        intermediates["pre_logits"] = pooled
        pooled = nn.Dropout(self.drop_rate)(pooled, deterministic=not train)
        if not self.num_classes:
            return pooled, intermediates
        logits = layers.classifier_head(self.num_classes, False, self.dtype, self.param_dtype)(pooled)
        return logits, intermediates


_TNTS = {
    "tnt_s_legacy_patch16_224": dict(embed_dim=384, inner_dim=24, depth=12, num_heads_outer=6, legacy=True),
    "tnt_s_patch16_224": dict(embed_dim=384, inner_dim=24, depth=12, num_heads_outer=6),
    "tnt_b_patch16_224": dict(embed_dim=640, inner_dim=40, depth=12, num_heads_outer=10),
}

# timm's pretrained_cfg: inputs in [-1, 1], crop 0.9.
_TNT_PRETRAINED = dict(mean=IMAGENET_INCEPTION_MEAN, std=IMAGENET_INCEPTION_STD, crop_pct=0.9)
for _name, _settings in _TNTS.items():
    register_model(_name, TNT, family="tnt", patch_size=16, qkv_bias=False, pretrained_cfg=_TNT_PRETRAINED,
                   **_settings)
