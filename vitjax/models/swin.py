"""Swin Transformer v1 (Liu et al. 2021): shifted-window attention with a relative position bias.

The parameter tree mirrors timm's `SwinTransformer` (timm >= 0.9 layout: stage i > 0 starts with its
patch merging), so weights convert by a plain key table: `patch_embed/proj`, `patch_embed_norm`,
`layers_{i}/downsample/{norm,reduction}`, `layers_{i}/blocks_{j}/{norm1,attn,norm2,mlp}` with the block's
`relative_position_bias_table` (timm keeps it under `attn`), `norm`, `head`.

Buffers timm does not save (the relative position index, the shifted-window mask) are numpy constants
computed here from the window and feature-map sizes; the mask (-100 between tokens from different
regions, as the reference) is added to the attention logits through `bias`, so `attention_impl` applies.
"""
from typing import Any, Dict, List, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import layers, param_groups
from vitjax.models.registry import register_model

# The reference fills cross-region logits with -100 rather than -inf; kept for exact parity.
MASK_VALUE = -100.0


def relative_position_index(window: Tuple[int, int]) -> np.ndarray:
    """Returns the (N, N) index into the ((2wh-1)(2ww-1), heads) bias table for each token pair of a window."""
    wh, ww = window
    rows, cols = np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")
    coords = np.stack([rows.reshape(-1), cols.reshape(-1)])            # (2, N)
    relative = coords[:, :, None] - coords[:, None, :]                 # (2, N, N)
    return (relative[0] + wh - 1) * (2 * ww - 1) + (relative[1] + ww - 1)


def shifted_window_mask(height: int, width: int, window: Tuple[int, int],
                        shift: Tuple[int, int]) -> np.ndarray:
    """Returns the (num_windows, N, N) additive mask of shifted windows: 0 within a region, -100 across.

    `height`, `width` are the padded map's sides. After the cyclic shift a window can hold tokens from up
    to four image regions that were not neighbours; they must not attend to each other.
    """
    region = np.zeros((1, height, width, 1), np.float32)
    count = 0
    for rows in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for cols in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            region[:, rows[0]:rows[1], cols[0]:cols[1], :] = count
            count += 1
    region = np.asarray(layers.window_partition(region, window))[..., 0]      # (num_windows, N)
    different = region[:, None, :] != region[:, :, None]
    return np.where(different, MASK_VALUE, 0.0).astype(np.float32)


def stage_resolutions(grid: Tuple[int, int], num_stages: int) -> List[Tuple[int, int]]:
    """Returns the feature-map size of each stage: the patch grid, then halved (rounding up) per merging."""
    sizes = [tuple(grid)]
    for _ in range(num_stages - 1):
        sizes.append(tuple((side + 1) // 2 for side in sizes[-1]))
    return sizes


def block_window_and_shift(resolution: Tuple[int, int], window: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """Returns a block's (window, shift): a map no larger than the window is one unshifted window (as timm)."""
    sizes = tuple(side if side <= window else window for side in resolution)
    shift = tuple(0 if side <= size else window // 2 for side, size in zip(resolution, sizes))
    return sizes, shift


class SwinBlock(nn.Module):
    """(Shifted-)window attention block on an NHWC map; `shift_size` (0, 0) is plain window attention."""

    num_heads: int
    window_size: Tuple[int, int]
    shift_size: Tuple[int, int]
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-5
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        batch, height, width, channels = x.shape
        wh, ww = self.window_size
        num_tokens = wh * ww
        table = self.param("relative_position_bias_table",
                           layers.logical(layers.trunc_normal_init, (None, "heads")),
                           ((2 * wh - 1) * (2 * ww - 1), self.num_heads), self.param_dtype)
        index = relative_position_index(self.window_size).reshape(-1)
        bias = table[index].reshape(num_tokens, num_tokens, self.num_heads).transpose(2, 0, 1)[None]

        norm = lambda name: layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, name)  # noqa: E731
        y = norm("norm1")(x)
        shifted = any(self.shift_size)
        if shifted:
            y = jnp.roll(y, (-self.shift_size[0], -self.shift_size[1]), axis=(1, 2))
        pad_h, pad_w = (-height) % wh, (-width) % ww
        # Padding after the shift, as the reference: padded (zero) tokens are keys of the edge windows.
        y = jnp.pad(y, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        padded_h, padded_w = height + pad_h, width + pad_w
        windows = layers.window_partition(y, self.window_size)
        if shifted:
            mask = jnp.asarray(shifted_window_mask(padded_h, padded_w, self.window_size, self.shift_size))
            # Windows are ordered (image, window), so the per-window mask repeats once per image; a traced
            # broadcast, not a (B * num_windows, N, N) constant in the program.
            mask = jnp.broadcast_to(mask[None], (batch,) + mask.shape).reshape(-1, 1, num_tokens, num_tokens)
            bias = bias + mask
        y, _ = layers.Attention(
            self.num_heads, qkv_bias=self.qkv_bias, attn_drop_rate=self.attn_drop_rate,
            proj_drop_rate=self.proj_drop_rate, attention_impl=self.attention_impl,
            dtype=self.dtype, param_dtype=self.param_dtype, name="attn")(windows, bias=bias, train=train)
        y = layers.window_reverse(y, self.window_size, padded_h, padded_w)[:, :height, :width]
        if shifted:
            y = jnp.roll(y, self.shift_size, axis=(1, 2))
        x = x + layers.DropPath(self.drop_path_rate)(y, train)
        y = layers.Mlp(int(channels * self.mlp_ratio), drop_rate=self.proj_drop_rate, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="mlp")(norm("norm2")(x), train)
        x = x + layers.DropPath(self.drop_path_rate)(y, train)
        return layers.constrain(x, ("batch", None, None, "embed"))


class PatchMerging(nn.Module):
    """Concatenates each 2x2 neighbourhood (padding odd sides) and projects 4C -> `out_dim`; NHWC in and out."""

    out_dim: int
    norm_eps: float = 1e-5
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))
        height, width = x.shape[1], x.shape[2]
        # Channel order (column offset, row offset, C), as the reference's x0, x1, x2, x3 concatenation.
        x = x.reshape(batch, height // 2, 2, width // 2, 2, channels).transpose(0, 1, 3, 4, 2, 5)
        x = x.reshape(batch, height // 2, width // 2, 4 * channels)
        x = layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, name="norm")(x)
        return nn.Dense(self.out_dim, use_bias=False,
                        kernel_init=layers.logical(layers.trunc_normal_init, ("mlp", "embed")),
                        dtype=self.dtype, param_dtype=self.param_dtype, name="reduction")(x)


class SwinStage(nn.Module):
    """Optional patch merging, then `depth` blocks alternating plain and shifted windows; NHWC in and out."""

    depth: int
    num_heads: int
    window_size: Tuple[int, int]
    shift_size: Tuple[int, int]
    downsample: bool
    out_dim: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rates: Tuple[float, ...] = ()
    norm_eps: float = 1e-5
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.downsample:
            x = PatchMerging(self.out_dim, self.norm_eps, self.dtype, self.param_dtype, name="downsample")(x)
        for index in range(self.depth):
            x = SwinBlock(
                self.num_heads, self.window_size, self.shift_size if index % 2 else (0, 0),
                mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias, proj_drop_rate=self.proj_drop_rate,
                attn_drop_rate=self.attn_drop_rate,
                drop_path_rate=self.drop_path_rates[index] if self.drop_path_rates else 0.0,
                norm_eps=self.norm_eps, attention_impl=self.attention_impl, dtype=self.dtype,
                param_dtype=self.param_dtype, name=f"blocks_{index}")(x, train)
        return x


class SwinTransformer(param_groups.LayerGroups, nn.Module):
    """Swin Transformer v1 classifier; `__call__(images NHWC, train)` returns (logits, intermediates).

    intermediates: `stages` (list of per-stage NHWC maps), `pre_logits` (B, C).
    `window_size` is an int for every stage or one int per stage (Swin-S3). With `num_classes=0` the
    model returns the pooled features, and with `global_pool=""` as well the normed last-stage map.
    """

    num_classes: int = 1000
    img_size: Union[int, Tuple[int, int]] = 224
    patch_size: int = 4
    in_chans: int = 3
    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window_size: Union[int, Sequence[int]] = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    global_pool: str = "avg"
    drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-5
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    POOLING_TYPES = ("avg", "")

    @property
    def num_stages(self) -> int:
        """Returns the number of stages."""
        return len(self.depths)

    @property
    def stage_windows(self) -> Tuple[int, ...]:
        """Returns the configured window size of each stage."""
        if isinstance(self.window_size, (int, np.integer)):
            return (int(self.window_size),) * self.num_stages
        return tuple(int(w) for w in self.window_size)

    @property
    def grid_size(self) -> Tuple[int, int]:
        """Returns the patch grid (h, w) at `img_size`."""
        img = layers.to_2tuple(self.img_size)
        return img[0] // self.patch_size, img[1] // self.patch_size

    @property
    def stage_dims(self) -> Tuple[int, ...]:
        """Returns the width of each stage (doubling from `embed_dim`)."""
        return tuple(self.embed_dim * 2 ** i for i in range(self.num_stages))

    def validate(self) -> None:
        """Raises ValueError naming the valid choices if the settings cannot build a model."""
        from vitjax.kernels import ATTENTION_IMPLS
        img = layers.to_2tuple(self.img_size)
        if img[0] % self.patch_size or img[1] % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if len(self.num_heads) != self.num_stages:
            raise ValueError(f"num_heads {tuple(self.num_heads)} needs one entry per stage of depths "
                             f"{tuple(self.depths)}")
        if not isinstance(self.window_size, (int, np.integer)) and len(self.window_size) != self.num_stages:
            raise ValueError(f"window_size {self.window_size} must be an int or one int per stage "
                             f"({self.num_stages} stages)")
        if any(w < 1 for w in self.stage_windows):
            raise ValueError(f"window sizes must be positive, got {self.stage_windows}")
        for dim, heads in zip(self.stage_dims, self.num_heads):
            if dim % heads:
                raise ValueError(f"stage width {dim} is not divisible by its num_heads {heads}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"Unknown attention_impl {self.attention_impl!r}; valid choices: {ATTENTION_IMPLS}")
        if self.global_pool not in self.POOLING_TYPES:
            raise ValueError(f"Unknown global_pool {self.global_pool!r}; valid choices: {self.POOLING_TYPES}")
        if self.num_classes and not self.global_pool:
            raise ValueError("global_pool='' returns the feature map and needs num_classes=0")

    def group_matcher(self) -> param_groups.Matcher:
        """Returns timm's group_matcher(coarse=False) over vitjax param paths (see param_groups)."""
        return dict(
            stem=r"^patch_embed",
            blocks=[(r"^layers_(\d+)/downsample", (0,)), (r"^layers_(\d+)/blocks_(\d+)", None),
                    (r"^norm", (param_groups.MERGE_WITH_PREVIOUS,))])

    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns regexes of the param paths not weight-decayed, as timm's no_weight_decay."""
        return (r"relative_position_bias_table$",)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (logits, intermediates) for NHWC `images` of size `img_size`."""
        tokens, grid = layers.PatchEmbed(self.patch_size, self.embed_dim, dtype=self.dtype,
                                         param_dtype=self.param_dtype, name="patch_embed")(images)
        if grid != self.grid_size:
            raise ValueError(f"Input grid {grid} does not match the model's {self.grid_size} "
                             f"(img_size={self.img_size}); the windows and their bias tables depend on it")
        x = tokens.reshape(tokens.shape[0], grid[0], grid[1], self.embed_dim)
        x = layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, name="patch_embed_norm")(x)
        drop_path_rates = np.split(np.linspace(0.0, self.drop_path_rate, sum(self.depths)),
                                   np.cumsum(self.depths)[:-1])
        resolutions = stage_resolutions(grid, self.num_stages)
        stages = []
        for stage, (depth, heads, window, dim) in enumerate(zip(self.depths, self.num_heads, self.stage_windows,
                                                               self.stage_dims)):
            window_hw, shift = block_window_and_shift(resolutions[stage], window)
            x = SwinStage(
                depth, heads, window_hw, shift, downsample=stage > 0, out_dim=dim, mlp_ratio=self.mlp_ratio,
                qkv_bias=self.qkv_bias, proj_drop_rate=self.proj_drop_rate, attn_drop_rate=self.attn_drop_rate,
                drop_path_rates=tuple(float(rate) for rate in drop_path_rates[stage]), norm_eps=self.norm_eps,
                attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype,
                name=f"layers_{stage}")(x, train)
            stages.append(x)
        x = layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, name="norm")(x)
        intermediates: Dict[str, Any] = {"stages": stages}
        if not self.global_pool:
            intermediates["pre_logits"] = x
            return x, intermediates
        pooled = x.mean(axis=(1, 2))
        intermediates["pre_logits"] = pooled
        pooled = nn.Dropout(self.drop_rate)(pooled, deterministic=not train)
        if not self.num_classes:
            return pooled, intermediates
        logits = layers.classifier_head(self.num_classes, False, self.dtype, self.param_dtype)(pooled)
        return logits, intermediates


# --- registry: every Swin v1 size of timm ----------------------------------------------------------------------

_TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_SMALL = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_BASE = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_LARGE = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))

_TIMM_SWINS = {
    "swin_tiny_patch4_window7_224": dict(_TINY, window_size=7),
    "swin_small_patch4_window7_224": dict(_SMALL, window_size=7),
    "swin_base_patch4_window7_224": dict(_BASE, window_size=7),
    "swin_base_patch4_window12_384": dict(_BASE, window_size=12, img_size=384),
    "swin_large_patch4_window7_224": dict(_LARGE, window_size=7),
    "swin_large_patch4_window12_384": dict(_LARGE, window_size=12, img_size=384),
    # Swin-S3 (AutoFormerV2, Chen et al. 2022): searched per-stage windows and depths, same blocks.
    "swin_s3_tiny_224": dict(_TINY, window_size=(7, 7, 14, 7)),
    "swin_s3_small_224": dict(_SMALL, window_size=(14, 14, 14, 7)),
    "swin_s3_base_224": dict(embed_dim=96, depths=(2, 2, 30, 2), num_heads=(3, 6, 12, 24),
                             window_size=(7, 7, 14, 7)),
}

# timm's pretrained_cfg: ImageNet statistics, crop 0.9; the 384 fine-tunes uncropped.
for _name, _settings in _TIMM_SWINS.items():
    register_model(_name, SwinTransformer, family="swin", **_settings,
                   pretrained_cfg=dict(crop_pct=1.0 if _settings.get("img_size") == 384 else 0.9))
