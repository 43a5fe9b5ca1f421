"""Linear probe on frozen features: multinomial logistic regression on cached features, with an lr sweep.

The features of the train and eval splits are computed once (`Objective.features`, no augmentation)
and cached; they are standardised with the train features' mean and standard deviation (what MAE's
probe does with a BatchNorm without affine), then one linear classifier per learning rate of the sweep
is trained at once (vmapped) with the probe's own optax optimizer: SGD with momentum 0.9 and a cosine
schedule, no weight decay (DINO's `eval_linear.py` recipe, which also sweeps the lr). A seeded
`val_fraction` of the train split is held out to choose the lr; the reported top-1 / top-5 are on the
eval split, of the classifier with the chosen lr.

    config.evals = dict(probe=dict(kind="linear_probe", every_steps=0))    # at the end of the run

Settings: `train_split`, `learning_rates` (the sweep), `epochs`, `probe_batch_size`, `momentum`,
`weight_decay`, `val_fraction`, `seed`, `max_train_examples`. Metrics: `top1`, `top5`, `lr` (the
chosen one), `val_top1` (its held-out accuracy), `num_examples`.
"""
from typing import Any, Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitjax.evaluate.evaluators import FeatureEvaluator, register_evaluator

DEFAULT_LEARNING_RATES = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def probe_optimizer(num_steps: int, momentum: float = 0.9, weight_decay: float = 0.0
                    ) -> optax.GradientTransformation:
    """Returns the probe's optimizer at unit learning rate (the caller scales its updates by the lr)."""
    return optax.chain(optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
                       optax.trace(decay=momentum),
                       optax.scale_by_schedule(optax.cosine_decay_schedule(1.0, num_steps)),
                       optax.scale(-1.0))


def train_linear_classifiers(features: np.ndarray, labels: np.ndarray, num_classes: int,
                             learning_rates: Sequence[float], *, epochs: int = 100, batch_size: int = 256,
                             momentum: float = 0.9, weight_decay: float = 0.0, seed: int = 0) -> Dict[str, jax.Array]:
    """Returns {"kernel" (L, D, C), "bias" (L, C)}: one softmax classifier per learning rate, trained on `features`."""
    features = jnp.asarray(features, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    num_examples, dim = features.shape
    batch_size = min(int(batch_size), num_examples)
    steps_per_epoch = num_examples // batch_size
    rng = np.random.default_rng(seed)
    # The batches of every epoch, drawn on the host: a permutation per epoch, the remainder dropped.
    order = np.stack([rng.permutation(num_examples)[:steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)
                      for _ in range(epochs)]).reshape(epochs * steps_per_epoch, batch_size)
    tx = probe_optimizer(len(order), momentum, weight_decay)

    def loss_fn(params, index):
        logits = features[index] @ params["kernel"] + params["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels[index]).mean()

    def train_one(learning_rate):
        params = {"kernel": jnp.zeros((dim, num_classes), jnp.float32), "bias": jnp.zeros((num_classes,), jnp.float32)}

        def step(carry, index):
            params, opt_state = carry
            grads = jax.grad(loss_fn)(params, index)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, jax.tree.map(lambda u: learning_rate * u, updates))
            return (params, opt_state), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jnp.asarray(order))
        return params

    return jax.jit(jax.vmap(train_one))(jnp.asarray(learning_rates, jnp.float32))


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Returns the fraction of rows whose label is among the k largest logits."""
    ranked = np.argsort(-np.asarray(logits), axis=-1)[..., :k]
    return float(np.mean(np.any(ranked == np.asarray(labels)[..., None], axis=-1)))


def linear_probe_accuracy(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                          test_labels: np.ndarray, *, learning_rates: Sequence[float] = DEFAULT_LEARNING_RATES,
                          epochs: int = 100, batch_size: int = 256, momentum: float = 0.9, weight_decay: float = 0.0,
                          val_fraction: float = 0.1, seed: int = 0, num_classes: int = 0) -> Dict[str, float]:
    """Returns {"top1", "top5", "lr", "val_top1"}: test accuracy of the probe whose lr is best on held-out data."""
    train_features = np.asarray(train_features, np.float32)
    test_features = np.asarray(test_features, np.float32)
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    mean = train_features.mean(axis=0, keepdims=True)
    std = train_features.std(axis=0, keepdims=True) + 1e-6
    train_features, test_features = (train_features - mean) / std, (test_features - mean) / std
    order = np.random.default_rng(seed).permutation(len(train_labels))
    num_val = int(round(val_fraction * len(order))) if len(learning_rates) > 1 else 0
    val_index, fit_index = order[:num_val], order[num_val:]
    params = train_linear_classifiers(train_features[fit_index], train_labels[fit_index], num_classes, learning_rates,
                                      epochs=epochs, batch_size=batch_size, momentum=momentum,
                                      weight_decay=weight_decay, seed=seed)
    kernel, bias = np.asarray(params["kernel"]), np.asarray(params["bias"])
    best, val_top1 = 0, float("nan")
    if num_val:
        val_logits = np.einsum("nd,ldc->lnc", train_features[val_index], kernel) + bias[:, None]
        val_accuracy = [topk_accuracy(logits, train_labels[val_index], 1) for logits in val_logits]
        best = int(np.argmax(val_accuracy))
        val_top1 = val_accuracy[best]
    logits = test_features @ kernel[best] + bias[best]
    return {"top1": topk_accuracy(logits, test_labels, 1),
            "top5": topk_accuracy(logits, test_labels, min(5, num_classes)),
            "lr": float(learning_rates[best]), "val_top1": val_top1}


class LinearProbe(FeatureEvaluator):
    """Logistic regression on the objective's frozen, cached features, lr chosen on held-out train examples."""

    default_settings: Dict[str, Any] = dict(train_split=None, learning_rates=DEFAULT_LEARNING_RATES, epochs=100,
                                            probe_batch_size=256, momentum=0.9, weight_decay=0.0, val_fraction=0.1,
                                            seed=0, max_train_examples=None)

    @classmethod
    def check_settings(cls, name, settings):
        rates = settings["learning_rates"]
        if (not isinstance(rates, (tuple, list)) or not rates
                or any(not isinstance(lr, (int, float)) or lr <= 0 for lr in rates)):
            raise ValueError(f"config.evals.{name}.learning_rates must be a non-empty list of numbers > 0, "
                             f"got {rates!r}")
        for key in ("epochs", "probe_batch_size"):
            value = settings[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"config.evals.{name}.{key} must be an int >= 1, got {value!r}")
        if not 0 <= settings["val_fraction"] < 1:
            raise ValueError(f"config.evals.{name}.val_fraction must be in [0, 1), got {settings['val_fraction']!r}")
        if not 0 <= settings["momentum"] < 1 or settings["weight_decay"] < 0:
            raise ValueError(f"config.evals.{name}: momentum must be in [0, 1) and weight_decay >= 0, got "
                             f"{settings['momentum']!r}, {settings['weight_decay']!r}")

    def evaluate(self, state) -> Dict[str, float]:
        """Returns the probe's top1 / top5 on the eval split, the chosen lr and its held-out top-1."""
        train, train_labels = self.features(state, self.train_split(), self.settings.get("max_train_examples"))
        test, test_labels = self.features(state, None)
        settings = self.settings
        result = linear_probe_accuracy(
            train, train_labels, test, test_labels, learning_rates=tuple(settings["learning_rates"]),
            epochs=int(settings["epochs"]), batch_size=int(settings["probe_batch_size"]),
            momentum=float(settings["momentum"]), weight_decay=float(settings["weight_decay"]),
            val_fraction=float(settings["val_fraction"]), seed=int(settings["seed"]))
        result["num_examples"] = int(len(test_labels))
        return result


register_evaluator("linear_probe", LinearProbe)

__all__ = ["DEFAULT_LEARNING_RATES", "LinearProbe", "linear_probe_accuracy", "probe_optimizer", "topk_accuracy",
           "train_linear_classifiers"]
