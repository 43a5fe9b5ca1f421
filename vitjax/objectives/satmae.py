"""SatMAE++ pretraining (Noman et al., CVPR 2024, "Rethinking Transformers Pre-training for Multi-Spectral
Satellite Imagery"; official code techmn/satmae_pp, whose `main_pretrain.py`, `engine_pretrain.py`,
`models_mae_group_channels.py`, `models_mae.py` and `util/datasets.py` this follows).

The batch's "image" is the LARGEST scale: (B, S x H, S x W, C) with S = 2 ** num_scales and H x W the
encoder's `img_size`. As the official loaders, each smaller scale is the one above halved by bilinear
interpolation (an exact 2x2 mean, `models.satmae.downsample2x`); the smallest is the MAE's input. The model
(`vitjax.models.satmae.SatMAE`) reconstructs the masked input and, from that reconstruction, the image at
2x, 4x, ... The loss, as `engine_pretrain.py`:

    loss = mse_weight x MSE(removed patches) + (1 - mse_weight) x sum_k scale_weights[k] x L1(scale k)

with mse_weight 0.6 and equal scale weights (0.5, 0.5 for two scales). MSE is MAE's on the removed
patches, per-patch normalised pixels only with `norm_pix_loss` (off in their recipe); L1 is the mean
absolute error over every pixel of a scale.

Variants (`objective_kwargs.channel_groups`):
  * a tuple of band groups (default theirs for fMoW-Sentinel's 10 kept bands: ((0, 1, 2, 6), (3, 4, 5, 7),
    (8, 9))): the group-channel MAE, one patch embedding per group; masking independent across groups
    (`spatial_mask=False`, their default) or per location; two up-sampling blocks (2x, 4x).
  * None: the RGB variant, the plain MAE (`vitjax.models.mae.MaskedAutoencoder`) and one block (2x).

Quirk kept for parity: the group decoder stacks its heads' outputs in the groups' order while the target is
in band order, so with groups that are not in band order, the loss compares head output k with band k (the
official `forward_loss`; inherited from SatMAE). It is a fixed relabelling of what the heads learn.

The encoder's width, depth, heads, patch and image size (the MAE input) and input channels come from the
`VisionTransformer` of `config.model_name` / `config.model`.

    objective_kwargs: mask_ratio, channel_groups, spatial_mask, num_scales (None: 2 grouped, 1 RGB), proj_ratio,
    group_embed_dim, decoder_embed_dim, decoder_group_embed_dim, decoder_depth, decoder_num_heads, decoder_mlp_ratio,
    norm_pix_loss, mse_weight, scale_weights, eval_seed
"""
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from vitjax import masking
from vitjax.models import layers
from vitjax.models import mae as mae_model
from vitjax.models import satmae as satmae_model
from vitjax.objectives import mae as mae_objective
from vitjax.objectives.base import Objective, Variables, model_overrides

# fMoW-Sentinel's 13 bands less B1, B9, B10 (their --dropped_bands 0 9 10): RGB+NIR, red edge, SWIR.
SENTINEL_GROUPS = ((0, 1, 2, 6), (3, 4, 5, 7), (8, 9))


def input_pyramid(images: jax.Array, num_scales: int) -> List[jax.Array]:
    """Returns [model input, 2x, 4x, ...]: `images` (the largest scale) halved `num_scales` times, smallest first."""
    pyramid = [images.astype(jnp.float32)]
    for _ in range(num_scales):
        pyramid.append(satmae_model.downsample2x(pyramid[-1]))
    return pyramid[::-1]


def group_reconstruction_loss(images: jax.Array, pred: jax.Array, mask: jax.Array, channel_groups, patch_size: int,
                              norm_pix_loss: bool) -> jax.Array:
    """Returns the per-example (B,) MSE of the group MAE on its removed tokens, as the official `forward_loss`.

    pred (B, C, L, p*p) is compared with the target's band at the same index; each group's loss is the mean over
    the group's bands, counted on the group's removed patches (mask (B, G, L), 1 = removed).
    """
    target = mae_objective.reconstruction_target(images, patch_size, norm_pix_loss)   # (B, L, p*p*C), (p, p, c)
    batch, num_patches, _ = target.shape
    channels = images.shape[-1]
    target = target.reshape(batch, num_patches, patch_size * patch_size, channels).transpose(0, 3, 1, 2)
    per_band = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)   # (B, C, L)
    total = 0.0
    for index, group in enumerate(channel_groups):
        total = total + jnp.sum(per_band[:, list(group)].mean(axis=1) * mask[:, index], axis=1)
    return total / jnp.sum(mask, axis=(1, 2))


class SatMAE(Objective):
    """SatMAE++ pretraining; metrics: `loss` (the weighted total), `mse`, `l1_{2**k}x` per scale, `multiscale`."""

    batch_keys = ("image",)
    eval_batch_keys = ("image",)
    # Their pretraining defaults (main_pretrain.py, models_mae_group_channels.py, engine_pretrain.py).
    default_kwargs: Dict[str, Any] = dict(
        mask_ratio=0.75, channel_groups=SENTINEL_GROUPS, spatial_mask=False, num_scales=None, proj_ratio=4,
        group_embed_dim=256, decoder_embed_dim=512, decoder_group_embed_dim=128, decoder_depth=8,
        decoder_num_heads=16, decoder_mlp_ratio=4.0, norm_pix_loss=False, mse_weight=0.6, scale_weights=None,
        eval_seed=0)

    def __init__(self, config):
        super().__init__(config)
        kwargs = self.kwargs
        ratio = masking.check_mask_ratio(kwargs["mask_ratio"], "objective_kwargs.mask_ratio")
        user_model = dict(config.model or {})
        for key, required in dict(num_classes=0, global_pool="").items():
            if key in user_model and user_model[key] != required:
                raise ValueError(f"The SatMAE++ encoder has no head: config.model.{key} must be {required!r} "
                                 f"(or unset), got {user_model[key]!r}")
        defaults = {key: value for key, value in dict(pos_embed="sincos2d", weight_init="xavier").items()
                    if key not in user_model}
        encoder = mae_objective.build_encoder(config, num_classes=0, global_pool="", **defaults)
        groups = kwargs["channel_groups"]
        num_scales = kwargs["num_scales"]
        num_scales = (1 if groups is None else 2) if num_scales is None else num_scales
        if isinstance(num_scales, bool) or not isinstance(num_scales, int) or num_scales < 1:
            raise ValueError(f"objective_kwargs.num_scales must be an int >= 1 (or None), got {num_scales!r}")
        decoder = dict(decoder_embed_dim=int(kwargs["decoder_embed_dim"]),
                       decoder_depth=int(kwargs["decoder_depth"]),
                       decoder_num_heads=int(kwargs["decoder_num_heads"]),
                       decoder_mlp_ratio=float(kwargs["decoder_mlp_ratio"]), mask_ratio=ratio)
        if groups is None:
            backbone = mae_model.MaskedAutoencoder(encoder=encoder, **decoder)
        else:
            try:
                groups = satmae_model.check_channel_groups(groups, encoder.in_chans)
            except ValueError as error:
                raise ValueError(f"objective_kwargs.channel_groups: {error} (config.model.in_chans="
                                 f"{encoder.in_chans}); or None for the RGB (single patch embedding) variant") from None
            height, width = layers.to_2tuple(encoder.img_size)
            patch = layers.to_2tuple(encoder.patch_size)
            if height != width or patch[0] != patch[1]:
                raise ValueError(f"SatMAE++ needs square images and patches, got img_size={encoder.img_size}, "
                                 f"patch_size={encoder.patch_size}")
            backbone = satmae_model.GroupChannelMAE(
                img_size=height, patch_size=patch[0], in_chans=encoder.in_chans, channel_groups=groups,
                spatial_mask=bool(kwargs["spatial_mask"]), embed_dim=encoder.embed_dim,
                group_embed_dim=int(kwargs["group_embed_dim"]), depth=encoder.depth, num_heads=encoder.num_heads,
                mlp_dim=int(encoder.mlp_dim or encoder.embed_dim * encoder.mlp_ratio),
                decoder_group_embed_dim=int(kwargs["decoder_group_embed_dim"]), norm_eps=encoder.norm_eps,
                scan=encoder.scan, remat=encoder.remat, attention_impl=encoder.attention_impl, **decoder)
        self.module = satmae_model.SatMAE(backbone=backbone, num_scales=num_scales,
                                          proj_ratio=int(kwargs["proj_ratio"]))
        self.module.validate()
        self.num_scales = num_scales
        self.norm_pix_loss = bool(kwargs["norm_pix_loss"])
        self.mse_weight = float(kwargs["mse_weight"])
        if not 0.0 <= self.mse_weight <= 1.0:
            raise ValueError(f"objective_kwargs.mse_weight must be in [0, 1], got {self.mse_weight}")
        weights = kwargs["scale_weights"]
        weights = (1.0 / num_scales,) * num_scales if weights is None else tuple(float(w) for w in weights)
        if len(weights) != num_scales:
            raise ValueError(f"objective_kwargs.scale_weights needs one weight per scale ({num_scales}), got {weights}")
        self.scale_weights = weights

    # ---- shapes -----------------------------------------------------------------------------------
    @property
    def input_size(self) -> int:
        """Returns the side of the batch's images: the encoder's img_size x 2 ** num_scales."""
        return self.module.img_size * 2 ** self.num_scales

    def _pyramid(self, images: jax.Array) -> List[jax.Array]:
        expected = (self.input_size, self.input_size, self.module.in_chans)
        if tuple(images.shape[1:]) != expected:
            raise ValueError(f"SatMAE++ reads images at the largest scale: (batch,) + {expected} (img_size "
                             f"{self.module.img_size} x 2 ** num_scales={self.num_scales}, in_chans), got "
                             f"{tuple(images.shape)}; resize in the input pipeline")
        return input_pyramid(images, self.num_scales)

    def example_batch(self, image: np.ndarray) -> Dict[str, np.ndarray]:
        """Returns one zero row of the batch: an image at the largest scale."""
        return {"image": np.zeros((1, self.input_size, self.input_size, self.module.in_chans), np.float32)}

    # ---- the objective ------------------------------------------------------------------------------
    def init_variables(self, rng: jax.Array, batch: Dict[str, Any]) -> Variables:
        """Returns the model's initial variables (MAE's xavier patch-embedding init for the RGB encoder)."""
        images = self._pyramid(batch["image"])[0]
        init_rng, masking_rng = jax.random.split(rng)
        variables = dict(self.module.init({"params": init_rng, "masking": masking_rng}, images, train=False))
        if not self.module.grouped:
            params = dict(variables["params"])
            backbone = dict(params["backbone"])
            backbone["encoder"] = mae_model.mae_initialization(backbone["encoder"])
            params["backbone"] = backbone
            variables["params"] = params
        return variables

    def losses(self, variables: Variables, images: jax.Array, train: bool, rng: jax.Array,
               noise: Optional[jax.Array] = None) -> Tuple[jax.Array, Dict[str, jax.Array], Dict[str, Any]]:
        """Returns (per-example total loss (B,), {metric: per-example (B,)}, outputs: pred, scales, aux, pyramid)."""
        pyramid = self._pyramid(images)
        masking_rng, dropout_rng, drop_path_rng = jax.random.split(rng, 3)
        rngs = {"masking": masking_rng, "dropout": dropout_rng, "drop_path": drop_path_rng}
        pred, scales, aux = self.module.apply(variables, pyramid[0], train=train, noise=noise, rngs=rngs)
        if self.module.grouped:
            mse = group_reconstruction_loss(pyramid[0], pred, aux["mask"], self.module.backbone.channel_groups,
                                            self.module.patch_size, self.norm_pix_loss)
        else:
            per_patch = mae_objective.per_patch_loss(pyramid[0], pred, self.module.patch_size, self.norm_pix_loss)
            mse = jnp.sum(per_patch * aux["mask"], axis=1) / jnp.sum(aux["mask"], axis=1)
        metrics = {"mse": mse}
        multiscale = 0.0
        for index, (output, target, weight) in enumerate(zip(scales, pyramid[1:], self.scale_weights)):
            l1 = jnp.mean(jnp.abs(output.astype(jnp.float32) - target), axis=(1, 2, 3))
            metrics[f"l1_{2 ** (index + 1)}x"] = l1
            multiscale = multiscale + weight * l1
        metrics["multiscale"] = multiscale
        total = self.mse_weight * mse + (1.0 - self.mse_weight) * multiscale
        metrics["loss"] = total
        return total, metrics, dict(pred=pred, scales=scales, aux=aux, pyramid=pyramid)

    def train_loss(self, variables: Variables, batch: Dict[str, Any], rng: jax.Array
                   ) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (the weighted loss, {"metrics": loss, mse, l1 per scale, multiscale; "updates": {}})."""
        # Every image removes as many tokens and has as many pixels, so batch means of per-image values are theirs.
        _, metrics, _ = self.losses(variables, batch["image"], True, rng)
        metrics = {name: jnp.mean(value) for name, value in metrics.items()}
        return metrics["loss"], {"metrics": metrics, "updates": {}}

    def eval_metrics(self, variables: Variables, batch: Dict[str, Any]) -> Dict[str, jax.Array]:
        """Returns per-example {"loss", "mse", "l1_*", "multiscale"} under a fixed (seeded) random mask."""
        _, metrics, _ = self.losses(variables, batch["image"], False, jax.random.key(int(self.kwargs["eval_seed"])))
        return metrics

    def features(self, variables: Variables, images: jax.Array) -> jax.Array:
        """Returns the encoder's class token (after its final norm) on the whole, unmasked model input."""
        small = self._pyramid(images)[0]
        params = variables["params"]["backbone"]["encoder"]
        if self.module.grouped:
            tokens = self.module.backbone.encoder_module().apply({"params": params}, small, False)
        else:
            tokens, _ = self.module.backbone.encoder.apply({"params": params}, small, train=False)
        return tokens[:, 0].astype(jnp.float32)


__all__ = ["SENTINEL_GROUPS", "SatMAE", "group_reconstruction_loss", "input_pyramid"]
