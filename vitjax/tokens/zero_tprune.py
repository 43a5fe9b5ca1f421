"""Zero-TPrune, zero-shot token pruning from the attention graph (Wang, Dedhia, Jha, "Zero-TPrune: Zero-Shot
Token Pruning through Leveraging of the Attention Graph in Pre-Trained Transformers", arXiv 2305.17328,
CVPR 2024), on the token-reduction interface. No code was published, and the paper's text was not at hand
when this was written (offline, only its abstract): this follows the method's published outline, and the
choices below are unchecked against the paper.

    model = vitjax.models.create("deit_small_patch16_224",
                                 token_reduction=dict(method="zero_tprune", keep_rate=0.7, prune_loc=(3, 6, 9)))

At each location in `prune_loc`, after attention, the block's attention matrix (B, H, N, N) is read as a
directed graph whose edge j -> i carries the attention query j pays to key i. The Weighted Page Rank (WPR)
scores start uniform (1/N) and are propagated `wpr_iterations` times, s <- A^T s, per head: a token is
important when important tokens attend to it. Rows of A sum to one, so the scores stay a distribution.
The heads' scores are averaged. Of the patch tokens to remove at that location (N - prefix - keep):
- I-stage (importance): the (1 - similarity_fraction) share with the lowest WPR score is pruned.
- S-stage (similarity): the survivors are sorted by WPR score and dealt alternately into two groups (the
  more important of each pair into B, the other into A); each A token's highest cosine similarity to a B
  token (on the keys' head mean, as ToMe) is its redundancy, and the most redundant A tokens are pruned.
  Pruned tokens are dropped (not merged), as in the paper.
Prefix tokens (cls, dist) always stay first; the kept patch tokens keep their original order. Every count
is fixed by the plan, so shapes are static under jit.

Choices the paper leaves open (or that we could not pin down without its code), and ours:
- Setting names and defaults: none published; `keep_rate` 0.7 at `prune_loc` (3, 6, 9) mirrors EViT's
  budget so the methods compare at equal counts; `wpr_iterations` 30, a fixed count (a static loop under
  jit) where the paper iterates until the scores settle; `similarity_fraction` 0.5 splits the budget
  evenly between the I- and S-stage.
- The initial WPR distribution is uniform at every location (the paper may reuse earlier scores).
- The paper's refinements Emphasizing Informative Region and the Variance-based Head Filter are not
  implemented: heads are averaged with equal weight.
- Similarity metric: cosine similarity of the keys averaged over heads.
- Kept tokens keep their spatial order (not re-sorted by score).
The WPR needs the whole attention matrix; it is recomputed from the view's queries and keys in plain jnp
(O(N^2) per location), so any attention kernel (`attention_impl="pallas"` too) works.
"""
import dataclasses
import math
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp

from vitjax.tokens import base


def weighted_page_rank(attention: jax.Array, iterations: int = 30) -> jax.Array:
    """Returns the WPR scores (B, H, N) of attention graphs (B, H, N, N): uniform start, `iterations` of s <- A^T s."""
    scores = jnp.full(attention.shape[:-1], 1.0 / attention.shape[-1], attention.dtype)

    def step(scores, _):
        return jnp.einsum("bhqk,bhq->bhk", attention, scores), None

    scores, _ = jax.lax.scan(step, scores, None, length=iterations)
    return scores


def _check_count(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


@base.register
@dataclasses.dataclass(frozen=True)
class ZeroTPruneConfig(base.Method):
    """Zero-TPrune settings (see the module docstring)."""
    name = "zero_tprune"
    keep_rate: float = 0.7
    prune_loc: Any = (3, 6, 9)
    wpr_iterations: int = 30
    similarity_fraction: float = 0.5

    def __post_init__(self):
        base.check_keep_rate(self.keep_rate, "zero_tprune keep_rate")
        _check_count(self.wpr_iterations, "zero_tprune wpr_iterations", 1)
        fraction = self.similarity_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"zero_tprune similarity_fraction must be a number in [0, 1], got {fraction!r}")
        # Lists become tuples so the settings stay hashable (a static argument under jit).
        if isinstance(self.prune_loc, list):
            object.__setattr__(self, "prune_loc", tuple(self.prune_loc))

    def plan(self, num_tokens: int, depth: int, num_prefix_tokens: int) -> base.Plan:
        """Returns a BlockPrune at each pruning location and the token count after each block."""
        locations = base.check_locations(self.prune_loc, depth, "zero_tprune prune_loc")
        blocks, counts = [], []
        for index in range(depth):
            candidates = num_tokens - num_prefix_tokens
            keep = math.ceil(self.keep_rate * candidates)
            if index in locations and keep < candidates:
                removed = candidates - keep
                # The S-stage pairs survivors, so it can prune at most half of them.
                by_similarity = round(self.similarity_fraction * removed)
                while by_similarity > (candidates - removed + by_similarity) // 2:
                    by_similarity -= 1
                blocks.append(BlockPrune(removed - by_similarity, by_similarity, num_prefix_tokens,
                                         self.wpr_iterations))
                num_tokens = num_prefix_tokens + keep
            else:
                blocks.append(None)
            counts.append(num_tokens)
        return base.Plan(tuple(blocks), tuple(counts))

    def summarize(self, plan: base.Plan, states, tokens) -> Dict[str, Any]:
        """Returns token_counts and, per pruning block, `kept_index` (B, keep) into its patch tokens and `wpr`."""
        reducing = [index for index, block in enumerate(plan.blocks) if block is not None]
        return dict(token_counts=plan.token_counts,
                    kept_index={index: states[index]["kept_index"] for index in reducing},
                    wpr={index: states[index]["wpr"] for index in reducing})


@dataclasses.dataclass(frozen=True)
class BlockPrune(base.BlockReducer):
    """One Zero-TPrune location: prune `by_importance` tokens by WPR, then `by_similarity` redundant ones."""
    by_importance: int
    by_similarity: int
    num_prefix_tokens: int = 1
    wpr_iterations: int = 30

    def __call__(self, tokens: jax.Array, view: base.AttentionView, state: base.State):
        """Returns ([prefix, kept patches in order], state with `kept_index` into the patch tokens and `wpr`)."""
        prefix = self.num_prefix_tokens
        attention = base.query_attention(view.query, view.key, view.key_bias, heads_mean=False)
        # Pruning is a discrete choice: no gradient flows through the scores.
        wpr = jax.lax.stop_gradient(weighted_page_rank(attention, self.wpr_iterations).mean(axis=1))
        scores = wpr[:, prefix:]
        candidates = scores.shape[1]
        # I-stage: the most important survive, sorted by descending score.
        _, order = jax.lax.top_k(scores, candidates - self.by_importance)
        if self.by_similarity:
            order = self._similarity_stage(view.key_mean()[:, prefix:], order)
        kept_index = jnp.sort(order, axis=1)
        kept = jnp.take_along_axis(tokens[:, prefix:], kept_index[:, :, None], axis=1)
        return jnp.concatenate([tokens[:, :prefix], kept], axis=1), {"kept_index": kept_index, "wpr": wpr}

    def _similarity_stage(self, metric: jax.Array, order: jax.Array) -> jax.Array:
        """Returns the survivors `order` (B, M, by score) less the `by_similarity` most redundant of group A."""
        metric = jax.lax.stop_gradient(metric.astype(jnp.float32))
        metric = metric / jnp.linalg.norm(metric, axis=-1, keepdims=True)
        group_b, group_a = order[:, 0::2], order[:, 1::2]
        features_a = jnp.take_along_axis(metric, group_a[:, :, None], axis=1)
        features_b = jnp.take_along_axis(metric, group_b[:, :, None], axis=1)
        redundancy = jnp.einsum("bac,bkc->bak", features_a, features_b).max(axis=-1)
        _, keep_a = jax.lax.top_k(-redundancy, group_a.shape[1] - self.by_similarity)
        return jnp.concatenate([group_b, jnp.take_along_axis(group_a, keep_a, axis=1)], axis=1)


__all__ = ["BlockPrune", "ZeroTPruneConfig", "weighted_page_rank"]
