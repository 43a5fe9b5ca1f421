"""Masked-autoencoder objectives (He et al. 2021): pretraining, fine-tuning and linear probing.

  mae            pretraining: a `VisionTransformer` encoder (`config.model_name`, `config.model`) sees
                 the patches a random mask keeps; a light decoder predicts the pixels of every patch;
                 MSE on the removed patches only, on per-patch normalised pixels (`norm_pix_loss`).
  mae_finetune   supervised fine-tuning of a classifier `VisionTransformer` whose encoder params are
                 copied from an MAE checkpoint (`init_from`); the head starts at trunc_normal(2e-5).
  mae_linprobe   a linear classifier on frozen MAE features: encoder -> BatchNorm without affine
                 (eps 1e-6) -> Dense head (trunc_normal 0.01), as MAE's `main_linprobe.py`.
                 Freeze the encoder with `config.optim.frozen = ("^encoder/",)`.

The pretrained encoder of fine-tuning and probing is `config.init_from` (`vitjax.weights`): an official
MAE `.pth`, a vitjax workdir of an `mae` run (its `encoder` subtree is taken), or None (train from the
initialisation: the from-scratch baseline, or the random-encoder probe). Each objective's
`init_from_rules` says how the encoder fits its params.
"""
import dataclasses
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

import vitjax.models as models
from vitjax import weights
from vitjax.models import layers, param_groups
from vitjax.models import mae as mae_model
from vitjax.models.vit import VisionTransformer
from vitjax.objectives.base import Objective, Variables, model_overrides
from vitjax.objectives.supervised import Supervised


# =============================================================================================
# The loss
# =============================================================================================
def reconstruction_target(images: jax.Array, patch_size: int, norm_pix_loss: bool) -> jax.Array:
    """Returns the (B, N, p*p*C) pixel target; with `norm_pix_loss`, each patch normalised by its own
    mean and unbiased (n-1) variance, eps 1e-6, as MAE's `forward_loss`."""
    target = mae_model.patchify(images.astype(jnp.float32), patch_size)
    if norm_pix_loss:
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, keepdims=True, ddof=1)
        target = (target - mean) / jnp.sqrt(var + 1e-6)
    return target


def per_patch_loss(images: jax.Array, pred: jax.Array, patch_size: int, norm_pix_loss: bool) -> jax.Array:
    """Returns the (B, N) mean squared error of each patch's predicted pixels."""
    target = reconstruction_target(images, patch_size, norm_pix_loss)
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)


def masked_mse(images: jax.Array, pred: jax.Array, mask: jax.Array, patch_size: int,
               norm_pix_loss: bool) -> jax.Array:
    """Returns MAE's scalar loss: the per-patch MSE averaged over the removed patches (mask == 1) only."""
    loss = per_patch_loss(images, pred, patch_size, norm_pix_loss)
    return jnp.sum(loss * mask) / jnp.sum(mask)


# =============================================================================================
# Pretraining
# =============================================================================================
def build_encoder(config, **forced) -> VisionTransformer:
    """Returns the `VisionTransformer` of `config.model_name` / `config.model` with `forced` settings."""
    overrides = {**model_overrides(config.model), **forced}
    entry = models.get_entry(config.model_name)
    if not issubclass(entry.module_class, VisionTransformer):
        raise ValueError(f"MAE needs a VisionTransformer encoder; model {config.model_name!r} is a "
                         f"{entry.module_class.__name__}. Valid choices: {models.list_models('vit')}")
    return models.create(config.model_name, **overrides)


class MAE(Objective):
    """MAE pretraining; metrics: `loss` (on removed patches, the target set by `norm_pix_loss`)."""

    batch_keys = ("image",)
    # The paper's ViT-B/16 defaults (Table 1 and Appendix A.1).
    default_kwargs: Dict[str, Any] = dict(mask_ratio=0.75, decoder_embed_dim=512, decoder_depth=8,
                                          decoder_num_heads=16, decoder_mlp_ratio=4.0, norm_pix_loss=True,
                                          eval_seed=0)

    def __init__(self, config):
        super().__init__(config)
        user_model = dict(config.model or {})
        # MAE's encoder: fixed sin-cos position embeddings and xavier init unless the config says otherwise.
        defaults = {key: value for key, value in dict(pos_embed="sincos2d", weight_init="xavier").items()
                    if key not in user_model}
        for key, required in dict(num_classes=0, global_pool="").items():
            if key in user_model and user_model[key] != required:
                raise ValueError(f"The MAE encoder has no head: config.model.{key} must be {required!r} "
                                 f"(or unset), got {user_model[key]!r}")
        encoder = build_encoder(config, num_classes=0, global_pool="", **defaults)
        kwargs = self.kwargs
        self.module = mae_model.MaskedAutoencoder(
            encoder=encoder, decoder_embed_dim=int(kwargs["decoder_embed_dim"]),
            decoder_depth=int(kwargs["decoder_depth"]), decoder_num_heads=int(kwargs["decoder_num_heads"]),
            decoder_mlp_ratio=float(kwargs["decoder_mlp_ratio"]), mask_ratio=float(kwargs["mask_ratio"]))
        self.module.validate()
        self.norm_pix_loss = bool(kwargs["norm_pix_loss"])

    def init_variables(self, rng: jax.Array, batch: Dict[str, Any]) -> Variables:
        """Returns the MAE's variables with the paper's initialisation."""
        return mae_model.init_variables(self.module, rng, batch["image"])

    def _loss(self, variables: Variables, images: jax.Array, train: bool, rng: jax.Array):
        """Returns (per-example loss (B,), pred, aux)."""
        masking_rng, dropout_rng, drop_path_rng = jax.random.split(rng, 3)
        rngs = {"masking": masking_rng, "dropout": dropout_rng, "drop_path": drop_path_rng}
        pred, aux = self.module.apply(variables, images, train=train, rngs=rngs)
        loss = per_patch_loss(images, pred, self.module.patch_size, self.norm_pix_loss)
        per_example = jnp.sum(loss * aux["mask"], axis=1) / jnp.sum(aux["mask"], axis=1)
        return per_example, pred, aux

    def train_loss(self, variables: Variables, batch: Dict[str, Any], rng: jax.Array
                   ) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (loss on the removed patches, {"metrics": {"loss"}, "updates": {}})."""
        per_example, _, _ = self._loss(variables, batch["image"], True, rng)
        # Every image removes the same number of patches, so the mean of per-image means is MAE's loss.
        loss = jnp.mean(per_example)
        return loss, {"metrics": {"loss": loss}, "updates": {}}

    def eval_metrics(self, variables: Variables, batch: Dict[str, Any]) -> Dict[str, jax.Array]:
        """Returns per-example {"loss"}: the reconstruction loss under a fixed (seeded) random mask."""
        per_example, _, _ = self._loss(variables, batch["image"], False,
                                       jax.random.key(int(self.kwargs["eval_seed"])))
        return {"loss": per_example}

    def features(self, variables: Variables, images: jax.Array) -> jax.Array:
        """Returns the encoder's features of the whole (unmasked) image: the class token after the final norm
        (the token MAE's linear probe reads), or the mean patch token without one."""
        encoder = self.module.encoder
        tokens, _ = encoder.apply({"params": variables["params"]["encoder"]}, images, train=False)
        pooled = tokens[:, 0] if encoder.class_token else tokens[:, encoder.num_prefix_tokens:].mean(axis=1)
        return pooled.astype(jnp.float32)


# =============================================================================================
# Fine-tuning
# =============================================================================================
class MaeFinetune(Supervised):
    """Supervised fine-tuning from an MAE encoder (`config.init_from`); head init trunc_normal(`head_init_std`)."""

    default_kwargs: Dict[str, Any] = dict(head_init_std=2e-5)

    def init_from_rules(self) -> weights.Rules:
        """Returns MAE's fine-tuning init: the encoder's trunk; learned position embeddings start from the encoder's
        sin-cos table; with global pooling the encoder's final norm is dropped and `fc_norm` starts fresh."""
        rules = super().init_from_rules()
        fill, ignore, optional = [], [], []
        if self.module.pos_embed == "learn":
            prefix = 0 if self.module.no_embed_class else self.module.num_prefix_tokens
            fill.append(("^pos_embed$", lambda shape: mae_model.sincos_position_table(shape, prefix)))
        if self.module.global_pool == "avg" or self.module.fc_norm:
            ignore.append("^norm/")
            optional.append("^fc_norm/")
        return dataclasses.replace(rules, fill=tuple(fill), ignore=tuple(ignore), optional=tuple(optional))

    def init_variables(self, rng: jax.Array, batch: Dict[str, Any]) -> Variables:
        """Returns the classifier's variables with MAE's fine-tuning head init (`config.init_from` loads the rest)."""
        init_rng, head_rng = jax.random.split(rng)
        variables = dict(super().init_variables(init_rng, batch))
        params = dict(variables["params"])
        if self.module.weight_init == "xavier":
            params = dict(mae_model.mae_initialization(params))
        if "head" in params:
            head = dict(params["head"])
            kernel = head["kernel"]
            value = kernel.value if isinstance(kernel, nn.LogicallyPartitioned) else kernel
            new = nn.initializers.truncated_normal(float(self.kwargs["head_init_std"]))(
                head_rng, value.shape, value.dtype)
            head["kernel"] = kernel.replace_boxed(new) if isinstance(kernel, nn.LogicallyPartitioned) else new
            params["head"] = head
        variables["params"] = params
        return variables


# =============================================================================================
# Linear probing
# =============================================================================================
class LinearProbe(nn.Module):
    """Encoder features -> BatchNorm without affine -> Dense head; returns (logits, intermediates)."""

    encoder: VisionTransformer
    num_classes: int
    head_init_std: float = 0.01
    batch_norm_eps: float = 1e-6
    batch_norm_momentum: float = 0.1  # torch convention: the weight of the batch

    def layer_ids(self, params) -> Tuple[Dict[str, Any], int]:
        """Returns ({path: layer id}, num_layers): the encoder's ids under "encoder/", the head in the last group."""
        # The encoder's matcher under "encoder/" leaves the head unmatched: last, as timm's head.
        matcher = param_groups.scoped_matcher(self.encoder.group_matcher(), "encoder")
        stacked = ("encoder/blocks",) if self.encoder.scan else ()
        return param_groups.layer_ids_from_matcher(params, matcher, stacked=stacked)

    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns regexes of the param paths not weight-decayed: the encoder's, under "encoder/"."""
        return param_groups.scoped_patterns(self.encoder.no_weight_decay(), "encoder")

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
        features, intermediates = self.encoder(images, train=False)
        features = jax.lax.stop_gradient(features.astype(jnp.float32))
        # MAE's probe head: BatchNorm1d(affine=False, eps=1e-6), torch momentum 0.1.
        normed = layers.BatchNorm(use_running_average=not train, use_scale=False, use_bias=False,
                                  eps=self.batch_norm_eps, momentum=self.batch_norm_momentum,
                                  name="head_norm")(features)
        logits = nn.Dense(self.num_classes, name="head",
                          kernel_init=layers.logical(nn.initializers.truncated_normal(self.head_init_std),
                                                     ("embed", "classes")),
                          bias_init=layers.logical(nn.initializers.zeros, ("classes",)))(normed)
        return logits, dict(intermediates, pre_logits=features)


class MaeLinearProbe(Supervised):
    """Linear probing of a (frozen) MAE encoder (`config.init_from`); pooling from `config.model.global_pool`."""

    default_kwargs: Dict[str, Any] = dict(head_init_std=0.01)

    def __init__(self, config):
        Objective.__init__(self, config)
        overrides = model_overrides(config.model)
        self.num_classes = overrides.pop("num_classes", None)
        if not self.num_classes:
            raise ValueError("Linear probing needs config.model.num_classes")
        forced = dict(num_classes=0, pos_embed=overrides.pop("pos_embed", "sincos2d"),
                      weight_init=overrides.pop("weight_init", "xavier"),
                      global_pool=overrides.pop("global_pool", "token"))
        encoder = models.create(config.model_name, **overrides, **forced) \
            if issubclass(models.get_entry(config.model_name).module_class, VisionTransformer) else None
        if encoder is None:
            raise ValueError(f"Linear probing needs a VisionTransformer; valid choices: {models.list_models('vit')}")
        self.module = LinearProbe(encoder=encoder, num_classes=int(self.num_classes),
                                  head_init_std=float(self.kwargs["head_init_std"]))

    def init_from_rules(self) -> weights.Rules:
        """Returns the rules that put a pretrained encoder under "encoder/" (the probe's head stays fresh)."""
        encoder = self.module.encoder
        prefix = 0 if encoder.no_embed_class else encoder.num_prefix_tokens
        return dataclasses.replace(super().init_from_rules(), scope="encoder", posemb_prefix=prefix)

    def features(self, variables: Variables, images: jax.Array) -> jax.Array:
        """Returns the frozen encoder's pooled features (before the probe's BatchNorm)."""
        _, intermediates = self.module.apply(variables, images, train=False)
        return intermediates["pre_logits"].astype(jnp.float32)

    def init_variables(self, rng: jax.Array, batch: Dict[str, Any]) -> Variables:
        """Returns the probe's variables; a xavier encoder gets MAE's initialisation (the random-encoder baseline)."""
        variables = dict(super().init_variables(rng, batch))
        if self.module.encoder.weight_init == "xavier":
            params = dict(variables["params"])
            params["encoder"] = mae_model.mae_initialization(params["encoder"])
            variables["params"] = params
        return variables


__all__ = ["MAE", "LinearProbe", "MaeFinetune", "MaeLinearProbe", "build_encoder", "masked_mse", "per_patch_loss",
           "reconstruction_target"]
