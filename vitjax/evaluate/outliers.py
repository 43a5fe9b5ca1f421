"""The outlier metrics of Bondarenko et al. (2023), "Quantizable Transformers": infinity norm and kurtosis.

    config.evals = dict(outliers=dict(kind="outliers", max_batches=4))
    metrics = outlier_metrics(module, variables, image_batches)      # standalone

Per layer, over the real examples of the eval split, as the official code measures them: the
infinity norm of one example's activation (all tokens and channels) averaged over examples, and its
kurtosis E[(x - mean)^4] / (std^4 + 1e-6) (std with Bessel's correction, as torch's) averaged over examples.
Two places per block: `ffn<i>` the output of the block's MLP (the FFN output, before the residual add)
and `block<i>` the block's output, the residual stream (in the official post-LN BERT, LN(FFN + input)).
Summaries: `max_inf_norm` over the block outputs (the paper's "max inf. norm"), `max_ffn_inf_norm`,
`avg_kurtosis` over all the per-layer kurtoses of both places (the paper's "avg. kurtosis") and `max_kurtosis`.
The FFN outputs are every `layers.Mlp` of the model, so any family built on it is measured; the block
outputs are the model's `blocks` intermediates where it returns them (ViT).
"""
from typing import Any, Dict, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vitjax.evaluate import classification
from vitjax.evaluate.evaluators import Evaluator, register_evaluator

KURTOSIS_EPS = 1e-6


def inf_norm(x: jax.Array) -> jax.Array:
    """Returns (B,) the infinity norm of each example's activation, all other axes flattened."""
    return jnp.max(jnp.abs(x.reshape(x.shape[0], -1).astype(jnp.float32)), axis=1)


def kurtosis(x: jax.Array) -> jax.Array:
    """Returns (B,) each example's kurtosis over its flattened activation: mu4 / (std^4 + 1e-6), std unbiased."""
    x = x.reshape(x.shape[0], -1).astype(jnp.float32)
    centred = x - x.mean(axis=1, keepdims=True)
    std = jnp.sqrt(jnp.sum(centred ** 2, axis=1) / (x.shape[1] - 1))
    return jnp.mean(centred ** 4, axis=1) / (std ** 4 + KURTOSIS_EPS)


def _is_mlp(module, method_name: str) -> bool:
    from vitjax.models import layers
    return isinstance(module, layers.Mlp) and method_name == "__call__"


def _per_layer(captured: Mapping[str, Any], intermediates: Any, scanned: bool) -> Dict[str, jax.Array]:
    """Returns {"ffn<i>" | "block<i>": (B, ...) activation} from captured Mlp outputs and the model's blocks."""
    ffn = [value for _, value in sorted(_flatten_calls(captured), key=lambda item: item[0])]
    result = {}
    # Under nn.scan the captured outputs are stacked over the layers: (depth, B, N, C).
    for index, value in enumerate(_unstack(ffn) if scanned else ffn):
        result[f"ffn{index}"] = value
    blocks = intermediates.get("blocks") if isinstance(intermediates, Mapping) else None
    if blocks is not None:
        for index, value in enumerate(_unstack([blocks] if not isinstance(blocks, (list, tuple)) else list(blocks))):
            result[f"block{index}"] = value
    return result


def _flatten_calls(tree, path=()):
    """Yields (path with numeric block indices as ints, output) for each captured `__call__` output."""
    for key, value in tree.items():
        if key == "__call__":
            yield tuple(int(p) if p.isdigit() else p for part in path for p in _split_index(part)), value[0]
        elif isinstance(value, Mapping):
            yield from _flatten_calls(value, path + (key,))


def _split_index(name: str):
    """Returns "blocks_12" as ("blocks", "12") so that layers sort by number, not text."""
    head, _, tail = name.rpartition("_")
    return (head, tail) if head and tail.isdigit() else (name, "")


def _unstack(values):
    """Returns a list of (B, ...) arrays; a scanned (depth, B, N, C) array becomes depth entries."""
    result = []
    for value in values:
        result.extend(list(value) if value.ndim == 4 else [value])
    return result


def make_outlier_step(module):
    """Returns (variables, batch) -> masked sums of per-layer inf norms and kurtoses (and "count")."""

    def step(variables, batch):
        (_, intermediates), state = module.apply(variables, batch["image"], train=False,
                                                 capture_intermediates=_is_mlp, mutable=["intermediates"])
        per_example = {}
        scanned = bool(getattr(module, "scan", False))
        for name, value in _per_layer(state.get("intermediates", {}), intermediates, scanned).items():
            per_example[f"{name}/inf_norm"] = inf_norm(value)
            per_example[f"{name}/kurtosis"] = kurtosis(value)
        if not per_example:
            raise ValueError(f"{type(module).__name__} has no layers.Mlp and returns no `blocks`: nothing to measure")
        return classification.masked_sums(per_example, batch["mask"])

    return step


def summarise(per_layer: Mapping[str, float]) -> Dict[str, float]:
    """Returns `per_layer` plus max_inf_norm, mean_inf_norm (block outputs), max_ffn_inf_norm, avg/max_kurtosis."""
    result = dict(per_layer)
    block_norms = [v for k, v in per_layer.items() if k.startswith("block") and k.endswith("/inf_norm")]
    ffn_norms = [v for k, v in per_layer.items() if k.startswith("ffn") and k.endswith("/inf_norm")]
    kurtoses = [v for k, v in per_layer.items() if k.endswith("/kurtosis")]
    norms = block_norms or ffn_norms
    result.update(max_inf_norm=max(norms), mean_inf_norm=float(np.mean(norms)),
                  avg_kurtosis=float(np.mean(kurtoses)), max_kurtosis=max(kurtoses))
    if ffn_norms:
        result["max_ffn_inf_norm"] = max(ffn_norms)
    return result


def outlier_metrics(module, variables: Mapping[str, Any], batches: Iterable[Any],
                    max_batches: Optional[int] = None) -> Dict[str, float]:
    """Returns the per-layer and summary outlier metrics of `module` on image batches (arrays or dicts with "image")."""
    step = jax.jit(make_outlier_step(module))

    def as_batches():
        for batch in batches:
            if not isinstance(batch, Mapping):
                batch = {"image": batch}
            image = jnp.asarray(batch["image"])
            yield {"image": image, "mask": jnp.asarray(batch.get("mask", np.ones(image.shape[0], bool)))}

    metrics = classification.evaluate(lambda variables, batch: step(variables, batch), dict(variables), as_batches(),
                                      prefix="", max_batches=max_batches)
    count = metrics.pop("num_examples")
    return dict(summarise(metrics), num_examples=count)


class OutlierEvaluator(Evaluator):
    """config.evals kind "outliers": the paper's max infinity norm and average kurtosis, per layer and summarised."""

    default_settings: Dict[str, Any] = dict(max_batches=None)

    @classmethod
    def check_settings(cls, name, settings):
        limit = settings["max_batches"]
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"config.evals.{name}.max_batches must be None or an int >= 1, got {limit!r}")

    def __init__(self, name, settings, context):
        super().__init__(name, settings, context)
        from vitjax import parallel
        module = context.objective.module
        outlier_step = make_outlier_step(module)

        def step(state, batch):
            return outlier_step({"params": state.params, **state.model_state}, batch)

        self.step = jax.jit(step, in_shardings=(context.state_shardings, context.batch_sharding),
                            out_shardings=parallel.replicated(context.mesh))

    def evaluate(self, state) -> Dict[str, float]:
        """Returns the per-layer inf norms and kurtoses of the eval split, their max / mean, and num_examples."""
        metrics = classification.evaluate(self.step, state, self.batches(("image",)), prefix="",
                                          max_batches=self.settings.get("max_batches"))
        count = metrics.pop("num_examples")
        return dict(summarise(metrics), num_examples=count)


register_evaluator("outliers", OutlierEvaluator)

__all__ = ["OutlierEvaluator", "inf_norm", "kurtosis", "make_outlier_step", "outlier_metrics", "summarise"]
