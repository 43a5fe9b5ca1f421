"""EViT, token reorganisation (Liang et al., "Not All Patches are What You Need: Expediting Vision
Transformers via Token Reorganizations", ICLR 2022), on the token-reduction interface.

    model = vitjax.models.create("deit_small_patch16_224",
                                 token_reduction=dict(method="evit", base_keep_rate=0.7, fuse_token=True))

At each location in `drop_loc`, after attention, the patch tokens are ranked by the class token's
attention (averaged over heads); the top ceil(keep_rate * (N - prefix)) stay, in that rank order, and
with `fuse_token` the rest are fused into one token appended at the end: their sum weighted by that
attention (the official code does not renormalise the weights, nor does this). Prefix tokens (cls,
dist) always stay first. A fused token is an ordinary token for later locations.

Settings (the official code's argument names and defaults, `main.py` / `evit.py` at commit 5ca95a7):
- base_keep_rate: 0.7, the keep rate at each location of drop_loc.
- drop_loc: (3, 6, 9), block indices (0-based) that reduce.
- fuse_token: False (the paper's recipe passes --fuse_token; `configs/evit_deit_s.py` does).
- keep_rate: None, or one rate per block (or one for all), as the official EViT model's `keep_rate`
  argument; replaces base_keep_rate / drop_loc (a block reduces where its rate is below 1).

The fine-tuning recipe warms the keep rate up from 1 to base_keep_rate on a cosine (`adjust_keep_rate`,
the official schedule); `with_keep_rate` gives the method at the current rate. Token counts are whole
numbers, so a trainer compiles one step per distinct count (`token_counts` tells them apart).

Written from the paper and from reading the official (Apache-2.0) code; equal to it in
tests/test_tokens_parity.py.
"""
import dataclasses
import math
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp

from vitjax.tokens import base


@base.register
@dataclasses.dataclass(frozen=True)
class EViTConfig(base.Method):
    """EViT settings (see the module docstring)."""
    name = "evit"
    needs_class_token = True
    base_keep_rate: float = 0.7
    drop_loc: Any = (3, 6, 9)
    fuse_token: bool = False
    keep_rate: Any = None

    def __post_init__(self):
        base.check_keep_rate(self.base_keep_rate, "evit base_keep_rate")
        if not isinstance(self.fuse_token, bool):
            raise ValueError(f"evit fuse_token must be True or False, got {self.fuse_token!r}")
        # Lists become tuples so the settings stay hashable (a static argument under jit).
        if isinstance(self.drop_loc, list):
            object.__setattr__(self, "drop_loc", tuple(self.drop_loc))
        if self.keep_rate is not None:
            rates = tuple(self.keep_rate) if isinstance(self.keep_rate, (list, tuple)) else (self.keep_rate,)
            for rate in rates:
                base.check_keep_rate(rate, "evit keep_rate (each block's)")
            object.__setattr__(self, "keep_rate", rates)

    def keep_rates(self, depth: int) -> Tuple[float, ...]:
        """Returns the keep rate of each of `depth` blocks (1: the block keeps every token)."""
        if self.keep_rate is not None:
            if len(self.keep_rate) == 1:
                return self.keep_rate * depth
            if len(self.keep_rate) != depth:
                raise ValueError(f"evit keep_rate lists {len(self.keep_rate)} blocks; give one rate or one per "
                                 f"block (the model has depth {depth})")
            return tuple(self.keep_rate)
        locations = base.check_locations(self.drop_loc, depth, "evit drop_loc")
        return tuple(self.base_keep_rate if index in locations else 1.0 for index in range(depth))

    def plan(self, num_tokens: int, depth: int, num_prefix_tokens: int) -> base.Plan:
        """Returns a BlockKeep at each reducing block and the token count after each block."""
        blocks, counts = [], []
        for rate in self.keep_rates(depth):
            candidates = num_tokens - num_prefix_tokens
            keep = math.ceil(rate * candidates) if rate < 1.0 else candidates
            if keep < candidates:
                blocks.append(BlockKeep(keep, num_prefix_tokens, self.fuse_token))
                num_tokens = num_prefix_tokens + keep + int(self.fuse_token)
            else:
                blocks.append(None)
            counts.append(num_tokens)
        return base.Plan(tuple(blocks), tuple(counts))

    def summarize(self, plan: base.Plan, states, tokens) -> Dict[str, Any]:
        """Returns token_counts and, per reducing block, `kept_index` (B, keep): which tokens stayed, in rank order."""
        kept = {index: state["kept_index"] for index, (block, state) in enumerate(zip(plan.blocks, states))
                if block is not None}
        return dict(token_counts=plan.token_counts, kept_index=kept)


@dataclasses.dataclass(frozen=True)
class BlockKeep(base.BlockReducer):
    """One EViT location: keep `keep` patch tokens by class attention, fuse the rest if `fuse_token`."""
    keep: int
    num_prefix_tokens: int = 1
    fuse_token: bool = False

    def __call__(self, tokens: jax.Array, view: base.AttentionView, state: base.State):
        """Returns ([prefix, kept in rank order, (fused)], state with `kept_index` into the patch tokens)."""
        prefix = self.num_prefix_tokens
        # The ranking is discrete: no gradient flows through it (the fused token's weights do get one).
        attention = view.class_attention()[:, prefix:]
        _, kept_index = jax.lax.top_k(jax.lax.stop_gradient(attention), self.keep)
        patches = tokens[:, prefix:]
        kept = jnp.take_along_axis(patches, kept_index[:, :, None], axis=1)
        parts = [tokens[:, :prefix], kept]
        if self.fuse_token:
            dropped = 1.0 - jnp.sum(jax.nn.one_hot(kept_index, patches.shape[1], dtype=attention.dtype), axis=1)
            weights = (attention * dropped).astype(tokens.dtype)
            parts.append(jnp.einsum("bn,bnc->bc", weights, patches)[:, None])
        return jnp.concatenate(parts, axis=1), {"kept_index": kept_index}


def adjust_keep_rate(iters: int, epoch: int, warmup_epochs: int, total_epochs: int, iters_per_epoch: int,
                     base_keep_rate: float = 0.5, max_keep_rate: float = 1.0) -> float:
    """Returns the keep rate at step `iters` (epoch `epoch`): 1 until warmup_epochs, a cosine down to
    base_keep_rate at total_epochs, then base_keep_rate (EViT's `adjust_keep_rate`; the recipe uses
    warmup_epochs=shrink_start_epoch, total_epochs=shrink_start_epoch + shrink_epochs)."""
    if epoch < warmup_epochs:
        return 1.0
    if epoch >= total_epochs:
        return float(base_keep_rate)
    total_iters = iters_per_epoch * (total_epochs - warmup_epochs)
    iters = iters - iters_per_epoch * warmup_epochs
    return float(base_keep_rate + (max_keep_rate - base_keep_rate)
                 * (math.cos(iters / total_iters * math.pi) + 1) * 0.5)


def with_keep_rate(method: EViTConfig, keep_rate: float) -> EViTConfig:
    """Returns `method` with `keep_rate` at its reducing locations (the official forward's keep_rate argument)."""
    keep_rate = base.check_keep_rate(keep_rate, "evit keep_rate")
    if method.keep_rate is not None:
        rates = tuple(keep_rate if rate < 1.0 else 1.0 for rate in method.keep_rate)
        return dataclasses.replace(method, keep_rate=rates)
    return dataclasses.replace(method, base_keep_rate=keep_rate)


__all__ = ["BlockKeep", "EViTConfig", "adjust_keep_rate", "with_keep_rate"]
