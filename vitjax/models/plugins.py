"""Small plug-ins of the ViT, each an option of `vitjax.models.vit.VisionTransformer` (off by default).

- GGeM pooling (Ko et al. 2022, "Group Generalized Mean Pooling for Vision Transformer"):
  `global_pool="ggem"`, a generalized mean over the patch tokens with one learnable exponent per group of
  channels (the groups are the heads' channel slices by default).
- Adaptive polyphase patch embedding (Ding et al., CVPR 2024, "Reviving Shift Equivariance in Vision
  Transformers"): `patch_embed_type="poly"` circularly shifts each image so that its polyphase component of
  largest norm sits on the patch grid, then patchifies; with `pos_embed="conv"` (their PosConv, a circular
  depthwise 3x3 convolution) the logits do not change under any circular shift of the input.
- The Gaussian mixture mask ("RetNet viewed through convolution", Li et al. 2023): `attention_mask="gmm"`,
  a per-head mixture of 2-D Gaussians of the tokens' grid offsets that *multiplies* the scaled attention
  logits before the softmax (`layers.multihead_attention`'s `logit_multiplier`).
"""
from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import layers

PATCH_EMBED_TYPES = ("standard", "poly")
ATTENTION_MASKS = (None, "gmm")


# --- GGeM pooling ---------------------------------------------------------------------------------------------

def ggem_pool(tokens: jax.Array, exponents: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Returns (B, C) group generalized means of tokens (B, N, C), one exponent per channel group (G,).

    Channel c belongs to group c // (C / G); each group g pools (mean_n max(x, eps)^p_g)^(1 / p_g). As GeM
    does, activations are clamped at `eps` first: a real power of a negative number is undefined, and ViT
    activations (unlike a CNN's post-ReLU maps) are signed.
    """
    batch, length, channels = tokens.shape
    groups = exponents.shape[0]
    if channels % groups:
        raise ValueError(f"GGeM: {channels} channels cannot be split into {groups} equal groups")
    grouped = tokens.astype(jnp.float32).reshape(batch, length, groups, channels // groups)
    power = exponents.astype(jnp.float32)[:, None]
    pooled = jnp.mean(jnp.maximum(grouped, eps) ** power, axis=1) ** (1.0 / power)
    return pooled.reshape(batch, channels).astype(tokens.dtype)


class GGeMPool(nn.Module):
    """GGeM pooling of patch tokens (B, N, C) with a learnable exponent `p` (groups,); returns (B, C)."""

    groups: int
    p_init: float = 3.0
    eps: float = 1e-6
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        exponents = self.param("p", layers.logical(nn.initializers.constant(self.p_init), (None,)),
                               (self.groups,), self.param_dtype)
        return ggem_pool(tokens, exponents, self.eps)


# --- adaptive polyphase patch embedding ----------------------------------------------------------------------

def polyphase_offsets(images: jax.Array, patch: Tuple[int, int]) -> jax.Array:
    """Returns (B, 2) int32 (row, column) offsets in [0, patch) of each image's polyphase of largest L2 norm.

    Polyphase (i, j) is images[:, i::ph, j::pw, :]; ties go to the first in row-major order, as torch.argmax.
    """
    batch, height, width, channels = images.shape
    ph, pw = patch
    grid = images.astype(jnp.float32).reshape(batch, height // ph, ph, width // pw, pw, channels)
    energy = jnp.sum(jnp.square(grid), axis=(1, 3, 5)).reshape(batch, ph * pw)
    index = jnp.argmax(energy, axis=1).astype(jnp.int32)
    return jnp.stack([index // pw, index % pw], axis=1)


def polyphase_align(images: jax.Array, patch: Tuple[int, int]) -> jax.Array:
    """Returns NHWC `images` circularly shifted so that their largest-norm polyphase starts at (0, 0).

    A circular shift of the input by any (dy, dx) then changes the output only by a shift of whole
    patches, which a circular position encoding and permutation-invariant pooling ignore.
    """
    offsets = jax.lax.stop_gradient(polyphase_offsets(images, patch))
    height, width = images.shape[1:3]

    def shift(image, offset):
        rows = (jnp.arange(height) + offset[0]) % height
        cols = (jnp.arange(width) + offset[1]) % width
        return image[rows][:, cols]

    return jax.vmap(shift)(images, offsets)


class PolyPatchEmbed(nn.Module):
    """Adaptive polyphase patch embedding: align, strided conv `proj`, LayerNorm `norm`; returns (tokens, grid).

    The LayerNorm after the projection and its eps (PyTorch's default 1e-5) follow the official PolyPatchEmbed.
    """

    patch_size: Tuple[int, int]
    embed_dim: int
    norm_eps: float = 1e-5
    kernel_init: layers.Initializer = layers.trunc_normal_init
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> Tuple[jax.Array, Tuple[int, int]]:
        patch = layers.to_2tuple(self.patch_size)
        x = nn.Conv(self.embed_dim, kernel_size=patch, strides=patch, padding="VALID",
                    kernel_init=layers.logical(self.kernel_init, (None, None, None, "embed")),
                    bias_init=layers.logical(nn.initializers.zeros, ("embed",)),
                    dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(polyphase_align(images, patch))
        batch, grid_h, grid_w, channels = x.shape
        x = layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, name="norm")(
            x.reshape(batch, grid_h * grid_w, channels))
        return layers.constrain(x, ("batch", "length", "embed")), (grid_h, grid_w)


class PosConv(nn.Module):
    """Conditional position encoding: tokens + depthwise 3x3 conv of their grid, padded circularly (PEG).

    Circular padding keeps it equivariant to circular shifts of the grid; returns tokens (B, N, C).
    """

    grid: Tuple[int, int]
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        batch, length, channels = tokens.shape
        feature_map = tokens.reshape(batch, self.grid[0], self.grid[1], channels)
        padded = jnp.pad(feature_map, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="wrap")
        out = nn.Conv(channels, (3, 3), padding="VALID", feature_group_count=channels,
                      kernel_init=layers.logical(layers.torch_default_init, (None, None, None, "embed")),
                      bias_init=layers.logical(nn.initializers.zeros, ("embed",)),
                      dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(padded)
        return tokens + out.reshape(batch, length, channels).astype(tokens.dtype)


# --- Gaussian mixture mask -----------------------------------------------------------------------------------

def gaussian_base(grid: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """Returns (log_base, positive), (N, N) each: log of the official mask's base sqrt(exp(-d^2)) in float32.

    d^2 is the squared grid distance of two tokens. The official code forms the base in float32, where
    exp(-d^2) underflows to 0 for d^2 >~ 103 (offsets of about 10 patches and more), and raises it to
    1 / (sigma^2 + 1e-5); keeping that float32 base (and its zeros, `positive` False) keeps its numbers.
    """
    rows, cols = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
    distance2 = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
    base = np.sqrt(np.exp(-distance2.astype(np.float32)))
    positive = base > 0
    log_base = np.where(positive, np.log(np.where(positive, base, 1.0).astype(np.float64)), 0.0)
    return log_base.astype(np.float32), positive


class GaussianMixtureMask(nn.Module):
    """Per-head Gaussian mixture of token offsets; returns the (H, N, N) factor on the attention logits.

    factor[h] = sum_k alpha[k, h] * base ** (1 / (sigma[k, h]^2 + 1e-5)), base = exp(-d^2 / 2), i.e. each
    kernel is alpha * exp(-d^2 / (2 (sigma^2 + 1e-5))). Initialised as the official code: sigma ~ N(10, 10^2),
    alpha ~ N(0, 2^2), shapes (kernels, heads).
    """

    num_heads: int
    num_kernels: int
    grid: Tuple[int, int]
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self) -> jax.Array:
        shape = (self.num_kernels, self.num_heads)
        sigma = self.param("sigma", layers.logical(lambda key, s, d: 10.0 + 10.0 * jax.random.normal(key, s, d),
                                                   (None, "heads")), shape, self.param_dtype)
        alpha = self.param("alpha", layers.logical(nn.initializers.normal(2.0), (None, "heads")), shape,
                           self.param_dtype)
        log_base, positive = gaussian_base(self.grid)
        exponent = 1.0 / (jnp.square(sigma.astype(jnp.float32)) + 1e-5)
        # exp(log(base) * e) rather than base ** e: the gradient stays finite where the base underflowed to 0.
        kernels = jnp.where(positive, jnp.exp(jnp.asarray(log_base) * exponent[:, :, None, None]), 0.0)
        return jnp.sum(alpha.astype(jnp.float32)[:, :, None, None] * kernels, axis=0)


__all__ = ["ATTENTION_MASKS", "GGeMPool", "GaussianMixtureMask", "PATCH_EMBED_TYPES", "PolyPatchEmbed", "PosConv",
           "gaussian_base", "ggem_pool", "polyphase_align", "polyphase_offsets"]
