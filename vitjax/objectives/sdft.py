"""Self-distillation for further pre-training (Lee et al., "Self-Distillation for Further Pre-training of
Transformers", ICLR 2023; official code github.com/seanie12/self-distillation).

A pretrained MAE encoder is adapted to a target dataset in two rounds:

  round 1  plain MAE pretraining (objective `mae`) continued from the pretrained weights on the target data;
  round 2  (this objective, `sdft`) MAE on the target data again, started from the *pretrained* weights
           (`config.init_from`), not round 1's, plus a term pulling the student's hidden representation
           towards the frozen round-1 encoder's (`teacher_init`, loaded once through `frozen_weights()`):

      loss = MAE loss + distill_weight * mean_b || h_student(x_b) - stop_grad(h_teacher(x_b)) ||^2

`h` is the encoder's class token after the final norm on the whole, unmasked image (the official trainer's
`get_student_features`, and the teacher's `[:, 0]`); the squared distance is summed over the features and
averaged over the batch (torch's `MSELoss(reduction="sum") / batch`). The student's forward for the term is
a second pass in train mode (dropout / drop path as configured), separate from the masked MAE pass.
The paper writes the term without a weight; the official trainer adds it with weight 1 (`distill_weight`
default 1.0). The paper leaves open: an encoder without a class token (here: the mean patch token, as
`MAE.features`), and how round 2's schedule relates to round 1's (the official scripts use the same one).
"""
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp

from vitjax import weights
from vitjax.objectives.base import Variables, model_overrides
from vitjax.objectives.mae import MAE

TEACHER = "teacher"


def representation_distance(student: jax.Array, teacher: jax.Array) -> jax.Array:
    """Returns the squared L2 distance of (B, D) representations, summed over D, averaged over B; the
    teacher gets no gradient."""
    teacher = jax.lax.stop_gradient(teacher.astype(jnp.float32))
    return jnp.sum(jnp.square(student.astype(jnp.float32) - teacher)) / student.shape[0]


def pooled_representation(tokens: jax.Array, class_token: bool, num_prefix_tokens: int) -> jax.Array:
    """Returns the (B, D) representation the term matches: the class token, or the mean patch token."""
    return tokens[:, 0] if class_token else tokens[:, num_prefix_tokens:].mean(axis=1)


class SelfDistillMAE(MAE):
    """Round 2 of self-distillation further pretraining: MAE plus hidden-state distillation from a frozen
    round-1 encoder; metrics `loss`, `mae_loss`, `distill_loss`."""

    default_kwargs: Dict[str, Any] = dict(MAE.default_kwargs, teacher_init=None, distill_weight=1.0)

    def __init__(self, config):
        super().__init__(config)
        kwargs = self.kwargs
        weight = kwargs["distill_weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0.0:
            raise ValueError(f"objective_kwargs.distill_weight must be a number >= 0 (the official value is 1.0), "
                             f"got {weight!r}")
        if not kwargs["teacher_init"]:
            raise ValueError("objective 'sdft' needs objective_kwargs.teacher_init: the round-1 model (a vitjax "
                             "workdir of an `mae` run on the target data). Valid sources: "
                             f"{weights.describe_sources()}")
        weights.check_source(kwargs["teacher_init"])
        encoder = self.module.encoder
        # The teacher is the student's encoder architecture exactly, so the round-1 weights fit it strictly.
        self.teacher_overrides = {**model_overrides(config.model), "num_classes": 0, "global_pool": "",
                                  "pos_embed": encoder.pos_embed, "weight_init": encoder.weight_init}

    def init_variables(self, rng: jax.Array, batch: Dict[str, Any]) -> Variables:
        """Returns the MAE's variables plus the teacher encoder's (random here; the trainer loads `frozen_weights`)."""
        student_rng, teacher_rng = jax.random.split(rng)
        variables = super().init_variables(student_rng, batch)
        teacher = self.module.encoder.init({"params": teacher_rng}, batch["image"], train=False)
        return {**variables, TEACHER: dict(teacher)}

    def frozen_weights(self) -> Dict[str, Dict[str, Any]]:
        """Returns the round-1 encoder to load once into a new run: `teacher_init` fitted exactly to the encoder."""
        return {TEACHER: dict(source=self.kwargs["teacher_init"], model_name=self.config.model_name,
                              model_overrides=self.teacher_overrides)}

    @staticmethod
    def _student(variables: Variables) -> Variables:
        return {name: value for name, value in variables.items() if name != TEACHER}

    def _representation(self, encoder_variables: Variables, images: jax.Array, train: bool,
                        rng: jax.Array) -> jax.Array:
        encoder = self.module.encoder
        dropout_rng, drop_path_rng = jax.random.split(rng)
        tokens, _ = encoder.apply(encoder_variables, images, train=train,
                                  rngs={"dropout": dropout_rng, "drop_path": drop_path_rng})
        return pooled_representation(tokens, encoder.class_token, encoder.num_prefix_tokens)

    def distill_term(self, variables: Variables, images: jax.Array, rng: jax.Array, train: bool = True
                     ) -> jax.Array:
        """Returns the (unweighted) distance of the student encoder's representation to the teacher's."""
        student = self._representation({"params": variables["params"]["encoder"]}, images, train, rng)
        teacher = self._representation(variables[TEACHER], images, False, rng)
        return representation_distance(student, teacher)

    def train_loss(self, variables: Variables, batch: Dict[str, Any], rng: jax.Array
                   ) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (MAE loss + distill_weight x distill term, {"metrics": loss, mae_loss, distill_loss, "updates"})."""
        mae_rng, distill_rng = jax.random.split(rng)
        mae_loss, _ = super().train_loss(self._student(variables), batch, mae_rng)
        distill = self.distill_term(variables, batch["image"], distill_rng)
        loss = mae_loss + float(self.kwargs["distill_weight"]) * distill
        return loss, {"metrics": {"loss": loss, "mae_loss": mae_loss, "distill_loss": distill}, "updates": {}}

    def eval_metrics(self, variables: Variables, batch: Dict[str, Any]) -> Dict[str, jax.Array]:
        """Returns MAE's per-example {"loss"} of the student under the fixed eval mask."""
        return super().eval_metrics(self._student(variables), batch)


__all__ = ["SelfDistillMAE", "pooled_representation", "representation_distance"]
