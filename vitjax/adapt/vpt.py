"""Visual Prompt Tuning (Jia et al. 2022): learned prompt tokens in the input (shallow) or before every block (deep).

    model = vitjax.models.create("vit_base_patch16_224", adapt=dict(method="vpt", num_tokens=50, deep=True))

As the official code (KMnP/vpt, `PromptedTransformer`): after the embedding (patches, prefix tokens, position
embedding and its dropout) the prompts, through `prompt_dropout`, go between the prefix tokens (cls, dist) and
the patches, without position embedding. VPT-deep replaces them before every later block i by that layer's own
prompts (`deep_prompts[i - 1]`), so the prompts the previous block produced are dropped. Both start as
U(-v, v), v = sqrt(6 / (C * p * p + width)) (xavier-uniform over a flattened patch and the width, the paper's
init). After the last block the prompts are removed, so pooling ("token", "avg", "map") sees the tokens it
would see without them (the official code pools the class token, which is unchanged by the removal).
The official `prompt_proj` (an optional projection of smaller prompts) is not implemented: its default is off.

Parameters: `vpt/prompts` (1, num_tokens, width) and, when deep, `vpt/deep_prompts` (depth - 1, num_tokens, width).
The model may also be applied with per-example prompts in their place, `vpt/prompts` (B, num_tokens, width) and
`vpt/deep_prompts` (depth - 1, B, num_tokens, width): the semantic proxies of `vitjax.objectives.proxy_dml` run
the frozen backbone so with each image's class prompts.
"""
import dataclasses
import math
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.adapt.base import Method, ModelInfo, register


class _Prompts(nn.Module):
    """Holds the prompts; returns (input prompts (1, P, C), per-layer prompts (depth - 1, P, C) or None)."""
    num_tokens: int
    width: int
    deep_layers: int
    patch_dim: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> Tuple[jax.Array, Any]:
        bound = math.sqrt(6.0 / float(self.patch_dim + self.width))
        init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)  # noqa: E731
        prompts = self._prompts("prompts", init, (1, self.num_tokens, self.width))
        deep = None
        if self.deep_layers:
            deep = self._prompts("deep_prompts", init, (self.deep_layers, self.num_tokens, self.width))
        return prompts, deep

    def _prompts(self, name: str, init, shape) -> jax.Array:
        """Returns param `name`; given per example (a batch axis before the last two) it is read as it is."""
        if not self.has_variable("params", name):
            return self.param(name, init, shape, self.param_dtype)
        value = self.get_variable("params", name)  # flax's own check would refuse the per-example shape
        leading = (None,) if name == "prompts" else (shape[0], None)   # None: any batch size
        fits = value.ndim == len(leading) + 2 and value.shape[-2:] == tuple(shape[-2:]) and all(
            want is None or have == want for have, want in zip(value.shape, leading))
        if tuple(value.shape) != tuple(shape) and not fits:
            raise ValueError(f"vpt/{name} has shape {value.shape}; expected {shape}, or per example "
                             f"{tuple('B' if want is None else want for want in leading) + tuple(shape[-2:])}")
        return value


@register
@dataclasses.dataclass(frozen=True)
class VPT(Method):
    """Prompt tokens after the prefix tokens: at the input (shallow) or replaced before every block (deep)."""
    name = "vpt"
    param_patterns = (r"^vpt/",)
    scannable = False

    num_tokens: int = 10
    deep: bool = False
    prompt_dropout: float = 0.0

    def validate(self) -> None:
        if not isinstance(self.num_tokens, int) or self.num_tokens < 1:
            raise ValueError(f"adapt.num_tokens must be a positive int, got {self.num_tokens!r}")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"adapt.prompt_dropout must be in [0, 1), got {self.prompt_dropout}")

    def check_model(self, depth: int, num_prefix_tokens: int, scan: bool, token_reduction: bool) -> None:
        super().check_model(depth, num_prefix_tokens, scan, token_reduction)
        if token_reduction:
            raise ValueError(f"Adaptation {self.name!r} cannot be combined with token_reduction: a reducer would "
                             "merge or drop the prompt tokens, whose positions the prompts rely on")

    def after_embed(self, x: jax.Array, info: ModelInfo, train: bool) -> Tuple[jax.Array, Any]:
        """Returns (tokens with the prompts after the prefix, the per-layer prompts of VPT-deep or None)."""
        prompts, deep = _Prompts(self.num_tokens, x.shape[-1], info.depth - 1 if self.deep else 0, info.patch_dim,
                                 name="vpt")()
        prompts = jnp.broadcast_to(prompts.astype(x.dtype), (x.shape[0],) + prompts.shape[1:])
        prompts = nn.Dropout(self.prompt_dropout)(prompts, deterministic=not train)
        x = jnp.concatenate([x[:, :info.num_prefix], prompts, x[:, info.num_prefix:]], axis=1)
        return x, deep

    def before_block(self, x: jax.Array, index: int, carry: Any, info: ModelInfo, train: bool) -> jax.Array:
        """Returns the tokens with block `index`'s own prompts in place of the previous ones (deep; index >= 1)."""
        if carry is None or index == 0:
            return x
        layer_prompts = carry[index - 1]
        prompts = jnp.broadcast_to(layer_prompts.astype(x.dtype), (x.shape[0],) + layer_prompts.shape[-2:])
        prompts = nn.Dropout(self.prompt_dropout)(prompts, deterministic=not train)
        start = info.num_prefix
        return jnp.concatenate([x[:, :start], prompts, x[:, start + self.num_tokens:]], axis=1)

    def after_blocks(self, x: jax.Array, info: ModelInfo) -> jax.Array:
        """Returns the tokens without the prompts."""
        start = info.num_prefix
        return jnp.concatenate([x[:, :start], x[:, start + self.num_tokens:]], axis=1)
