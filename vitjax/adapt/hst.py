"""HST (Lin et al. 2023, "Hierarchical Side-Tuning for Vision Transformers"): a small multi-scale side network.

    model = vitjax.models.create("vit_base_patch16_224", adapt=dict(method="hst"))

Written from the paper and the official code (AFeng-x/HST at ee89571, `models/vit_hsn.py`; no licence:
read and run, not copied), whose outputs it matches (tests/fixtures/hst). With the backbone frozen:

1. Meta tokens: before every block l, `meta_tokens` learned tokens (`hst_meta/tokens[l]`) join the sequence
   (no position embedding); after the block they are taken out. Block l's outputs for them (the "meta
   register") and its patch tokens (a gh x gw map) go to the side network.
2. The side network has 4 stages (`side_dims`) at strides 4, 8, 16, 32 of the image: stage 0 embeds the
   image itself (conv 3x3/2 without bias, BatchNorm, ReLU, conv 2x2/2, LayerNorm), later stages a conv
   3x3/2 + LayerNorm of the previous stage. Stage s owns `side_depths[s]` consecutive backbone layers, one
   side block each; a stage's linear bridge `bridge_s` (width -> side_dims[s]) projects both that layer's
   meta outputs (then a LayerNorm per layer, `meta_norm_l`) and its patch map, bilinearly resized to the
   stage's resolution (torch's align_corners=False, no antialias).
3. A side block: x += proj(attention(q = norm1(x), keys/values = [meta, mean of the projected patches]));
   x += the projected patches; x += mlp(norm2(x)). Each stage ends with a LayerNorm.
4. The classifier sees the mean of the last stage's tokens through a BatchNorm without scale or bias
   (eps 1e-6), then `head` (side_dims[-1] -> classes): it replaces the model's pooling and head input.

Trained: `hst_meta/`, `hst/` (side network, bridges, norms), every backbone block's LayerNorms (`norm1`,
`norm2`, as the official `freeze_vit`) and the head. Defaults: the official code's for ViT-B/16 (its training
scripts pass no others): side_dims (32, 48, 64, 72), side_heads (2, 4, 8, 12), 3 layers per stage, 1 meta
token, the side MLPs at the backbone's mlp_ratio (`side_mlp_ratio`). A stage may own 0 layers (it only
down-samples: models shallower than 4 blocks; the official code has no such case); `side_depths=()` splits
the layers evenly. Left out: the side blocks' dropout and drop path (the official rates are the backbone's;
its training scripts set them to 0). The stage-0 BatchNorm and the final one keep running statistics in `batch_stats`
(`hst/embed_0_bn`, `hst/fc_norm`), trained with the batch's statistics as torch's `train()` mode.
"""
import dataclasses
import math
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.adapt.base import Method, ModelInfo, register
from vitjax.models import layers

# torch's Conv2d init in the official side network: N(0, 2 / (k * k * out_channels)).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def stage_layers(depth: int, side_depths: Sequence[int], num_stages: int) -> Tuple[Tuple[int, ...], ...]:
    """Returns the backbone layers of every side stage (consecutive, `side_depths` each or an even split)."""
    counts = tuple(side_depths) or (depth // num_stages,) * num_stages
    start, stages = 0, []
    for count in counts:
        stages.append(tuple(range(start, start + count)))
        start += count
    return tuple(stages)


class _SideBlock(nn.Module):
    """Cross-attention from the side tokens to the meta tokens, the backbone's patches added, an MLP."""
    num_heads: int
    mlp_ratio: float
    qkv_bias: bool

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, patches: jax.Array) -> jax.Array:
        width = x.shape[-1]
        head_dim = width // self.num_heads
        dense = lambda name, bias=self.qkv_bias: nn.Dense(  # noqa: E731
            width, use_bias=bias, kernel_init=layers.trunc_normal_init, name=name)
        split = lambda t: t.reshape(t.shape[:2] + (self.num_heads, head_dim))  # noqa: E731
        normed = nn.LayerNorm(1e-6, name="norm1")(x)
        out, _ = layers.multihead_attention(split(dense("q")(normed)), split(dense("k")(context)),
                                            split(dense("v")(context)))
        x = x + dense("proj", True)(out.reshape(x.shape))
        x = x + patches
        hidden = int(width * self.mlp_ratio)
        return x + layers.Mlp(hidden, kernel_init=layers.trunc_normal_init, name="mlp")(
            nn.LayerNorm(1e-6, name="norm2")(x))


class SideNetwork(nn.Module):
    """HST's side network; returns the pooled features (B, side_dims[-1]) after its BatchNorm."""
    side_dims: Tuple[int, ...]
    side_heads: Tuple[int, ...]
    stages: Tuple[Tuple[int, ...], ...]
    mlp_ratio: float
    qkv_bias: bool

    @nn.compact
    def __call__(self, images: jax.Array, meta: Sequence[jax.Array], patches: Sequence[jax.Array],
                 train: bool) -> jax.Array:
        x = images
        for stage, (width, num_heads, owned) in enumerate(zip(self.side_dims, self.side_heads, self.stages)):
            if stage == 0:
                x = nn.Conv(width, (3, 3), (2, 2), padding=((1, 1), (1, 1)), use_bias=False, kernel_init=_conv_init,
                            name="embed_0_conv1")(x)
                x = nn.relu(layers.batch_norm(train, eps=1e-5, name="embed_0_bn")(x))
                x = nn.Conv(width, (2, 2), (2, 2), padding="VALID", kernel_init=_conv_init, name="embed_0_conv2")(x)
            else:
                x = nn.Conv(width, (3, 3), (2, 2), padding=((1, 1), (1, 1)), kernel_init=_conv_init,
                            name=f"embed_{stage}_conv")(x)
            batch, height, width_, _ = x.shape
            x = nn.LayerNorm(1e-5, name=f"embed_{stage}_norm")(x.reshape(batch, height * width_, width))
            bridge = nn.Dense(width, kernel_init=layers.trunc_normal_init, name=f"bridge_{stage}")
            for position, layer in enumerate(owned):
                grid = layers.resize_images_like_torch(patches[layer], (height, width_), "bilinear")
                grid = bridge(grid.reshape(batch, height * width_, -1))
                registers = nn.LayerNorm(1e-5, name=f"meta_norm_{layer}")(bridge(meta[layer]))
                context = jnp.concatenate([registers, grid.mean(axis=1, keepdims=True)], axis=1)
                x = _SideBlock(num_heads, self.mlp_ratio, self.qkv_bias, name=f"blocks_{stage}_{position}")(
                    x, context, grid)
            x = nn.LayerNorm(1e-6, name=f"norm_{stage}")(x)
            x = x.reshape(batch, height, width_, width)
        pooled = x.reshape(x.shape[0], -1, x.shape[-1]).mean(axis=1)
        return layers.BatchNorm(use_running_average=not train, eps=1e-6, use_scale=False, use_bias=False,
                                name="fc_norm")(pooled)


class _MetaTokens(nn.Module):
    """Holds the meta tokens; returns them (depth, meta_tokens, width)."""
    depth: int
    meta_tokens: int
    width: int

    @nn.compact
    def __call__(self) -> jax.Array:
        # torch's xavier_uniform_ on each layer's (1, n, C) tensor: fan_in n * C, fan_out C.
        bound = math.sqrt(6.0 / float(self.meta_tokens * self.width + self.width))
        init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)  # noqa: E731
        return self.param("tokens", init, (self.depth, self.meta_tokens, self.width), jnp.float32)


@register
@dataclasses.dataclass(frozen=True)
class HST(Method):
    """Hierarchical side-tuning: meta tokens through the frozen backbone feed a 4-stage side network."""
    name = "hst"
    param_patterns = (r"^hst(_meta)?/", r"^blocks_\d+/norm[12]/")
    scannable = False

    side_dims: Tuple[int, ...] = (32, 48, 64, 72)
    side_heads: Tuple[int, ...] = (2, 4, 8, 12)
    side_depths: Tuple[int, ...] = ()
    meta_tokens: int = 1
    side_mlp_ratio: float = 4.0

    def validate(self) -> None:
        for field in ("side_dims", "side_heads"):
            value = getattr(self, field)
            if (not isinstance(value, tuple) or len(value) != 4
                    or not all(isinstance(v, int) and v > 0 for v in value)):
                raise ValueError(f"adapt.{field} must be 4 positive ints (one per side stage), got {value!r}")
        bad = [(d, h) for d, h in zip(self.side_dims, self.side_heads) if d % h]
        if bad:
            raise ValueError(f"adapt.side_dims must be divisible by adapt.side_heads stage by stage; {bad} are not")
        if self.side_depths and (len(self.side_depths) != 4 or not all(
                isinstance(v, int) and v >= 0 for v in self.side_depths)):
            raise ValueError(f"adapt.side_depths must be () (an even split) or 4 ints >= 0 (backbone layers "
                             f"per side stage; a stage of 0 only down-samples), got {self.side_depths!r}")
        if not isinstance(self.meta_tokens, int) or self.meta_tokens < 1:
            raise ValueError(f"adapt.meta_tokens must be a positive int, got {self.meta_tokens!r}")
        if not self.side_mlp_ratio > 0:
            raise ValueError(f"adapt.side_mlp_ratio must be > 0, got {self.side_mlp_ratio}")

    def check_model(self, depth: int, num_prefix_tokens: int, scan: bool, token_reduction: bool) -> None:
        super().check_model(depth, num_prefix_tokens, scan, token_reduction)
        if token_reduction:
            raise ValueError("Adaptation 'hst' cannot be combined with token_reduction: the side network needs "
                             "every block's full patch grid")
        if self.side_depths and sum(self.side_depths) != depth:
            raise ValueError(f"adapt.side_depths {self.side_depths} must sum to the model's depth {depth} (one side "
                             "block per backbone layer), or be () for an even split")
        if not self.side_depths and depth % 4:
            raise ValueError(f"adapt.side_depths=() splits the layers evenly over 4 stages, but depth {depth} is not "
                             "divisible by 4; give 4 counts summing to the depth")

    def after_embed(self, x: jax.Array, info: ModelInfo, train: bool) -> Tuple[jax.Array, Any]:
        """Returns (the tokens unchanged, a carry of the meta tokens and the per-block outputs collected so far)."""
        tokens = _MetaTokens(info.depth, self.meta_tokens, x.shape[-1], name="hst_meta")()
        return x, dict(tokens=tokens, meta=(), patches=())

    def before_block(self, x: jax.Array, index: int, carry: Any, info: ModelInfo, train: bool) -> jax.Array:
        """Returns the tokens with block `index`'s meta tokens in front (the official order; attention ignores it)."""
        meta = jnp.broadcast_to(carry["tokens"][index][None].astype(x.dtype), (x.shape[0],) + carry["tokens"].shape[1:])
        return jnp.concatenate([meta, x], axis=1)

    def after_block(self, x: jax.Array, index: int, carry: Any, info: ModelInfo,
                    train: bool) -> Tuple[jax.Array, Any]:
        """Returns (the tokens without the meta tokens, the carry with this block's meta outputs and patch map)."""
        meta, x = x[:, :self.meta_tokens], x[:, self.meta_tokens:]
        grid_h, grid_w = info.grid
        patches = x[:, info.num_prefix:]
        if patches.shape[1] != grid_h * grid_w:
            raise ValueError(f"Adaptation 'hst' needs the full {grid_h}x{grid_w} patch grid; got {patches.shape[1]} "
                             "patch tokens (patch_indices / masking is not supported)")
        patches = patches.reshape(x.shape[0], grid_h, grid_w, x.shape[-1])
        return x, dict(carry, meta=carry["meta"] + (meta,), patches=carry["patches"] + (patches,))

    def pooled(self, images: jax.Array, carry: Any, info: ModelInfo, train: bool) -> Optional[jax.Array]:
        """Returns the side network's pooled features, which replace the model's pooled tokens."""
        stages = stage_layers(info.depth, self.side_depths, len(self.side_dims))
        return SideNetwork(self.side_dims, self.side_heads, stages, self.side_mlp_ratio, True, name="hst")(
            images, carry["meta"], carry["patches"], train)
