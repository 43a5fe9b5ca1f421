"""Classification evaluation: per-example metrics averaged over an eval split, padding excluded.

The eval iterator pads its last batch to the fixed batch size and marks padding with
`mask=False`; sums are taken over real examples only, so every example counts exactly once.
"""
from typing import Any, Callable, Dict, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np


def masked_sums(per_example: Dict[str, jax.Array], mask: jax.Array) -> Dict[str, jax.Array]:
    """Returns {name: sum over unmasked examples} plus "count", the number of real examples."""
    weights = mask.astype(jnp.float32)
    sums = {name: jnp.sum(values.astype(jnp.float32) * weights) for name, values in per_example.items()}
    sums["count"] = jnp.sum(weights)
    return sums


def make_eval_step(metrics_fn: Callable[[Any, Dict[str, Any]], Dict[str, jax.Array]]
                   ) -> Callable[[Any, Dict[str, Any]], Dict[str, jax.Array]]:
    """Returns (variables, batch) -> masked sums of `metrics_fn`'s per-example values."""

    def eval_step(variables, batch):
        return masked_sums(metrics_fn(variables, batch), batch["mask"])

    return eval_step


def evaluate(eval_step: Callable[..., Dict[str, jax.Array]], state: Any, batches: Iterable[Any],
             prefix: str = "eval/", max_batches: Optional[int] = None) -> Dict[str, float]:
    """Returns {prefix + name: mean over the real examples} plus `prefix + "num_examples"`."""
    totals = None
    for index, batch in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            break
        sums = eval_step(state, batch)
        # Accumulate on device: no host sync per batch.
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
        raise ValueError("The eval split gave no batch")
    totals = jax.device_get(totals)
    count = float(totals.pop("count"))
    if count == 0:
        raise ValueError("The eval split has no real (unpadded) example")
    result = {f"{prefix}{name}": float(np.asarray(value) / count) for name, value in totals.items()}
    result[f"{prefix}num_examples"] = int(count)
    return result
