"""DVPT (Ruan & Wang 2023, "Dynamic Visual Prompt Tuning for Parameter Efficient Transfer Learning"): prompts
generated per input by a small Meta-Net.

    model = vitjax.models.create("vit_base_patch16_224", adapt=dict(method="dvpt", num_tokens=10, meta_dim=16))

The paper (arXiv 2309.06123; no code published) generates "a dynamic instance-wise token for each image" with
a Meta-Net from the image's features and inserts it like VPT's prompts. Written from that description; before
block l (every block with `deep=True`, else only the first), with x the block's input tokens:

    patches = layer_norm(x[patch tokens])                       (no scale or bias: no params)
    h       = patches @ down_l                                  (width -> meta_dim)
    dynamic = softmax(queries_l h^T / sqrt(meta_dim)) h         (num_tokens learned queries attend to the image)
    prompts = static_l + dynamic @ up_l                         (meta_dim -> width)

and the prompts go after the prefix tokens (cls, dist), replacing block l - 1's prompts, as VPT-deep; they are
removed after the last block, so pooling sees the tokens it would see without them.

What the paper leaves open and what is chosen here: the Meta-Net's form (here one single-head cross-attention
of learned queries over the down-projected patch tokens, a bottleneck as adapters use; `meta_dim` 16); which
tokens it reads (the patch tokens entering the block, normalised without parameters because the residual
stream's scale grows with depth); whether a static prompt is kept beside the dynamic one (kept: `up_l` and its
bias start at zero, so an untrained DVPT is VPT-deep with the same prompts, the static ones initialised as
VPT's); prompt count and depth (VPT's `num_tokens` and `deep` settings and defaults: 10 tokens, the first block only;
the transfer table runs it deep, beside VPT-deep).
Initialisation: queries N(0, 1), down-projection U(+-1/sqrt(width)) (torch's Linear), its bias, the
up-projection and its bias zero.

Parameters: `dvpt_<l>/prompts` (1, num_tokens, width), `dvpt_<l>/queries` (num_tokens, meta_dim),
`dvpt_<l>/down_kernel` (width, meta_dim), `dvpt_<l>/down_bias`, `dvpt_<l>/up_kernel` (meta_dim, width),
`dvpt_<l>/up_bias` for every prompted block l.
"""
import dataclasses
import math
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.adapt.base import ModelInfo, register, torch_linear_uniform
from vitjax.adapt.vpt import VPT


def dynamic_prompts(patches: jax.Array, static: jax.Array, queries: jax.Array, down_kernel: jax.Array,
                    down_bias: jax.Array, up_kernel: jax.Array, up_bias: jax.Array) -> jax.Array:
    """Returns the prompts (B, P, C) of patch tokens (B, N, C): static + up(attention(queries, down(norm(patches))))."""
    mean = patches.mean(axis=-1, keepdims=True)
    var = jnp.square(patches - mean).mean(axis=-1, keepdims=True)
    normed = (patches - mean) * jax.lax.rsqrt(var + 1e-6)
    hidden = normed @ down_kernel + down_bias
    logits = jnp.einsum("pd,bnd->bpn", queries, hidden) / math.sqrt(queries.shape[-1])
    dynamic = jnp.einsum("bpn,bnd->bpd", jax.nn.softmax(logits, axis=-1), hidden)
    return static + dynamic @ up_kernel + up_bias


class MetaNet(nn.Module):
    """One block's prompt generator; returns the prompts (B, num_tokens, width) of its patch tokens."""
    num_tokens: int
    meta_dim: int
    patch_dim: int

    @nn.compact
    def __call__(self, patches: jax.Array) -> jax.Array:
        width = patches.shape[-1]
        bound = math.sqrt(6.0 / float(self.patch_dim + width))  # VPT's prompt init (vitjax.adapt.vpt)
        static = self.param("prompts", lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound),
                            (1, self.num_tokens, width))
        queries = self.param("queries", nn.initializers.normal(1.0), (self.num_tokens, self.meta_dim))
        down_kernel = self.param("down_kernel", torch_linear_uniform, (width, self.meta_dim))
        down_bias = self.param("down_bias", nn.initializers.zeros, (self.meta_dim,))
        up_kernel = self.param("up_kernel", nn.initializers.zeros, (self.meta_dim, width))
        up_bias = self.param("up_bias", nn.initializers.zeros, (width,))
        cast = lambda value: value.astype(patches.dtype)  # noqa: E731
        return dynamic_prompts(patches, cast(static), cast(queries), cast(down_kernel), cast(down_bias),
                               cast(up_kernel), cast(up_bias))


@register
@dataclasses.dataclass(frozen=True)
class DVPT(VPT):
    """Per-input prompts from a Meta-Net, before every block (deep) or the first only; VPT's settings and removal."""
    name = "dvpt"
    param_patterns = (r"^dvpt_\d+/",)

    meta_dim: int = 16

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.meta_dim, int) or self.meta_dim < 1:
            raise ValueError(f"adapt.meta_dim must be a positive int, got {self.meta_dim!r}")

    def after_embed(self, x: jax.Array, info: ModelInfo, train: bool) -> Tuple[jax.Array, Any]:
        """Returns (the tokens unchanged: block 0's prompts come from its own input, no carry)."""
        return x, None

    def before_block(self, x: jax.Array, index: int, carry: Any, info: ModelInfo, train: bool) -> jax.Array:
        """Returns the tokens with block `index`'s prompts after the prefix (inserted at 0, replaced after)."""
        if index > 0 and not self.deep:
            return x
        start = info.num_prefix
        patches = x[:, start:] if index == 0 else x[:, start + self.num_tokens:]
        prompts = MetaNet(self.num_tokens, self.meta_dim, info.patch_dim, name=f"dvpt_{index}")(patches)
        prompts = nn.Dropout(self.prompt_dropout)(prompts, deterministic=not train)
        return jnp.concatenate([x[:, :start], prompts, patches], axis=1)
