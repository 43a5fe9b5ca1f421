"""SN-Net training (Pan et al. 2023): each step trains one stitched network drawn by the paper's sampling rule.

The rule is the official `SNNetv2.sampling_stitch_config`: the training pool's configurations are grouped by
GFLOPs (`flops_gap`), a group is drawn (uniformly, or weighted towards costlier groups by `flops_sampling_k`),
then a member of it uniformly (`vitjax.models.snnet.sampling_probabilities`). The draw happens inside the
jitted step from the step's rng, and `jax.lax.switch` runs the drawn configuration: every configuration is
compiled into the one program and only the drawn one runs. Unlike PyTorch, where parameters outside the drawn
route get no gradient and the optimizer skips them, optax still applies their momentum and weight decay.

Loss and metrics are `supervised`'s (cross-entropy on the soft labels); `train/stitch` logs the drawn id.
Evaluation runs `eval_stitch` (default: the model's `default_stitch`, the larger anchor).
"""
from typing import Any, Dict, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitjax.models import snnet
from vitjax.objectives.base import Variables
from vitjax.objectives.supervised import Supervised


class StitchSampling(Supervised):
    """Supervised classification of an `SNNet`, one sampled stitch configuration per step."""

    default_kwargs: Dict[str, Any] = dict(flops_gap=1.0, flops_sampling_k=None, eval_stitch=None)

    def __init__(self, config):
        super().__init__(config)
        if not isinstance(self.module, snnet.SNNet):
            raise ValueError(f"Objective 'snnet' trains an SN-Net (vitjax.models.snnet); model {config.model_name!r} "
                             f"is a {type(self.module).__name__}. Valid choices: "
                             f"{[name for name in snnet_models()]}")
        kw = self.kwargs
        if not float(kw["flops_gap"]) >= 0:
            raise ValueError(f"objective_kwargs.flops_gap must be >= 0 (GFLOPs), got {kw['flops_gap']!r}")
        probs = snnet.sampling_probabilities(self.module, float(kw["flops_gap"]), kw["flops_sampling_k"])
        self.pool = [int(index) for index in np.flatnonzero(probs)]
        self.pool_probs = probs[self.pool]
        if kw["eval_stitch"] is not None:
            self.module.check_stitch(kw["eval_stitch"])
            self.module = self.module.clone(default_stitch=int(kw["eval_stitch"]))

    def _forward(self, stitch: int, variables: Variables, images: jax.Array, rng: jax.Array) -> jax.Array:
        dropout_rng, drop_path_rng = jax.random.split(rng)
        logits, _ = self.module.apply(variables, images, train=True, stitch=stitch,
                                      rngs={"dropout": dropout_rng, "drop_path": drop_path_rng})
        return logits.astype(jnp.float32)

    def train_loss(self, variables: Variables, batch: Dict[str, Any], rng: jax.Array
                   ) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (cross-entropy of the sampled stitch, {"metrics": loss, top1, stitch; "updates": {}})."""
        chex.assert_rank(batch["image"], 4)
        chex.assert_shape(batch["label"], (batch["image"].shape[0], self.num_classes))
        choice_rng, rng = jax.random.split(rng)
        index = jax.random.choice(choice_rng, len(self.pool), p=jnp.asarray(self.pool_probs, jnp.float32))
        branches = [lambda v, x, r, s=stitch: self._forward(s, v, x, r) for stitch in self.pool]
        logits = jax.lax.switch(index, branches, variables, batch["image"], rng)
        labels = batch["label"].astype(jnp.float32)
        loss = optax.softmax_cross_entropy(logits, labels).mean()
        top1 = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(labels, -1))
        stitch = jnp.asarray(self.pool, jnp.float32)[index]
        return loss, {"metrics": {"loss": loss, "top1": top1, "stitch": stitch}, "updates": {}}


def snnet_models():
    """Returns the registered SN-Net model names."""
    from vitjax import models
    return [name for name in models.list_models() if models.model_family(name) == "snnet"]
