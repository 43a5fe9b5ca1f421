"""Masked autoencoder (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners").

A `VisionTransformer` encoder (fixed 2-D sin-cos position embeddings, cls token, no head) sees only
the patches a per-sample random mask keeps; a light decoder (linear projection, mask tokens,
un-shuffle, transformer blocks, norm, per-patch pixel prediction) reconstructs every patch.

Params: {"encoder": <the VisionTransformer's params>, "decoder": {"embed", "mask_token",
"blocks_{i}" (or stacked "blocks" when scanned), "norm", "pred"}}. The encoder subtree is exactly a
`VisionTransformer`'s, so a pretrained encoder loads into a classifier for fine-tuning
(`config.init_from`, see `vitjax.weights`).

    module = MaskedAutoencoder(encoder=vit.VisionTransformer(**mae_encoder_settings("B/16")))
    variables = init_variables(module, jax.random.key(0), images)    # the paper's initialisation
    pred, aux = module.apply(variables, images, rngs={"masking": key})
    # pred (B, N, p*p*C) per-patch pixels, patchify order (p, p, c); aux: latent, mask, ids_restore, ...

This module is built by the `mae` objective (`vitjax.objectives.mae`), not registered by name.
"""
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import layers, param_groups
from vitjax.models.vit import Block, VisionTransformer, decode_variant
from vitjax.pytree import path_to_str


def mae_encoder_settings(variant: str = "B/16", **overrides) -> Dict[str, Any]:
    """Returns `VisionTransformer` settings of an MAE encoder: sin-cos posemb, xavier init, no head or pooling."""
    settings = dict(decode_variant(variant), num_classes=0, global_pool="", class_token=True,
                    pos_embed="sincos2d", weight_init="xavier")
    settings.update(overrides)
    return settings


# ---------------------------------------------------------------------------------------------
# Patches and masking
# ---------------------------------------------------------------------------------------------
def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """Returns NHWC `images` as (B, h*w, p*p*C) patches, row-major over the grid, pixels in (p, p, c) order.

    The order of MAE's `patchify` (there written for NCHW), so predictions compare with its weights.
    """
    batch, height, width, channels = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"Image size {(height, width)} is not divisible by patch_size {patch_size}")
    grid_h, grid_w = height // patch_size, width // patch_size
    x = images.reshape(batch, grid_h, patch_size, grid_w, patch_size, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, grid_h * grid_w, patch_size * patch_size * channels)


def unpatchify(patches: jax.Array, patch_size: int, grid: Tuple[int, int], channels: int) -> jax.Array:
    """Returns (B, h*w, p*p*C) patches as NHWC images (the inverse of `patchify`)."""
    batch = patches.shape[0]
    grid_h, grid_w = grid
    x = patches.reshape(batch, grid_h, grid_w, patch_size, patch_size, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, grid_h * patch_size, grid_w * patch_size, channels)


def num_kept_patches(num_patches: int, mask_ratio: float) -> int:
    """Returns how many patches the encoder sees: int(N * (1 - mask_ratio)), as MAE rounds."""
    return int(num_patches * (1 - mask_ratio))


def random_masking(noise: jax.Array, mask_ratio: float) -> Dict[str, jax.Array]:
    """Returns the per-sample masking that argsorts `noise` (B, N): smaller noise is kept.

    {"ids_keep" (B, K): kept patch indices in shuffled order, "ids_restore" (B, N): the inverse
    permutation, "mask" (B, N) float: 1 = removed, 0 = kept, in the original patch order}.
    """
    batch, num_patches = noise.shape
    len_keep = num_kept_patches(num_patches, mask_ratio)
    if len_keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio} keeps no patch out of {num_patches}")
    ids_shuffle = jnp.argsort(noise, axis=1)
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    # Patch ids_restore[i] sits at shuffled position ids_restore[i]; positions >= len_keep are removed.
    mask = (ids_restore >= len_keep).astype(jnp.float32)
    return {"ids_keep": ids_shuffle[:, :len_keep], "ids_restore": ids_restore, "mask": mask}


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
def transformer_stack(x: jax.Array, train: bool, *, depth: int, num_heads: int, mlp_dim: int,
                      norm_eps: float = 1e-6, scan: bool = False, remat: bool = False,
                      attention_impl: str = "xla", kernel_init: layers.Initializer = layers.xavier_uniform_init,
                      dtype: layers.Dtype = jnp.float32, param_dtype: layers.Dtype = jnp.float32) -> jax.Array:
    """Returns `x` after `depth` pre-norm `vit.Block`s created in the calling module (`blocks_{i}`, or `blocks`
    stacked over a "layers" axis when scanned). Call it inside a compact method."""
    block_kwargs = dict(num_heads=num_heads, mlp_dim=mlp_dim, norm_eps=norm_eps, attention_impl=attention_impl,
                        kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype)
    block_cls = Block
    if remat:
        # self=0, x=1, train=2, capture_attention=3: the flags must stay Python bools.
        block_cls = nn.remat(Block, prevent_cse=not scan, static_argnums=(2, 3))
    if scan:
        scanned = nn.scan(block_cls, variable_axes={"params": 0},
                          split_rngs={"params": True, "dropout": True, "drop_path": True},
                          in_axes=(nn.broadcast, nn.broadcast), length=depth,
                          metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = scanned(name="blocks", **block_kwargs)(x, train, False)
        return x
    for index in range(depth):
        x, _ = block_cls(name=f"blocks_{index}", **block_kwargs)(x, train, False)
    return x


class MaskedAutoencoder(nn.Module):
    """MAE: encoder on the kept patches, light decoder on all; `__call__` returns (pred, aux).

    pred (B, N, p*p*C): the decoder's per-patch pixels (cls token removed). aux: `latent` (B, 1+K, C)
    encoder output (cls first, then kept patches in shuffled order), `mask` (B, N) 1 = removed,
    `ids_restore` (B, N), `ids_keep` (B, K). Masking draws uniform noise from the rng `masking`
    unless `noise` (B, N) is given.
    """

    encoder: VisionTransformer
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    mask_ratio: float = 0.75

    def validate(self) -> None:
        """Raises ValueError naming the problem if the settings cannot build an MAE."""
        enc = self.encoder
        enc.validate()
        expected = dict(num_classes=0, global_pool="", class_token=True, distilled=False)
        wrong = {k: getattr(enc, k) for k, v in expected.items() if getattr(enc, k) != v}
        if wrong:
            raise ValueError(f"An MAE encoder needs {expected}; got {wrong}")
        if enc.pos_embed not in ("sincos2d", "learn"):
            raise ValueError(f"An MAE encoder needs position embeddings; pos_embed={enc.pos_embed!r}, "
                             "valid choices: ['sincos2d', 'learn']")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        grid = enc.grid_size
        if num_kept_patches(grid[0] * grid[1], self.mask_ratio) < 1:
            raise ValueError(f"mask_ratio={self.mask_ratio} keeps no patch of the {grid} grid")
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError(f"decoder_embed_dim {self.decoder_embed_dim} is not divisible by "
                             f"decoder_num_heads {self.decoder_num_heads}")
        if self.decoder_embed_dim % 4:
            raise ValueError(f"decoder_embed_dim must be divisible by 4 (2-D sin-cos), got {self.decoder_embed_dim}")
        if self.decoder_depth < 1:
            raise ValueError(f"decoder_depth must be >= 1, got {self.decoder_depth}")
        if layers.to_2tuple(enc.patch_size)[0] != layers.to_2tuple(enc.patch_size)[1]:
            raise ValueError(f"MAE needs square patches, got patch_size={enc.patch_size}")

    def layer_ids(self, params) -> Tuple[Dict[str, param_groups.LayerIds], int]:
        """Returns ({path: layer id}, num_layers): the encoder's ids under "encoder/", the decoder in the last group."""
        # The encoder's matcher under "encoder/" leaves the decoder unmatched: last, as timm's head.
        matcher = param_groups.scoped_matcher(self.encoder.group_matcher(), "encoder")
        stacked = ("encoder/blocks",) if self.encoder.scan else ()
        return param_groups.layer_ids_from_matcher(params, matcher, stacked=stacked)

    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns regexes of the param paths not weight-decayed: the encoder's, and the decoder's mask token."""
        return param_groups.scoped_patterns(self.encoder.no_weight_decay(), "encoder") + (r"^decoder/mask_token$",)

    @property
    def patch_size(self) -> int:
        """Returns the (square) patch side."""
        return layers.to_2tuple(self.encoder.patch_size)[0]

    @property
    def num_patches(self) -> int:
        """Returns the number of patches of an image at the encoder's `img_size`."""
        grid = self.encoder.grid_size
        return grid[0] * grid[1]

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False, noise: Optional[jax.Array] = None,
                 mask_ratio: Optional[float] = None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        """Returns (pred (B, N, p*p*C), aux); `mask_ratio` overrides the field (e.g. 0 for a full view)."""
        mask_ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        batch = images.shape[0]
        num_patches = self.num_patches
        if noise is None:
            noise = jax.random.uniform(self.make_rng("masking"), (batch, num_patches))
        if noise.shape != (batch, num_patches):
            raise ValueError(f"noise must have shape {(batch, num_patches)}, got {noise.shape}")
        masking = random_masking(noise, mask_ratio)
        latent, _ = self.encoder(images, train=train, patch_indices=masking["ids_keep"])
        pred = MaeDecoder(
            num_patches=num_patches, grid=self.encoder.grid_size,
            out_features=self.patch_size ** 2 * self.encoder.in_chans,
            embed_dim=self.decoder_embed_dim, depth=self.decoder_depth, num_heads=self.decoder_num_heads,
            mlp_ratio=self.decoder_mlp_ratio, norm_eps=self.encoder.norm_eps, scan=self.encoder.scan,
            remat=self.encoder.remat, attention_impl=self.encoder.attention_impl, dtype=self.encoder.dtype,
            param_dtype=self.encoder.param_dtype, name="decoder")(latent, masking["ids_restore"], train)
        return pred, {"latent": latent, **masking}


class MaeDecoder(nn.Module):
    """Maps the encoder's (B, 1+K, C) tokens to (B, N, out_features) per-patch predictions."""

    num_patches: int
    grid: Tuple[int, int]
    out_features: int
    embed_dim: int = 512
    depth: int = 8
    num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    scan: bool = False
    remat: bool = False
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, latent: jax.Array, ids_restore: jax.Array, train: bool = False) -> jax.Array:
        dense = lambda features, name, axes: nn.Dense(  # noqa: E731
            features, kernel_init=layers.logical(layers.xavier_uniform_init, axes),
            bias_init=layers.logical(nn.initializers.zeros, axes[1:]),
            dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        # Decoder-width axes are named "embed" too (sharded like the encoder's width); an array names
        # a mesh axis once, so the projections leave their other axis unsharded.
        x = dense(self.embed_dim, "embed", (None, "embed"))(latent)
        batch, length, width = x.shape
        mask_token = self.param("mask_token", layers.logical(nn.initializers.normal(0.02), (None, None, "embed")),
                                (1, 1, width), self.param_dtype)
        mask_tokens = jnp.broadcast_to(mask_token.astype(x.dtype), (batch, self.num_patches + 1 - length, width))
        # Append mask tokens after the kept patches, then un-shuffle to the original patch order.
        patches = jnp.concatenate([x[:, 1:], mask_tokens], axis=1)
        patches = jnp.take_along_axis(patches, ids_restore[:, :, None].astype(jnp.int32), axis=1)
        x = jnp.concatenate([x[:, :1], patches], axis=1)
        table = layers.posemb_sincos_2d(self.grid[0], self.grid[1], width)
        table = np.concatenate([np.zeros((1, width), np.float32), table])  # the cls row is zero, as in MAE
        x = x + jnp.asarray(table[None], x.dtype)
        x = layers.constrain(x, ("batch", "length", "embed"))
        x = transformer_stack(x, train, depth=self.depth, num_heads=self.num_heads,
                              mlp_dim=int(width * self.mlp_ratio), norm_eps=self.norm_eps, scan=self.scan,
                              remat=self.remat, attention_impl=self.attention_impl,
                              dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, name="norm")(x)
        x = dense(self.out_features, "pred", ("embed", None))(x)
        return x[:, 1:]


# ---------------------------------------------------------------------------------------------
# The paper's initialisation
# ---------------------------------------------------------------------------------------------
# (path suffix, in axes, out axes) of the kernels whose PyTorch fans differ from flax's default
# (last-but-one axis = in, last = out, the others a receptive field): MAE applies xavier to the
# flattened patch-embed conv, (C, p*p*in). The fused qkv and the attention projection need no
# fix: flax's DenseGeneral draws its kernel on the flattened (in, out) shape, as torch's Linear.
_FUSED_KERNELS = (
    ("patch_embed/proj/kernel", (0, 1, 2), (3,)),   # (p, p, in, C)
)


def _xavier_rescale(shape: Tuple[int, ...], in_axes: Tuple[int, ...], out_axes: Tuple[int, ...]) -> float:
    """Returns the factor that turns flax's xavier-uniform draw for `shape` into PyTorch's for the given fans."""
    receptive = int(np.prod(shape[:-2]))
    flax_fans = (shape[-2] + shape[-1]) * receptive
    torch_fans = int(np.prod([shape[a] for a in in_axes])) + int(np.prod([shape[a] for a in out_axes]))
    return float(np.sqrt(flax_fans / torch_fans))


def mae_initialization(params: Any) -> Any:
    """Returns `params` with the patch-embedding kernel rescaled to xavier-uniform with PyTorch's fans (MAE's init).

    Flax's xavier counts the conv's spatial axes as a receptive field in both fans: for ViT-B/16 its
    bound is sqrt(6 / (256 * (3 + 768))) = 0.0055 where MAE's xavier on the flattened (768, 16*16*3)
    weight gives sqrt(6 / (768 + 768)) = 0.0625. A uniform draw scaled by the ratio of the bounds is
    exactly the wanted uniform, so this needs no new random numbers. It assumes the kernel came from
    flax's `xavier_uniform()` (a `VisionTransformer` with weight_init="xavier"). Works on boxed (logically
    partitioned) or plain trees, scanned (a stacked "layers" axis) or not. The patch-embed bias
    stays zero (MAE leaves PyTorch's default conv bias init there, a negligible difference).
    """
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_box)
    new_leaves = []
    for path, leaf in flat:
        name = path_to_str(path)
        value = leaf.value if is_box(leaf) else leaf
        names = tuple(leaf.names) if is_box(leaf) else ()
        # nn.scan initialises each layer on its own, so flax's fans are those of one layer's shape.
        per_layer_shape = tuple(size for size, axis_name in zip(value.shape, names or (None,) * value.ndim)
                                if axis_name != "layers")
        new_value = value
        for suffix, in_axes, out_axes in _FUSED_KERNELS:
            if name.endswith(suffix) and len(per_layer_shape) == len(in_axes) + len(out_axes):
                new_value = value * jnp.asarray(_xavier_rescale(per_layer_shape, in_axes, out_axes), value.dtype)
        new_leaves.append(leaf.replace_boxed(new_value) if is_box(leaf) else new_value)
    return jax.tree_util.tree_unflatten(treedef, new_leaves)


def sincos_position_table(shape: Tuple[int, ...], num_prefix_tokens: int) -> np.ndarray:
    """Returns MAE's fixed (1, prefix + N, C) sin-cos table (prefix rows zero) for a square grid of N patches.

    The start MAE gives learned position embeddings when a sin-cos encoder is fine-tuned.
    """
    _, length, width = shape
    num_patches = length - num_prefix_tokens
    side = int(round(np.sqrt(num_patches)))
    if side * side != num_patches:
        raise ValueError(f"Cannot build a sin-cos table for {num_patches} positions (not a square grid)")
    table = layers.posemb_sincos_2d(side, side, width)
    table = np.concatenate([np.zeros((num_prefix_tokens, width), np.float32), table])
    return table[None]


def init_variables(module: MaskedAutoencoder, rng: jax.Array, images: jax.Array) -> Dict[str, Any]:
    """Returns the MAE's initial variables with the paper's initialisation (boxed with logical axes)."""
    init_rng, masking_rng = jax.random.split(rng)
    variables = dict(module.init({"params": init_rng, "masking": masking_rng}, images, train=False))
    params = dict(variables["params"])
    if module.encoder.weight_init == "xavier":
        params["encoder"] = mae_initialization(params["encoder"])
    variables["params"] = params
    return variables


__all__ = ["MaeDecoder", "MaskedAutoencoder", "transformer_stack", "init_variables", "mae_encoder_settings",
           "mae_initialization", "num_kept_patches", "patchify", "random_masking", "sincos_position_table",
           "unpatchify"]
