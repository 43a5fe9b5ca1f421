"""ATS, adaptive token sampling (Fayyaz et al., "Adaptive Token Sampler For Vision Transformers", ECCV 2022),
on the token-reduction interface.

    model = vitjax.models.create("deit_small_patch16_224", token_reduction=dict(method="ats"))

In each block of `ats_blocks`, after attention, every patch token gets a significance score: the class
token's attention to it (summed over heads) times the norm of its value (all heads), normalised to sum 1.
The scores are sorted, their cumulative sum normalised to [0, 1], and K = n_tokens - prefix evenly spaced
levels (from the smallest non-zero level to 1) each pick the token whose level is nearest: inverse-transform
sampling. A token picked twice counts once, so each image keeps its own number of tokens.

Under `jit` shapes are fixed: the block's output always has n_tokens tokens, [prefix, the distinct picks in
ascending significance order, zero padding], with a mask (intermediates["ats"]["masks"]) that later
attention (a key bias of -1e9 on padding), ATS scoring and average / attention pooling respect. This is the
official code's `drop_tokens=False` path, equal to it in tests/test_tokens_parity.py. The official
`drop_tokens=True` trims each batch to its largest count, so an image's result depends on the other images
in its batch (the normalised levels include the padding's zeros or not); it is rejected here.

Settings (the official ViT's argument names and defaults, at commit 9271257):
- ats_blocks: (3, 4, ..., 11), the blocks that sample.
- num_tokens: None (every token: the official [197] * 12 at 224 px), an int or a ratio in (0, 1] for every
  ATS block, or one value per block of the model. As the official block: a ratio r means round(r * N),
  at least 8 and at most the N tokens the block receives. With the official setting (N) nothing shrinks
  but the padding; a smaller n_tokens is the paper's budget K and shrinks the shapes.
- drop_tokens: False (only False: see above).

The sampling levels are a fixed grid (no random draws), as in the official code. Written from the paper
and from reading the official (Apache-2.0) code.
"""
import dataclasses
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from vitjax.tokens import base

MIN_TOKENS = 8  # the official block never samples fewer


@base.register
@dataclasses.dataclass(frozen=True)
class ATSConfig(base.Method):
    """ATS settings (see the module docstring)."""
    name = "ats"
    needs_class_token = True
    ats_blocks: Any = (3, 4, 5, 6, 7, 8, 9, 10, 11)
    num_tokens: Any = None
    drop_tokens: bool = False

    def __post_init__(self):
        if self.drop_tokens is not False:
            raise ValueError("ats drop_tokens must be False: under jit ATS keeps fixed shapes with padding masks "
                             "(the official drop_tokens=False); drop_tokens=True makes an image's output depend on "
                             "the other images of its batch")
        for name in ("ats_blocks", "num_tokens"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        values = self.num_tokens if isinstance(self.num_tokens, tuple) else (self.num_tokens,)
        for value in values:
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"ats num_tokens must be None, a token count >= 1 or a ratio in (0, 1] (one, or "
                                 f"one per block); got {self.num_tokens!r}")

    def _requested(self, depth: int) -> Tuple[Any, ...]:
        if isinstance(self.num_tokens, tuple):
            if len(self.num_tokens) != depth:
                raise ValueError(f"ats num_tokens lists {len(self.num_tokens)} blocks; give one value or one per "
                                 f"block (the model has depth {depth})")
            return self.num_tokens
        return (self.num_tokens,) * depth

    def plan(self, num_tokens: int, depth: int, num_prefix_tokens: int) -> base.Plan:
        """Returns a BlockSample at each ATS block, KeepAll after the first (padding masks) and token counts."""
        locations = base.check_locations(self.ats_blocks, depth, "ats ats_blocks")
        requested = self._requested(depth)
        blocks, counts = [], []
        for index in range(depth):
            if index in locations:
                count = sampled_count(requested[index], num_tokens)
                if count <= num_prefix_tokens:
                    raise ValueError(f"ats samples {count} tokens at block {index}, not more than the "
                                     f"{num_prefix_tokens} prefix tokens; raise num_tokens")
                blocks.append(BlockSample(count, num_prefix_tokens))
                num_tokens = count
            else:
                sampled_before = any(block is not None for block in blocks)
                blocks.append(base.KeepAll() if sampled_before else None)
            counts.append(num_tokens)
        return base.Plan(tuple(blocks), tuple(counts))

    def initial_state(self, tokens: jax.Array, num_prefix_tokens: int) -> base.State:
        """Returns every token valid (mask of ones) and no key bias yet."""
        return {"mask": jnp.ones(tokens.shape[:2], jnp.float32), "key_bias": None}

    def summarize(self, plan: base.Plan, states, tokens) -> Dict[str, Any]:
        """Returns token_counts (padded shapes), `masks` per block (B, N_l), `kept` per block (B,): valid tokens,
        and per sampling block `sampled_index` (B, N_l - prefix): the incoming patch token each token is
        (-1: padding)."""
        masks = [state["mask"] for state in states]
        sampled = {index: state["sampled_index"] for index, (block, state) in enumerate(zip(plan.blocks, states))
                   if isinstance(block, BlockSample)}
        return dict(token_counts=plan.token_counts, masks=masks, kept=[mask.sum(axis=1) for mask in masks],
                    sampled_index=sampled)

    def pool_weights(self, state: base.State) -> Optional[jax.Array]:
        """Returns the padding mask: an average pool counts only the sampled tokens."""
        return state["mask"]

    def pool_key_bias(self, state: base.State) -> Optional[jax.Array]:
        """Returns the padding mask's key bias, so attention pooling ignores padding."""
        return base.mask_key_bias(state["mask"])


def sampled_count(requested: Any, num_tokens: int) -> int:
    """Returns the tokens an ATS block outputs (prefix included) for a request, by the official block's rules."""
    count = num_tokens if requested is None else requested
    count = min(count, num_tokens)
    if count <= 1.0:
        count = count * num_tokens
    count = max(count, MIN_TOKENS)
    return min(int(round(count)), num_tokens)


def significance(view: base.AttentionView, mask: jax.Array, num_prefix_tokens: int) -> jax.Array:
    """Returns each patch token's significance (B, N - prefix): class attention (summed over heads) times
    the value norm, zero on padding, normalised to sum 1."""
    attention = view.class_attention(heads_mean=False).sum(axis=1)
    batch, length = view.value.shape[:2]
    value_norm = jnp.linalg.norm(view.value.astype(jnp.float32).reshape(batch, length, -1), axis=-1)
    score = (attention * value_norm * mask)[:, num_prefix_tokens:]
    return score / score.sum(axis=1, keepdims=True)


def sampling_levels(normalized_cdf: jax.Array, num_samples: int) -> jax.Array:
    """Returns (B, num_samples) levels evenly spaced from the smallest non-zero normalised cdf value to 1."""
    grid = jnp.linspace(0.0, 1.0, num_samples, dtype=normalized_cdf.dtype)[None]
    start = jnp.min(normalized_cdf + (normalized_cdf == 0).astype(normalized_cdf.dtype) * 1e8, axis=1,
                    keepdims=True)
    steps = jnp.arange(num_samples, dtype=normalized_cdf.dtype)[None]
    intervals = max(num_samples - 1, 1)
    return start + (grid * intervals - start * steps) / intervals


@dataclasses.dataclass(frozen=True)
class BlockSample(base.BlockReducer):
    """One ATS block: output `num_tokens` tokens (prefix, distinct samples, padding) and the new mask."""
    num_tokens: int
    num_prefix_tokens: int = 1

    def __call__(self, tokens: jax.Array, view: base.AttentionView, state: base.State):
        """Returns (sampled tokens with zero padding, state with the new mask and its key bias)."""
        prefix, num_samples = self.num_prefix_tokens, self.num_tokens - self.num_prefix_tokens
        # The sampling is discrete: no gradient flows through the choice (the kept tokens carry theirs).
        score = jax.lax.stop_gradient(significance(view, state["mask"], prefix))
        candidates = score.shape[1]
        order = jnp.argsort(score, axis=1, stable=True)
        cdf = jnp.cumsum(jnp.take_along_axis(score, order, axis=1), axis=1)
        low, high = cdf.min(axis=1, keepdims=True), cdf.max(axis=1, keepdims=True)
        normalized = (cdf - low) / (high - low)
        levels = sampling_levels(normalized, num_samples)
        picks = jnp.argmin(jnp.abs(levels[:, :, None] - normalized[:, None, :]), axis=2)
        # A token picked twice is kept once: repeats point at the padding slot (index `candidates`).
        picks = jnp.sort(picks, axis=1)
        repeated = jnp.concatenate([picks[:, 1:] == picks[:, :-1], jnp.zeros_like(picks[:, :1], bool)], axis=1)
        picks = jnp.sort(jnp.where(repeated, candidates, picks), axis=1)
        ranked = jnp.take_along_axis(tokens[:, prefix:], order[:, :, None], axis=1)
        ranked = jnp.concatenate([ranked, jnp.zeros_like(ranked[:, :1])], axis=1)
        sampled = jnp.take_along_axis(ranked, picks[:, :, None], axis=1)
        mask = jnp.concatenate([jnp.ones((tokens.shape[0], prefix), jnp.float32),
                                (picks != candidates).astype(jnp.float32)], axis=1)
        # Which incoming patch token each output token is (-1: padding), for pictures and analysis.
        sampled_index = jnp.where(picks == candidates, -1,
                                  jnp.take_along_axis(order, jnp.minimum(picks, candidates - 1), axis=1))
        return (jnp.concatenate([tokens[:, :prefix], sampled], axis=1),
                {"mask": mask, "key_bias": base.mask_key_bias(mask), "sampled_index": sampled_index})


__all__ = ["ATSConfig", "BlockSample", "MIN_TOKENS", "sampled_count", "sampling_levels", "significance"]
