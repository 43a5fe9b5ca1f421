"""The token-reduction interface: a registry of methods, each turning into one hook per transformer block.

    model = vitjax.models.create("deit_small_patch16_224", token_reduction=dict(method="evit", base_keep_rate=0.7))

A `Method` (one frozen dataclass per paper, registered by name, its fields named as the official code's
arguments) validates its settings and, for a given model (tokens in, depth, prefix tokens), makes a `Plan`:
one `BlockReducer` (or None) per block, the token count after each block, and the initial state.

A block calls its reducer between attention and MLP. The reducer first says which key bias attention
should add (`key_bias`: log sizes, padding masks), then gets an `AttentionView` of that attention (the
per-head queries and keys, from which the keys' head mean and the class-token attention row are
computed on demand, one query row: no full attention matrix, so any attention kernel works) and
returns (tokens, state). The state is a dict of arrays carried from block to block.
"""
import dataclasses
from typing import Any, ClassVar, Dict, Mapping, NamedTuple, Optional, Tuple, Type

import jax
import jax.numpy as jnp

State = Dict[str, Any]
_METHODS: Dict[str, Type["Method"]] = {}


class AttentionView(NamedTuple):
    """What a block's attention exposes to its reducer: per-head queries, keys, values (B, N, H, D), its key bias."""
    query: jax.Array
    key: jax.Array
    value: jax.Array
    key_bias: Optional[jax.Array] = None

    def key_mean(self) -> jax.Array:
        """Returns the keys averaged over heads (B, N, D): ToMe's similarity metric."""
        return self.key.mean(axis=2)

    def class_attention(self, heads_mean: bool = True) -> jax.Array:
        """Returns the softmax attention row of the class token (query 0) over all keys: (B, N), or (B, H, N).

        One query against N keys in plain jnp: O(N) where the attention matrix is O(N^2).
        """
        return query_attention(self.query[:, :1], self.key, self.key_bias, heads_mean)[..., 0, :]


def query_attention(query: jax.Array, key: jax.Array, key_bias: Optional[jax.Array] = None,
                    heads_mean: bool = True) -> jax.Array:
    """Returns softmax(q k^T / sqrt(D) + key_bias) of a few queries (B, Q, H, D): (B, Q, N) or (B, H, Q, N)."""
    scale = query.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", query.astype(jnp.float32), key.astype(jnp.float32)) * scale
    if key_bias is not None:
        logits = logits + key_bias.astype(jnp.float32)[:, None, None, :]
    weights = jax.nn.softmax(logits, axis=-1)
    return weights.mean(axis=1) if heads_mean else weights


# Where in its block a reducer runs. After attention (the default, ToMe, EViT, ATS) it gets that attention's
# view and the tokens after its residual. Before attention (MCTF's one-step-ahead) it gets the view of the
# block's attention on the unreduced tokens and may put `attention_weights` (B, H, N', N') in its state for
# the block to use on the reduced ones. After the MLP (MCTF without one-step-ahead) it gets the block's view.
BEFORE_ATTENTION, AFTER_ATTENTION, AFTER_MLP = "before_attention", "after_attention", "after_mlp"


class BlockReducer:
    """One block's token reduction; subclasses are frozen dataclasses (hashable: a block field, static under jit)."""
    stage: ClassVar[str] = AFTER_ATTENTION

    def key_bias(self, state: State) -> Optional[jax.Array]:
        """Returns the bias (B, N) this block's attention adds to every key's logit, or None."""
        return state_key_bias(state)

    def __call__(self, tokens: jax.Array, view: AttentionView, state: State) -> Tuple[jax.Array, State]:
        """Returns (reduced tokens, new state) from the tokens after attention's residual."""
        raise NotImplementedError


def state_key_bias(state: Optional[State]) -> Optional[jax.Array]:
    """Returns the key bias carried in a state (`key_bias`, e.g. a padding mask's), or None."""
    return None if state is None else state.get("key_bias")


# Finite, so a fully padded row stays NaN-free in every kernel; exp of it underflows to exactly 0 in fp32.
MASKED_LOGIT = -1e9


def mask_key_bias(mask: jax.Array) -> jax.Array:
    """Returns the key bias (B, N) that hides padded tokens (mask 0) from attention: 0 or MASKED_LOGIT."""
    return jnp.where(mask > 0, 0.0, MASKED_LOGIT).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class KeepAll(BlockReducer):
    """A block that keeps every token but still applies the state's key bias (e.g. after ATS padded some)."""

    def __call__(self, tokens: jax.Array, view: AttentionView, state: State) -> Tuple[jax.Array, State]:
        """Returns the tokens and state unchanged."""
        return tokens, state


class Plan(NamedTuple):
    """A method applied to one model: per-block reducers (None: the block keeps its tokens) and token counts."""
    blocks: Tuple[Optional[BlockReducer], ...]
    token_counts: Tuple[int, ...]


class Method:
    """A token-reduction method's settings; subclasses are frozen dataclasses registered with `register`.

    Fields are the official code's argument names; `name` is the registry key, `needs_class_token` says
    whether the method ranks tokens by the class token's attention.
    """
    name: ClassVar[str] = ""
    needs_class_token: ClassVar[bool] = False

    def check(self, depth: int, num_prefix_tokens: int, class_token: bool) -> None:
        """Raises ValueError if the method cannot apply to a model of this depth and prefix."""
        if self.needs_class_token and not class_token:
            raise ValueError(f"token_reduction method {self.name!r} ranks tokens by the class token's attention; "
                             f"this model has class_token=False. Methods that need none: "
                             f"{sorted(n for n, m in _METHODS.items() if not m.needs_class_token)}")

    def plan(self, num_tokens: int, depth: int, num_prefix_tokens: int) -> Plan:
        """Returns the per-block plan for `num_tokens` tokens entering `depth` blocks."""
        raise NotImplementedError

    def initial_state(self, tokens: jax.Array, num_prefix_tokens: int) -> State:
        """Returns the state entering the first block."""
        return {}

    def summarize(self, plan: Plan, states: Tuple[State, ...], tokens: Tuple[jax.Array, ...]) -> Dict[str, Any]:
        """Returns the intermediates entry of the method (under its name) from the state and tokens after each block."""
        return dict(token_counts=plan.token_counts)

    def pool_weights(self, state: State) -> Optional[jax.Array]:
        """Returns per-token weights (B, N) of an average pool after the last block, or None for a plain mean."""
        return None

    def pool_key_bias(self, state: State) -> Optional[jax.Array]:
        """Returns the key bias (B, N) of attention pooling (MAP) after the last block, or None."""
        return None


class TracksSizes:
    """Mixin of methods whose state carries token `size` (B, N) (merging, fusing): pools weigh tokens by it."""

    def pool_weights(self, state: State) -> Optional[jax.Array]:
        """Returns the token sizes: a merged token counts as the patches it holds."""
        return state.get("size")

    def pool_key_bias(self, state: State) -> Optional[jax.Array]:
        """Returns log(size) with proportional attention, so attention pooling weighs tokens as the blocks do."""
        return None if not self.prop_attn or state.get("size") is None else jnp.log(state["size"])

    @staticmethod
    def sizes_per_block(states, tokens) -> list:
        """Returns the sizes after each block, ones before any merge."""
        return [jnp.ones(block_tokens.shape[:2], jnp.float32) if state["size"] is None else state["size"]
                for block_tokens, state in zip(tokens, states)]


def register(cls: Type[Method]) -> Type[Method]:
    """Registers a Method subclass under `cls.name`; returns it (a class decorator)."""
    if not cls.name or cls.name in _METHODS:
        raise ValueError(f"token-reduction method name {cls.name!r} is empty or registered twice")
    _METHODS[cls.name] = cls
    return cls


def list_methods() -> Tuple[str, ...]:
    """Returns the registered method names."""
    return tuple(sorted(_METHODS))


def method_options(name: str) -> Tuple[str, ...]:
    """Returns the settings a method takes (its official argument names)."""
    return tuple(field.name for field in dataclasses.fields(get_method(name)))


def get_method(name: str) -> Type[Method]:
    """Returns the Method class registered as `name`; raises ValueError naming the valid ones."""
    if name not in _METHODS:
        raise ValueError(f"Unknown token_reduction method {name!r}; valid choices: {list(list_methods())}")
    return _METHODS[name]


def parse(spec: Any) -> Optional[Method]:
    """Returns `spec` (None, a Method, or a mapping with `method` and that method's settings) as a Method."""
    if spec is None or isinstance(spec, Method):
        return spec
    if isinstance(spec, Mapping) or hasattr(spec, "to_dict"):
        settings = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
        if "method" not in settings:
            raise ValueError(f"token_reduction needs a 'method'; valid choices: {list(list_methods())}")
        cls = get_method(settings.pop("method"))
        valid = method_options(cls.name)
        unknown = sorted(set(settings) - set(valid))
        if unknown:
            raise ValueError(f"Unknown {cls.name} option(s) {unknown}; valid choices: {list(valid)}")
        return cls(**settings)
    raise ValueError(f"token_reduction must be None or a dict(method=..., ...) with method in "
                     f"{list(list_methods())}; got {spec!r}")


def check_keep_rate(value: Any, what: str) -> float:
    """Returns `value` as a float if it lies in (0, 1]; raises ValueError naming the range otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{what} must be a number in (0, 1], got {value!r}")
    return float(value)


def check_locations(locations: Any, depth: int, what: str) -> Tuple[int, ...]:
    """Returns block indices as a tuple of ints if each is in [0, depth); raises ValueError naming the range."""
    locations = tuple(locations) if isinstance(locations, (list, tuple)) else (locations,)
    for location in locations:
        if isinstance(location, bool) or not isinstance(location, int) or not 0 <= location < depth:
            raise ValueError(f"{what} must be block indices in [0, {depth - 1}] (the model has depth {depth}); "
                             f"got {list(locations)}")
    return locations


def weighted_average(tokens: jax.Array, sizes: Optional[jax.Array]) -> jax.Array:
    """Returns the size-weighted mean over tokens (B, N, C) -> (B, C): a merged token counts s times."""
    if sizes is None:
        return tokens.mean(axis=1)
    weights = sizes.astype(jnp.float32)[..., None]
    pooled = jnp.sum(tokens.astype(jnp.float32) * weights, axis=1) / jnp.sum(weights, axis=1)
    return pooled.astype(tokens.dtype)


__all__ = ["AFTER_ATTENTION", "AFTER_MLP", "BEFORE_ATTENTION", "AttentionView", "BlockReducer", "KeepAll",
           "MASKED_LOGIT", "Method", "Plan", "State", "TracksSizes", "check_keep_rate", "check_locations", "get_method",
           "list_methods", "mask_key_bias", "method_options", "parse", "query_attention", "register",
           "state_key_bias", "weighted_average"]
