"""Knowledge distillation from a frozen teacher (Touvron et al. 2021, "Training data-efficient image transformers").

    config.objective = "distill"
    config.objective_kwargs = dict(teacher="vit_small_patch16_224", teacher_init="/ckpt/teacher",
                                   distillation_type="hard", alpha=0.5, tau=1.0)

The student is `models.create(config.model_name, **config.model)`. A DeiT with a distillation token
returns (cls logits, distillation logits) in training: the class head learns the labels and the
distillation head the teacher. A student with one head uses it for both terms. The teacher sees the
same (augmented, mixed) images as the student, in eval mode, and is never trained.

With s the class-head logits, d the distillation-head logits, t the teacher's logits and y the
(soft) labels, the loss is (1 - alpha) CE(s, y) + alpha L_dist where
- "hard": L_dist = CE(d, argmax t), DeiT's hard-label distillation (the paper's best, alpha 0.5);
- "soft": L_dist = tau^2 KL(softmax(t / tau) || softmax(d / tau)), summed over classes and divided by
  B x classes as the official code does (so alpha weighs a per-logit mean).

The teacher is any registered model (`teacher`, with `teacher_model` overrides) loaded from
`teacher_init` by `vitjax.weights` (every parameter must fit exactly): a vitjax workdir or checkpoint
directory (its newest step; `PATH@STEP` for another), a `.msgpack` from `vitjax.convert`, or a timm
`.pth` / `.bin` / `.safetensors` file. Its variables live in the train state's non-trained collections
under "teacher", sharded by their own logical axes, so checkpoints hold them and a resumed run needs
no reload. Evaluation reports the student (the mean of its two heads for a distilled DeiT),
plus `teacher_agreement`, the fraction of examples where the student's prediction equals the
teacher's.
"""
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import optax

import vitjax.models as models
from vitjax import weights
from vitjax.objectives.base import Variables, model_overrides
from vitjax.objectives.supervised import Supervised

DISTILLATION_TYPES = ("hard", "soft")
TEACHER = "teacher"


def distillation_loss(class_logits: jax.Array, dist_logits: jax.Array, teacher_logits: jax.Array,
                      labels: jax.Array, *, distillation_type: str, alpha: float, tau: float
                      ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """Returns (loss, {"base_loss", "distill_loss"}) of DeiT's distillation (see the module doc)."""
    class_logits, dist_logits = class_logits.astype(jnp.float32), dist_logits.astype(jnp.float32)
    teacher_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    base = optax.softmax_cross_entropy(class_logits, labels.astype(jnp.float32)).mean()
    if distillation_type == "hard":
        distill = optax.softmax_cross_entropy_with_integer_labels(dist_logits, jnp.argmax(teacher_logits, -1)).mean()
    else:
        log_student = jax.nn.log_softmax(dist_logits / tau, axis=-1)
        log_teacher = jax.nn.log_softmax(teacher_logits / tau, axis=-1)
        kl = jnp.sum(jnp.exp(log_teacher) * (log_teacher - log_student))
        distill = kl * tau * tau / dist_logits.size
    loss = (1.0 - alpha) * base + alpha * distill
    return loss, {"base_loss": base, "distill_loss": distill}


class Distillation(Supervised):
    """A student classifier trained on the labels and on a frozen teacher's predictions."""

    default_kwargs: Dict[str, Any] = dict(teacher=None, teacher_model={}, teacher_init=None,
                                          distillation_type="hard", alpha=0.5, tau=1.0)

    def __init__(self, config):
        super().__init__(config)
        kwargs = self.kwargs
        if kwargs["distillation_type"] not in DISTILLATION_TYPES:
            raise ValueError(f"Unknown distillation_type {kwargs['distillation_type']!r}; valid choices: "
                             f"{DISTILLATION_TYPES}")
        if not 0.0 <= float(kwargs["alpha"]) <= 1.0:
            raise ValueError(f"objective_kwargs.alpha must be in [0, 1], got {kwargs['alpha']!r}")
        if not float(kwargs["tau"]) > 0.0:
            raise ValueError(f"objective_kwargs.tau must be > 0, got {kwargs['tau']!r}")
        if not kwargs["teacher"]:
            raise ValueError("objective 'distill' needs objective_kwargs.teacher, a registered model name "
                             "(see vitjax.models.list_models())")
        if not kwargs["teacher_init"]:
            raise ValueError("objective 'distill' needs objective_kwargs.teacher_init: a vitjax workdir or "
                             "checkpoint directory, or a timm .pth / .bin / .safetensors file")
        weights.check_source(kwargs["teacher_init"])
        self.teacher_overrides = model_overrides(kwargs["teacher_model"])
        self.teacher = models.create(kwargs["teacher"], **self.teacher_overrides)
        teacher_classes = getattr(self.teacher, "num_classes", None)
        if teacher_classes and teacher_classes != self.num_classes:
            raise ValueError(f"The teacher {kwargs['teacher']!r} has {teacher_classes} classes, the student "
                             f"{self.num_classes}; set objective_kwargs.teacher_model.num_classes")

    def init_variables(self, rng: jax.Array, batch: Dict[str, Any]) -> Variables:
        """Returns the student's variables plus the teacher's (random here; the trainer loads `frozen_weights`)."""
        student_rng, teacher_rng = jax.random.split(rng)
        variables = super().init_variables(student_rng, batch)
        teacher = self.teacher.init({"params": teacher_rng}, batch["image"], train=False)
        # The teacher's params keep their logical-axis boxes: the trainer shards them by their own names.
        return {**variables, TEACHER: dict(teacher)}

    def frozen_weights(self) -> Dict[str, Dict[str, Any]]:
        """Returns the teacher's weights to load once into a new run: `teacher_init` fitted exactly to `teacher`."""
        return {TEACHER: dict(source=self.kwargs["teacher_init"], model_name=self.kwargs["teacher"],
                              model_overrides=self.teacher_overrides)}

    def features(self, variables: Variables, images: jax.Array) -> jax.Array:
        """Returns the student's pre-logits features."""
        return super().features(self._student(variables), images)

    def _teacher_logits(self, variables: Variables, images: jax.Array) -> jax.Array:
        logits, _ = self.teacher.apply(variables[TEACHER], images, train=False)
        if isinstance(logits, (tuple, list)):
            logits = sum(logits) / len(logits)
        return jax.lax.stop_gradient(logits.astype(jnp.float32))

    @staticmethod
    def _student(variables: Variables) -> Variables:
        return {name: value for name, value in variables.items() if name != TEACHER}

    def train_loss(self, variables: Variables, batch: Dict[str, Any], rng: jax.Array
                   ) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (DeiT's distillation loss, {"metrics": loss, base_loss, distill_loss, top1, "updates"})."""
        output, updates = self._apply(self._student(variables), batch["image"], True, rng)
        class_logits, dist_logits = output if isinstance(output, (tuple, list)) else (output, output)
        teacher_logits = self._teacher_logits(variables, batch["image"])
        loss, parts = distillation_loss(class_logits, dist_logits, teacher_logits, batch["label"],
                                        distillation_type=self.kwargs["distillation_type"],
                                        alpha=float(self.kwargs["alpha"]), tau=float(self.kwargs["tau"]))
        logits = (class_logits.astype(jnp.float32) + dist_logits.astype(jnp.float32)) / 2
        top1 = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(batch["label"], -1))
        return loss, {"metrics": {"loss": loss, "top1": top1, **parts}, "updates": updates}

    def eval_metrics(self, variables: Variables, batch: Dict[str, Any]) -> Dict[str, jax.Array]:
        """Returns the student's per-example {"loss", "top1", "top5"} and `teacher_agreement`."""
        student = self.eval_logits(self._student(variables), batch["image"])
        metrics = self.metrics_of(student, batch["label"])
        teacher = self._teacher_logits(variables, batch["image"])
        metrics["teacher_agreement"] = (jnp.argmax(student, -1) == jnp.argmax(teacher, -1)).astype(jnp.float32)
        return metrics
