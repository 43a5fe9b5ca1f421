"""MP3: masked patch position prediction (Zhai et al. 2022, "Position Prediction as an Effective Pretraining
Strategy"). No official code: written from the paper's text.

The encoder is a ViT that sees no position embedding. A random `mask_ratio` of the patches is masked:
their keys and values are dropped from every attention layer (a -1e9 key bias), so all patches ask
(queries) but only the context patches answer (keys / values). A linear head on each patch token
classifies which of the N grid positions the patch came from; the loss is the cross-entropy averaged
over all patches (context and masked). Without position embeddings the transformer is permutation
equivariant, so the position must be inferred from content alone.

    model (the encoder): any registered `VisionTransformer` (config.model_name, config.model); its
        `pos_embed` is forced to "none"
    objective_kwargs: mask_ratio (the share of patches whose keys / values are dropped), eval_seed

Params: {"encoder": a ViT's params without `pos_embed` (same names: patch_embed, cls_token, blocks_i,
norm), "position_head": Dense(N)}. Fine-tuning adds position embeddings back: a classifier ViT with
learned position embeddings, `init_from` = the MP3 run, `init_from_skip = ("^pos_embed$",)` (they start
from the classifier's own initialisation).
"""
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitjax import masking
from vitjax.models import layers, param_groups
from vitjax.models.vit import Block, VisionTransformer
from vitjax.objectives.base import Objective, Variables
from vitjax.objectives.gmml import encoder_layer_ids
from vitjax.objectives.mae import build_encoder
from vitjax.tokens.base import KeepAll, mask_key_bias


class ContextEncoder(nn.Module):
    """A ViT's trunk without position embeddings whose attention reads keys / values of the context patches only.

    Built from `vit`'s settings with a ViT's parameter names, so its params load into a `VisionTransformer`.
    """

    vit: VisionTransformer

    @nn.compact
    def __call__(self, images: jax.Array, context: jax.Array, train: bool = False) -> jax.Array:
        """Returns the final normed tokens (B, prefix + N, D); `context` (B, N): 1 = the patch's keys / values seen."""
        vit = self.vit
        block_kwargs = vit.block_kwargs()
        x, _ = layers.PatchEmbed(vit.patch_size, vit.embed_dim, use_bias=not vit.pre_norm,
                                 kernel_init=block_kwargs["kernel_init"], dtype=vit.dtype,
                                 param_dtype=vit.param_dtype, name="patch_embed")(images)
        batch, _, width = x.shape
        prefix = 0
        if vit.class_token:
            init = layers.logical(nn.initializers.normal(1e-6 if vit.weight_init == "timm" else 0.02),
                                  (None, None, "embed"))
            cls = self.param("cls_token", init, (1, 1, width), vit.param_dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, width)), x], axis=1)
            prefix = 1
        x = nn.Dropout(vit.pos_drop_rate)(x, deterministic=not train)
        seen = jnp.concatenate([jnp.ones((batch, prefix), context.dtype), context], axis=1)
        state = {"key_bias": mask_key_bias(seen)}
        rates = np.linspace(0.0, vit.drop_path_rate, vit.depth)
        for index in range(vit.depth):
            # KeepAll keeps every token (all are queries) and applies the state's key bias (context keys only).
            x, _ = Block(drop_path_rate=float(rates[index]), token_reducer=KeepAll(), name=f"blocks_{index}",
                         **block_kwargs)(x, train, False, None, state)
        return layers.layer_norm(vit.norm_eps, vit.dtype, vit.param_dtype, name="norm")(x)


class PositionPredictionModel(nn.Module):
    """Context encoder + per-patch position classifier; `__call__` returns ((B, N, N) logits, (B, N) context)."""

    vit: VisionTransformer
    mask_ratio: float = 0.75

    def layer_ids(self, params) -> Tuple[Dict[str, Any], int]:
        """Returns ({path: layer id}, num_layers): the ViT's ids under "encoder/", the head in the last group."""
        return encoder_layer_ids(self.vit, params)

    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns regexes of the param paths not weight-decayed: the ViT's, under "encoder/"."""
        return param_groups.scoped_patterns(self.vit.no_weight_decay(), "encoder")

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False, context=None) -> Tuple[jax.Array, jax.Array]:
        grid = self.vit.grid_size
        num_patches = grid[0] * grid[1]
        if context is None:
            removed = masking.random_masking(self.make_rng("masking"), images.shape[0], num_patches,
                                             self.mask_ratio)["mask"]
            context = 1.0 - removed
        tokens = ContextEncoder(self.vit, name="encoder")(images, context, train)
        prefix = self.vit.num_prefix_tokens
        logits = nn.Dense(num_patches, name="position_head", dtype=self.vit.dtype, param_dtype=self.vit.param_dtype,
                          kernel_init=layers.logical(layers.trunc_normal_init, ("embed", "classes")),
                          bias_init=layers.logical(nn.initializers.zeros, ("classes",)))(tokens[:, prefix:])
        return logits, context


class MP3(Objective):
    """MP3 pretraining; metrics: `loss` (position cross-entropy over all patches), `position_top1`."""

    batch_keys = ("image",)
    eval_batch_keys = ("image",)
    default_kwargs: Dict[str, Any] = dict(mask_ratio=0.75, eval_seed=0)

    def __init__(self, config):
        super().__init__(config)
        user_model = dict(config.model or {})
        if user_model.get("pos_embed", "none") != "none":
            raise ValueError(f"MP3's encoder sees no position embedding: config.model.pos_embed must be 'none' (or "
                             f"unset), got {user_model['pos_embed']!r}")
        if user_model.get("num_classes"):
            raise ValueError("The MP3 encoder has no classifier: config.model.num_classes must be 0 (or unset)")
        vit = build_encoder(config, num_classes=0, global_pool="avg", pos_embed="none")
        vit.validate()
        mask_ratio = masking.check_mask_ratio(self.kwargs["mask_ratio"], "objective_kwargs.mask_ratio")
        grid = vit.grid_size
        if int(grid[0] * grid[1] * (1 - mask_ratio)) < 1:
            raise ValueError(f"mask_ratio={mask_ratio} leaves no context patch of the {grid} grid")
        unsupported = {key: getattr(vit, key) for key in ("distilled", "scan", "remat") if getattr(vit, key)}
        if unsupported or vit.token_method() is not None or vit.init_values is not None:
            raise ValueError(f"MP3's encoder is a plain ViT trunk: distilled, scan, remat, layer scale and token "
                             f"reduction are not supported, got {unsupported or 'token reduction / layer scale'}")
        self.module = PositionPredictionModel(vit=vit, mask_ratio=mask_ratio)

    def init_variables(self, rng: jax.Array, batch: Dict[str, Any]) -> Variables:
        """Returns the model's initial variables."""
        init_rng, masking_rng = jax.random.split(rng)
        return dict(self.module.init({"params": init_rng, "masking": masking_rng}, batch["image"], train=False))

    def _per_example(self, variables, images, train, rng):
        masking_rng, dropout_rng, drop_path_rng = jax.random.split(rng, 3)
        logits, _ = self.module.apply(variables, images, train=train, rngs={
            "masking": masking_rng, "dropout": dropout_rng, "drop_path": drop_path_rng})
        logits = logits.astype(jnp.float32)
        targets = jnp.broadcast_to(jnp.arange(logits.shape[1]), logits.shape[:2])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(axis=1)
        top1 = jnp.mean(jnp.argmax(logits, -1) == targets, axis=1)
        return loss, top1

    def train_loss(self, variables: Variables, batch: Dict[str, Any], rng: jax.Array
                   ) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (position cross-entropy, {"metrics": {"position_top1"}, "updates": {}})."""
        loss, top1 = self._per_example(variables, batch["image"], True, rng)
        return jnp.mean(loss), {"metrics": {"position_top1": jnp.mean(top1)}, "updates": {}}

    def eval_metrics(self, variables: Variables, batch: Dict[str, Any]) -> Dict[str, jax.Array]:
        """Returns per-example {"loss", "position_top1"} under a fixed (seeded) mask."""
        loss, top1 = self._per_example(variables, batch["image"], False, jax.random.key(int(self.kwargs["eval_seed"])))
        return {"loss": loss, "position_top1": top1}

    def features(self, variables: Variables, images: jax.Array) -> jax.Array:
        """Returns the mean patch token after the final norm, every patch in context."""
        vit = self.module.vit
        grid = vit.grid_size
        context = jnp.ones((images.shape[0], grid[0] * grid[1]), jnp.float32)
        tokens = ContextEncoder(vit).apply({"params": variables["params"]["encoder"]}, images, context)
        return tokens[:, vit.num_prefix_tokens:].mean(axis=1).astype(jnp.float32)


__all__ = ["ContextEncoder", "MP3", "PositionPredictionModel"]
