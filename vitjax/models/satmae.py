"""SatMAE++ (Noman et al., CVPR 2024, "Rethinking Transformers Pre-training for Multi-Spectral Satellite Imagery").

An MAE whose reconstruction is also read at higher scales: the decoder's per-patch pixels, put back
into an image, go through a 1x1 projection (x `proj_ratio` channels, GELU, LayerNorm) and a chain of
up-sampling blocks (transposed conv 4/2, LayerNorm, leaky ReLU, a residual pair of 3x3 convs, LayerNorm),
each emitting the image at twice the previous scale through a 3x3 conv. The official code
(techmn/satmae_pp) has two variants, both here:

  * multi-spectral (`GroupChannelMAE`): one patch embedding per group of spectral bands; each group's
    tokens carry the spatial sin-cos position embedding concatenated with a 1-D sin-cos group
    embedding, so the encoder sees G x L tokens (G groups, L patches); masking draws per token
    (independent across groups, their default) or per location (`spatial_mask`: all groups of a location
    together); the decoder has its own position/group embeddings and one pixel head per group.
    Two up-sampling blocks: the image at 2x and 4x.
  * RGB: the plain `mae.MaskedAutoencoder` and one up-sampling block (2x).

    model = SatMAE(backbone=GroupChannelMAE(...), num_scales=2)
    pred, scales, aux = model.apply(variables, images, rngs={"masking": key})
    # pred: the backbone's prediction; scales: [(B, 2H, 2W, C), (B, 4H, 4W, C)]; aux: mask, ids_restore, latent

Params: {"backbone": {"encoder", "decoder"}, "upsample": {"proj", "proj_norm", "blocks_{i}"}}.
This module is built by the `satmae` objective (`vitjax.objectives.satmae`), not registered by name.
"""
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import layers
from vitjax.models import mae as mae_model

Groups = Tuple[Tuple[int, ...], ...]

# Torch's xavier on the flattened (out, p*p*in) patch-embedding weight (MAE's init), as one variance scaling.
_patch_embed_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3)


def check_channel_groups(channel_groups: Sequence[Sequence[int]], in_chans: int) -> Groups:
    """Returns the groups as a tuple of int tuples; raises ValueError unless they split range(in_chans) exactly."""
    try:
        groups = tuple(tuple(int(band) for band in group) for group in channel_groups)
    except TypeError as error:
        raise ValueError(f"channel_groups must be a sequence of band-index sequences, got {channel_groups!r}") from error
    bands = sorted(band for group in groups for band in group)
    if not groups or any(not group for group in groups) or bands != list(range(in_chans)):
        raise ValueError(f"channel_groups {groups} must split the {in_chans} input bands {list(range(in_chans))} "
                         "into non-empty groups, each band in exactly one group")
    return groups


def group_embedding(num_groups: int, dim: int) -> np.ndarray:
    """Returns the (num_groups, dim) 1-D sin-cos embedding of the group indices (SatMAE's channel embedding)."""
    return layers.posemb_sincos_1d(np.arange(num_groups), dim).astype(np.float32)


def group_position_table(grid: Tuple[int, int], num_groups: int, width: int, group_dim: int) -> np.ndarray:
    """Returns the (G*L, width) table of group tokens: [2-D sin-cos of the patch (width - group_dim), group's 1-D]."""
    spatial = layers.posemb_sincos_2d(grid[0], grid[1], width - group_dim)
    groups = group_embedding(num_groups, group_dim)
    num_patches = spatial.shape[0]
    table = np.concatenate([np.broadcast_to(spatial[None], (num_groups, num_patches, spatial.shape[1])),
                            np.broadcast_to(groups[:, None], (num_groups, num_patches, group_dim))], axis=-1)
    return table.reshape(num_groups * num_patches, width)


def downsample2x(images: jax.Array) -> jax.Array:
    """Returns NHWC `images` at half the size: the mean of each 2x2 block.

    What torch's F.interpolate(scale_factor=0.5, mode="bilinear", align_corners=False) computes on an even size,
    the official loaders' way of making the model input from the largest scale.
    """
    batch, height, width, channels = images.shape
    if height % 2 or width % 2:
        raise ValueError(f"Cannot halve an image of size {(height, width)}: both sides must be even")
    return images.reshape(batch, height // 2, 2, width // 2, 2, channels).mean(axis=(2, 4))


# ---------------------------------------------------------------------------------------------
# Up-sampling
# ---------------------------------------------------------------------------------------------
def _channel_norm(name: str) -> nn.LayerNorm:
    # Their channels-first LayerNorm: two-pass variance over the channels, eps 1e-6.
    return nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, name=name)


def _conv3x3(features: int, name: str) -> nn.Conv:
    return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), kernel_init=layers.xavier_uniform_init,
                   bias_init=nn.initializers.zeros, name=name)


class UpsampleBlock(nn.Module):
    """2x transposed conv -> LN -> leaky ReLU -> residual 3x3 pair -> LN; returns (features, image via a 3x3 conv)."""

    out_channels: int

    @nn.compact
    def __call__(self, x: jax.Array) -> Tuple[jax.Array, jax.Array]:
        channels = x.shape[-1]
        # lax.conv_transpose pads the dilated input: 4 - 1 - 1 on each side is PyTorch's padding=1.
        x = nn.ConvTranspose(channels, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)),
                             kernel_init=layers.torch_default_init, name="up_conv")(x)
        x = jax.nn.leaky_relu(_channel_norm("up_norm")(x), negative_slope=0.01)
        residual = x
        x = jax.nn.relu(_conv3x3(channels, "res_conv1")(x))
        x = _conv3x3(channels, "res_conv2")(x) * 0.5 + residual
        x = _channel_norm("res_norm")(x)
        return x, _conv3x3(self.out_channels, "proj_out")(x)


class MultiScaleHead(nn.Module):
    """Maps a reconstructed (B, H, W, C) image to [(B, 2H, 2W, C), (B, 4H, 4W, C), ...], `num_scales` of them."""

    num_scales: int = 2
    proj_ratio: int = 4

    @nn.compact
    def __call__(self, image: jax.Array) -> Tuple[jax.Array, ...]:
        channels = image.shape[-1]
        x = nn.Conv(channels * self.proj_ratio, (1, 1), kernel_init=layers.torch_default_init, name="proj")(image)
        x = _channel_norm("proj_norm")(layers.gelu(x))
        outputs = []
        for index in range(self.num_scales):
            x, out = UpsampleBlock(channels, name=f"blocks_{index}")(x)
            outputs.append(out)
        return tuple(outputs)


# ---------------------------------------------------------------------------------------------
# The group-channel MAE
# ---------------------------------------------------------------------------------------------
class GroupChannelEncoder(nn.Module):
    """Group patch embeddings + position/group embeddings, the kept tokens, a cls token, ViT blocks, a final norm.

    `__call__(images, ids_keep=None)` returns (B, 1+K, D): the cls token, then the kept tokens in `ids_keep`'s
    order (indices into the G*L group-major tokens); all G*L tokens without `ids_keep`.
    """

    img_size: int
    patch_size: int
    channel_groups: Groups
    embed_dim: int
    group_embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    norm_eps: float = 1e-6
    scan: bool = False
    remat: bool = False
    attention_impl: str = "xla"

    @property
    def grid(self) -> Tuple[int, int]:
        """Returns the patch grid (h, w)."""
        side = self.img_size // self.patch_size
        return side, side

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False, ids_keep: Optional[jax.Array] = None) -> jax.Array:
        tokens = []
        for index, group in enumerate(self.channel_groups):
            embedded, _ = layers.PatchEmbed(self.patch_size, self.embed_dim, kernel_init=_patch_embed_init,
                                            name=f"patch_embed_{index}")(images[..., list(group)])
            tokens.append(embedded)
        x = jnp.concatenate(tokens, axis=1)   # (B, G*L, D), group-major
        table = group_position_table(self.grid, len(self.channel_groups), self.embed_dim, self.group_embed_dim)
        x = x + jnp.asarray(table[None], x.dtype)
        if ids_keep is not None:
            x = jnp.take_along_axis(x, ids_keep[:, :, None].astype(jnp.int32), axis=1)
        cls_token = self.param("cls_token", layers.logical(nn.initializers.normal(0.02), (None, None, "embed")),
                               (1, 1, self.embed_dim))
        x = jnp.concatenate([jnp.broadcast_to(cls_token, (x.shape[0], 1, self.embed_dim)).astype(x.dtype), x], 1)
        x = mae_model.transformer_stack(x, train, depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                                        norm_eps=self.norm_eps, scan=self.scan, remat=self.remat,
                                        attention_impl=self.attention_impl)
        return layers.layer_norm(self.norm_eps, jnp.float32, jnp.float32, name="norm")(x)


class GroupChannelDecoder(nn.Module):
    """Maps the encoder's (B, 1+K, D) tokens to the (B, C, L, p*p) prediction: channels in the groups' order."""

    grid: Tuple[int, int]
    patch_size: int
    channel_groups: Groups
    embed_dim: int = 512
    group_embed_dim: int = 128
    depth: int = 8
    num_heads: int = 16
    mlp_ratio: float = 4.0
    spatial_mask: bool = False
    norm_eps: float = 1e-6
    scan: bool = False
    remat: bool = False
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, latent: jax.Array, ids_restore: jax.Array, train: bool = False) -> jax.Array:
        num_groups = len(self.channel_groups)
        num_patches = self.grid[0] * self.grid[1]
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, kernel_init=layers.xavier_uniform_init, bias_init=nn.initializers.zeros, name=name)
        x = dense(self.embed_dim, "embed")(latent)
        batch, length, width = x.shape
        mask_token = self.param("mask_token", layers.logical(nn.initializers.normal(0.02), (None, None, "embed")),
                                (1, 1, width))
        restore = ids_restore[:, :, None].astype(jnp.int32)
        if self.spatial_mask:
            # Kept locations carry all their groups: un-shuffle locations with each location's groups side by side.
            kept = (length - 1) // num_groups
            patches = x[:, 1:].reshape(batch, num_groups, kept, width).transpose(0, 2, 1, 3)
            patches = patches.reshape(batch, kept, num_groups * width)
            fill = jnp.broadcast_to(jnp.tile(mask_token, (1, 1, num_groups)),
                                    (batch, num_patches - kept, num_groups * width))
            patches = jnp.take_along_axis(jnp.concatenate([patches, fill], axis=1), restore, axis=1)
            patches = patches.reshape(batch, num_patches, num_groups, width).transpose(0, 2, 1, 3)
            patches = patches.reshape(batch, num_groups * num_patches, width)
        else:
            fill = jnp.broadcast_to(mask_token, (batch, num_groups * num_patches + 1 - length, width))
            patches = jnp.take_along_axis(jnp.concatenate([x[:, 1:], fill], axis=1), restore, axis=1)
        x = jnp.concatenate([x[:, :1], patches], axis=1)
        table = group_position_table(self.grid, num_groups, width, self.group_embed_dim)
        # The cls token's row: a zero position part and the group embedding of index G (one past the groups).
        cls_row = np.concatenate([np.zeros(width - self.group_embed_dim, np.float32),
                                  group_embedding(num_groups + 1, self.group_embed_dim)[-1]])
        x = x + jnp.asarray(np.concatenate([cls_row[None], table])[None], x.dtype)
        x = mae_model.transformer_stack(x, train, depth=self.depth, num_heads=self.num_heads,
                                        mlp_dim=int(width * self.mlp_ratio), norm_eps=self.norm_eps, scan=self.scan,
                                        remat=self.remat, attention_impl=self.attention_impl)
        x = layers.layer_norm(self.norm_eps, jnp.float32, jnp.float32, name="norm")(x)
        x = x[:, 1:].reshape(batch, num_groups, num_patches, width)
        outputs = []
        for index, group in enumerate(self.channel_groups):
            out = dense(len(group) * self.patch_size ** 2, f"pred_{index}")(x[:, index])
            outputs.append(out.reshape(batch, num_patches, len(group), self.patch_size ** 2).transpose(0, 2, 1, 3))
        return jnp.concatenate(outputs, axis=1)


class GroupChannelMAE(nn.Module):
    """SatMAE's group-channel MAE; `__call__` returns (pred (B, C, L, p*p), aux).

    pred's channels follow the groups' concatenated order (as the official decoder stacks its heads' outputs);
    aux: `latent` (B, 1+K, D), `mask` (B, G, L) 1 = removed, `ids_restore` ((B, G*L), or (B, L) with
    `spatial_mask`), `ids_keep` into the G*L group-major tokens.
    """

    img_size: int = 96
    patch_size: int = 8
    in_chans: int = 10
    channel_groups: Groups = ((0, 1, 2, 6), (3, 4, 5, 7), (8, 9))
    spatial_mask: bool = False
    embed_dim: int = 1024
    group_embed_dim: int = 256
    depth: int = 24
    num_heads: int = 16
    mlp_dim: int = 4096
    decoder_embed_dim: int = 512
    decoder_group_embed_dim: int = 128
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    mask_ratio: float = 0.75
    norm_eps: float = 1e-6
    scan: bool = False
    remat: bool = False
    attention_impl: str = "xla"

    def validate(self) -> None:
        """Raises ValueError naming the problem if the settings cannot build the model."""
        check_channel_groups(self.channel_groups, self.in_chans)
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if mae_model.num_kept_patches(self.num_mask_units, self.mask_ratio) < 1:
            raise ValueError(f"mask_ratio={self.mask_ratio} keeps none of the {self.num_mask_units} masked units")
        for name, width, group_dim, heads in (
                ("", self.embed_dim, self.group_embed_dim, self.num_heads),
                ("decoder_", self.decoder_embed_dim, self.decoder_group_embed_dim, self.decoder_num_heads)):
            if width % heads:
                raise ValueError(f"{name}embed_dim {width} is not divisible by {name}num_heads {heads}")
            if group_dim % 2 or group_dim <= 0 or (width - group_dim) % 4 or width <= group_dim:
                raise ValueError(f"{name}group_embed_dim {group_dim} must be even and leave {name}embed_dim {width} "
                                 "a positive multiple of 4 for the 2-D sin-cos table")

    @property
    def grid(self) -> Tuple[int, int]:
        """Returns the patch grid (h, w)."""
        side = self.img_size // self.patch_size
        return side, side

    @property
    def num_mask_units(self) -> int:
        """Returns what one masking draw covers: L locations with `spatial_mask`, else G*L tokens."""
        num_patches = self.grid[0] * self.grid[1]
        return num_patches if self.spatial_mask else num_patches * len(self.channel_groups)

    @nn.nowrap
    def encoder_module(self, name: Optional[str] = None) -> GroupChannelEncoder:
        """Returns the encoder (named `name` when built inside this module)."""
        return GroupChannelEncoder(
            img_size=self.img_size, patch_size=self.patch_size, channel_groups=self.channel_groups,
            embed_dim=self.embed_dim, group_embed_dim=self.group_embed_dim, depth=self.depth,
            num_heads=self.num_heads, mlp_dim=self.mlp_dim, norm_eps=self.norm_eps, scan=self.scan,
            remat=self.remat, attention_impl=self.attention_impl, name=name)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False, noise: Optional[jax.Array] = None,
                 mask_ratio: Optional[float] = None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        mask_ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        batch = images.shape[0]
        num_groups, num_units = len(self.channel_groups), self.num_mask_units
        num_patches = self.grid[0] * self.grid[1]
        if noise is None:
            noise = jax.random.uniform(self.make_rng("masking"), (batch, num_units))
        if noise.shape != (batch, num_units):
            raise ValueError(f"noise must have shape {(batch, num_units)}, got {noise.shape}")
        masking = mae_model.random_masking(noise, mask_ratio)
        ids_keep = masking["ids_keep"]
        mask = masking["mask"]
        if self.spatial_mask:
            # Group-major token order: group g's kept tokens are the kept locations offset by g * L.
            ids_keep = (ids_keep[:, None, :] + num_patches * jnp.arange(num_groups)[None, :, None]).reshape(batch, -1)
            mask = jnp.tile(mask, (1, num_groups))
        latent = self.encoder_module("encoder")(images, train, ids_keep)
        pred = GroupChannelDecoder(
            grid=self.grid, patch_size=self.patch_size, channel_groups=self.channel_groups,
            embed_dim=self.decoder_embed_dim, group_embed_dim=self.decoder_group_embed_dim, depth=self.decoder_depth,
            num_heads=self.decoder_num_heads, mlp_ratio=self.decoder_mlp_ratio, spatial_mask=self.spatial_mask,
            norm_eps=self.norm_eps, scan=self.scan, remat=self.remat, attention_impl=self.attention_impl,
            name="decoder")(latent, masking["ids_restore"], train)
        return pred, {"latent": latent, "mask": mask.reshape(batch, num_groups, num_patches),
                      "ids_restore": masking["ids_restore"], "ids_keep": ids_keep}


def group_pred_image(pred: jax.Array, grid: Tuple[int, int], patch_size: int) -> jax.Array:
    """Returns the (B, C, L, p*p) group prediction as a (B, H, W, C) image (channels in the prediction's order)."""
    batch, channels, num_patches, _ = pred.shape
    x = pred.reshape(batch, channels, grid[0], grid[1], patch_size, patch_size)
    return x.transpose(0, 2, 4, 3, 5, 1).reshape(batch, grid[0] * patch_size, grid[1] * patch_size, channels)


# ---------------------------------------------------------------------------------------------
# SatMAE++
# ---------------------------------------------------------------------------------------------
class SatMAE(nn.Module):
    """A backbone MAE (`GroupChannelMAE` or `mae.MaskedAutoencoder`) + the multi-scale head on its reconstruction.

    `__call__` returns (pred, scales, aux): the backbone's prediction and aux, and `num_scales` images at 2x, 4x, ...
    the input size.
    """

    backbone: nn.Module
    num_scales: int = 2
    proj_ratio: int = 4

    def validate(self) -> None:
        """Raises ValueError naming the problem if the settings cannot build the model."""
        if not isinstance(self.backbone, (GroupChannelMAE, mae_model.MaskedAutoencoder)):
            raise ValueError(f"SatMAE's backbone must be a GroupChannelMAE or a MaskedAutoencoder, got "
                             f"{type(self.backbone).__name__}")
        self.backbone.validate()
        if int(self.num_scales) < 1 or int(self.proj_ratio) < 1:
            raise ValueError(f"num_scales and proj_ratio must be >= 1, got {self.num_scales}, {self.proj_ratio}")

    @property
    def grouped(self) -> bool:
        """Returns whether the backbone is the group-channel MAE."""
        return isinstance(self.backbone, GroupChannelMAE)

    @property
    def patch_size(self) -> int:
        """Returns the backbone's (square) patch side."""
        return self.backbone.patch_size

    @property
    def img_size(self) -> int:
        """Returns the side of the backbone's input (the smallest scale)."""
        if self.grouped:
            return self.backbone.img_size
        return layers.to_2tuple(self.backbone.encoder.img_size)[0]

    @property
    def in_chans(self) -> int:
        """Returns the number of input channels."""
        return self.backbone.in_chans if self.grouped else self.backbone.encoder.in_chans

    @property
    def grid(self) -> Tuple[int, int]:
        """Returns the patch grid."""
        return self.backbone.grid if self.grouped else tuple(self.backbone.encoder.grid_size)

    def reconstruction(self, pred: jax.Array) -> jax.Array:
        """Returns the backbone's prediction as a (B, H, W, C) image."""
        if self.grouped:
            return group_pred_image(pred, self.grid, self.patch_size)
        return mae_model.unpatchify(pred, self.patch_size, self.grid, self.in_chans)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False, noise: Optional[jax.Array] = None
                 ) -> Tuple[jax.Array, Tuple[jax.Array, ...], Dict[str, Any]]:
        pred, aux = self.backbone(images, train=train, noise=noise)
        scales = MultiScaleHead(self.num_scales, self.proj_ratio, name="upsample")(self.reconstruction(pred))
        return pred, scales, aux


__all__ = ["GroupChannelDecoder", "GroupChannelEncoder", "GroupChannelMAE", "MultiScaleHead", "SatMAE",
           "UpsampleBlock", "check_channel_groups", "downsample2x", "group_embedding", "group_pred_image",
           "group_position_table"]
