"""Evaluators: named evaluations, each with its own data, preprocessing, cadence and kind (big_vision's `config.evals`).

    config.evals = dict(
        test=dict(kind="classification"),                               # input.eval_split with input.pp_eval
        test_flip=dict(kind="classification", pp="decode(channels=1)|resize(16)|flip_lr(1.0)|value_range(-1, 1)"),
        knn=dict(kind="knn", k=20, every_steps=400),                    # train split as the memory bank
    )

Each evaluator writes its metrics as "<name>/<metric>" (with EMA params also "<name>_ema/<metric>"
where the kind supports it). With `config.evals` empty the run has one classification evaluator named
"eval" on `input.eval_split`, as before.

Settings every kind takes (None: the run's own):
  kind          one of `list_kinds()`.
  dataset, data_dir   the data (default: config.input's).
  split         the split evaluated (default: input.eval_split).
  pp            its preprocessing (default: input.pp_eval).
  batch_size    global batch size (default: config.eval_batch_size, else config.batch_size).
  every_steps   cadence in train steps (default: config.eval_every_steps); 0: only at the end.
Kinds:
  classification  the objective's per-example eval metrics (loss, top-1, top-5, ...) averaged over
                  the real examples of the split; EMA params too.
  knn             weighted k-nearest-neighbour classification on the objective's `features` (DINO's
                  protocol: cosine similarity, the k most similar train examples vote with weight
                  exp(similarity / temperature)); settings `train_split` (the memory bank, default
                  input.train_split), `k` (20), `temperature` (0.07), `max_train_examples` (None: all).
  linear_probe    multinomial logistic regression on frozen, cached features (`vitjax.evaluate.linear_probe`).
  fewshot         closed-form ridge regression on 1/5/10/25 shots per class, big_vision's few-shot protocol
                  (`vitjax.evaluate.fewshot`).
A new kind is a class with `default_settings` and `evaluate(state) -> {metric: float}`, registered
with `register_evaluator(kind, cls)`; the few-shot, linear-probe and zero-shot evaluators plug in so.
"""
import dataclasses
import gc
from typing import Any, Callable, Dict, List, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vitjax.evaluate import classification

_COMMON_SETTINGS = dict(kind=None, dataset=None, data_dir=None, split=None, pp=None, batch_size=None,
                        every_steps=None)
_KINDS: Dict[str, type] = {}


def register_evaluator(kind: str, cls: type) -> None:
    """Registers evaluator class `cls` under `kind` (its `default_settings` lists its own settings)."""
    if kind in _KINDS:
        raise ValueError(f"Evaluator kind {kind!r} is registered twice")
    _KINDS[kind] = cls


def list_kinds() -> List[str]:
    """Returns the sorted registered evaluator kinds."""
    return sorted(_KINDS)


def default_evals(config) -> Dict[str, Dict[str, Any]]:
    """Returns the run's evaluators: `config.evals`, or one classification evaluator "eval" when it is empty."""
    evals = config.get("evals") or {}
    evals = evals.to_dict() if hasattr(evals, "to_dict") else dict(evals)
    return evals or {"eval": {"kind": "classification"}}


def validate_evals(config) -> Dict[str, Dict[str, Any]]:
    """Returns {name: settings with defaults}; raises ValueError naming bad kinds, keys or values (no data read)."""
    result = {}
    for name, settings in default_evals(config).items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"config.evals names must be non-empty strings without '/', got {name!r}")
        if not isinstance(settings, Mapping):
            raise ValueError(f"config.evals.{name} must be a dict of settings, got {settings!r}")
        kind = settings.get("kind")
        if kind not in _KINDS:
            raise ValueError(f"config.evals.{name}.kind={kind!r} is not valid; valid kinds: {list_kinds()}")
        valid = {**_COMMON_SETTINGS, **_KINDS[kind].default_settings}
        unknown = sorted(set(settings) - set(valid))
        if unknown:
            raise ValueError(f"Unknown setting(s) {unknown} in config.evals.{name} (kind {kind!r}); valid: "
                             f"{sorted(valid)}")
        merged = {**valid, **dict(settings)}
        every = merged["every_steps"]
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 0):
            raise ValueError(f"config.evals.{name}.every_steps must be an int >= 0, got {every!r}")
        _KINDS[kind].check_settings(name, merged)
        result[name] = merged
    return result


@dataclasses.dataclass
class EvalContext:
    """What an evaluator may use of the run: the objective, the data, the mesh and the state's layout."""
    objective: Any
    input_config: Mapping[str, Any]        # the run's config.input
    mesh: jax.sharding.Mesh
    state_shardings: Any
    batch_sharding: jax.sharding.Sharding
    eval_batch_size: int
    default_every_steps: int
    data: Any                              # the `vitjax.data` module (tests may pass a stand-in)


class Evaluator:
    """Base class: `name`, `every_steps`, and `evaluate(state) -> {metric: float}` (unprefixed)."""

    default_settings: Dict[str, Any] = {}

    def __init__(self, name: str, settings: Mapping[str, Any], context: EvalContext):
        self.name = name
        self.settings = dict(settings)
        self.context = context
        every = settings.get("every_steps")
        self.every_steps = int(context.default_every_steps if every is None else every)
        self.batch_size = int(settings.get("batch_size") or context.eval_batch_size)

    @classmethod
    def check_settings(cls, name: str, settings: Mapping[str, Any]) -> None:
        """Raises ValueError for bad kind-specific settings (override where there are some)."""

    def due(self, step: int, is_last: bool) -> bool:
        """Returns whether this evaluator runs after train step `step`."""
        return is_last or (self.every_steps > 0 and step % self.every_steps == 0)

    def input_config(self, split: Optional[str] = None, pp: Optional[str] = None) -> Dict[str, Any]:
        """Returns the run's input config with this evaluator's data, split (`split` overrides) and preprocessing."""
        config = dict(self.context.input_config.to_dict() if hasattr(self.context.input_config, "to_dict")
                      else self.context.input_config)
        for key in ("dataset", "data_dir"):
            if self.settings.get(key) is not None:
                config[key] = self.settings[key]
        config["eval_split"] = split or self.settings.get("split") or config.get("eval_split")
        config["pp_eval"] = pp or self.settings.get("pp") or config.get("pp_eval")
        return config

    def batches(self, keys, split: Optional[str] = None):
        """Yields global eval batches (only `keys` and "mask") of `split` (default: this evaluator's)."""
        from vitjax import parallel
        iterator = self.context.data.make_eval_iterator(self.input_config(split), global_batch_size=self.batch_size)
        try:
            for batch in iterator:
                yield parallel.global_batch({key: batch[key] for key in tuple(keys) + ("mask",)}, self.context.mesh)
        finally:
            # Free the finished tf.data iterator now: finalized later by the garbage collector, in the
            # middle of building the next pipeline, it once broke TF's graph construction.
            del iterator
            gc.collect()

    def evaluate(self, state) -> Dict[str, float]:
        """Returns {metric: value} of `state` (unprefixed)."""
        raise NotImplementedError


def _variables(state, params) -> Dict[str, Any]:
    return {"params": params, **state.model_state}


class Classification(Evaluator):
    """The objective's per-example eval metrics averaged over the split's real examples (EMA params too)."""

    default_settings: Dict[str, Any] = dict(max_batches=None)

    def __init__(self, name, settings, context):
        super().__init__(name, settings, context)
        objective = context.objective
        from vitjax import parallel

        def eval_step(state, batch):
            per_example = objective.eval_metrics(_variables(state, state.params), batch)
            if state.ema_params is not None:
                ema = objective.eval_metrics(_variables(state, state.ema_params), batch)
                per_example.update({f"ema/{key}": value for key, value in ema.items()})
            return classification.masked_sums(per_example, batch["mask"])

        self.step = jax.jit(eval_step, in_shardings=(context.state_shardings, context.batch_sharding),
                            out_shardings=parallel.replicated(context.mesh))

    def evaluate(self, state) -> Dict[str, float]:
        """Returns loss / top-1 / ... (and ema/...) averaged over the real examples of the split."""
        keys = tuple(self.context.objective.eval_batch_keys)
        result = classification.evaluate(self.step, state, self.batches(keys), prefix="",
                                         max_batches=self.settings.get("max_batches"))
        return result


class FeatureEvaluator(Evaluator):
    """Base of the kinds that read the objective's `features` of a train split and an eval split (kNN, probes)."""

    #: Whether `features` returns L2-normalised rows (kNN's cosine similarity) or the raw features.
    normalise_features: bool = False

    def __init__(self, name, settings, context):
        super().__init__(name, settings, context)
        objective = context.objective
        normalise = self.normalise_features
        from vitjax import parallel

        def feature_step(state, batch):
            features = objective.features(_variables(state, state.params), batch["image"])
            if normalise:
                features = features / jnp.maximum(jnp.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
            return features, batch["label"], batch["mask"]

        self.step = jax.jit(feature_step, in_shardings=(context.state_shardings, context.batch_sharding),
                            out_shardings=parallel.replicated(context.mesh))

    def train_split(self) -> str:
        """Returns the split the features are fitted on: setting `train_split`, else the run's train split."""
        return self.settings.get("train_split") or self.context.input_config.get("train_split", "train")

    def features(self, state, split: Optional[str], limit: Optional[int] = None):
        """Returns (features (N, D), labels (N,)) of the real examples of `split` (None: the eval split), as numpy."""
        features, labels, count = [], [], 0
        for batch in self.batches(("image", "label"), split):
            batch_features, batch_labels, mask = jax.device_get(self.step(state, batch))
            mask = np.asarray(mask, bool)
            features.append(np.asarray(batch_features)[mask])
            labels.append(np.asarray(batch_labels)[mask])
            count += int(mask.sum())
            if limit is not None and count >= limit:
                break
        features, labels = np.concatenate(features), np.concatenate(labels)
        return (features[:limit], labels[:limit]) if limit is not None else (features, labels)


class KNearestNeighbours(FeatureEvaluator):
    """Weighted kNN classification on the objective's features, the train split as the memory bank."""

    default_settings: Dict[str, Any] = dict(train_split=None, k=20, temperature=0.07, max_train_examples=None)
    normalise_features = True

    @classmethod
    def check_settings(cls, name, settings):
        if isinstance(settings["k"], bool) or not isinstance(settings["k"], int) or settings["k"] < 1:
            raise ValueError(f"config.evals.{name}.k must be an int >= 1, got {settings['k']!r}")
        if not isinstance(settings["temperature"], (int, float)) or settings["temperature"] <= 0:
            raise ValueError(f"config.evals.{name}.temperature must be > 0, got {settings['temperature']!r}")

    def evaluate(self, state) -> Dict[str, float]:
        """Returns top1 / top5 of weighted kNN (and the memory-bank size)."""
        bank, bank_labels = self.features(state, self.train_split(), self.settings.get("max_train_examples"))
        queries, labels = self.features(state, None)
        top1, top5 = knn_classify(bank, bank_labels, queries, labels, k=int(self.settings["k"]),
                                  temperature=float(self.settings["temperature"]))
        return {"top1": top1, "top5": top5, "num_examples": int(len(labels)), "num_train_examples": int(len(bank))}


def knn_classify(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, labels: np.ndarray, *,
                 k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> tuple:
    """Returns (top-1, top-5) accuracy of weighted kNN: L2-normalised features, votes exp(cos / temperature)."""
    num_classes = int(max(bank_labels.max(), labels.max())) + 1
    k = min(k, len(bank))
    bank_device = jnp.asarray(bank, jnp.float32)
    bank_onehot = jax.nn.one_hot(jnp.asarray(bank_labels), num_classes, dtype=jnp.float32)

    @jax.jit
    def scores(query):
        similarity = query @ bank_device.T
        top, index = jax.lax.top_k(similarity, k)
        votes = bank_onehot[index] * jnp.exp(top / temperature)[..., None]
        return votes.sum(axis=1)

    correct1 = correct5 = 0
    for start in range(0, len(queries), chunk):
        class_scores = np.asarray(scores(jnp.asarray(queries[start:start + chunk], jnp.float32)))
        truth = labels[start:start + chunk]
        ranked = np.argsort(-class_scores, axis=1)
        correct1 += int(np.sum(ranked[:, 0] == truth))
        correct5 += int(np.sum(np.any(ranked[:, :min(5, num_classes)] == truth[:, None], axis=1)))
    return correct1 / len(queries), correct5 / len(queries)


register_evaluator("classification", Classification)
register_evaluator("knn", KNearestNeighbours)


def build_evaluators(config, context: EvalContext) -> List[Evaluator]:
    """Returns the run's evaluators (validated), in the order of `config.evals` (a ConfigDict sorts its keys)."""
    return [_KINDS[settings["kind"]](name, settings, context) for name, settings in validate_evals(config).items()]


def run_evaluators(evaluators: List[Evaluator], state, step: int, is_last: bool,
                   log: Optional[Callable[[str], None]] = None) -> Dict[str, float]:
    """Returns the metrics of the evaluators due after `step`, as "<name>/<metric>" ("<name>_ema/<metric>" for EMA)."""
    import time
    result: Dict[str, float] = {}
    for evaluator in evaluators:
        if not evaluator.due(step, is_last):
            continue
        start = time.time()
        metrics = evaluator.evaluate(state)
        named = {}
        for key, value in metrics.items():
            if key.startswith("ema/"):
                named[f"{evaluator.name}_ema/{key[4:]}"] = value
            else:
                named[f"{evaluator.name}/{key}"] = value
        if any(key.startswith(f"{evaluator.name}_ema/") for key in named) and f"{evaluator.name}/num_examples" in named:
            named[f"{evaluator.name}_ema/num_examples"] = named[f"{evaluator.name}/num_examples"]
        result.update(named)
        if log is not None:
            shown = ", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                              for key, value in sorted(named.items()))
            log(f"step {step}: {shown} ({time.time() - start:.1f} s)")
    return result


__all__ = ["Classification", "EvalContext", "Evaluator", "FeatureEvaluator", "KNearestNeighbours", "build_evaluators",
           "default_evals",
           "knn_classify", "list_kinds", "register_evaluator", "run_evaluators", "validate_evals"]

# Kinds defined in other modules register on import (after everything above exists: they import it).
from vitjax.evaluate import zeroshot  # noqa: E402,F401  pylint: disable=wrong-import-position
from vitjax.evaluate import fewshot, linear_probe  # noqa: E402,F401  pylint: disable=wrong-import-position
from vitjax.evaluate import outliers  # noqa: E402,F401  pylint: disable=wrong-import-position
from vitjax.evaluate import recall_at_k  # noqa: E402,F401  pylint: disable=wrong-import-position
