"""MCTF, multi-criteria token fusion (Lee et al., "Multi-criteria Token Fusion with One-step-ahead Attention
for Efficient Vision Transformers", CVPR 2024), on the token-reduction interface.

    model = vitjax.models.create("deit_small_patch16_224", token_reduction=dict(method="mctf", r_eval=16,
                                 activate_layer=tuple(range(1, 12))))

In each block of `activate_layer`, r tokens are fused by bipartite matching (alternate tokens A and B, as
ToMe) of the block's input tokens, scored by the product of three criteria, each softened by a temperature:
similarity ((cos + 1) / 2)^(1/tau_sim), informativeness (the inverse of the attention a token receives,
averaged over heads and queries, of both tokens)^(1/tau_info) and size (the inverse token sizes)^(1/tau_size).
With `bidirection` half of r merges A into B, then the rest B into the unmerged A. Fused tokens are pooled
by `pooling_type`: 0 size-weighted, 1 weighted by attention x size, 2 max, 3 mean.
With `one_step_ahead` = 1 the block's attention on the unreduced tokens is itself fused (keys summed, queries
pooled as the tokens) and used as the attention of the fused tokens; 2 recomputes attention on them ("precise");
0 fuses after the MLP instead. The informativeness criterion averages attention over every query, and
one-step-ahead fuses the attention matrix itself, so MCTF materialises the (B, H, N, N) weights in plain jnp
whatever `attention_impl` (the blocks' other attention calls use the chosen kernel).

Settings (the official code's names: `mctf_type`'s entries as its `info` dict names them, `activate_layer`,
`r_evals`; defaults from its `main.py`, commit 2004da0):
- r_student: 0.35 (a ratio of the non-prefix tokens if < 1, else a count), the r of a model in training;
  r_eval: None (inference r; None: r_student). This model uses r_eval if given, else r_student.
- r_teacher_max: 0.15, the teacher's r for the consistency loss is drawn in [0, r_teacher_max) (`draw_r_teacher`).
- activate_layer: (3, 6, 9); prop_attn 1; one_step_ahead 1; tau_sim 1; tau_info 20; tau_size 40;
  bidirection 1; pooling_type 1; trace_source 0.
As the official block: r is capped so at least 10 tokens stay (t - r < 10), then at half the non-prefix tokens.

The token-reduction consistency loss of its fine-tuning recipe (`consistency_loss`): the squared distance of
the student's final class token to a teacher's (the same weights with less reduction, no gradient).

Written from the paper and from reading the official (MIT) code; equal to it in tests/test_tokens_parity.py.
"""
import dataclasses
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vitjax.tokens import base

POOLING_TYPES = (0, 1, 2, 3)
ONE_STEP_AHEAD = (0, 1, 2)
MIN_TOKENS = 10  # the official block never fuses below this many tokens


@base.register
@dataclasses.dataclass(frozen=True)
class MCTFConfig(base.TracksSizes, base.Method):
    """MCTF settings (see the module docstring)."""
    name = "mctf"
    r_student: Any = 0.35
    r_eval: Any = None
    r_teacher_max: Any = 0.15
    activate_layer: Any = (3, 6, 9)
    trace_source: int = 0
    prop_attn: int = 1
    one_step_ahead: int = 1
    tau_sim: float = 1
    tau_info: float = 20
    tau_size: float = 40
    bidirection: int = 1
    pooling_type: int = 1

    def __post_init__(self):
        if isinstance(self.activate_layer, list):
            object.__setattr__(self, "activate_layer", tuple(self.activate_layer))
        for name in ("r_student", "r_eval", "r_teacher_max"):
            value = getattr(self, name)
            if value is None and name == "r_eval":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"mctf {name} must be a ratio in [0, 1) or a token count >= 1, got {value!r}")
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"Unknown mctf pooling_type {self.pooling_type!r}; valid choices: {POOLING_TYPES} "
                             "(0 size-weighted, 1 attention x size, 2 max, 3 mean)")
        if self.one_step_ahead not in ONE_STEP_AHEAD:
            raise ValueError(f"Unknown mctf one_step_ahead {self.one_step_ahead!r}; valid choices: {ONE_STEP_AHEAD} "
                             "(0 off, 1 fused attention, 2 recomputed)")
        for name in ("tau_sim", "tau_info", "tau_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"mctf {name} must be a number >= 0 (0 turns the criterion off), got {value!r}")

    @property
    def r(self) -> Any:
        """Returns the r this model fuses with: r_eval if given, else r_student."""
        return self.r_student if self.r_eval is None else self.r_eval

    def plan(self, num_tokens: int, depth: int, num_prefix_tokens: int) -> base.Plan:
        """Returns an MCTF BlockFuse per block (r = 0 where it only applies the size bias) and token counts."""
        locations = base.check_locations(self.activate_layer, depth, "mctf activate_layer")
        blocks, counts = [], []
        for index in range(depth):
            r = fused_count(self.r, num_tokens, num_prefix_tokens) if index in locations else 0
            blocks.append(BlockFuse(r, num_prefix_tokens, float(self.tau_sim), float(self.tau_info),
                                    float(self.tau_size), bool(self.bidirection), int(self.pooling_type),
                                    int(self.one_step_ahead), bool(self.prop_attn), bool(self.trace_source)))
            num_tokens -= r
            counts.append(num_tokens)
        return base.Plan(tuple(blocks), tuple(counts))

    def initial_state(self, tokens: jax.Array, num_prefix_tokens: int) -> base.State:
        """Returns sizes unknown (all 1) and, with trace_source, the identity source map."""
        batch, length = tokens.shape[:2]
        source = jnp.broadcast_to(jnp.eye(length, dtype=jnp.float32), (batch, length, length)) \
            if self.trace_source else None
        return {"size": None, "source": source}

    def summarize(self, plan: base.Plan, states, tokens) -> Dict[str, Any]:
        """Returns token_counts, `fused` per block, `sizes` per block and, with trace_source, `sources`."""
        summary = dict(token_counts=plan.token_counts, fused=tuple(block.r for block in plan.blocks),
                       sizes=self.sizes_per_block(states, tokens))
        if self.trace_source:
            summary["sources"] = [state["source"] for state in states]
        return summary


def fused_count(r: Any, num_tokens: int, num_prefix_tokens: int) -> int:
    """Returns how many tokens a block fuses, by the official block's rules (ratio or count, capped)."""
    if num_tokens - r < MIN_TOKENS:
        r = num_tokens - MIN_TOKENS
    r = int((num_tokens - num_prefix_tokens) * r) if r < 1 else int(r)
    return max(0, min(r, (num_tokens - num_prefix_tokens) // 2))


class Matching:
    """A bipartite fusion of tokens (alternate A, B): which A go where, and the optional second step B -> A."""

    def __init__(self, unmerged, src, dst, unmerged2=None, src2=None, dst2=None):
        self.unmerged, self.src, self.dst = unmerged, src, dst
        self.unmerged2, self.src2, self.dst2 = unmerged2, src2, dst2

    def merge(self, x: jax.Array, mode: str = "sum") -> jax.Array:
        """Returns x (B, T, ...) with its tokens (axis 1) fused: "sum" or "amax" of each group."""
        return jax.vmap(self._merge_one, in_axes=(0, 0, 0, 0, 0, 0, 0, None))(
            x, self.unmerged, self.src, self.dst, self.unmerged2, self.src2, self.dst2, mode)

    @staticmethod
    def _merge_one(x, unmerged, src, dst, unmerged2, src2, dst2, mode):
        scatter = (lambda target, index, values: target.at[index].add(values)) if mode == "sum" else \
            (lambda target, index, values: target.at[index].max(values))
        set_a, set_b = x[0::2], x[1::2]
        set_b = scatter(set_b, dst, set_a[src])
        kept_a = set_a[unmerged]
        if unmerged2 is None:
            return jnp.concatenate([kept_a, set_b], axis=0)
        kept_a = scatter(kept_a, dst2, set_b[src2])
        return jnp.concatenate([kept_a, set_b[unmerged2]], axis=0)

    def merge_axis(self, x: jax.Array, axis: int, mode: str = "sum") -> jax.Array:
        """Returns x with tokens fused along `axis` (batch first)."""
        return jnp.moveaxis(self.merge(jnp.moveaxis(x, axis, 1), mode), 1, axis)


def _descending(values: jax.Array) -> jax.Array:
    return jnp.argsort(-values, axis=-1, stable=True)


def match(tokens: jax.Array, attention: Optional[jax.Array], size: Optional[jax.Array], block: "BlockFuse") -> Matching:
    """Returns the multi-criteria bipartite matching of `tokens` (B, T, C) fusing `block.r` of them."""
    r = block.r
    r1, r2 = (r // 2, r - r // 2) if block.bidirection else (r, 0)
    metric = jax.lax.stop_gradient(tokens.astype(jnp.float32))
    metric = metric / jnp.linalg.norm(metric, axis=-1, keepdims=True)
    set_a, set_b = metric[:, 0::2], metric[:, 1::2]
    scores = jnp.ones((tokens.shape[0], set_a.shape[1], set_b.shape[1]), jnp.float32)
    if block.tau_sim:
        scores = ((set_a @ jnp.swapaxes(set_b, 1, 2) + 1) / 2) ** (1 / block.tau_sim)
    if block.tau_info > 0 and attention is not None:
        inverse = 1 / jax.lax.stop_gradient(attention).mean(axis=(1, 2))
        inverse = inverse / inverse.max(axis=1, keepdims=True)
        scores = scores * (inverse[:, 0::2, None] * inverse[:, None, 1::2]) ** (1 / block.tau_info)
    if block.tau_size and size is not None:
        inverse = 1 / size
        inverse = inverse / inverse.max(axis=1, keepdims=True)
        scores = scores * (inverse[:, 0::2, None] * inverse[:, None, 1::2]) ** (1 / block.tau_size)
    # Prefix tokens (cls, dist) never fuse: as rows of A and columns of B (A holds even, B odd positions).
    positions = np.arange(tokens.shape[1])
    protected_a = jnp.asarray(positions[0::2] < block.num_prefix_tokens)
    protected_b = jnp.asarray(positions[1::2] < block.num_prefix_tokens)
    scores = jnp.where(protected_a[None, :, None] | protected_b[None, None, :], -jnp.inf, scores)
    node_max, node_index = scores.max(axis=-1), scores.argmax(axis=-1)
    edges = _descending(node_max)
    unmerged, src = edges[:, r1:], edges[:, :r1]
    dst = jnp.take_along_axis(node_index, src, axis=1)
    if block.num_prefix_tokens:
        unmerged = jnp.sort(unmerged, axis=1)  # keeps the prefix tokens first
    if not block.bidirection:
        return Matching(unmerged, src, dst)
    backward = jnp.swapaxes(jnp.take_along_axis(scores, unmerged[:, :, None], axis=1), 1, 2)  # (B, t2, t1 - r1)
    node_max2, node_index2 = backward.max(axis=-1), backward.argmax(axis=-1)
    edges2 = _descending(node_max2)
    unmerged2, src2 = edges2[:, r2:], edges2[:, :r2]
    dst2 = jnp.take_along_axis(node_index2, src2, axis=1)
    return Matching(unmerged, src, dst, unmerged2, src2, dst2)


def full_attention(view: base.AttentionView) -> jax.Array:
    """Returns the softmax attention weights (B, H, N, N) of a view, in plain jnp."""
    return base.query_attention(view.query, view.key, view.key_bias, heads_mean=False)


@dataclasses.dataclass(frozen=True)
class BlockFuse(base.BlockReducer):
    """One MCTF block: fuse `r` tokens (r = 0: only proportional attention), in the stage one_step_ahead sets."""
    r: int
    num_prefix_tokens: int = 1
    tau_sim: float = 1.0
    tau_info: float = 20.0
    tau_size: float = 40.0
    bidirection: bool = True
    pooling_type: int = 1
    one_step_ahead: int = 1
    prop_attn: bool = True
    trace_source: bool = False

    @property
    def stage(self) -> str:
        """Returns where the block fuses: before attention with one-step-ahead, else after the MLP."""
        if self.r == 0:
            return base.AFTER_ATTENTION
        return base.BEFORE_ATTENTION if self.one_step_ahead else base.AFTER_MLP

    def key_bias(self, state: base.State) -> Optional[jax.Array]:
        """Returns log(size) with proportional attention once tokens have fused."""
        if not self.prop_attn or state is None or state.get("size") is None:
            return None
        return jnp.log(state["size"])

    def __call__(self, tokens: jax.Array, view: base.AttentionView, state: base.State):
        """Returns (fused tokens, state with sizes, source and, one step ahead, the fused `attention_weights`)."""
        if self.r == 0:
            return tokens, state
        attention = full_attention(view)
        if self.one_step_ahead == 2:
            attention = jax.lax.stop_gradient(attention)
        state = dict(state)
        size = state.get("size")
        matching = match(tokens, attention, size, self)
        if self.trace_source:
            state["source"] = matching.merge(state["source"], "amax")
        tokens, size, fused_attention = self._pool(matching, tokens, size, attention)
        state["size"] = size
        if self.one_step_ahead == 1:
            state["attention_weights"] = fused_attention
        return tokens, state

    def _pool(self, matching: Matching, x: jax.Array, size: Optional[jax.Array], attention: jax.Array):
        """Returns (fused tokens, fused sizes, fused attention or None) for the block's pooling_type."""
        size = jnp.ones(x.shape[:2], jnp.float32) if size is None else size
        ahead = self.one_step_ahead == 1
        keys_fused = matching.merge_axis(attention, 3, "sum") if ahead else None  # a fused key gets its members' sum
        new_size = jax.lax.stop_gradient(matching.merge(size, "sum"))
        if self.pooling_type == 1:
            weight = jax.lax.stop_gradient(attention.mean(axis=(1, 2)) * (size / size.max(axis=1, keepdims=True)))
            norm = matching.merge(weight, "sum")
            fused = None
            if ahead:
                fused = matching.merge_axis(keys_fused * weight[:, None, :, None], 2, "sum") / norm[:, None, :, None]
            x = matching.merge(x * weight[..., None].astype(x.dtype), "sum") / norm[..., None].astype(x.dtype)
            return x, new_size, fused
        if self.pooling_type == 2:
            fused = matching.merge_axis(keys_fused, 2, "amax") if ahead else None
            return matching.merge(x, "amax"), new_size, fused
        if self.pooling_type == 3:
            count = jax.lax.stop_gradient(matching.merge(jnp.ones_like(size), "sum"))
            fused = matching.merge_axis(keys_fused, 2, "sum") / count[:, None, :, None] if ahead else None
            return matching.merge(x, "sum") / count[..., None].astype(x.dtype), new_size, fused
        fused = None
        if ahead:
            fused = matching.merge_axis(keys_fused * size[:, None, :, None], 2, "sum") / new_size[:, None, :, None]
        x = matching.merge(x * size[..., None].astype(x.dtype), "sum") / new_size[..., None].astype(x.dtype)
        return x, new_size, fused


def consistency_loss(student_encoded: jax.Array, teacher_encoded: jax.Array) -> jax.Array:
    """Returns MCTF's token-reduction consistency loss per image (B,): the mean squared difference of the
    student's final (normed) class token and the teacher's, the teacher taken as a constant.

    Give each model's intermediates["encoded"] (the teacher: the same weights at r_teacher)."""
    teacher = jax.lax.stop_gradient(teacher_encoded[:, 0])
    return jnp.mean(jnp.square(teacher - student_encoded[:, 0]), axis=-1)


def draw_r_teacher(rng: np.random.Generator, r_teacher_max: Any) -> Any:
    """Returns a teacher r drawn as the official code does: k / 100 for k in [0, 100 r_max) if r_max < 1, else
    an int in [0, r_max); 0 when r_max is 0. Host-side: r sets the shapes, so each value compiles once."""
    if not r_teacher_max:
        return 0
    if r_teacher_max < 1:
        return int(rng.integers(0, int(r_teacher_max * 100))) / 100
    return int(rng.integers(0, int(r_teacher_max)))


__all__ = ["BlockFuse", "MCTFConfig", "Matching", "consistency_loss", "draw_r_teacher", "full_attention",
           "fused_count", "match"]
