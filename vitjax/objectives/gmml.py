"""GMML: group masked model learning (Atito, Awais, Kittler, "SiT: Self-supervised vIsion Transformer", 2021, and
"GMML is All you Need", 2022). Official code: github.com/Sara-Ahmed/GMML (read and run, not copied).

The encoder sees the whole image, of which connected groups of pixels are corrupted: each image gets,
with probability `replace_prob`, groups filled with the pixels of another image of the batch (covering
about `replace_ratio` of it), otherwise groups filled with N(0, 1) noise (or zeros) covering
U(min(0.5, r), r) of it, r = `mask_ratio` (`vitjax.masking.group_masks`: rectangles drawn until the
share is reached, on an `align`-pixel grid). The tokens of the blocks `recons_blocks` (1-based) are
averaged, put through the encoder's final LayerNorm, and a light head (three Dense + GELU layers, then
a per-patch transposed convolution, the official `RECHead`) predicts the clean image. The loss is the L1
distance to the clean pixels on the corrupted pixels only (`masked_only`), averaged over the batch's
corrupted pixels and channels, as the official `F.l1_loss(...)[mask == 1].mean()`. No momentum encoder.

    model (the encoder): any registered `VisionTransformer` (config.model_name, config.model)
    objective_kwargs: mask_ratio, corruption ("noise" | "zeros"), replace_ratio, replace_prob, align,
        max_block_fraction, recons_blocks, masked_only, features_pool ("avg" | "token"), eval_seed,
        corruption_from ("device" | "data")

Params: {"encoder": the ViT's (loads into a classifier with `init_from`), "rec_head": {...}}. Where the
corruption is drawn is `corruption_from`: "device" (the default) draws it inside the train step (the masking
rng), so a batch is just "image"; "data" reads it from the batch, as the input pipeline makes it (the pp op
`gmml_corrupt(...)` writes "image_corrupted" and "corruption_mask", and `input.gmml_replace` replaces groups by
another image's on the device; both run `vitjax.masking`'s rules, those of the device draw). The option is
explicit, not guessed from the batch, so a pipeline that lost its op fails at the first batch. With "data",
the corruption settings of objective_kwargs serve the eval loss only (eval batches are not corrupted).
"""
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax import masking
from vitjax.models import layers, param_groups
from vitjax.models.vit import VisionTransformer
from vitjax.objectives.base import Objective, Variables
from vitjax.objectives.mae import build_encoder

CORRUPTIONS = masking.CORRUPTIONS
CORRUPTION_SOURCES = ("device", "data")
FEATURE_POOLS = ("avg", "token")


# =============================================================================================
# Corruption and loss
# =============================================================================================
def corrupt(rng: jax.Array, images: jax.Array, *, mask_ratio: float, corruption: str = "noise",
            replace_ratio: float = 0.0, replace_prob: float = 0.5, align: int = 1,
            max_block_fraction: float = 0.3) -> Tuple[jax.Array, jax.Array]:
    """Returns (corrupted images (B, H, W, C), mask (B, H, W) 1 = corrupted): GMML's noise / zeros groups, and with
    probability `replace_prob` per image instead groups copied from a random image of the batch.

    The rules are `vitjax.masking`'s, which the input pipeline's `gmml_corrupt` op and batch step run too; the
    replacement draws from keys 2-4 of `jax.random.split(rng, 5)`, as the batch step does from its own key.
    """
    masking.check_corruption(corruption)
    batch, height, width, _ = images.shape
    keys = jax.random.split(rng, 5)
    mask = masking.group_masks(keys[0], batch, height, width, mask_ratio, align=align,
                               max_block_fraction=max_block_fraction)
    corrupted = masking.fill_groups(images, mask, masking.corruption_fill(keys[1], images.shape, images.dtype,
                                                                          corruption))
    if replace_ratio > 0:
        corrupted, mask = masking.replace_groups(keys[2:], images, corrupted, mask, replace_ratio=replace_ratio,
                                                 replace_prob=replace_prob, align=align,
                                                 max_block_fraction=max_block_fraction)
    return corrupted, mask


def reconstruction_l1(reconstruction: jax.Array, images: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
    """Returns the scalar L1 loss: mean |reconstruction - images| over the masked pixels and all channels (`mask`
    (B, H, W)), or over every pixel when `mask` is None."""
    error = jnp.abs(reconstruction.astype(jnp.float32) - images.astype(jnp.float32))
    if mask is None:
        return jnp.mean(error)
    weights = jnp.broadcast_to(mask[..., None].astype(jnp.float32), error.shape)
    return jnp.sum(error * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def per_example_l1(reconstruction: jax.Array, images: jax.Array, mask: jax.Array) -> jax.Array:
    """Returns the (B,) L1 loss of each image over its masked pixels and channels."""
    error = jnp.abs(reconstruction.astype(jnp.float32) - images.astype(jnp.float32)).mean(axis=-1)
    return jnp.sum(error * mask, axis=(1, 2)) / jnp.maximum(jnp.sum(mask, axis=(1, 2)), 1.0)


# =============================================================================================
# Modules
# =============================================================================================
class ReconstructionHead(nn.Module):
    """GMML's light pixel head: 3 x (Dense, GELU) on each patch token, then a patch_size-stride transposed conv."""

    patch_size: int
    out_chans: int
    hidden_dim: Optional[int] = None   # None: the token width, as the official head
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, grid: Tuple[int, int]) -> jax.Array:
        """Returns (B, H, W, C) images from (B, N, D) patch tokens on `grid`."""
        width = self.hidden_dim or tokens.shape[-1]
        x = tokens
        for index in range(3):
            x = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name=f"fc{index}",
                         kernel_init=layers.logical(layers.trunc_normal_init, ("embed", "mlp")),
                         bias_init=layers.logical(nn.initializers.zeros, ("mlp",)))(x)
            x = layers.gelu(x)
        patch = self.patch_size
        # A transposed conv with kernel = stride = patch: each token paints its own patch; one bias per channel.
        kernel = self.param("kernel", layers.logical(nn.initializers.lecun_normal(), ("mlp", None, None, None)),
                            (width, patch, patch, self.out_chans), self.param_dtype)
        bias = self.param("bias", layers.logical(nn.initializers.zeros, (None,)), (self.out_chans,), self.param_dtype)
        pixels = jnp.einsum("bnd,dijc->bnijc", x, kernel.astype(x.dtype)) + bias.astype(x.dtype)
        batch = x.shape[0]
        pixels = pixels.reshape(batch, grid[0], grid[1], patch, patch, self.out_chans)
        return pixels.transpose(0, 1, 3, 2, 4, 5).reshape(batch, grid[0] * patch, grid[1] * patch, self.out_chans)


def layer_norm_with(params: Dict[str, jax.Array], x: jax.Array, eps: float) -> jax.Array:
    """Returns LayerNorm(x) with the given {scale, bias} (the encoder's own final norm, shared, as the official)."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axis=-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (normed * params["scale"] + params["bias"]).astype(x.dtype)


def encoder_layer_ids(encoder: VisionTransformer, params, scope: str = "encoder") -> Tuple[Dict[str, Any], int]:
    """Returns ({path: layer id}, num_layers) of params holding `encoder` under `scope`; other params (heads) last."""
    matcher = param_groups.scoped_matcher(encoder.group_matcher(), scope)
    stacked = (f"{scope}/blocks",) if encoder.scan else ()
    return param_groups.layer_ids_from_matcher(params, matcher, stacked=stacked)


class GroupMaskedModel(nn.Module):
    """Encoder + reconstruction head; `__call__` returns (reconstruction (B, H, W, C), aux).

    aux: `tokens` (B, T, D) the encoder's final normed tokens, `pooled` (B, D) its class token after the norm.
    """

    encoder: VisionTransformer
    recons_blocks: Tuple[int, ...] = (6, 8, 10, 12)

    def layer_ids(self, params) -> Tuple[Dict[str, Any], int]:
        """Returns ({path: layer id}, num_layers): the encoder's ids under "encoder/", the heads in the last group."""
        return encoder_layer_ids(self.encoder, params)

    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns regexes of the param paths not weight-decayed: the encoder's."""
        return param_groups.scoped_patterns(self.encoder.no_weight_decay(), "encoder")

    @property
    def patch_size(self) -> int:
        """Returns the (square) patch side."""
        return layers.to_2tuple(self.encoder.patch_size)[0]

    def encode(self, images: jax.Array, train: bool) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        """Returns (the normed average of the `recons_blocks` outputs (B, T, D), aux with the final tokens)."""
        pooled, intermediates = self.encoder(images, train=train)
        blocks = intermediates["blocks"]
        chosen = [blocks[index - 1] for index in self.recons_blocks]
        average = sum(chosen[1:], chosen[0]) / len(chosen)
        norm = nn.meta.unbox(self.encoder.variables["params"]["norm"])
        return layer_norm_with(norm, average, self.encoder.norm_eps), {
            "tokens": intermediates["encoded"], "pooled": pooled}

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        tokens, aux = self.encode(images, train)
        reconstruction = ReconstructionHead(self.patch_size, self.encoder.in_chans, dtype=self.encoder.dtype,
                                            param_dtype=self.encoder.param_dtype, name="rec_head")(
            tokens[:, self.encoder.num_prefix_tokens:], self.encoder.grid_size)
        return reconstruction, aux


def check_recons_blocks(recons_blocks: Sequence[int], depth: int) -> Tuple[int, ...]:
    """Returns `recons_blocks` as a tuple; raises ValueError unless they are distinct block numbers in [1, depth]."""
    blocks = tuple(recons_blocks)
    if (not blocks or len(set(blocks)) != len(blocks)
            or any(isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= depth for b in blocks)):
        raise ValueError(f"recons_blocks must be distinct block numbers in [1, {depth}] (1-based, the encoder's "
                         f"depth), got {recons_blocks!r}")
    return blocks


def check_settings(kwargs: Dict[str, Any], encoder: VisionTransformer) -> None:
    """Raises ValueError naming the valid choices for bad GMML settings of `encoder`."""
    masking.check_mask_ratio(kwargs["mask_ratio"], "objective_kwargs.mask_ratio")
    if kwargs["replace_ratio"]:
        masking.check_mask_ratio(kwargs["replace_ratio"], "objective_kwargs.replace_ratio (0 turns it off)")
    if not 0.0 <= float(kwargs["replace_prob"]) <= 1.0:
        raise ValueError(f"objective_kwargs.replace_prob must be in [0, 1], got {kwargs['replace_prob']!r}")
    if kwargs["corruption"] not in CORRUPTIONS:
        raise ValueError(f"objective_kwargs.corruption={kwargs['corruption']!r} is not valid; valid choices: "
                         f"{list(CORRUPTIONS)}")
    if kwargs["corruption_from"] not in CORRUPTION_SOURCES:
        raise ValueError(f"objective_kwargs.corruption_from={kwargs['corruption_from']!r} is not valid; valid "
                         f"choices: {list(CORRUPTION_SOURCES)}")
    if kwargs["features_pool"] not in FEATURE_POOLS:
        raise ValueError(f"objective_kwargs.features_pool={kwargs['features_pool']!r} is not valid; valid choices: "
                         f"{list(FEATURE_POOLS)}")
    patch = layers.to_2tuple(encoder.patch_size)
    if patch[0] != patch[1]:
        raise ValueError(f"GMML needs square patches, got patch_size={encoder.patch_size}")
    if encoder.token_method() is not None:
        raise ValueError("GMML reconstructs every patch: the encoder cannot use token reduction")
    height, width = layers.to_2tuple(encoder.img_size)
    # The mask generator's own checks (grid, block sizes), before anything is traced.
    masking.check_group_settings(height, width, int(kwargs["align"]), float(kwargs["max_block_fraction"]))


# =============================================================================================
# The objective
# =============================================================================================
class GMML(Objective):
    """GMML pretraining; metrics: `loss` (L1 on the corrupted pixels), `masked_fraction`."""

    batch_keys = ("image",)
    eval_batch_keys = ("image",)
    # The official repository's defaults (Sara-Ahmed/GMML main.py): drop_perc 0.75, drop_replace 0.3 with
    # probability 1/2 (one drop type), drop_type noise, drop_align 1, blocks up to 0.3 of a side, reconstruction
    # from the mean of blocks 6, 8, 10, 12, loss on the corrupted pixels only.
    default_kwargs: Dict[str, Any] = dict(mask_ratio=0.75, corruption="noise", replace_ratio=0.3, replace_prob=0.5,
                                          align=1, max_block_fraction=0.3, recons_blocks=(6, 8, 10, 12),
                                          masked_only=True, features_pool="avg", eval_seed=0,
                                          corruption_from="device")

    def __init__(self, config):
        super().__init__(config)
        user_model = dict(config.model or {})
        if user_model.get("num_classes"):
            raise ValueError(f"The {type(self).__name__} encoder has no classifier: config.model.num_classes must be 0 "
                             f"(or unset), got {user_model['num_classes']!r}")
        encoder = build_encoder(config, num_classes=0, global_pool="token")
        encoder.validate()
        check_settings(self.kwargs, encoder)
        recons_blocks = check_recons_blocks(self.kwargs["recons_blocks"], encoder.depth)
        self.module = self.build_module(encoder, recons_blocks)
        if self.kwargs["corruption_from"] == "data":
            views = [None] if self.batch_keys == ("image",) else range(len(self.batch_keys))
            fields = [masking.corruption_fields(view) for view in views]
            self.batch_keys = tuple(field[i] for i in range(3) for field in fields)

    def example_batch(self, image):
        """Returns zero rows of the batch keys: the image(s), and with corruption_from="data" their corruption."""
        return {key: image[..., 0] if key.startswith("corruption_mask") else image for key in self.batch_keys}

    def corrupted_batch(self, batch: Dict[str, Any], rng: jax.Array, clean_keys: Sequence[str]
                        ) -> Tuple[jax.Array, jax.Array, jax.Array]:
        """Returns (clean, corrupted, mask) of the `clean_keys` images concatenated: read from the batch
        (corruption_from="data") or drawn here with `rng`."""
        clean = jnp.concatenate([batch[key] for key in clean_keys], axis=0)
        if self.kwargs["corruption_from"] != "data":
            return (clean, *self.corrupt(rng, clean))
        suffixes = [key[len("image"):] for key in clean_keys]
        corrupted = jnp.concatenate([batch[f"image_corrupted{suffix}"] for suffix in suffixes], axis=0)
        mask = jnp.concatenate([batch[f"corruption_mask{suffix}"] for suffix in suffixes], axis=0)
        return clean, corrupted.astype(clean.dtype), mask.astype(jnp.float32)

    def build_module(self, encoder: VisionTransformer, recons_blocks: Tuple[int, ...]) -> nn.Module:
        """Returns the trained module (a subclass adds heads)."""
        return GroupMaskedModel(encoder=encoder, recons_blocks=recons_blocks)

    def corrupt(self, rng: jax.Array, images: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """Returns (corrupted images, (B, H, W) mask) with this objective's settings."""
        kwargs = self.kwargs
        return corrupt(rng, images, mask_ratio=float(kwargs["mask_ratio"]), corruption=kwargs["corruption"],
                       replace_ratio=float(kwargs["replace_ratio"]), replace_prob=float(kwargs["replace_prob"]),
                       align=int(kwargs["align"]), max_block_fraction=float(kwargs["max_block_fraction"]))

    def init_variables(self, rng: jax.Array, batch: Dict[str, Any]) -> Variables:
        """Returns the model's initial variables."""
        images = batch[self.batch_keys[0]]
        return dict(self.module.init({"params": rng}, images, train=False))

    def _apply(self, variables, images, train, rng):
        dropout_rng, drop_path_rng = jax.random.split(rng)
        return self.module.apply(variables, images, train=train, rngs={"dropout": dropout_rng,
                                                                       "drop_path": drop_path_rng})

    def reconstruction_loss(self, variables: Variables, batch: Dict[str, Any], rng: jax.Array, train: bool):
        """Returns (scalar L1 loss, per-example loss (B,), masked fraction) of batch["image"], corrupted as
        `corrupted_batch` says (eval: always drawn here)."""
        corrupt_rng, model_rng = jax.random.split(rng)
        if train:
            images, corrupted, mask = self.corrupted_batch(batch, corrupt_rng, ("image",))
        else:
            images = batch["image"]
            corrupted, mask = self.corrupt(corrupt_rng, images)
        reconstruction, _ = self._apply(variables, corrupted, train, model_rng)
        loss = reconstruction_l1(reconstruction, images, mask if self.kwargs["masked_only"] else None)
        return loss, per_example_l1(reconstruction, images, mask), jnp.mean(mask)

    def train_loss(self, variables: Variables, batch: Dict[str, Any], rng: jax.Array
                   ) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (L1 on the corrupted pixels, {"metrics": {"loss", "masked_fraction"}, "updates": {}})."""
        loss, _, fraction = self.reconstruction_loss(variables, batch, rng, True)
        return loss, {"metrics": {"masked_fraction": fraction}, "updates": {}}

    def eval_metrics(self, variables: Variables, batch: Dict[str, Any]) -> Dict[str, jax.Array]:
        """Returns per-example {"loss"}: the L1 reconstruction loss under a fixed (seeded) corruption."""
        _, per_example, _ = self.reconstruction_loss(variables, batch,
                                                     jax.random.key(int(self.kwargs["eval_seed"])), False)
        return {"loss": per_example}

    def features(self, variables: Variables, images: jax.Array) -> jax.Array:
        """Returns the clean image's features: the mean patch token after the final norm ("avg") or the class token."""
        encoder = self.module.encoder
        pooled, intermediates = encoder.apply({"params": variables["params"]["encoder"]}, images, train=False)
        if self.kwargs["features_pool"] == "avg" or not encoder.class_token:
            return intermediates["encoded"][:, encoder.num_prefix_tokens:].mean(axis=1).astype(jnp.float32)
        return pooled.astype(jnp.float32)


__all__ = ["CORRUPTIONS", "CORRUPTION_SOURCES", "GMML", "GroupMaskedModel", "ReconstructionHead", "check_recons_blocks", "corrupt",
           "encoder_layer_ids",
           "layer_norm_with", "per_example_l1", "reconstruction_l1"]
