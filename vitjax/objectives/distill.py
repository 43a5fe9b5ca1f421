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
`teacher_init`: a vitjax workdir or checkpoint directory (its newest step), or a timm `.pth` /
`.bin` / `.safetensors` file (converted by `vitjax.convert.from_timm`). Its variables live in the
train state's non-trained collections under "teacher", so checkpoints hold them and a resumed run
needs no reload. Evaluation reports the student (the mean of its two heads for a distilled DeiT),
plus `teacher_agreement`, the fraction of examples where the student's prediction equals the
teacher's.
"""
import os
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import vitjax.models as models
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


def load_teacher_variables(source: str, name: str, **overrides) -> Dict[str, Any]:
    """Returns flax variables of teacher `name` from a vitjax checkpoint directory or a timm weights file."""
    if not isinstance(source, str) or not source:
        raise ValueError("objective_kwargs.teacher_init must name the teacher's weights: a vitjax workdir or "
                         "checkpoint directory, or a timm .pth / .bin / .safetensors file")
    if os.path.isdir(source):
        from vitjax import checkpoint
        directory = os.path.join(source, "checkpoints") if os.path.isdir(os.path.join(source, "checkpoints")) \
            else source
        state = checkpoint.load_state(directory)
        return {"params": state["params"], **dict(state.get("model_state") or {})}
    if not os.path.exists(source):
        raise FileNotFoundError(f"objective_kwargs.teacher_init={source!r} does not exist")
    from vitjax import convert
    return convert.from_timm(source, name, **overrides)


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
        self.teacher_overrides = model_overrides(kwargs["teacher_model"])
        self.teacher = models.create(kwargs["teacher"], **self.teacher_overrides)
        teacher_classes = getattr(self.teacher, "num_classes", None)
        if teacher_classes and teacher_classes != self.num_classes:
            raise ValueError(f"The teacher {kwargs['teacher']!r} has {teacher_classes} classes, the student "
                             f"{self.num_classes}; set objective_kwargs.teacher_model.num_classes")

    def init_variables(self, rng: jax.Array, batch: Dict[str, Any]) -> Variables:
        """Returns the student's variables plus the teacher's (random here; `load_pretrained_state` loads them)."""
        student_rng, teacher_rng = jax.random.split(rng)
        variables = super().init_variables(student_rng, batch)
        teacher = self.teacher.init({"params": teacher_rng}, batch["image"], train=False)
        # The trainer shards non-param collections like the student params whose path and shape they
        # share, and replicates the rest.
        return {**variables, TEACHER: dict(teacher)}

    def load_pretrained_state(self, model_state: Dict[str, Any]) -> Dict[str, Any]:
        """Returns `model_state` with the teacher's variables loaded from `teacher_init` (shapes checked)."""
        loaded = load_teacher_variables(self.kwargs["teacher_init"], self.kwargs["teacher"], **self.teacher_overrides)
        expected = model_state[TEACHER]
        want = jax.tree_util.tree_structure(expected)
        got = jax.tree_util.tree_structure(loaded)
        if want != got:
            raise ValueError(f"The teacher weights in {self.kwargs['teacher_init']!r} do not fit "
                             f"{self.kwargs['teacher']!r} with overrides {self.kwargs['teacher_model']}: "
                             f"expected collections {sorted(expected)}, got {sorted(loaded)}")
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(loaded)):
            if tuple(a.shape) != tuple(jnp.shape(b)):
                raise ValueError(f"Teacher weight {jax.tree_util.keystr(path)} has shape {jnp.shape(b)}, "
                                 f"the teacher model wants {a.shape}")
        loaded = jax.tree.map(lambda a, b: np.asarray(b, a.dtype), expected, loaded)
        return {**model_state, TEACHER: loaded}

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
