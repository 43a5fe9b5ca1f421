"""ToMe, Token Merging (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023), as a model transform.

A ViT/DeiT takes it from its config, for inference off the shelf and for training, through the
token-reduction interface (`vitjax.tokens.base`) as method "tome"; `tome=dict(...)` is the same thing:

    model = vitjax.models.create("deit_small_patch16_224", token_reduction=dict(method="tome", r=16))
    model = vitjax.models.create("deit_small_patch16_224", tome=dict(r=16))
    model = vitjax.models.create("vit_base_patch16_224", tome=dict(r=(16, -0.5), merge_impl="pallas"))

In every block, between attention and MLP, the r most similar tokens are merged by bipartite soft
matching on the head-averaged keys (`vitjax.kernels.tome_merge` defines the merge exactly). Token sizes
(how many patches a token holds) are tracked; attention adds log(size) to every key's logit
(proportional attention) and an average pool weights tokens by size. The cls and dist tokens never merge.

Options (`tome=dict(...)`):
- r: an int (the same every layer), a list (one value per layer; missing trailing layers merge 0), or
  a tuple (r, inflection) with inflection in [-1, 1]: the paper's linear schedule, from r (1 - inflection)
  in the first layer to r (1 + inflection) in the last (-1: decreasing, 0: constant, 1: increasing).
  Each layer merges at most floor((N - protected) / 2) tokens.
- merge_impl: "jnp" (reference) or "pallas" (the fused kernel).
- trace_source: also track which input tokens each output token holds (for `visualize`).
- prop_attn: proportional attention (the paper's default, True).

Clean-room: written from the paper, not from the official (CC-BY-NC) code.
"""
import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from vitjax.kernels import tome_merge
from vitjax.tokens import base

MERGE_IMPLS = tome_merge.MERGE_IMPLS
CONFIG_KEYS = ("r", "merge_impl", "trace_source", "prop_attn")

RSpec = Union[int, Sequence[int], Tuple[int, float]]


class PerLayer(tuple):
    """Per-layer merge counts (what a list `r` becomes), told apart from an (r, inflection) pair."""

    def __repr__(self) -> str:
        return f"PerLayer({list(self)!r})"


@base.register
@dataclasses.dataclass(frozen=True)
class ToMeConfig(base.TracksSizes, base.Method):
    """ToMe settings of a model (see the module docstring)."""
    name = "tome"
    r: Any = 0
    merge_impl: str = "jnp"
    trace_source: bool = False
    prop_attn: bool = True

    def __post_init__(self):
        if self.merge_impl not in MERGE_IMPLS:
            raise ValueError(f"Unknown tome merge_impl {self.merge_impl!r}; valid choices: {MERGE_IMPLS}")
        for name in ("trace_source", "prop_attn"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"tome {name} must be True or False, got {getattr(self, name)!r}")
        # Lists become a (hashable) PerLayer tuple, so the config can be a static argument.
        object.__setattr__(self, "r", normalize_r(self.r))

    def schedule(self, depth: int) -> Tuple[int, ...]:
        """Returns the requested number of merges of each of `depth` layers (before capping)."""
        return merge_schedule(self.r, depth)

    def plan(self, num_tokens: int, depth: int, num_prefix_tokens: int) -> base.Plan:
        """Returns one BlockMerge per block (r capped at what the block can merge) and the token counts."""
        merges, counts = token_counts(num_tokens, self.schedule(depth), num_prefix_tokens)
        return base.Plan(tuple(BlockMerge(r, num_prefix_tokens, self.merge_impl, self.prop_attn) for r in merges),
                         counts)

    def initial_state(self, tokens: jax.Array, num_prefix_tokens: int) -> base.State:
        """Returns sizes unknown (all 1) and, with trace_source, the identity source map."""
        return initial_state(tokens, self.trace_source)

    def summarize(self, plan: base.Plan, states, tokens) -> Dict[str, Any]:
        """Returns token_counts, merges, sizes per block, the final size and (traced) sources per block."""
        summary = dict(token_counts=plan.token_counts, merges=tuple(block.r for block in plan.blocks),
                       sizes=self.sizes_per_block(states, tokens), size=states[-1]["size"])
        if self.trace_source:
            summary["sources"] = [state["source"] for state in states]
        return summary


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def normalize_r(r: RSpec) -> Union[int, PerLayer, Tuple[int, float]]:
    """Returns r as an int, a PerLayer tuple (from a list), or an (r, inflection) pair; raises if malformed.

    A tuple of two is read as (r, inflection); any other tuple or a list as per-layer values.
    """
    form = "r must be an int >= 0, a list of ints >= 0 (per layer), or a tuple (r, inflection in [-1, 1])"
    if _is_int(r):
        if r < 0:
            raise ValueError(f"tome {form}; got {r!r}")
        return int(r)
    if isinstance(r, (list, PerLayer)) or (isinstance(r, tuple) and len(r) != 2):
        if not all(_is_int(value) and value >= 0 for value in r):
            raise ValueError(f"tome {form}; got the per-layer values {list(r)!r}")
        return PerLayer(int(value) for value in r)
    if isinstance(r, tuple):
        base, inflection = r
        if not _is_int(base) or base < 0 or isinstance(inflection, bool) \
                or not isinstance(inflection, (int, float, np.integer, np.floating)) \
                or not -1.0 <= float(inflection) <= 1.0:
            raise ValueError(f"tome {form}; got {r!r}")
        return int(base), float(inflection)
    raise ValueError(f"tome {form}; got {r!r}")


def parse_config(tome: Any) -> Optional[ToMeConfig]:
    """Returns `tome` (None, a ToMeConfig or a mapping of its fields) as a ToMeConfig, or None."""
    if tome is None or isinstance(tome, ToMeConfig):
        return tome
    if isinstance(tome, Mapping) or hasattr(tome, "to_dict"):
        settings = dict(tome.to_dict() if hasattr(tome, "to_dict") else tome)
        unknown = sorted(set(settings) - set(CONFIG_KEYS))
        if unknown:
            raise ValueError(f"Unknown tome option(s) {unknown}; valid choices: {list(CONFIG_KEYS)}")
        return ToMeConfig(**settings)
    raise ValueError(f"tome must be None, a dict with keys {list(CONFIG_KEYS)}, or a ToMeConfig; got {tome!r}")


def merge_schedule(r: RSpec, depth: int) -> Tuple[int, ...]:
    """Returns the requested merges per layer for an int, a per-layer list, or (r, inflection)."""
    r = normalize_r(r)
    if isinstance(r, int):
        return (r,) * depth
    if isinstance(r, PerLayer):
        if len(r) > depth:
            raise ValueError(f"tome r lists {len(r)} layers but the model has depth {depth}")
        return tuple(r) + (0,) * (depth - len(r))
    base, inflection = r
    if depth == 1:
        return (base,)
    # The paper's schedule: linear from r (1 - inflection) to r (1 + inflection), rounded down.
    first, last = base * (1.0 - inflection), base * (1.0 + inflection)
    step = (last - first) / (depth - 1)
    return tuple(int(first + step * layer) for layer in range(depth))


def token_counts(num_tokens: int, schedule: Sequence[int], num_protected: int) -> Tuple[Tuple[int, ...],
                                                                                            Tuple[int, ...]]:
    """Returns (merges each layer really makes, tokens after each layer): r capped at (N - protected) // 2."""
    merges, counts = [], []
    for requested in schedule:
        merged = min(int(requested), tome_merge.max_merge(num_tokens, num_protected))
        num_tokens -= merged
        merges.append(merged)
        counts.append(num_tokens)
    return tuple(merges), tuple(counts)


@dataclasses.dataclass(frozen=True)
class BlockMerge(base.BlockReducer):
    """What one transformer block does for ToMe: merge `r` tokens (capped), `num_protected` kept first."""
    r: int
    num_protected: int = 1
    merge_impl: str = "jnp"
    prop_attn: bool = True

    def key_bias(self, state: base.State) -> Optional[jax.Array]:
        """Returns log(size) for proportional attention, or None while no token has merged yet."""
        return key_bias(state, self)

    def __call__(self, tokens: jax.Array, view: base.AttentionView, state: base.State):
        """Returns (tokens with r pairs merged by the head-mean keys, the new sizes/source state)."""
        if self.r == 0:
            return tokens, state
        return merge_step(tokens, view.key_mean(), state, self)


def initial_state(tokens: jax.Array, trace_source: bool) -> Dict[str, Optional[jax.Array]]:
    """Returns the ToMe state of an unmerged sequence: sizes unknown (all 1) and, if traced, source = I."""
    batch, num_tokens = tokens.shape[:2]
    source = None
    if trace_source:
        source = jnp.broadcast_to(jnp.eye(num_tokens, dtype=jnp.float32), (batch, num_tokens, num_tokens))
    return {"size": None, "source": source}


def key_bias(state: Optional[Dict[str, Any]], settings: Optional[BlockMerge]) -> Optional[jax.Array]:
    """Returns log(size) (B, N) for proportional attention, or None while no token has merged yet."""
    if settings is None or not settings.prop_attn or state is None or state.get("size") is None:
        return None
    return jnp.log(state["size"])


def merge_step(tokens: jax.Array, metric: jax.Array, state: Optional[Dict[str, Any]],
               settings: BlockMerge) -> Tuple[jax.Array, Dict[str, Any]]:
    """Returns (merged tokens, new state): `settings.r` tokens (capped) merged by their metric (B, N, D)."""
    state = dict(state or {"size": None, "source": None})
    num_tokens = tokens.shape[1]
    r = min(settings.r, tome_merge.max_merge(num_tokens, settings.num_protected))
    if r == 0:
        return tokens, state
    sizes = state["size"]
    if sizes is None:
        sizes = jnp.ones(tokens.shape[:2], jnp.float32)
    # The matching is discrete: the keys get no gradient through it (as argmax/argsort give none).
    result = tome_merge.merge(tokens, jax.lax.stop_gradient(metric), sizes, r, settings.num_protected,
                              settings.merge_impl)
    state["size"] = result.sizes
    if state.get("source") is not None:
        state["source"] = tome_merge.apply_merge(state["source"], result.slot, result.weight,
                                                 num_tokens - r, mode="sum")
    return result.tokens, state


weighted_average = base.weighted_average


__all__ = ["BlockMerge", "CONFIG_KEYS", "MERGE_IMPLS", "PerLayer", "ToMeConfig", "initial_state", "key_bias",
           "merge_schedule", "merge_step", "normalize_r", "parse_config", "token_counts", "weighted_average"]
