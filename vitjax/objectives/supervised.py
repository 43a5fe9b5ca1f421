"""Supervised classification: softmax cross-entropy on (soft) labels; eval loss, top-1, top-5.

The model is `models.create(config.model_name, **config.model)` and must return logits (B, classes),
or, for a distilled DeiT in training, `(cls_logits, dist_logits)`: without a teacher both heads
learn the labels and the loss is the mean of the two (DeiT's "no distillation" baseline).
"""
from typing import Any, Dict, Tuple

import chex
import jax
import jax.numpy as jnp
import optax

import vitjax.models as models
from vitjax.objectives.base import Objective, Variables, model_overrides


def top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """Returns (B,) float: 1 where the integer label is among the k highest logits (k capped at #classes)."""
    k = min(k, logits.shape[-1])
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    # Rank by the count of strictly larger logits, so ties count in the label's favour like argmax.
    num_larger = jnp.sum(logits > label_logit, axis=-1)
    return (num_larger < k).astype(jnp.float32)


class Supervised(Objective):
    """Classification with a model that maps images to logits."""

    batch_keys = ("image", "label")
    default_kwargs: Dict[str, Any] = {}

    def __init__(self, config):
        super().__init__(config)
        overrides = model_overrides(config.model)
        self.module = models.create(config.model_name, **overrides)
        self.num_classes = getattr(self.module, "num_classes", overrides.get("num_classes"))
        if not self.num_classes:
            raise ValueError(f"Supervised training needs a classifier head: set config.model.num_classes "
                             f"(model {config.model_name!r} has num_classes={self.num_classes!r})")

    def init_variables(self, rng: jax.Array, batch: Dict[str, Any]) -> Variables:
        """Returns the model's initial variables."""
        return dict(self.module.init({"params": rng}, batch["image"], train=False))

    def _apply(self, variables: Variables, images: jax.Array, train: bool, rng=None):
        """Returns (output, updated non-param collections)."""
        mutable = [name for name in variables if name != "params"] if train else []
        mutable = mutable or False  # flax returns (output, updates) for any list, even empty
        rngs = None
        if train:
            dropout_rng, drop_path_rng = jax.random.split(rng)
            rngs = {"dropout": dropout_rng, "drop_path": drop_path_rng}
        result = self.module.apply(variables, images, train=train, rngs=rngs, mutable=mutable)
        if mutable:
            (output, _), updates = result
            return output, dict(updates)
        output, _ = result
        return output, {}

    def train_loss(self, variables: Variables, batch: Dict[str, Any], rng: jax.Array
                   ) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (mean cross-entropy on the soft labels, {"metrics": loss and top1, "updates": ...})."""
        # The batch's contract (the trainer's batch transform makes the labels one-hot): checked at trace time.
        chex.assert_rank(batch["image"], 4)
        chex.assert_shape(batch["label"], (batch["image"].shape[0], self.num_classes))
        output, updates = self._apply(variables, batch["image"], True, rng)
        labels = batch["label"].astype(jnp.float32)
        heads = output if isinstance(output, (tuple, list)) else (output,)
        losses = [optax.softmax_cross_entropy(logits.astype(jnp.float32), labels).mean() for logits in heads]
        loss = sum(losses) / len(losses)
        logits = sum(head.astype(jnp.float32) for head in heads) / len(heads)
        top1 = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(labels, -1))
        return loss, {"metrics": {"loss": loss, "top1": top1}, "updates": updates}

    def eval_logits(self, variables: Variables, images: jax.Array) -> jax.Array:
        """Returns the eval-mode logits (B, classes) in fp32 (a distilled DeiT's: the mean of its heads)."""
        logits, _ = self._apply(variables, images, False)
        if isinstance(logits, (tuple, list)):
            logits = sum(logits) / len(logits)
        return logits.astype(jnp.float32)

    def eval_metrics(self, variables: Variables, batch: Dict[str, Any]) -> Dict[str, jax.Array]:
        """Returns per-example {"loss", "top1", "top5"} for integer labels."""
        chex.assert_rank(batch["label"], 1)
        return self.metrics_of(self.eval_logits(variables, batch["image"]), batch["label"])

    @staticmethod
    def metrics_of(logits: jax.Array, labels: jax.Array) -> Dict[str, jax.Array]:
        """Returns per-example {"loss", "top1", "top5"} of fp32 logits for integer labels."""
        labels = labels.astype(jnp.int32)
        return {
            "loss": optax.softmax_cross_entropy_with_integer_labels(logits, labels),
            "top1": top_k_correct(logits, labels, 1),
            "top5": top_k_correct(logits, labels, 5),
        }
