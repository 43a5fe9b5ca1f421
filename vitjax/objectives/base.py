"""The interface between the trainer and an objective.

An objective owns the module(s) it trains, its loss and its metrics. The trainer calls only the
methods below, inside its jitted train and eval steps; it never looks inside the model or the
batch beyond `batch["mask"]` (eval padding).

    objective = vitjax.objectives.create(config.objective, config)   # full run config
    variables = objective.init_variables(rng, batch)    # {"params": ..., maybe "batch_stats": ...}
    loss, aux = objective.train_loss(variables, batch, rng)
    per_example = objective.eval_metrics(variables, batch)

Batches are dicts of arrays with a leading batch dim: in training "image" (B, H, W, C) float and
"label" (B, num_classes) float (one-hot, smoothed or mixed); in evaluation "image", "label"
(B,) int32 class ids and "mask" (B,) bool (False = padding). `rng` is a fresh key per step (and
per micro-batch under gradient accumulation): split it for the model's named rngs (`dropout`,
`drop_path`, `masking`).

Settings of an objective live in `config.objective_kwargs`; a subclass lists them with their
defaults in `default_kwargs`, and `self.kwargs` holds them merged (unknown names raise).

The parameter groups of the optimizer are the trained model's: `layer_ids(params)` (layer-wise lr
decay) and `no_weight_decay()` delegate to `self.module` (see vitjax.models.param_groups); an objective
whose params are not the module's alone overrides them.

Hooks with defaults (override where the objective needs something else):
  num_classes             int or None; checked against the dataset's number of classes.
  init_from_rules()       how `config.init_from` fits this objective's params (`vitjax.weights.Rules`):
                          where the model sits, what the checkpoint may lack or carry extra.
  frozen_weights()        {collection: dict(source, model_name, model_overrides)}: non-trained weights
                          the trainer loads once for a new run (a distillation teacher).
  features(variables, images) -> (B, D) features for the kNN and few-shot evaluators.
  host_batch_fields(...)  None, or fields(batch_index) -> {name: (local_batch, ...) array}: data read on the
                          host that the trainer adds to every train batch (stored teacher logits).
  example_batch(image)    one zero row of every batch key, for programs compiled without data (`vitjax.aot`).
"""
from typing import Any, Callable, Dict, Optional, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from vitjax import weights

Variables = Dict[str, Any]  # flax collections: {"params": ..., "batch_stats": ...}


def model_overrides(model_config) -> Dict[str, Any]:
    """Returns `config.model` as keyword arguments for `models.create`, dtype names made jnp dtypes."""
    overrides = dict(model_config or {})
    for key in ("dtype", "param_dtype"):
        if isinstance(overrides.get(key), str):
            overrides[key] = jnp.dtype(overrides[key])
    return overrides


class Objective:
    """Base class: subclasses set `module` and implement the three methods below."""

    #: Keys of the train batch the objective reads, e.g. ("image", "label") or ("image_0", "image_1");
    #: the trainer passes exactly these to the train step.
    batch_keys: Tuple[str, ...] = ("image", "label")

    #: Keys of the eval batch `eval_metrics` reads (eval pipelines give "image", "label" and "mask").
    eval_batch_keys: Tuple[str, ...] = ("image", "label")

    #: Classes the objective predicts (None: it predicts none); checked against the dataset's.
    num_classes: Optional[int] = None

    #: The objective's settings (config.objective_kwargs) and their defaults.
    default_kwargs: Dict[str, Any] = {}

    def __init__(self, config):
        self.config = config
        given = dict(config.get("objective_kwargs") or {}) if hasattr(config, "get") else {}
        unknown = sorted(set(given) - set(self.default_kwargs))
        if unknown:
            raise ValueError(f"Unknown objective_kwargs {unknown} for objective {type(self).__name__}; "
                             f"valid keys: {sorted(self.default_kwargs)}")
        self.kwargs = {**self.default_kwargs, **given}

    def init_variables(self, rng: jax.Array, batch: Dict[str, Any]) -> Variables:
        """Returns the initial variables (params may carry logical-axis boxes)."""
        raise NotImplementedError

    def train_loss(self, variables: Variables, batch: Dict[str, Any], rng: jax.Array
                   ) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (scalar loss, aux); aux = {"metrics": {name: scalar}, "updates": {collection: value}}.

        `updates` holds the non-param collections the step changed (e.g. batch_stats).
        """
        raise NotImplementedError

    def eval_metrics(self, variables: Variables, batch: Dict[str, Any]) -> Dict[str, jax.Array]:
        """Returns {name: per-example values of shape (batch,)}; the trainer averages them over batch["mask"]."""
        raise NotImplementedError

    # ---- hooks with defaults ---------------------------------------------------------------------
    def init_from_rules(self) -> weights.Rules:
        """Returns how `config.init_from` fits this objective: the user's skip/keep, the model's posemb prefix."""
        module = getattr(self, "module", None)
        prefix = None
        if module is not None and hasattr(module, "num_prefix_tokens"):
            prefix = 0 if getattr(module, "no_embed_class", False) else int(module.num_prefix_tokens)
        return weights.Rules(skip=tuple(self.config.get("init_from_skip") or ()),
                             keep=tuple(self.config.get("init_from_keep") or ()), posemb_prefix=prefix)

    def frozen_weights(self) -> Dict[str, Dict[str, Any]]:
        """Returns {collection: dict(source, model_name, model_overrides)} to load once into a new run (none here)."""
        return {}

    def host_batch_fields(self, *, start_step: int, total_steps: int
                          ) -> Optional[Callable[[int], Dict[str, Any]]]:
        """Returns None, or fields(batch_index) -> {name: this host's (local_batch, ...) array} for each train batch.

        Called once before the first batch, so a check that reads files fails before anything compiles.
        Batch b is the one train step b + 1 consumes; the fields' names belong in `batch_keys`.
        """
        del start_step, total_steps
        return None

    def example_batch(self, image: np.ndarray) -> Dict[str, np.ndarray]:
        """Returns {key: one zero row} for every key of `batch_keys`, given a (1, H, W, C) image row.

        What a train step is compiled for when no data is read (`python -m vitjax.aot`); an objective
        whose batch holds more than an image and a label overrides it.
        """
        rows = {"image": image, "label": np.zeros((1,), np.int32)}
        unknown = [key for key in self.batch_keys if key not in rows]
        if unknown:
            raise NotImplementedError(f"{type(self).__name__} reads batch keys {unknown}: it must define "
                                      "example_batch to be compiled without data")
        return {key: rows[key] for key in self.batch_keys}

    def features(self, variables: Variables, images: jax.Array) -> jax.Array:
        """Returns (B, D) fp32 features of the images: the model's pre-logits (its pooled representation)."""
        chex.assert_rank(images, 4)
        _, intermediates = self.module.apply(variables, images, train=False)
        features = intermediates["pre_logits"]
        chex.assert_rank(features, 2)
        return features.astype(jnp.float32)

    def layer_ids(self, params: Any) -> Tuple[Dict[str, Any], int]:
        """Returns ({path: layer id}, num_layers) of the trained params, for layer-wise lr decay (see vitjax.optim)."""
        if not hasattr(self.module, "layer_ids"):
            raise ValueError(f"optim.layer_decay needs layer ids, and the model {type(self.module).__name__} declares "
                             "no layer ids (a `layer_ids(params)` method, see vitjax.models.param_groups)")
        return self.module.layer_ids(params)

    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns regexes of the param paths never weight-decayed: the model's (none if it declares none)."""
        if not hasattr(self.module, "no_weight_decay"):
            return ()
        return tuple(self.module.no_weight_decay())
