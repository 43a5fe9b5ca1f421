"""CrossViT: Cross-Attention Multi-Scale Vision Transformer (Chen et al. 2021), as timm's `crossvit.py`.

Two ViT branches see the image at two patch sizes (and, for timm's `*_240` names, two resolutions: the
second branch's input is the image bicubic-resized to `img_size * img_scale[1]`, with torch's exact
arithmetic, see `layers.resize_images_like_torch`). After each multi-scale block, every branch's cls token
is projected to the other branch's width, attends to that branch's patch tokens (cross-attention through
the cls token only) and is projected back. The logits are the mean of one head per branch.

Parameter names follow timm: `patch_embed_{b}`, `cls_token_{b}`, `pos_embed_{b}`, `blocks_{k}/blocks_{b}_{i}`
(a ViT block), `blocks_{k}/projs_{b}`, `blocks_{k}/fusion_{b}[_{j}]`, `blocks_{k}/revert_projs_{b}`,
`norm_{b}`, `head_{b}`.
"""
from typing import Any, Dict, List, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import layers, param_groups
from vitjax.models.registry import register_model
from vitjax.models.vit import Block


def scaled_sizes(img_size: Union[int, Tuple[int, int]], img_scale: Sequence[float]) -> List[Tuple[int, int]]:
    """Returns each branch's input (h, w): int(side * scale), exactly as timm computes `img_size_scaled`."""
    img = layers.to_2tuple(img_size)
    return [tuple(int(side * scale) for side in img) for scale in img_scale]


def scale_image(images: jax.Array, size: Tuple[int, int], crop_scale: bool) -> jax.Array:
    """Returns NHWC `images` brought to `size`: a centre crop (when `crop_scale` and smaller) or a bicubic resize."""
    height, width = images.shape[1:3]
    if (height, width) == tuple(size):
        return images
    if crop_scale and size[0] <= height and size[1] <= width:
        # Python's round (half to even), as timm's scale_image.
        top, left = int(round((height - size[0]) / 2.0)), int(round((width - size[1]) / 2.0))
        return images[:, top:top + size[0], left:left + size[1]]
    return layers.resize_images_like_torch(images, size, "bicubic")


class BranchPatchEmbed(nn.Module):
    """A branch's patch embedding: one strided conv, or (`multi_conv`, the "dagger" models) a 3-conv stem.

    Returns (tokens (B, N, C), grid (h, w)).
    """

    patch_size: int
    embed_dim: int
    multi_conv: bool = False
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    def _conv(self, features: int, kernel: int, stride: int, padding: int, name: str) -> nn.Conv:
        return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=[(padding, padding)] * 2,
                       kernel_init=layers.logical(layers.torch_default_init, (None, None, None, "embed")),
                       bias_init=layers.logical(nn.initializers.zeros, ("embed",)),
                       dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    @nn.compact
    def __call__(self, images: jax.Array) -> Tuple[jax.Array, Tuple[int, int]]:
        if self.multi_conv:
            # (kernel, stride, padding) of the 2nd and 3rd convs: total stride 12 = 4*3*1, 16 = 4*2*2.
            second, third = ((3, 3, 0), (3, 1, 1)) if self.patch_size == 12 else ((3, 2, 1), (3, 2, 1))
            x = nn.relu(self._conv(self.embed_dim // 4, 7, 4, 3, "proj_0")(images))
            x = nn.relu(self._conv(self.embed_dim // 2, *second, "proj_1")(x))
            x = self._conv(self.embed_dim, *third, "proj_2")(x)
        else:
            x = self._conv(self.embed_dim, self.patch_size, self.patch_size, 0, "proj")(images)
        batch, grid_h, grid_w, channels = x.shape
        return x.reshape(batch, grid_h * grid_w, channels), (grid_h, grid_w)


class CrossAttention(nn.Module):
    """Attention of the first (cls) token to all tokens; returns (B, 1, C)."""

    num_heads: int
    qkv_bias: bool = True
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        channels = x.shape[-1]
        head_dim = channels // self.num_heads

        query, key, value = (layers.heads_dense(self, tokens, self.num_heads, head_dim, name, self.qkv_bias)
                             for tokens, name in ((x[:, :1], "wq"), (x, "wk"), (x, "wv")))
        out, _ = layers.attend(self, query, key, value, train=train)
        return layers.project_heads(self, out, channels, train=train)


class CrossAttentionBlock(nn.Module):
    """cls token + cross-attention (no MLP); returns only the updated cls token (B, 1, C), as timm."""

    num_heads: int
    qkv_bias: bool = True
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-6
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, name="norm1")(x)
        y = CrossAttention(self.num_heads, qkv_bias=self.qkv_bias, attn_drop_rate=self.attn_drop_rate,
                           proj_drop_rate=self.proj_drop_rate, attention_impl=self.attention_impl,
                           dtype=self.dtype, param_dtype=self.param_dtype, name="attn")(y, train)
        return x[:, :1] + layers.DropPath(self.drop_path_rate)(y, train)


class Projection(nn.Module):
    """LayerNorm, GELU, Linear: maps a cls token between branch widths (timm's `projs` / `revert_projs`)."""

    features: int
    norm_eps: float = 1e-6
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = layers.gelu(layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, name="norm")(x))
        return nn.Dense(self.features, kernel_init=layers.logical(layers.trunc_normal_init, ("embed", "mlp")),
                        bias_init=layers.logical(nn.initializers.zeros, ("mlp",)),
                        dtype=self.dtype, param_dtype=self.param_dtype, name="fc")(x)


class MultiScaleBlock(nn.Module):
    """Per-branch ViT blocks, then cls-token fusion across branches; maps a list of (B, 1 + N_b, C_b) to another.

    `depth` is timm's block config (blocks of branch 0, ..., blocks of branch n-1, fusion depth); a fusion
    depth of 0 means one cross-attention block (timm's "backward capability" layout, key `fusion.{b}`).
    """

    embed_dim: Sequence[int]
    depth: Sequence[int]
    num_heads: Sequence[int]
    mlp_ratio: Sequence[float]
    drop_path_rates: Sequence[float]
    qkv_bias: bool = True
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    norm_eps: float = 1e-6
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, xs: List[jax.Array], train: bool = False) -> List[jax.Array]:
        num_branches = len(self.embed_dim)
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        outs = []
        for branch, x in enumerate(xs):
            for index in range(self.depth[branch]):
                x, _ = Block(self.num_heads[branch], int(self.embed_dim[branch] * self.mlp_ratio[branch]),
                             qkv_bias=self.qkv_bias, proj_drop_rate=self.proj_drop_rate,
                             attn_drop_rate=self.attn_drop_rate, drop_path_rate=float(self.drop_path_rates[index]),
                             norm_eps=self.norm_eps, attention_impl=self.attention_impl,
                             name=f"blocks_{branch}_{index}", **common)(x, train)
            outs.append(x)
        fusion_depth = self.depth[-1]
        results = []
        for branch in range(num_branches):
            other = (branch + 1) % num_branches
            cls_token = Projection(self.embed_dim[other], self.norm_eps, name=f"projs_{branch}", **common)(
                outs[branch][:, :1])
            tokens = jnp.concatenate([cls_token, outs[other][:, 1:]], axis=1)
            names = [f"fusion_{branch}"] if fusion_depth == 0 else [
                f"fusion_{branch}_{j}" for j in range(fusion_depth)]
            for name in names:
                # Each block returns only the cls token, so a deeper fusion attends to it alone (as timm).
                tokens = CrossAttentionBlock(
                    self.num_heads[other], qkv_bias=self.qkv_bias, attn_drop_rate=self.attn_drop_rate,
                    proj_drop_rate=self.proj_drop_rate, drop_path_rate=float(self.drop_path_rates[-1]),
                    norm_eps=self.norm_eps, attention_impl=self.attention_impl, name=name, **common)(tokens, train)
            cls_token = Projection(self.embed_dim[branch], self.norm_eps, name=f"revert_projs_{branch}",
                                   **common)(tokens[:, :1])
            results.append(jnp.concatenate([cls_token, outs[branch][:, 1:]], axis=1))
        return results


class CrossVit(param_groups.LayerGroups, nn.Module):
    """CrossViT classifier; `__call__(images NHWC, train) -> (logits, intermediates)`.

    intermediates: `blocks` (per multi-scale block, the list of branch token sequences), `features` (the
    normed branch sequences), `pre_logits` (B, sum(embed_dim)), the concatenated pooled branches.
    """

    num_classes: int = 1000
    img_size: Union[int, Tuple[int, int]] = 224
    img_scale: Sequence[float] = (1.0, 1.0)
    patch_size: Sequence[int] = (8, 16)
    in_chans: int = 3
    embed_dim: Sequence[int] = (192, 384)
    depth: Sequence[Sequence[int]] = ((1, 3, 1), (1, 3, 1), (1, 3, 1))
    num_heads: Sequence[int] = (6, 12)
    mlp_ratio: Sequence[float] = (2.0, 2.0, 4.0)
    multi_conv: bool = False
    crop_scale: bool = False
    qkv_bias: bool = True
    global_pool: str = "token"
    norm_eps: float = 1e-6
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    GLOBAL_POOLS = ("token", "avg")

    @property
    def num_branches(self) -> int:
        """Returns the number of branches (patch sizes)."""
        return len(self.patch_size)

    def branch_sizes(self) -> List[Tuple[int, int]]:
        """Returns each branch's input (h, w)."""
        return scaled_sizes(self.img_size, tuple(self.img_scale))

    def branch_grids(self) -> List[Tuple[int, int]]:
        """Returns each branch's patch grid (h, w)."""
        return [(size[0] // patch, size[1] // patch) for size, patch in zip(self.branch_sizes(), self.patch_size)]

    def validate(self) -> None:
        """Raises ValueError naming the valid choices if the settings cannot build a model."""
        from vitjax.kernels import ATTENTION_IMPLS
        branches = self.num_branches
        for field in ("embed_dim", "num_heads", "img_scale"):
            if len(getattr(self, field)) != branches:
                raise ValueError(f"{field} needs one entry per branch ({branches} patch sizes), "
                                 f"got {getattr(self, field)}")
        if len(self.mlp_ratio) < branches:
            raise ValueError(f"mlp_ratio needs at least {branches} entries, got {self.mlp_ratio}")
        for config in self.depth:
            if len(config) != branches + 1 or min(config[:-1]) < 1:
                raise ValueError(f"Each depth entry is (blocks of each of the {branches} branches >= 1, fusion "
                                 f"depth); got {config}")
        for size, patch in zip(self.branch_sizes(), self.patch_size):
            if size[0] % patch or size[1] % patch:
                raise ValueError(f"Branch input {size} (img_size {self.img_size} x img_scale {self.img_scale}) is "
                                 f"not divisible by its patch size {patch}")
        if self.multi_conv and any(patch not in (12, 16) for patch in self.patch_size):
            raise ValueError(f"multi_conv supports patch sizes (12, 16); got {self.patch_size}")
        for dim, heads in zip(self.embed_dim, self.num_heads):
            if dim % heads:
                raise ValueError(f"embed_dim {dim} is not divisible by num_heads {heads}")
        if self.global_pool not in self.GLOBAL_POOLS:
            raise ValueError(f"Unknown global_pool {self.global_pool!r}; valid choices: {list(self.GLOBAL_POOLS)}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"Unknown attention_impl {self.attention_impl!r}; valid choices: "
                             f"{list(ATTENTION_IMPLS)}")

    def _block_drop_path_rates(self) -> List[np.ndarray]:
        """Returns each multi-scale block's slice of the stochastic-depth schedule (timm's dpr pointer walk)."""
        total = sum(sum(config[-2:]) for config in self.depth)
        rates = np.linspace(0.0, self.drop_path_rate, total)
        pointer, out = 0, []
        for config in self.depth:
            current = max(config[:-1]) + config[-1]
            out.append(rates[pointer:pointer + current])
            pointer += current
        return out

    def group_matcher(self) -> param_groups.Matcher:
        """Returns timm's group_matcher(coarse=False) over vitjax param paths (see param_groups)."""
        return dict(
            stem=r"^(?:cls_token|pos_embed|patch_embed)",
            blocks=[(r"^blocks_(\d+)", None), (r"^norm", (param_groups.MERGE_WITH_PREVIOUS,))])

    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns regexes of the param paths not weight-decayed, as timm's no_weight_decay."""
        return (r"^(?:cls_token|pos_embed)_\d+$",)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (logits, intermediates) for NHWC `images` of `img_size`."""
        img = layers.to_2tuple(self.img_size)
        if tuple(images.shape[1:3]) != img:
            raise ValueError(f"Input size {tuple(images.shape[1:3])} does not match the model's img_size {img}")
        batch = images.shape[0]
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        xs = []
        for branch, (size, grid) in enumerate(zip(self.branch_sizes(), self.branch_grids())):
            x, _ = BranchPatchEmbed(self.patch_size[branch], self.embed_dim[branch], self.multi_conv,
                                    name=f"patch_embed_{branch}", **common)(
                scale_image(images, size, self.crop_scale))
            channels = self.embed_dim[branch]
            init = layers.logical(layers.trunc_normal_init, (None, None, "embed"))
            cls_token = self.param(f"cls_token_{branch}", init, (1, 1, channels), self.param_dtype)
            pos_embed = self.param(f"pos_embed_{branch}", init, (1, 1 + grid[0] * grid[1], channels),
                                   self.param_dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(x.dtype), (batch, 1, channels)), x], axis=1)
            x = x + pos_embed.astype(x.dtype)
            xs.append(nn.Dropout(self.pos_drop_rate)(x, deterministic=not train))
        intermediates: Dict[str, Any] = {"blocks": []}
        for index, (config, rates) in enumerate(zip(self.depth, self._block_drop_path_rates())):
            xs = MultiScaleBlock(
                tuple(self.embed_dim), tuple(config), tuple(self.num_heads), tuple(self.mlp_ratio),
                tuple(float(rate) for rate in rates), qkv_bias=self.qkv_bias, proj_drop_rate=self.proj_drop_rate,
                attn_drop_rate=self.attn_drop_rate, norm_eps=self.norm_eps, attention_impl=self.attention_impl,
                name=f"blocks_{index}", **common)(xs, train)
            intermediates["blocks"].append(xs)
        xs = [layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, name=f"norm_{branch}")(x)
              for branch, x in enumerate(xs)]
        intermediates["features"] = xs
        pooled = [x[:, 1:].mean(axis=1) if self.global_pool == "avg" else x[:, 0] for x in xs]
        intermediates["pre_logits"] = jnp.concatenate(pooled, axis=-1)
        pooled = [nn.Dropout(self.drop_rate)(x, deterministic=not train) for x in pooled]
        if not self.num_classes:
            return jnp.concatenate(pooled, axis=-1), intermediates
        logits = [layers.classifier_head(self.num_classes, False, self.dtype, self.param_dtype,
                                         name=f"head_{branch}")(x) for branch, x in enumerate(pooled)]
        return jnp.mean(jnp.stack(logits), axis=0), intermediates


# --- registry: timm's names (`*_240` run the 224 branch at 240/224 scale, `*_408` likewise at 384) -------------

_SCALE_240 = (1.0, 224 / 240)
_SCALE_408 = (1.0, 384 / 408)


def _crossvit(embed_dim, depth, heads, mlp_ratio, img_size=240, img_scale=_SCALE_240, **extra) -> Dict[str, Any]:
    return dict(img_size=img_size, img_scale=img_scale, patch_size=(12, 16), embed_dim=embed_dim,
                depth=((1, depth, 0),) * 3, num_heads=(heads, heads), mlp_ratio=mlp_ratio, **extra)


_CROSSVITS = {
    "crossvit_tiny_240": _crossvit((96, 192), 4, 3, (4.0, 4.0, 1.0)),
    "crossvit_small_240": _crossvit((192, 384), 4, 6, (4.0, 4.0, 1.0)),
    "crossvit_base_240": _crossvit((384, 768), 4, 12, (4.0, 4.0, 1.0)),
    "crossvit_9_240": _crossvit((128, 256), 3, 4, (3.0, 3.0, 1.0)),
    "crossvit_15_240": _crossvit((192, 384), 5, 6, (3.0, 3.0, 1.0)),
    "crossvit_18_240": _crossvit((224, 448), 6, 7, (3.0, 3.0, 1.0)),
    "crossvit_9_dagger_240": _crossvit((128, 256), 3, 4, (3.0, 3.0, 1.0), multi_conv=True),
    "crossvit_15_dagger_240": _crossvit((192, 384), 5, 6, (3.0, 3.0, 1.0), multi_conv=True),
    "crossvit_15_dagger_408": _crossvit((192, 384), 5, 6, (3.0, 3.0, 1.0), img_size=408, img_scale=_SCALE_408,
                                        multi_conv=True),
    "crossvit_18_dagger_240": _crossvit((224, 448), 6, 7, (3.0, 3.0, 1.0), multi_conv=True),
    "crossvit_18_dagger_408": _crossvit((224, 448), 6, 7, (3.0, 3.0, 1.0), img_size=408, img_scale=_SCALE_408,
                                        multi_conv=True),
}

# timm's pretrained_cfg: ImageNet statistics, crop 0.875 at 240; the 408 fine-tunes uncropped.
for _name, _settings in _CROSSVITS.items():
    register_model(_name, CrossVit, family="crossvit", **_settings,
                   pretrained_cfg=dict(crop_pct=1.0 if _settings["img_size"] == 408 else 0.875))
