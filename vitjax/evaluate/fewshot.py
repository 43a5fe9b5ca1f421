"""Few-shot linear evaluation: closed-form ridge regression on K labelled examples per class (big_vision).

big_vision's protocol (`big_vision/evaluators/fewshot_lsr.py`): the K-shot features are whitened with
their own per-dimension mean and standard deviation (+1e-5), a constant feature of 100 is appended (a
bias that the l2 penalty barely touches), the targets are one-hot in {-1, 1}, and the weights solve
min |Xw - Y|^2 + l2 |w|^2 in closed form through one eigendecomposition (of X^T X or X X^T, whichever
is smaller) that serves every l2. The test features are whitened with the shots' statistics; the
prediction is the argmax.

    config.evals = dict(fewshot=dict(kind="fewshot", shots=(1, 5, 10, 25), every_steps=1000))

Settings: `train_split` (where the shots come from; default the run's train split), `shots` (per
class), `l2_regs` (the sweep), `num_seeds` (draws of the shots), `num_val_per_class` (train examples
outside the shots that choose l2; 0: report the first l2 of the sweep), `max_train_examples`.
Metrics: `{K}shot` (test top-1 at the chosen l2, mean over seeds), `{K}shot_std` (over seeds),
`{K}shot_l2` (the l2 chosen most often), written as "<name>/10shot" etc. The arithmetic runs in
float64 NumPy on the host: a few hundred rows, and the eigenvalues span many decades.
"""
from typing import Any, Dict, Sequence, Tuple

import numpy as np

from vitjax.evaluate.evaluators import FeatureEvaluator, register_evaluator

BIAS_FEATURE = 100.0
#: l2 strengths swept by default: powers of 2 around big_vision's fixed 2^10, every 4 octaves.
DEFAULT_L2_REGS = tuple(2.0 ** power for power in range(-2, 19, 4))


def ridge_fit(features: np.ndarray, labels: np.ndarray, num_classes: int) -> Dict[str, np.ndarray]:
    """Returns the l2-independent part of the ridge solution: whitening statistics and an eigendecomposition."""
    x = np.asarray(features, np.float64)
    mean = x.mean(axis=0, keepdims=True)
    std = x.std(axis=0, keepdims=True) + 1e-5
    x = np.pad((x - mean) / std, ((0, 0), (0, 1)), constant_values=BIAS_FEATURE)
    targets = 2.0 * np.eye(num_classes)[np.asarray(labels)] - 1.0
    num_points, dim = x.shape
    # Either (x^T x + l2)^-1 x^T y or x^T (x x^T + l2)^-1 y; both are lhs diag(1 / (eig + l2)) rhs.
    if num_points >= dim:
        eigenvalues, vectors = np.linalg.eigh(x.T @ x)
        lhs, rhs = vectors, vectors.T @ (x.T @ targets)
    else:
        eigenvalues, vectors = np.linalg.eigh(x @ x.T)
        lhs, rhs = x.T @ vectors, vectors.T @ targets
    return dict(mean=mean, std=std, eigenvalues=eigenvalues, lhs=lhs, rhs=rhs)


def ridge_weights(fit: Dict[str, np.ndarray], l2: float) -> np.ndarray:
    """Returns the (D + 1, classes) ridge weights for penalty `l2` (the last row multiplies the bias feature)."""
    return (fit["lhs"] / (fit["eigenvalues"] + l2)[None, :]) @ fit["rhs"]


def ridge_scores(fit: Dict[str, np.ndarray], features: np.ndarray, l2: float) -> np.ndarray:
    """Returns (N, classes) ridge scores of `features`, whitened with the fitted statistics."""
    x = (np.asarray(features, np.float64) - fit["mean"]) / fit["std"]
    x = np.pad(x, ((0, 0), (0, 1)), constant_values=BIAS_FEATURE)
    return x @ ridge_weights(fit, l2)


def sample_shots(labels: np.ndarray, shots: int, num_classes: int, seed: int, num_val_per_class: int = 0
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """Returns (shot indices, validation indices): per class a seeded permutation, its first `shots`, then the next
    `num_val_per_class`."""
    rng = np.random.default_rng(seed)
    chosen, held_out = [], []
    for cls in range(num_classes):
        order = rng.permutation(np.flatnonzero(labels == cls))
        chosen.append(order[:shots])
        held_out.append(order[shots:shots + num_val_per_class])
    return np.concatenate(chosen), np.concatenate(held_out)


def fewshot_accuracy(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                     test_labels: np.ndarray, *, shots: Sequence[int] = (1, 5, 10, 25),
                     l2_regs: Sequence[float] = DEFAULT_L2_REGS, num_seeds: int = 3, num_val_per_class: int = 5,
                     num_classes: int = 0) -> Dict[str, float]:
    """Returns {"{K}shot", "{K}shot_std", "{K}shot_l2"}: ridge test top-1 at the l2 chosen on held-out train images."""
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    result: Dict[str, float] = {}
    for count in shots:
        accuracies, chosen_l2 = [], []
        for seed in range(num_seeds):
            index, val_index = sample_shots(train_labels, int(count), num_classes, seed, num_val_per_class)
            fit = ridge_fit(train_features[index], train_labels[index], num_classes)
            l2 = float(l2_regs[0])
            if len(val_index) and len(l2_regs) > 1:
                val_accuracy = [np.mean(ridge_scores(fit, train_features[val_index], l2).argmax(1)
                                        == train_labels[val_index]) for l2 in l2_regs]
                l2 = float(l2_regs[int(np.argmax(val_accuracy))])   # the first best: the weakest penalty among ties
            accuracies.append(np.mean(ridge_scores(fit, test_features, l2).argmax(1) == test_labels))
            chosen_l2.append(l2)
        values, counts = np.unique(chosen_l2, return_counts=True)
        result[f"{count}shot"] = float(np.mean(accuracies))
        result[f"{count}shot_std"] = float(np.std(accuracies))
        result[f"{count}shot_l2"] = float(values[np.argmax(counts)])
    return result


class FewShot(FeatureEvaluator):
    """Few-shot ridge regression on the objective's features (big_vision's few-shot evaluator)."""

    default_settings: Dict[str, Any] = dict(train_split=None, shots=(1, 5, 10, 25), l2_regs=DEFAULT_L2_REGS,
                                            num_seeds=3, num_val_per_class=5, max_train_examples=None)

    @classmethod
    def check_settings(cls, name, settings):
        shots = settings["shots"]
        if (not isinstance(shots, (tuple, list)) or not shots
                or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in shots)):
            raise ValueError(f"config.evals.{name}.shots must be a non-empty list of ints >= 1, got {shots!r}")
        l2_regs = settings["l2_regs"]
        if (not isinstance(l2_regs, (tuple, list)) or not l2_regs
                or any(not isinstance(l2, (int, float)) or l2 <= 0 for l2 in l2_regs)):
            raise ValueError(f"config.evals.{name}.l2_regs must be a non-empty list of numbers > 0, got {l2_regs!r}")
        for key, low in (("num_seeds", 1), ("num_val_per_class", 0)):
            value = settings[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"config.evals.{name}.{key} must be an int >= {low}, got {value!r}")

    def evaluate(self, state) -> Dict[str, float]:
        """Returns {K}shot top-1 (mean over seeds), its std and chosen l2, per K of `shots`."""
        train, train_labels = self.features(state, self.train_split(), self.settings.get("max_train_examples"))
        test, test_labels = self.features(state, None)
        result = fewshot_accuracy(train, train_labels, test, test_labels, shots=tuple(self.settings["shots"]),
                                  l2_regs=tuple(self.settings["l2_regs"]), num_seeds=int(self.settings["num_seeds"]),
                                  num_val_per_class=int(self.settings["num_val_per_class"]))
        result["num_examples"] = int(len(test_labels))
        return result


register_evaluator("fewshot", FewShot)

__all__ = ["DEFAULT_L2_REGS", "FewShot", "fewshot_accuracy", "ridge_fit", "ridge_scores", "ridge_weights",
           "sample_shots"]
