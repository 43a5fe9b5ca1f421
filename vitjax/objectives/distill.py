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

TinyViT's distillation (Wu et al. 2022) is `distillation_type="soft_target"`: L_dist = CE(d, p), the
cross-entropy against the teacher's top-`topk` softmax probabilities with the rest of the mass spread
evenly over the other classes (TinyViT: k = 10, alpha = 1, so the labels are not used). It runs with
the teacher online, or from **stored** probabilities: set `teacher_logits=DIR`, written once by

    python -m vitjax.distill.save_logits --config=<this config>

for exactly the images this run will see (see `vitjax.distill.stored`). Then no teacher is built or
loaded and no teacher runs during training; the step reads (values, indices, fingerprint) from the
batch and reports `replay_mismatch`, the fraction of images whose fingerprint differs from the image
the teacher saw (0 when the replay is exact). A store written for another recipe, missing a file or
holding a truncated one stops the run before anything compiles. Stored probabilities serve
"soft_target" and "hard" (the top-1 class); "soft" needs the teacher's logits at temperature tau.

DeiT-LT (Rangwani et al. 2024, "DeiT-LT: Distillation Strikes Back for Vision Transformer Training on
Long-Tailed Datasets"; official code val-iisc/DeiT-LT) is hard distillation from a CNN teacher (trained
with SAM) on a long-tailed split (`input.long_tail`) with three settings:
- the teacher sees the student's own strongly augmented (mixed) images, which are out of its training
  distribution: that is what this objective does anyway; `teacher_size` resizes them (bicubic) for a
  teacher trained at another resolution (their --teacher-size: 32 for a CIFAR ResNet-32 under a 224 DeiT);
- `class_balance_beta` (their --beta, 0.9999): the distillation cross-entropy weighs example i by
  w[argmax t_i] with Cui et al.'s effective-number weights w_c = (1 - beta) / (1 - beta^n_c), normalised to
  sum to the number of classes, and averages as PyTorch's weighted cross-entropy does:
  L_dist = sum_i w[y_i] CE_i / sum_i w[y_i]. n_c are the train split's class counts (`class_counts`, or
  read from the input pipeline when None);
- `drw_step` (their --drw, deferred re-weighting, in steps): the weights apply from this train step on,
  before it L_dist is the plain mean. The class head keeps the plain cross-entropy throughout, as the
  official recipe (no --weighted-baseloss). Their --no-mixup-drw (CIFAR-LT) is `input.mixup.stop_step`
  set to the same step: from there the batches are neither mixed nor smoothed.
"""
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import vitjax.models as models
from vitjax import weights
from vitjax.distill import stored
from vitjax.objectives.base import Variables, model_overrides
from vitjax.objectives.supervised import Supervised

DISTILLATION_TYPES = ("hard", "soft", "soft_target")
STORED_TYPES = ("hard", "soft_target")
TEACHER = "teacher"
STEP_FIELD = "train_step"  # (B,) int32: the step that consumes the batch (deferred re-weighting reads it)


def class_balanced_weights(class_counts: Sequence[int], beta: float) -> np.ndarray:
    """Returns float32 (C,) effective-number class weights (Cui et al. 2019), summing to C.

    w_c = (1 - beta) / (1 - beta^n_c), the DeiT-LT / LDAM-DRW recipe; beta 0 gives equal weights.
    """
    counts = np.asarray(class_counts, np.float64)
    weights = (1.0 - beta) / (1.0 - np.power(beta, counts))
    return (weights / weights.sum() * len(counts)).astype(np.float32)


def distillation_loss(class_logits: jax.Array, dist_logits: jax.Array, teacher_logits: jax.Array,
                      labels: jax.Array, *, distillation_type: str, alpha: float, tau: float,
                      class_weights: Optional[jax.Array] = None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """Returns (loss, {"base_loss", "distill_loss"}) of DeiT's distillation (see the module doc).

    For "soft_target", `teacher_logits` are the teacher's (B, C) target probabilities (`teacher_targets`).
    `class_weights` (C,) weigh the "hard" distillation cross-entropy by the teacher's class (DeiT-LT).
    """
    class_logits, dist_logits = class_logits.astype(jnp.float32), dist_logits.astype(jnp.float32)
    teacher_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    base = optax.softmax_cross_entropy(class_logits, labels.astype(jnp.float32)).mean()
    if distillation_type == "hard":
        targets = jnp.argmax(teacher_logits, -1)
        per_example = optax.softmax_cross_entropy_with_integer_labels(dist_logits, targets)
        if class_weights is None:
            distill = per_example.mean()
        else:  # PyTorch's weighted mean: normalised by the weights of the targets, not by B
            example_weights = jnp.asarray(class_weights, jnp.float32)[targets]
            distill = jnp.sum(example_weights * per_example) / jnp.sum(example_weights)
    elif class_weights is not None:
        raise ValueError(f"class_weights weigh the 'hard' distillation only, not {distillation_type!r}")
    elif distillation_type == "soft_target":  # `teacher_logits` are probabilities here (see teacher_targets)
        distill = optax.softmax_cross_entropy(dist_logits, teacher_logits).mean()
    else:
        log_student = jax.nn.log_softmax(dist_logits / tau, axis=-1)
        log_teacher = jax.nn.log_softmax(teacher_logits / tau, axis=-1)
        kl = jnp.sum(jnp.exp(log_teacher) * (log_teacher - log_student))
        distill = kl * tau * tau / dist_logits.size
    loss = (1.0 - alpha) * base + alpha * distill
    return loss, {"base_loss": base, "distill_loss": distill}


class Distillation(Supervised):
    """A student classifier trained on the labels and on a frozen teacher's predictions (online or stored)."""

    default_kwargs: Dict[str, Any] = dict(teacher=None, teacher_model={}, teacher_init=None,
                                          distillation_type="hard", alpha=0.5, tau=1.0,
                                          topk=10, teacher_logits=None, class_balance_beta=None,
                                          drw_step=0, class_counts=None, teacher_size=None)

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
        topk = kwargs["topk"]
        uses_topk = kwargs["distillation_type"] == "soft_target" or kwargs["teacher_logits"]
        if uses_topk and (isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= self.num_classes):
            raise ValueError(f"objective_kwargs.topk must be an int in [1, {self.num_classes}] (the classes), "
                             f"got {topk!r}")
        self.stored = bool(kwargs["teacher_logits"])
        self.teacher = None
        self.class_weights = self._check_long_tail_settings(kwargs)
        if self.stored:
            if kwargs["distillation_type"] not in STORED_TYPES:
                raise ValueError(f"Stored teacher probabilities (objective_kwargs.teacher_logits) serve the "
                                 f"distillation types {STORED_TYPES}; {kwargs['distillation_type']!r} needs the "
                                 "teacher online (set teacher_logits=None)")
            self.batch_keys = ("image", "label") + stored.FIELDS + self._step_keys()
            return
        if not kwargs["teacher"]:
            raise ValueError("objective 'distill' needs objective_kwargs.teacher, a registered model name "
                             "(see vitjax.models.list_models()), or teacher_logits, a store written by "
                             "python -m vitjax.distill.save_logits")
        if not kwargs["teacher_init"]:
            raise ValueError("objective 'distill' needs objective_kwargs.teacher_init: a vitjax workdir or "
                             "checkpoint directory, or a timm .pth / .bin / .safetensors file")
        weights.check_source(kwargs["teacher_init"])
        self.batch_keys = ("image", "label") + self._step_keys()
        self.teacher_overrides = model_overrides(kwargs["teacher_model"])
        self.teacher = models.create(kwargs["teacher"], **self.teacher_overrides)
        teacher_classes = getattr(self.teacher, "num_classes", None)
        if teacher_classes and teacher_classes != self.num_classes:
            raise ValueError(f"The teacher {kwargs['teacher']!r} has {teacher_classes} classes, the student "
                             f"{self.num_classes}; set objective_kwargs.teacher_model.num_classes")

    def _check_long_tail_settings(self, kwargs) -> Optional[np.ndarray]:
        """Returns DeiT-LT's class weights (None without `class_balance_beta`) after checking its settings."""
        beta, drw_step, teacher_size = kwargs["class_balance_beta"], kwargs["drw_step"], kwargs["teacher_size"]
        if isinstance(drw_step, bool) or not isinstance(drw_step, int) or drw_step < 0:
            raise ValueError(f"objective_kwargs.drw_step must be an int >= 0 (the train step from which the class "
                             f"weights apply; 0: from the start), got {drw_step!r}")
        if teacher_size is not None:
            if isinstance(teacher_size, bool) or not isinstance(teacher_size, int) or teacher_size < 1:
                raise ValueError(f"objective_kwargs.teacher_size must be None or an int >= 1 (the teacher's input "
                                 f"side), got {teacher_size!r}")
            if self.stored:
                raise ValueError("objective_kwargs.teacher_size resizes the images for the teacher online; the "
                                 "stored probabilities (teacher_logits) were computed without it: set one")
        if beta is None:
            if drw_step or kwargs["class_counts"] is not None:
                raise ValueError("objective_kwargs.drw_step and class_counts weigh the distillation by class and "
                                 "need objective_kwargs.class_balance_beta (DeiT-LT: 0.9999)")
            return None
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"objective_kwargs.class_balance_beta must be None or a number in [0, 1), got {beta!r}")
        if kwargs["distillation_type"] != "hard":
            raise ValueError(f"objective_kwargs.class_balance_beta weighs the 'hard' distillation (DeiT-LT); "
                             f"distillation_type is {kwargs['distillation_type']!r}")
        counts = kwargs["class_counts"]
        if counts is None:  # the class prior of the split this run trains on (long-tailed where input asks)
            from vitjax import data  # pylint: disable=g-import-not-at-top
            counts = data.train_class_counts(self.config.input)
        counts = np.asarray(counts)
        if counts.shape != (self.num_classes,) or not np.issubdtype(counts.dtype, np.integer) or counts.min() < 1:
            raise ValueError(f"objective_kwargs.class_counts must hold {self.num_classes} ints >= 1 (examples per "
                             f"class), got {counts.tolist()!r}")
        return class_balanced_weights(counts, float(beta))

    def example_batch(self, image: np.ndarray) -> Dict[str, np.ndarray]:
        """Returns zero rows of the image, label, stored teacher fields (as `stored.Store.fields` gives them)
        and train step: what the train step reads."""
        rows = {"image": image, "label": np.zeros((1,), np.int32), STEP_FIELD: np.zeros((1,), np.int32),
                **stored.example_fields(self.kwargs["topk"])}
        return {key: rows[key] for key in self.batch_keys}

    def init_variables(self, rng: jax.Array, batch: Dict[str, Any]) -> Variables:
        """Returns the student's variables plus the teacher's (random here; the trainer loads `frozen_weights`)."""
        student_rng, teacher_rng = jax.random.split(rng)
        variables = super().init_variables(student_rng, batch)
        if self.stored:
            return variables
        teacher = self.teacher.init({"params": teacher_rng}, batch["image"], train=False)
        # The teacher's params keep their logical-axis boxes: the trainer shards them by their own names.
        return {**variables, TEACHER: dict(teacher)}

    def frozen_weights(self) -> Dict[str, Dict[str, Any]]:
        """Returns the teacher's weights to load once into a new run: `teacher_init` fitted exactly to `teacher`."""
        if self.stored:
            return {}
        return {TEACHER: dict(source=self.kwargs["teacher_init"], model_name=self.kwargs["teacher"],
                              model_overrides=self.teacher_overrides)}

    def _step_keys(self) -> Tuple[str, ...]:
        return (STEP_FIELD,) if self.class_weights is not None and self.kwargs["drw_step"] > 0 else ()

    def host_batch_fields(self, *, start_step: int, total_steps: int):
        """Returns the reader of the stored teacher probabilities (checked for this run's recipe and steps) and of
        the batch's train step (deferred re-weighting), or None when the batches need neither."""
        stored_fields = self._stored_fields(start_step, total_steps) if self.stored else None
        if not self._step_keys():
            return stored_fields
        local_batch = self.config.batch_size // jax.process_count()

        def fields(batch_index: int) -> Dict[str, np.ndarray]:
            step = {STEP_FIELD: np.full((local_batch,), batch_index, np.int32)}
            return {**stored_fields(batch_index), **step} if stored_fields else step
        return fields

    def _stored_fields(self, start_step: int, total_steps: int):
        store = stored.open_store(self.kwargs["teacher_logits"], self.config, num_classes=self.num_classes,
                                  start_batch=start_step, num_batches=total_steps)
        if store.meta["topk"] != self.kwargs["topk"]:
            raise ValueError(f"The store {self.kwargs['teacher_logits']} holds the top {store.meta['topk']} "
                             f"probabilities; objective_kwargs.topk is {self.kwargs['topk']}")
        return store.fields

    def features(self, variables: Variables, images: jax.Array) -> jax.Array:
        """Returns the student's pre-logits features."""
        return super().features(self._student(variables), images)

    def teacher_logits(self, teacher_variables: Variables, images: jax.Array) -> jax.Array:
        """Returns the frozen teacher's fp32 logits (the mean of a distilled DeiT teacher's two heads)."""
        size = self.kwargs["teacher_size"]
        if size is not None and images.shape[1:3] != (size, size):
            images = jax.image.resize(images, (images.shape[0], size, size, images.shape[3]), "bicubic")
        logits, _ = self.teacher.apply(teacher_variables, images, train=False)
        if isinstance(logits, (tuple, list)):
            logits = sum(logits) / len(logits)
        return jax.lax.stop_gradient(logits.astype(jnp.float32))

    def teacher_targets(self, variables: Variables, batch: Dict[str, Any]) -> jax.Array:
        """Returns what `distillation_loss` takes as the teacher's output for this batch and distillation type.

        Logits for "hard" and "soft" online; for "soft_target" the top-k probabilities made dense (TinyViT),
        from the teacher online or from the stored fields; stored "hard" gives the stored top-1 as a one-hot.
        """
        if self.stored:
            if self.kwargs["distillation_type"] == "hard":
                return jax.nn.one_hot(batch["teacher_indices"][:, 0], self.num_classes)
            return stored.dense_probabilities(batch["teacher_values"], batch["teacher_indices"], self.num_classes)
        logits = self.teacher_logits(variables[TEACHER], batch["image"])
        if self.kwargs["distillation_type"] != "soft_target":
            return logits
        values, indices = stored.top_k_probabilities(logits, self.kwargs["topk"])
        return stored.dense_probabilities(values, indices, self.num_classes)

    @staticmethod
    def _student(variables: Variables) -> Variables:
        return {name: value for name, value in variables.items() if name != TEACHER}

    def train_loss(self, variables: Variables, batch: Dict[str, Any], rng: jax.Array
                   ) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (the distillation loss, {"metrics": loss, base_loss, distill_loss, top1[, replay_mismatch], "updates"})."""
        output, updates = self._apply(self._student(variables), batch["image"], True, rng)
        class_logits, dist_logits = output if isinstance(output, (tuple, list)) else (output, output)
        class_weights, weighted = None, None
        if self.class_weights is not None:
            class_weights = jnp.asarray(self.class_weights)
            if self._step_keys():  # deferred re-weighting: equal weights (the plain mean) before drw_step
                weighted = batch[STEP_FIELD][0] >= self.kwargs["drw_step"]
                class_weights = jnp.where(weighted, class_weights, jnp.ones_like(class_weights))
            else:
                weighted = jnp.array(True)
        loss, parts = distillation_loss(class_logits, dist_logits, self.teacher_targets(variables, batch),
                                        batch["label"], distillation_type=self.kwargs["distillation_type"],
                                        alpha=float(self.kwargs["alpha"]), tau=float(self.kwargs["tau"]),
                                        class_weights=class_weights)
        if weighted is not None:
            parts["class_weighted"] = weighted.astype(jnp.float32)
        logits = (class_logits.astype(jnp.float32) + dist_logits.astype(jnp.float32)) / 2
        top1 = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(batch["label"], -1))
        metrics = {"loss": loss, "top1": top1, **parts}
        if self.stored:  # the image the student sees must be, bit for bit, the one the teacher saw
            seen = stored.fingerprint(batch["image"])
            metrics["replay_mismatch"] = jnp.mean((seen != batch["teacher_fingerprint"]).astype(jnp.float32))
        return loss, {"metrics": metrics, "updates": updates}

    def eval_metrics(self, variables: Variables, batch: Dict[str, Any]) -> Dict[str, jax.Array]:
        """Returns the student's per-example {"loss", "top1", "top5"} and, with a teacher online, `teacher_agreement`."""
        student = self.eval_logits(self._student(variables), batch["image"])
        metrics = self.metrics_of(student, batch["label"])
        if not self.stored:
            teacher = self.teacher_logits(variables[TEACHER], batch["image"])
            metrics["teacher_agreement"] = (jnp.argmax(student, -1) == jnp.argmax(teacher, -1)).astype(jnp.float32)
        return metrics
