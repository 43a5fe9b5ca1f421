"""Retrieval metrics of deep metric learning: Recall@K and MAP@R on an eval split, every example a query against
all the others (cosine similarity of the objective's `features`, the query left out of its own neighbours).

    config.evals = dict(retrieval=dict(kind="recall_at_k", ks=(1, 2, 4, 8)))
    python -m vitjax.evaluate --init_from=WORKDIR --kind=recall_at_k

Recall@K (the DML papers' "R@K"): the fraction of queries with at least one example of their class among their K
nearest neighbours. MAP@R (Musgrave et al. 2020, "A Metric Learning Reality Check"): per query with R other
examples of its class, the mean over its R nearest neighbours of precision@i at the correct ones, divided by R.
Settings: `ks` (1, 2, 4, 8), `map_at_r` (True), `max_examples` (None: the whole split). The split is usually
one of classes unseen in training (`input.eval_classes`). Arithmetic in NumPy, row chunks of the similarity.
"""
from typing import Any, Dict, Sequence

import numpy as np

from vitjax.evaluate.evaluators import FeatureEvaluator, register_evaluator


def retrieval_metrics(features: np.ndarray, labels: np.ndarray, *, ks: Sequence[int] = (1, 2, 4, 8),
                      map_at_r: bool = True, chunk: int = 512) -> Dict[str, float]:
    """Returns {"recall_at_K" per K, "map_at_r"}: each row a query against all other rows, by cosine similarity."""
    features = np.asarray(features, np.float32)
    features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    labels = np.asarray(labels)
    num = len(labels)
    if num < 2:
        raise ValueError(f"Retrieval needs at least 2 examples, got {num}")
    _, class_index = np.unique(labels, return_inverse=True)
    same_class = np.bincount(class_index)[class_index] - 1   # R: the other examples of the query's class
    max_k = min(max(ks), num - 1)
    depth = max(max_k, int(same_class.max()) if map_at_r else 0)
    hits = {k: 0 for k in ks}
    average_precision = []
    for start in range(0, num, chunk):
        rows = np.arange(start, min(start + chunk, num))
        similarity = features[rows] @ features.T
        similarity[np.arange(len(rows)), rows] = -np.inf   # the query is not its own neighbour
        order = np.argsort(-similarity, axis=1, kind="stable")[:, :depth]
        correct = labels[order] == labels[rows][:, None]
        for k in ks:
            hits[k] += int(np.sum(np.any(correct[:, :min(k, num - 1)], axis=1)))
        if map_at_r:
            for row, query_correct in zip(rows, correct):
                r = int(same_class[row])
                if r == 0:
                    average_precision.append(0.0)
                    continue
                relevant = query_correct[:r]
                precision = np.cumsum(relevant) / np.arange(1, r + 1)
                average_precision.append(float(np.sum(precision * relevant) / r))
    result = {f"recall_at_{k}": hits[k] / num for k in ks}
    if map_at_r:
        result["map_at_r"] = float(np.mean(average_precision))
    return result


class RecallAtK(FeatureEvaluator):
    """Recall@K and MAP@R of the eval split's examples retrieving each other by their features."""

    default_settings: Dict[str, Any] = dict(ks=(1, 2, 4, 8), map_at_r=True, max_examples=None)
    normalise_features = True

    @classmethod
    def check_settings(cls, name, settings):
        ks = settings["ks"]
        if (not isinstance(ks, (tuple, list)) or not ks
                or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks)):
            raise ValueError(f"config.evals.{name}.ks must be a non-empty list of ints >= 1, got {ks!r}")
        if not isinstance(settings["map_at_r"], bool):
            raise ValueError(f"config.evals.{name}.map_at_r must be True or False, got {settings['map_at_r']!r}")
        limit = settings["max_examples"]
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 2):
            raise ValueError(f"config.evals.{name}.max_examples must be None or an int >= 2, got {limit!r}")

    def evaluate(self, state) -> Dict[str, float]:
        """Returns recall@K per K of `ks`, map@r and the number of examples."""
        features, labels = self.features(state, None, self.settings.get("max_examples"))
        result = retrieval_metrics(features, labels, ks=tuple(self.settings["ks"]),
                                   map_at_r=bool(self.settings["map_at_r"]))
        result["num_examples"] = int(len(labels))
        return result


register_evaluator("recall_at_k", RecallAtK)

__all__ = ["RecallAtK", "retrieval_metrics"]
