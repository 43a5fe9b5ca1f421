"""SparK: sparse and hierarchical masked modelling for convnets (Tian et al., ICLR 2023, "Designing BERT for
Convolutional Networks: Sparse and Hierarchical Masked Modeling"). Official code: github.com/keyu-tian/SparK
(MIT licence; read and run for the parity fixture, this file is our own).

Each image is cut into patches of the encoder's total stride (32 for ConvNeXt); a random `mask_ratio` of
them is removed (round(N (1 - mask_ratio)) kept per image, as the official `mask`). The encoder sees the
image with removed patches zeroed and runs in its sparse mode (`ConvNeXt(..., active=...)`: every feature
map is re-masked after the stem, each downsampling conv and each block's branch, so removed cells stay
empty, the official masked convolution emulated with dense ops; its LayerNorms act per position, i.e. on
kept cells only). Its stage outputs, smallest first, are "densified": normalised over the kept cells only
(`densify_norm`: "ln" a channel LayerNorm, ConvNeXt's official choice; "bn" a BatchNorm whose statistics
count kept cells only, the ResNets' choice; "none"), removed cells filled with a learned mask token per
scale, and projected to the decoder's width at that scale (the identity where the widths already agree
at the smallest scale, else a 1x1 conv there and a 3x3 conv at the others). The light decoder (the
official `LightDecoder`) adds them in, scale by scale, to a UNet-like chain of upsampling blocks
(4x4 stride-2 transposed conv, then 3x3 conv, BatchNorm, ReLU6, 3x3 conv, BatchNorm; widths halving from
`decoder_width`), and a 1x1 conv predicts the pixels. The loss is the squared error to each patch's pixels
normalised by the patch's mean and unbiased std (+1e-6 under the root), averaged over each patch's values,
then over the removed patches of the batch.

    model (the encoder): any registered ConvNeXt with the patch stem and no GRN (config.model_name,
        config.model); a ViT is rejected before anything compiles.
    objective_kwargs: mask_ratio, decoder_width, densify_norm ("ln" | "bn" | "none"), eval_seed

Params: {"encoder": the ConvNeXt's (loads into a classifier with `init_from`; its unused head norm stays
at its initialisation), "decoder": {...}, "densify_<i>": {...}, "mask_token_<i>": (C_i,)}; i = 0 is the
smallest scale. The decoder's BatchNorm statistics live in `batch_stats`.
"""
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax import masking, models
from vitjax.models import layers, param_groups
from vitjax.models.convnext import ConvNeXt, mask_feature_map
from vitjax.objectives.base import Objective, Variables, model_overrides

DENSIFY_NORMS = ("ln", "bn", "none")


# =============================================================================================
# Masks and loss
# =============================================================================================
def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Returns how many of `num_patches` patches SparK keeps: round(num_patches x (1 - mask_ratio))."""
    return int(round(num_patches * (1.0 - mask_ratio)))


def random_active(rng: jax.Array, batch: int, grid: Tuple[int, int], mask_ratio: float) -> jax.Array:
    """Returns a (B, h, w) float mask, 1 = kept: per image a uniformly random subset of `num_kept` patches."""
    num_patches = grid[0] * grid[1]
    keep = num_kept(num_patches, mask_ratio)
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(rng, (batch, num_patches)), axis=1), axis=1)
    return (ranks < keep).astype(jnp.float32).reshape(batch, *grid)


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """Returns (B, L, patch * patch * C) patches of NHWC `images`, row-major over the grid."""
    batch, height, width, channels = images.shape
    x = images.reshape(batch, height // patch, patch, width // patch, patch, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, (height // patch) * (width // patch), -1)


def per_patch_loss(images: jax.Array, reconstruction: jax.Array, patch: int) -> jax.Array:
    """Returns the (B, L) mean squared error of each patch to its pixels normalised by its mean and unbiased std."""
    target = patchify(images.astype(jnp.float32), patch)
    prediction = patchify(reconstruction.astype(jnp.float32), patch)
    mean = target.mean(axis=-1, keepdims=True)
    std = jnp.sqrt(jnp.var(target, axis=-1, keepdims=True, ddof=1) + 1e-6)
    return jnp.mean(jnp.square(prediction - (target - mean) / std), axis=-1)


def masked_loss(per_patch: jax.Array, active: jax.Array) -> jax.Array:
    """Returns the scalar loss: the mean of `per_patch` (B, L) over the removed patches of the batch."""
    removed = 1.0 - active.reshape(per_patch.shape).astype(jnp.float32)
    return jnp.sum(per_patch * removed) / (jnp.sum(removed) + 1e-8)


# =============================================================================================
# Modules
# =============================================================================================
def _conv(features: int, kernel: int, use_bias: bool, name: str, kernel_init=None) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), use_bias=use_bias, name=name,
                   kernel_init=layers.logical(kernel_init or layers.trunc_normal_init, (None, None, None, "embed")),
                   bias_init=layers.logical(nn.initializers.zeros, ("embed",)))


class SparseBatchNorm(nn.Module):
    """BatchNorm of an NHWC map whose statistics count the kept cells only (PyTorch semantics, as `layers.BatchNorm`);
    returns the normalised map (removed cells hold values the caller replaces)."""

    use_running_average: bool
    momentum: float = 0.1
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, active: jax.Array) -> jax.Array:
        features = x.shape[-1]
        running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        running_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        inputs = x.astype(jnp.float32)
        weights = mask_feature_map(jnp.ones(x.shape[:3] + (1,), jnp.float32), active)
        if self.use_running_average:
            mean, var = running_mean.value, running_var.value
        else:
            count = jnp.maximum(jnp.sum(weights), 1.0)
            mean = jnp.sum(inputs * weights, axis=(0, 1, 2)) / count
            var = jnp.sum(jnp.square(inputs - mean) * weights, axis=(0, 1, 2)) / count
            if not self.is_initializing():
                unbiased = var * count / jnp.maximum(count - 1.0, 1.0)
                running_mean.value = (1.0 - self.momentum) * running_mean.value + self.momentum * mean
                running_var.value = (1.0 - self.momentum) * running_var.value + self.momentum * unbiased
        scale = self.param("scale", layers.logical(nn.initializers.ones, ("embed",)), (features,), jnp.float32)
        bias = self.param("bias", layers.logical(nn.initializers.zeros, ("embed",)), (features,), jnp.float32)
        return ((inputs - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias).astype(x.dtype)


class UpsampleBlock(nn.Module):
    """The official UNetBlock: 4x4 stride-2 transposed conv (x2 size), 3x3 conv, BN, ReLU6, 3x3 conv, BN."""

    out_features: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        channels = x.shape[-1]
        # lax.conv_transpose pads the dilated input: 4 - 1 - 1 on each side is PyTorch's padding=1.
        x = nn.ConvTranspose(channels, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)), name="up_sample",
                             kernel_init=layers.logical(nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                                                        (None, None, None, "embed")),
                             bias_init=layers.logical(nn.initializers.zeros, ("embed",)))(x)
        x = _conv(channels, 3, False, "conv_0")(x)
        x = jax.nn.relu6(layers.batch_norm(train, name="bn_0")(x))
        x = _conv(self.out_features, 3, False, "conv_1")(x)
        return layers.batch_norm(train, name="bn_1")(x)


def decoder_widths(width: int, upsample_ratio: int) -> Tuple[int, ...]:
    """Returns the decoder's widths from the smallest scale up: `width` halved once per 2x upsampling."""
    steps = int(round(math.log2(upsample_ratio)))
    return tuple(width // 2 ** index for index in range(steps + 1))


class LightDecoder(nn.Module):
    """The official densifying decoder: inputs added in scale by scale (smallest first) before each upsampling block,
    then a 1x1 conv to `out_chans`; returns (B, H, W, out_chans)."""

    width: int
    upsample_ratio: int
    out_chans: int

    @nn.compact
    def __call__(self, to_decode: Sequence[Optional[jax.Array]], train: bool) -> jax.Array:
        widths = decoder_widths(self.width, self.upsample_ratio)
        x = 0.0
        for index, out_features in enumerate(widths[1:]):
            if index < len(to_decode) and to_decode[index] is not None:
                x = x + to_decode[index]
            x = UpsampleBlock(out_features, name=f"blocks_{index}")(x, train)
        return nn.Conv(self.out_chans, (1, 1), name="proj",
                       kernel_init=layers.logical(layers.trunc_normal_init, (None, None, None, "embed")),
                       bias_init=layers.logical(nn.initializers.zeros, ("embed",)))(x)


def _mask_token_init(key, shape, dtype=jnp.float32):
    # The official trunc_normal_(std=.02, a=-.02, b=.02): cut at one standard deviation.
    return 0.02 * jax.random.truncated_normal(key, -1.0, 1.0, shape, dtype)


class SparKModel(nn.Module):
    """Sparse ConvNeXt encoder + densify layers + light decoder; `__call__(images, active, train)` returns
    (reconstruction (B, H, W, C), aux): `features` the encoder's stage outputs (largest first, removed cells 0),
    `to_decode` the densified maps the decoder adds (smallest first)."""

    encoder: ConvNeXt
    decoder_width: int = 768
    densify_norm: str = "ln"

    def layer_ids(self, params) -> Tuple[Dict[str, Any], int]:
        """Returns ({path: layer id}, num_layers): the encoder's ids under "encoder/", the rest in the last group."""
        matcher = param_groups.scoped_matcher(self.encoder.group_matcher(), "encoder")
        return param_groups.layer_ids_from_matcher(params, matcher)

    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns regexes of the param paths not weight-decayed: the encoder's and the mask tokens."""
        return param_groups.scoped_patterns(self.encoder.no_weight_decay(), "encoder") + (r"^mask_token_",)

    @nn.compact
    def __call__(self, images: jax.Array, active: jax.Array, train: bool = False
                 ) -> Tuple[jax.Array, Dict[str, Any]]:
        stride = self.encoder.total_stride
        pixels_active = mask_feature_map(jnp.ones(images.shape[:3] + (1,), images.dtype), active)
        _, intermediates = self.encoder(images * pixels_active, train=train, active=active)
        features: List[jax.Array] = list(intermediates["stages"])
        to_decode = []
        width = self.decoder_width
        for index, feature in enumerate(reversed(features)):
            channels = feature.shape[-1]
            if self.densify_norm == "ln":
                x = layers.ChannelNorm("layernorm", 1e-6, True, name=f"densify_{index}_norm")(feature)
            elif self.densify_norm == "bn":
                x = SparseBatchNorm(not train, name=f"densify_{index}_norm")(feature, active)
            else:
                x = feature
            token = self.param(f"mask_token_{index}", layers.logical(_mask_token_init, ("embed",)), (channels,),
                               jnp.float32)
            kept = mask_feature_map(jnp.ones(feature.shape[:3] + (1,), jnp.float32), active) > 0
            x = jnp.where(kept, x, token.astype(x.dtype))
            if not (index == 0 and channels == width):
                kernel = 1 if index == 0 else 3
                # PyTorch's default conv init (the official projections keep it): U(+-1/sqrt(fan_in)).
                x = _conv(width, kernel, True, f"densify_{index}_proj",
                          nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"))(x)
            to_decode.append(x)
            width //= 2
        reconstruction = LightDecoder(self.decoder_width, stride, self.encoder.in_chans, name="decoder")(
            to_decode, train)
        return reconstruction, {"features": features, "to_decode": to_decode}


# =============================================================================================
# The objective
# =============================================================================================
def sparse_convnext_names() -> List[str]:
    """Returns the registered models SparK takes: ConvNeXts with the patch stem and no GRN."""
    names = []
    for name in models.list_models("convnext"):
        entry = models.get_entry(name)
        if (issubclass(entry.module_class, ConvNeXt) and entry.defaults.get("stem_type", "patch") == "patch"
                and not entry.defaults.get("use_grn", False)):
            names.append(name)
    return names


def build_encoder(config) -> ConvNeXt:
    """Returns the ConvNeXt encoder of `config` (no classifier); raises ValueError naming the valid models."""
    valid = sparse_convnext_names()
    entry = models.get_entry(config.model_name)
    if not issubclass(entry.module_class, ConvNeXt):
        raise ValueError(f"SparK needs a ConvNeXt encoder; model {config.model_name!r} is a "
                         f"{entry.module_class.__name__}. Valid choices: {valid}")
    overrides = model_overrides(config.model)
    if overrides.get("num_classes"):
        raise ValueError(f"The SparK encoder has no classifier: config.model.num_classes must be 0 (or unset), got "
                         f"{overrides['num_classes']!r}")
    overrides["num_classes"] = 0
    encoder = models.create(config.model_name, **overrides)
    encoder.validate()
    if encoder.stem_type != "patch" or encoder.use_grn:
        raise ValueError(f"SparK's sparse encoder needs the patch stem and no GRN (stem_type={encoder.stem_type!r}, "
                         f"use_grn={encoder.use_grn}); valid choices: {valid}")
    return encoder


def check_settings(kwargs: Dict[str, Any], encoder: ConvNeXt) -> Tuple[int, int]:
    """Returns the mask grid (h, w); raises ValueError naming the valid choices for bad SparK settings."""
    ratio = masking.check_mask_ratio(kwargs["mask_ratio"], "objective_kwargs.mask_ratio")
    if kwargs["densify_norm"] not in DENSIFY_NORMS:
        raise ValueError(f"objective_kwargs.densify_norm={kwargs['densify_norm']!r} is not valid; valid choices: "
                         f"{list(DENSIFY_NORMS)}")
    stride = encoder.total_stride
    if stride & (stride - 1):
        raise ValueError(f"SparK's decoder upsamples by 2 per block: the encoder's total stride must be a power of 2, "
                         f"got {stride}")
    widths = decoder_widths(int(kwargs["decoder_width"]), stride)
    if widths[-1] < 1:
        raise ValueError(f"objective_kwargs.decoder_width={kwargs['decoder_width']} halves to 0 over "
                         f"{len(widths) - 1} upsampling blocks; use at least {2 ** (len(widths) - 1)}")
    if len(encoder.depths) > len(widths) - 1:
        raise ValueError(f"The encoder has {len(encoder.depths)} stages, more than the decoder's "
                         f"{len(widths) - 1} scales")
    height, width = layers.to_2tuple(encoder.img_size)
    grid = (height // stride, width // stride)
    keep = num_kept(grid[0] * grid[1], ratio)
    if not 0 < keep < grid[0] * grid[1]:
        raise ValueError(f"mask_ratio={ratio} keeps {keep} of the {grid[0] * grid[1]} patches of {stride} px of a "
                         f"{(height, width)} image: at least one must be kept and one removed (raise img_size or "
                         f"change mask_ratio)")
    return grid


class SparK(Objective):
    """SparK pretraining; metrics: `loss` (normalised-pixel MSE on the removed patches)."""

    batch_keys = ("image",)
    eval_batch_keys = ("image",)
    # The official defaults for ConvNeXt (pretrain/utils/arg_util.py): mask 0.6, densify LayerNorm, width 768.
    default_kwargs: Dict[str, Any] = dict(mask_ratio=0.6, decoder_width=768, densify_norm="ln", eval_seed=0)

    def __init__(self, config):
        super().__init__(config)
        encoder = build_encoder(config)
        self.grid = check_settings(self.kwargs, encoder)
        self.module = SparKModel(encoder=encoder, decoder_width=int(self.kwargs["decoder_width"]),
                                 densify_norm=self.kwargs["densify_norm"])

    @property
    def patch_size(self) -> int:
        """Returns the side of a masked patch: the encoder's total stride."""
        return self.module.encoder.total_stride

    def init_variables(self, rng: jax.Array, batch: Dict[str, Any]) -> Variables:
        """Returns the model's initial variables (params and the decoder's batch statistics)."""
        images = batch[self.batch_keys[0]]
        active = jnp.ones((images.shape[0],) + self.grid, jnp.float32)
        return dict(self.module.init({"params": rng}, images, active, train=False))

    def loss_given_mask(self, variables: Variables, images: jax.Array, active: jax.Array, train: bool,
                        rng: Optional[jax.Array] = None):
        """Returns (scalar loss, per-example loss (B,), reconstruction, aux, batch-stat updates) for a given mask."""
        rngs = dict(zip(("drop_path", "dropout"), jax.random.split(rng))) if rng is not None else {}
        if train:
            (reconstruction, aux), updates = self.module.apply(variables, images, active, train=True,
                                                               mutable=["batch_stats"], rngs=rngs)
        else:
            (reconstruction, aux), updates = self.module.apply(variables, images, active, train=False), {}
        per_patch = per_patch_loss(images, reconstruction, self.patch_size)
        removed = 1.0 - active.reshape(per_patch.shape)
        per_example = jnp.sum(per_patch * removed, axis=1) / jnp.maximum(jnp.sum(removed, axis=1), 1.0)
        return masked_loss(per_patch, active), per_example, reconstruction, aux, dict(updates)

    def train_loss(self, variables: Variables, batch: Dict[str, Any], rng: jax.Array
                   ) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (loss on the removed patches, {"metrics": {}, "updates": {"batch_stats"}})."""
        mask_rng, model_rng = jax.random.split(rng)
        images = batch["image"]
        active = random_active(mask_rng, images.shape[0], self.grid, float(self.kwargs["mask_ratio"]))
        loss, _, _, _, updates = self.loss_given_mask(variables, images, active, True, model_rng)
        return loss, {"metrics": {}, "updates": updates}

    def eval_metrics(self, variables: Variables, batch: Dict[str, Any]) -> Dict[str, jax.Array]:
        """Returns per-example {"loss"}: the reconstruction loss under a fixed (seeded) random mask."""
        images = batch["image"]
        active = random_active(jax.random.key(int(self.kwargs["eval_seed"])), images.shape[0], self.grid,
                               float(self.kwargs["mask_ratio"]))
        _, per_example, _, _, _ = self.loss_given_mask(variables, images, active, False)
        return {"loss": per_example}

    def features(self, variables: Variables, images: jax.Array) -> jax.Array:
        """Returns the dense encoder's features of the whole image: its last stage averaged over positions."""
        _, intermediates = self.module.encoder.apply({"params": variables["params"]["encoder"]}, images, train=False)
        return jnp.mean(intermediates["stages"][-1], axis=(1, 2)).astype(jnp.float32)


__all__ = ["DENSIFY_NORMS", "LightDecoder", "SparK", "SparKModel", "SparseBatchNorm", "UpsampleBlock",
           "build_encoder", "check_settings", "decoder_widths", "masked_loss", "num_kept", "patchify",
           "per_patch_loss", "random_active", "sparse_convnext_names"]
