"""The interface between the trainer and an objective.

An objective owns the module(s) it trains, its loss and its metrics. The trainer calls
only these methods; it never looks inside the model or the batch beyond `batch["mask"]`.
"""
from typing import Any, Dict, Tuple

import jax

Variables = Dict[str, Any]  # flax collections: {"params": ..., "batch_stats": ...}


class Objective:
    """Base class: subclasses set `module` and implement the four methods below."""

    #: Keys of the batch the objective reads, e.g. ("image", "label"); the data pipeline
    #: is asked for exactly these.
    batch_keys: Tuple[str, ...] = ("image", "label")

    def __init__(self, config):
        self.config = config

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
