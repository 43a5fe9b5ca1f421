"""LookupViT (Koner et al., ECCV 2024, "LookupViT: Compressing visual information to a limited number of tokens").

The image is patchified as a ViT does; those patch tokens are the *lookup* tokens (N of them, e.g. 14x14 at
224 px with 16 px patches). A small grid of *compressed* tokens (M of them, e.g. 7x7) is the lookup grid
resized bilinearly. Each block:

1. gathers (MHBC_{l->p}): the compressed tokens attend to the lookup tokens (queries from the compressed,
   keys and values from the lookup tokens), attention logits A (B, H, M, N);
2. refines: a full ViT block (self-attention + MLP at `mlp_ratio`) on the M compressed tokens only;
3. infuses (MHBC_{p->l}): the lookup tokens read the refined compressed tokens through the *same* logits,
   transposed (B, H, N, M), so no new queries or keys are computed; only values and an output projection;
4. an MLP on the lookup tokens at the reduced `lookup_mlp_ratio`.

The quadratic cost is M^2 + 2 M N per block instead of N^2, and the wide MLP runs on M tokens only.
Multi-resolution: one set of weights runs at any compressed grid (`compressed_grid` at call time, the
compressed position embedding is resized to it); with `train_grids` the model draws one grid per training
step (uniformly, from the `dropout` rng) and runs it through `nn.switch`, so every grid is compiled once.

No code was released by the authors. The text of the paper could not be read in full from this machine
(only its abstract), so the layout follows its description of the block as summarised above, and these
choices are ours (the paper leaves them open, or we could not check them):
  * compressed tokens = the lookup tokens (after their position embedding) bilinearly resized, with
    torch's `F.interpolate(mode="bilinear", align_corners=False)` arithmetic, plus a learned compressed
    position embedding (stored at the registered grid, bilinearly resized for other grids);
  * MHBC_{p->l} reuses the pre-softmax logits, transposed, and normalises them over the compressed tokens
    (each lookup token's weights sum to 1), as the one public reimplementation (lucidrains' vit-pytorch
    `look_vit.py`) does; its values come from the compressed tokens after step 2, normed by their own LayerNorm;
  * pre-norm LayerNorms everywhere (one per input of each cross-attention), biases in every projection;
  * `lookup_mlp_ratio` 1.0 (hidden width = width, a quarter of the compressed tokens' MLP);
  * the classifier reads the mean of the final-normed compressed tokens (`global_pool="compressed"`);
    "lookup" and "both" (the sum of both means, as lucidrains) are options;
  * registered sizes: ViT-B/16 at 224 px with 3x3, 5x5, 7x7 and 10x10 compressed grids; the paper's table
    of sizes and FLOPs was not available here, so the model table has no published column for them.

The public reimplementation differs elsewhere too (a 7x7 conv patch stem over smaller "high-res" patches,
sin-cos positions, bias-free projections, a LayerNorm on the lookup residual stream); tests/test_lookupvit.py
checks our two cross-attentions against its modules (a reimplementation, not the authors' code).
"""
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import layers, param_groups
from vitjax.models.registry import register_model
from vitjax.models.vit import Block

GLOBAL_POOLS = ("compressed", "lookup", "both")


class LookupCrossAttention(nn.Module):
    """MHBC_{l->p}: compressed tokens attend to lookup tokens; returns (update (B, M, C), logits (B, H, M, N))."""

    num_heads: int
    qkv_bias: bool = True
    proj_drop_rate: float = 0.0
    norm_eps: float = 1e-6
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, compressed: jax.Array, lookup: jax.Array, train: bool = False
                 ) -> Tuple[jax.Array, jax.Array]:
        channels = compressed.shape[-1]
        head_dim = channels // self.num_heads
        norm = lambda name: layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, name)  # noqa: E731
        queries_in, context = norm("norm_query")(compressed), norm("norm_context")(lookup)
        query = layers.heads_dense(self, queries_in, self.num_heads, head_dim, "q", self.qkv_bias)
        key = layers.heads_dense(self, context, self.num_heads, head_dim, "k", self.qkv_bias)
        value = layers.heads_dense(self, context, self.num_heads, head_dim, "v", self.qkv_bias)
        logits = jnp.einsum("bqhd,bkhd->bhqk", query * jnp.asarray(head_dim ** -0.5, query.dtype), key)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(value.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
        return layers.project_heads(self, out, channels, train=train), logits


class ReusedCrossAttention(nn.Module):
    """MHBC_{p->l}: lookup tokens read the compressed tokens through the transposed logits; returns (B, N, C)."""

    num_heads: int
    qkv_bias: bool = True
    proj_drop_rate: float = 0.0
    norm_eps: float = 1e-6
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, compressed: jax.Array, logits: jax.Array, train: bool = False) -> jax.Array:
        channels = compressed.shape[-1]
        head_dim = channels // self.num_heads
        context = layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, "norm_context")(compressed)
        value = layers.heads_dense(self, context, self.num_heads, head_dim, "v", self.qkv_bias)
        # The gather step's logits, transposed (B, H, N, M): normalised over the compressed tokens.
        weights = jax.nn.softmax(jnp.swapaxes(logits, -1, -2).astype(jnp.float32), axis=-1).astype(value.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
        return layers.project_heads(self, out, channels, train=train)


class LookupBlock(nn.Module):
    """One LookupViT block; maps (compressed (B, M, C), lookup (B, N, C)) to the updated pair."""

    num_heads: int
    mlp_ratio: float = 4.0
    lookup_mlp_ratio: float = 1.0
    qkv_bias: bool = True
    proj_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-6
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, compressed: jax.Array, lookup: jax.Array, train: bool = False
                 ) -> Tuple[jax.Array, jax.Array]:
        channels = compressed.shape[-1]
        common = dict(qkv_bias=self.qkv_bias, proj_drop_rate=self.proj_drop_rate, norm_eps=self.norm_eps,
                      dtype=self.dtype, param_dtype=self.param_dtype)
        drop_path = layers.DropPath(self.drop_path_rate)
        update, logits = LookupCrossAttention(self.num_heads, name="gather", **common)(compressed, lookup, train)
        compressed = compressed + drop_path(update, train)
        compressed, _ = Block(self.num_heads, int(channels * self.mlp_ratio), attention_impl=self.attention_impl,
                              drop_path_rate=self.drop_path_rate, name="compressed", **common)(compressed, train)
        update = ReusedCrossAttention(self.num_heads, name="infuse", **common)(compressed, logits, train)
        lookup = lookup + drop_path(update, train)
        y = layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, "norm_lookup_mlp")(lookup)
        y = layers.Mlp(int(channels * self.lookup_mlp_ratio), drop_rate=self.proj_drop_rate, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="lookup_mlp")(y, train)
        return compressed, lookup + drop_path(y, train)


class LookupEncoder(nn.Module):
    """The blocks and final norms; maps (compressed, lookup) tokens to (pooled (B, C), intermediates)."""

    depth: int
    num_heads: int
    mlp_ratio: float
    lookup_mlp_ratio: float
    drop_path_rates: Sequence[float]
    global_pool: str = "compressed"
    qkv_bias: bool = True
    proj_drop_rate: float = 0.0
    norm_eps: float = 1e-6
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, compressed: jax.Array, lookup: jax.Array, train: bool = False
                 ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        for index in range(self.depth):
            compressed, lookup = LookupBlock(
                self.num_heads, self.mlp_ratio, self.lookup_mlp_ratio, qkv_bias=self.qkv_bias,
                proj_drop_rate=self.proj_drop_rate, drop_path_rate=float(self.drop_path_rates[index]),
                norm_eps=self.norm_eps, attention_impl=self.attention_impl, dtype=self.dtype,
                param_dtype=self.param_dtype, name=f"blocks_{index}")(compressed, lookup, train)
        compressed = layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, "norm")(compressed)
        lookup = layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, "lookup_norm")(lookup)
        pooled = {"compressed": compressed.mean(axis=1), "lookup": lookup.mean(axis=1)}
        pooled["both"] = pooled["compressed"] + pooled["lookup"]
        return pooled[self.global_pool], {"compressed": compressed, "lookup": lookup}


def resize_token_grid(tokens: jax.Array, grid: Tuple[int, int], new_grid: Tuple[int, int]) -> jax.Array:
    """Returns tokens (B, h*w, C) on `grid` resized bilinearly (torch's arithmetic) to `new_grid`, (B, h'*w', C)."""
    batch, _, channels = tokens.shape
    images = tokens.reshape(batch, grid[0], grid[1], channels)
    resized = layers.resize_images_like_torch(images, tuple(new_grid), "bilinear")
    return resized.reshape(batch, new_grid[0] * new_grid[1], channels)


class LookupViT(param_groups.LayerGroups, nn.Module):
    """LookupViT classifier; `__call__(images NHWC, train, compressed_grid=None) -> (logits, intermediates)`.

    intermediates: `compressed` (B, M, C) and `lookup` (B, N, C), the final-normed tokens of the grid that ran,
    `pre_logits` (B, C) and `compressed_grid`, the (h, w) that ran (when training over `train_grids`: the grid
    drawn for that step, as a traced index into `train_grids` under `grid_index`).
    """

    num_classes: int = 1000
    img_size: Union[int, Tuple[int, int]] = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    lookup_mlp_ratio: float = 1.0
    compressed_grid: Tuple[int, int] = (7, 7)
    train_grids: Sequence[Tuple[int, int]] = ()
    global_pool: str = "compressed"
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    def lookup_grid(self) -> Tuple[int, int]:
        """Returns the (h, w) grid of lookup tokens (the patch grid)."""
        img = layers.to_2tuple(self.img_size)
        return img[0] // self.patch_size, img[1] // self.patch_size

    def _check_grid(self, grid, what: str) -> Tuple[int, int]:
        grid = tuple(int(side) for side in layers.to_2tuple(grid))
        lookup = self.lookup_grid()
        if len(grid) != 2 or not all(1 <= side <= limit for side, limit in zip(grid, lookup)):
            raise ValueError(f"{what} {grid} must be (h, w) with 1 <= h <= {lookup[0]} and 1 <= w <= {lookup[1]} "
                             f"(the lookup grid of img_size {self.img_size} / patch_size {self.patch_size})")
        return grid

    def validate(self) -> None:
        """Raises ValueError naming the valid choices if the settings cannot build a model."""
        from vitjax.kernels import ATTENTION_IMPLS
        img = layers.to_2tuple(self.img_size)
        if img[0] % self.patch_size or img[1] % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        self._check_grid(self.compressed_grid, "compressed_grid")
        for grid in self.train_grids:
            self._check_grid(grid, "Each of train_grids")
        if self.global_pool not in GLOBAL_POOLS:
            raise ValueError(f"Unknown global_pool {self.global_pool!r}; valid choices: {list(GLOBAL_POOLS)}")
        if self.mlp_ratio <= 0 or self.lookup_mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio and lookup_mlp_ratio must be > 0, got {self.mlp_ratio}, "
                             f"{self.lookup_mlp_ratio}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"Unknown attention_impl {self.attention_impl!r}; valid choices: "
                             f"{list(ATTENTION_IMPLS)}")

    def group_matcher(self) -> param_groups.Matcher:
        """Returns timm-style group_matcher(coarse=False) over vitjax param paths (see param_groups)."""
        return dict(
            stem=r"^(?:pos_embed|compressed_pos_embed|patch_embed)",
            blocks=[(r"^encoder/blocks_(\d+)", None),
                    (r"^encoder/(?:norm|lookup_norm)", (param_groups.MERGE_WITH_PREVIOUS,))])

    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns regexes of the param paths not weight-decayed (the position embeddings)."""
        return (r"^(?:pos_embed|compressed_pos_embed)$",)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False,
                 compressed_grid: Optional[Tuple[int, int]] = None) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (logits, intermediates) for NHWC `images` of `img_size`, at `compressed_grid` (default: the
        registered one; while training with `train_grids`, one of those drawn per step)."""
        img = layers.to_2tuple(self.img_size)
        if tuple(images.shape[1:3]) != img:
            raise ValueError(f"Input size {tuple(images.shape[1:3])} does not match the model's img_size {img}")
        lookup_grid = self.lookup_grid()
        base_grid = self._check_grid(self.compressed_grid, "compressed_grid")
        init = layers.logical(layers.trunc_normal_init, (None, None, "embed"))
        x, _ = layers.PatchEmbed(self.patch_size, self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                                 name="patch_embed")(images)
        pos_embed = self.param("pos_embed", init, (1, lookup_grid[0] * lookup_grid[1], self.embed_dim),
                               self.param_dtype)
        compressed_pos = self.param("compressed_pos_embed", init, (1, base_grid[0] * base_grid[1], self.embed_dim),
                                    self.param_dtype)
        lookup = nn.Dropout(self.pos_drop_rate)(x + pos_embed.astype(x.dtype), deterministic=not train)
        rates = np.linspace(0.0, self.drop_path_rate, self.depth)
        encoder = LookupEncoder(
            self.depth, self.num_heads, self.mlp_ratio, self.lookup_mlp_ratio, tuple(float(r) for r in rates),
            global_pool=self.global_pool, qkv_bias=self.qkv_bias, proj_drop_rate=self.proj_drop_rate,
            norm_eps=self.norm_eps, attention_impl=self.attention_impl, dtype=self.dtype,
            param_dtype=self.param_dtype, name="encoder")

        def run(module, lookup, compressed_pos, grid):
            compressed = resize_token_grid(lookup, lookup_grid, grid)
            position = resize_token_grid(compressed_pos.astype(lookup.dtype), base_grid, grid)
            return module(compressed + position, lookup, train)

        intermediates: Dict[str, Any] = {}
        grids = [self._check_grid(grid, "Each of train_grids") for grid in self.train_grids]
        if train and compressed_grid is None and len(grids) > 1 and not self.is_initializing():
            index = jax.random.randint(self.make_rng("dropout"), (), 0, len(grids))
            # Each branch returns only (B, C) features, so all grids share one output shape under the switch.
            branches = [lambda module, tokens, position, grid=grid: run(module, tokens, position, grid)[0]
                        for grid in grids]
            pooled = nn.switch(index, branches, encoder, lookup, compressed_pos)
            intermediates["grid_index"] = index
        else:
            grid = base_grid if compressed_grid is None else self._check_grid(compressed_grid, "compressed_grid")
            if train and compressed_grid is None and len(grids) == 1:
                grid = grids[0]
            pooled, tokens = run(encoder, lookup, compressed_pos, grid)
            intermediates.update(tokens, compressed_grid=grid)
        intermediates["pre_logits"] = pooled
        pooled = nn.Dropout(self.drop_rate)(pooled, deterministic=not train)
        if not self.num_classes:
            return pooled, intermediates
        logits = layers.classifier_head(self.num_classes, False, self.dtype, self.param_dtype, name="head")(pooled)
        return logits, intermediates


# --- registry: ViT-B/16 at 224 px with the compressed grids the paper evaluates ---------------------------------

_GRIDS = {"3x3": (3, 3), "5x5": (5, 5), "7x7": (7, 7), "10x10": (10, 10)}
for _label, _grid in _GRIDS.items():
    register_model(f"lookupvit_base_patch16_224_{_label}", LookupViT, family="lookupvit", img_size=224,
                   patch_size=16, embed_dim=768, depth=12, num_heads=12, compressed_grid=_grid)
