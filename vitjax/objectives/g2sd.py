"""G2SD's generic distillation (Huang et al., "Generic-to-Specific Distillation of Masked Autoencoders", CVPR 2023;
official code github.com/pengzhiliang/G2SD, read and run for the parity fixture, not copied: it has no licence).

G2SD distils a large MAE into a small one in two stages:

  generic   (this objective, `g2sd`): a small MAE student and a frozen pretrained MAE teacher see the same image
            under the same random mask. A two-layer MLP (`feature_pred`: Linear, GELU, Linear; widths
            teacher_decoder_dim) maps the student decoder's last hidden state (after its last block, before its
            final norm) to the teacher decoder's hidden state after block `layer_index` (before any norm, then
            normalised by a LayerNorm without affine, eps 1e-6), and the loss is their smooth-L1 distance
            (beta 2) averaged over every element, of every token (`supervise_all`: the class token and the
            visible and masked patches; False: the masked patches only). No pixel loss.
            The official GD script also computes an encoder term (an MLP of the student's final encoder
            tokens against the teacher encoder's pre-norm tokens, the same smooth-L1) and weighs it 0; it is
            here as `encoder_weight` (default 0, and its MLP exists only when the weight is positive).
  specific  fine-tuning the student with DeiT's hard distillation from a fine-tuned teacher: objective
            `distill`, distillation_type "hard", alpha 0.5, a student with a distillation token
            (`configs/g2sd_vit.py:stage=specific`).

The teacher's whole decoder runs though only its first `layer_index` blocks are read (the checkpoint's weights
are loaded strictly; the rest costs the teacher's decoder 8 - 4 blocks of 512 wide tokens at the defaults).
Paper defaults (GD.sh): teacher MAE ViT-B/16 (decoder 512 x 8, 16 heads), student MAE ViT-S/16 with a 256 x 4
decoder (8 heads),
mask ratio 0.75, layer_index 4, 300 epochs, AdamW (0.9, 0.95), blr 1.5e-4, weight decay 0.05.
"""
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vitjax import weights
from vitjax.models import mae as mae_model
from vitjax.objectives.base import Variables, model_overrides
from vitjax.objectives.mae import MAE, build_encoder

TEACHER = "teacher"
FEATURE_PRED = "feature_pred"
ENCODER_PRED = "encoder_feature_pred"


def smooth_l1(prediction: jax.Array, target: jax.Array, beta: float) -> jax.Array:
    """Returns torch's smooth_l1_loss per element: 0.5 d^2 / beta where |d| < beta, else |d| - 0.5 beta."""
    diff = jnp.abs(prediction.astype(jnp.float32) - target.astype(jnp.float32))
    return jnp.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)


def normalized_target(hidden: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Returns a LayerNorm without scale or bias of the teacher's hidden state (the target), without gradient."""
    hidden = jax.lax.stop_gradient(hidden.astype(jnp.float32))
    mean = hidden.mean(-1, keepdims=True)
    var = jnp.square(hidden - mean).mean(-1, keepdims=True)
    return (hidden - mean) / jnp.sqrt(var + eps)


class FeaturePredictor(nn.Module):
    """Linear (hidden = out), GELU (erf), Linear: the student's map into the teacher's feature space."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.features, name="fc1")(x)
        return nn.Dense(self.features, name="fc2")(nn.gelu(x, approximate=False))


def hidden_states(module: mae_model.MaskedAutoencoder, variables: Variables, images: jax.Array, noise: jax.Array,
                  reads: Dict[str, Tuple[str, ...]], *, train: bool, rngs: Optional[Dict[str, jax.Array]] = None
                  ) -> Tuple[Dict[str, jax.Array], Dict[str, jax.Array]]:
    """Returns ({name: tokens out of the block at module path reads[name]}, the MAE's aux) of one forward pass.

    The blocks' outputs are flax's captured intermediates: the model is unchanged.
    """
    wanted = {tuple(path) for path in reads.values()}
    (_, aux), state = module.apply(
        variables, images, train=train, noise=noise, rngs=rngs or {}, mutable=["intermediates"],
        capture_intermediates=lambda mdl, method: method == "__call__" and tuple(mdl.path) in wanted)
    found = {}
    for name, path in reads.items():
        node = state["intermediates"]
        for key in path:
            node = node[key]
        found[name] = node["__call__"][0][0]  # a block returns (tokens, aux)
    return found, aux


class G2SD(MAE):
    """G2SD's generic distillation: a small MAE learns a frozen MAE teacher's decoder features (see the module doc).

    Metrics: `loss`, `decoder_loss`, `encoder_loss` (weighted by `encoder_weight`).
    """

    default_kwargs: Dict[str, Any] = dict(
        MAE.default_kwargs, decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8, norm_pix_loss=False,
        teacher_init=None, teacher_model_name="vit", teacher_model=dict(variant="B/16"),
        teacher_decoder_embed_dim=512, teacher_decoder_depth=8, teacher_decoder_num_heads=16, layer_index=4,
        supervise_all=True, beta=2.0, encoder_weight=0.0)

    def __init__(self, config):
        super().__init__(config)
        kwargs = self.kwargs
        depth = int(kwargs["teacher_decoder_depth"])
        layer = kwargs["layer_index"]
        if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= depth:
            raise ValueError(f"objective_kwargs.layer_index must be an int in [1, {depth}] (the teacher decoder's "
                             f"blocks), got {layer!r}")
        for name in ("beta", "encoder_weight"):
            value = kwargs[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
                    name == "beta" and value == 0):
                raise ValueError(f"objective_kwargs.{name} must be a number {'> 0' if name == 'beta' else '>= 0'}, "
                                 f"got {value!r}")
        if not kwargs["teacher_init"]:
            raise ValueError("objective 'g2sd' needs objective_kwargs.teacher_init: the pretrained MAE teacher with "
                             f"its decoder. Valid sources: {weights.describe_sources()}")
        weights.check_source(kwargs["teacher_init"])
        self.teacher_overrides = {**model_overrides(kwargs["teacher_model"]), "num_classes": 0, "global_pool": "",
                                  "pos_embed": "sincos2d", "weight_init": "xavier"}
        teacher_encoder = build_encoder(ml_collections.ConfigDict(
            {"model_name": kwargs["teacher_model_name"], "model": self.teacher_overrides}))
        self.teacher_module = mae_model.MaskedAutoencoder(
            encoder=teacher_encoder, decoder_embed_dim=int(kwargs["teacher_decoder_embed_dim"]), decoder_depth=depth,
            decoder_num_heads=int(kwargs["teacher_decoder_num_heads"]), mask_ratio=self.module.mask_ratio)
        self.teacher_module.validate()
        for module, who in ((self.module, "student"), (self.teacher_module, "teacher")):
            if module.encoder.scan:
                raise ValueError(f"G2SD reads hidden states between blocks; the {who}'s blocks are scanned: set "
                                 "scan=False")
        if self.teacher_module.num_patches != self.module.num_patches:
            raise ValueError(f"Teacher and student must cut the image into the same patches (one mask for both); "
                             f"teacher {self.teacher_module.num_patches}, student {self.module.num_patches}")
        self.predictor = FeaturePredictor(int(kwargs["teacher_decoder_embed_dim"]))
        self.encoder_predictor = (FeaturePredictor(int(teacher_encoder.embed_dim))
                                  if float(kwargs["encoder_weight"]) > 0 else None)

    def init_variables(self, rng: jax.Array, batch: Dict[str, Any]) -> Variables:
        """Returns the student MAE's variables with the predictor(s) in its params, and the teacher's (random here)."""
        student_rng, pred_rng, teacher_rng = jax.random.split(rng, 3)
        variables = dict(super().init_variables(student_rng, batch))
        params = dict(variables["params"])
        hidden = jnp.zeros((1, 1, self.module.decoder_embed_dim), jnp.float32)
        params[FEATURE_PRED] = self.predictor.init(pred_rng, hidden)["params"]
        if self.encoder_predictor is not None:
            latent = jnp.zeros((1, 1, self.module.encoder.embed_dim), jnp.float32)
            params[ENCODER_PRED] = self.encoder_predictor.init(jax.random.fold_in(pred_rng, 1), latent)["params"]
        teacher = mae_model.init_variables(self.teacher_module, teacher_rng, batch["image"])
        return {**variables, "params": params, TEACHER: dict(teacher)}

    def frozen_weights(self) -> Dict[str, Dict[str, Any]]:
        """Returns the teacher MAE (encoder and decoder) to load once into a new run, fitted exactly."""
        return {TEACHER: dict(source=self.kwargs["teacher_init"], model_name=self.kwargs["teacher_model_name"],
                              model_overrides=self.teacher_overrides)}

    def _mae_variables(self, variables: Variables) -> Variables:
        params = {key: value for key, value in variables["params"].items() if key not in (FEATURE_PRED, ENCODER_PRED)}
        return {"params": params}

    def distillation_losses(self, variables: Variables, images: jax.Array, noise: jax.Array, *, train: bool,
                            rngs: Optional[Dict[str, jax.Array]] = None) -> Dict[str, jax.Array]:
        """Returns per-image (B,) {"loss", "decoder_loss", "encoder_loss"} under the mask `noise` (B, N) draws.

        Every image has as many tokens (and masked patches) as the others, so their mean is the official loss.
        """
        student_depth, teacher_layer = self.module.decoder_depth, int(self.kwargs["layer_index"])
        reads = {"decoder": ("decoder", f"blocks_{student_depth - 1}")}
        teacher_reads = {"decoder": ("decoder", f"blocks_{teacher_layer - 1}")}
        if self.encoder_predictor is not None:
            teacher_reads["encoder"] = ("encoder", f"blocks_{self.teacher_module.encoder.depth - 1}")
        student, aux = hidden_states(self.module, self._mae_variables(variables), images, noise, reads, train=train,
                                     rngs=rngs)
        teacher, _ = hidden_states(self.teacher_module, variables[TEACHER], images, noise, teacher_reads, train=False)
        beta = float(self.kwargs["beta"])
        prediction = self.predictor.apply({"params": variables["params"][FEATURE_PRED]}, student["decoder"])
        per_element = smooth_l1(prediction, normalized_target(teacher["decoder"]), beta)
        if self.kwargs["supervise_all"]:
            decoder_loss = per_element.mean(axis=(1, 2))
        else:  # the masked patches only (the class token and kept patches dropped)
            masked = aux["mask"].astype(jnp.float32)
            decoder_loss = jnp.sum(per_element[:, 1:].mean(-1) * masked, axis=1) / jnp.sum(masked, axis=1)
        encoder_loss = jnp.zeros(images.shape[:1], jnp.float32)
        if self.encoder_predictor is not None:
            encoder_prediction = self.encoder_predictor.apply({"params": variables["params"][ENCODER_PRED]},
                                                              aux["latent"])
            encoder_loss = smooth_l1(encoder_prediction, normalized_target(teacher["encoder"]), beta).mean(axis=(1, 2))
        loss = decoder_loss + float(self.kwargs["encoder_weight"]) * encoder_loss
        return {"loss": loss, "decoder_loss": decoder_loss, "encoder_loss": encoder_loss}

    def train_loss(self, variables: Variables, batch: Dict[str, Any], rng: jax.Array
                   ) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (G2SD's generic distillation loss, {"metrics": loss, decoder_loss, encoder_loss, "updates": {}})."""
        images = batch["image"]
        masking_rng, dropout_rng, drop_path_rng = jax.random.split(rng, 3)
        noise = jax.random.uniform(masking_rng, (images.shape[0], self.module.num_patches))
        per_image = self.distillation_losses(variables, images, noise, train=True,
                                             rngs={"dropout": dropout_rng, "drop_path": drop_path_rng})
        metrics = {name: value.mean() for name, value in per_image.items()}
        return metrics["loss"], {"metrics": metrics, "updates": {}}

    def eval_metrics(self, variables: Variables, batch: Dict[str, Any]) -> Dict[str, jax.Array]:
        """Returns per-example {"loss"}: the distillation loss of each image under a fixed (seeded) mask."""
        images = batch["image"]
        noise = jax.random.uniform(jax.random.key(int(self.kwargs["eval_seed"])),
                                   (images.shape[0], self.module.num_patches))
        return {"loss": self.distillation_losses(variables, images, noise, train=False)["loss"]}

    def features(self, variables: Variables, images: jax.Array) -> jax.Array:
        """Returns the student encoder's features of the whole image (see `MAE.features`)."""
        return super().features(self._mae_variables(variables), images)
