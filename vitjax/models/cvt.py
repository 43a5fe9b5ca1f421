"""CvT: Introducing Convolutions to Vision Transformers (Wu et al. 2021).

Three stages, each opening with a convolutional token embedding (overlapping strided conv + LayerNorm) and
running blocks whose query/key/value come from depthwise-conv + BatchNorm projections of the token map (keys
and values at stride 2). Only the last stage carries a cls token, which the classifier reads.

Reference: Hugging Face transformers `CvtForImageClassification` (timm has no CvT); parameter names follow
the official Microsoft code (`stages_{i}/blocks_{j}/attn/conv_proj_q/...`), which the HF model mirrors.
Two deliberate differences from HF, neither visible at inference: stochastic depth follows the official code
(a linearly rising rate inside each stage, applied to each residual branch; HF gives every block of a stage
the same rate and drops the whole block output including its residual), and the attention scale
`embed_dim ** -0.5` of the reference (not `head_dim ** -0.5`) is kept, folded into the query.
"""
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import layers, param_groups
from vitjax.models.registry import register_model

QKV_PROJECTIONS = ("dw_bn", "linear")

# torch.nn.BatchNorm2d defaults, in torch's momentum convention (layers.BatchNorm: the weight of the batch).
BN_MOMENTUM = 0.1
BN_EPS = 1e-5


def _conv_output(size: int, kernel: int, stride: int, padding: int) -> int:
    """Returns the output length of a conv along one axis (PyTorch arithmetic)."""
    return (size + 2 * padding - kernel) // stride + 1


class ConvEmbed(nn.Module):
    """Convolutional token embedding: an overlapping strided conv, then LayerNorm; returns (B, h, w, C)."""

    embed_dim: int
    patch_size: int
    stride: int
    padding: int
    norm_eps: float = 1e-5
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = self.padding
        x = nn.Conv(self.embed_dim, (self.patch_size, self.patch_size), strides=(self.stride, self.stride),
                    padding=((pad, pad), (pad, pad)),
                    kernel_init=layers.logical(layers.trunc_normal_init, (None, None, None, "embed")),
                    bias_init=layers.logical(nn.initializers.zeros, ("embed",)),
                    dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
        return layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, name="norm")(x)


class ConvAttention(nn.Module):
    """CvT attention: conv projections of the token map to q/k/v, then multi-head attention; returns (B, N, C).

    The projections are depthwise conv + BatchNorm (`dw_bn`, params `conv_proj_{q,k,v}/{conv,bn}`) or none
    (`linear`); keys and values are taken at `stride_kv`.
    The cls token (when present) bypasses the conv projections and is prepended to q, k and v.
    """

    num_heads: int
    with_cls_token: bool = False
    qkv_bias: bool = True
    qkv_projection: str = "dw_bn"
    kernel_size: int = 3
    stride_q: int = 1
    stride_kv: int = 2
    padding_q: int = 1
    padding_kv: int = 1
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, grid: Tuple[int, int], train: bool = False,
                 capture_attention: bool = False) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        """Returns (output (B, N, C), aux with `attention` weights when captured)."""
        batch, _, channels = x.shape
        head_dim = channels // self.num_heads
        if self.with_cls_token:
            cls_token, x = x[:, :1], x[:, 1:]
        token_map = x.reshape(batch, grid[0], grid[1], channels)

        def conv_projection(name: str, stride: int, padding: int) -> jax.Array:
            if self.qkv_projection == "linear":
                return x
            # Depthwise conv (no bias) + BatchNorm, torch's defaults and two-pass batch variance.
            projected = layers.ConvBN(channels, self.kernel_size, stride, padding, groups=channels,
                                      bn_momentum=BN_MOMENTUM, bn_eps=BN_EPS, kernel_init=layers.trunc_normal_init,
                                      dtype=self.dtype, param_dtype=self.param_dtype, name=name)(token_map, train)
            return projected.reshape(batch, -1, channels)

        query = conv_projection("conv_proj_q", self.stride_q, self.padding_q)
        key = conv_projection("conv_proj_k", self.stride_kv, self.padding_kv)
        value = conv_projection("conv_proj_v", self.stride_kv, self.padding_kv)
        if self.with_cls_token:
            query, key, value = (jnp.concatenate([cls_token, t], axis=1) for t in (query, key, value))

        query, key, value = (layers.heads_dense(self, tokens, self.num_heads, head_dim, name, self.qkv_bias)
                             for tokens, name in ((query, "proj_q"), (key, "proj_k"), (value, "proj_v")))
        # The reference scales logits by embed_dim ** -0.5; the shared kernel applies head_dim ** -0.5.
        query = query * jnp.asarray((head_dim / channels) ** 0.5, query.dtype)
        out, aux = layers.attend(self, query, key, value, train=train, capture_attention=capture_attention)
        return layers.project_heads(self, out, channels, train=train), aux


class CvtBlock(nn.Module):
    """Pre-norm CvT block (conv attention + MLP); returns (tokens, aux)."""

    num_heads: int
    mlp_ratio: float = 4.0
    with_cls_token: bool = False
    qkv_bias: bool = True
    qkv_projection: str = "dw_bn"
    kernel_size: int = 3
    stride_q: int = 1
    stride_kv: int = 2
    padding_q: int = 1
    padding_kv: int = 1
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-5
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, grid: Tuple[int, int], train: bool = False,
                 capture_attention: bool = False) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        channels = x.shape[-1]
        norm = lambda name: layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, name)  # noqa: E731
        y, aux = ConvAttention(
            self.num_heads, with_cls_token=self.with_cls_token, qkv_bias=self.qkv_bias,
            qkv_projection=self.qkv_projection, kernel_size=self.kernel_size, stride_q=self.stride_q,
            stride_kv=self.stride_kv, padding_q=self.padding_q, padding_kv=self.padding_kv,
            attn_drop_rate=self.attn_drop_rate, proj_drop_rate=self.proj_drop_rate,
            attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype,
            name="attn")(norm("norm1")(x), grid, train, capture_attention)
        x = x + layers.DropPath(self.drop_path_rate)(y, train)
        y = layers.Mlp(int(channels * self.mlp_ratio), drop_rate=self.proj_drop_rate, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="mlp")(norm("norm2")(x), train)
        x = x + layers.DropPath(self.drop_path_rate)(y, train)
        return layers.constrain(x, ("batch", "length", "embed")), aux


class CvtStage(nn.Module):
    """One CvT stage: conv token embedding, optional cls token, blocks; returns (map (B, h, w, C), cls, aux)."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    patch_stride: int
    patch_padding: int
    mlp_ratio: float = 4.0
    with_cls_token: bool = False
    drop_path_rate: float = 0.0
    block_kwargs: Optional[Dict[str, Any]] = None
    norm_eps: float = 1e-5
    proj_drop_rate: float = 0.0
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, capture_attention: bool = False):
        x = ConvEmbed(self.embed_dim, self.patch_size, self.patch_stride, self.patch_padding,
                      norm_eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="patch_embed")(x)
        x = nn.Dropout(self.proj_drop_rate)(x, deterministic=not train)
        batch, grid_h, grid_w, channels = x.shape
        x = x.reshape(batch, grid_h * grid_w, channels)
        if self.with_cls_token:
            token = self.param("cls_token", layers.logical(layers.trunc_normal_init, (None, None, "embed")),
                               (1, 1, channels), self.param_dtype)
            x = jnp.concatenate([jnp.broadcast_to(token.astype(x.dtype), (batch, 1, channels)), x], axis=1)
        attention = []
        # Stochastic depth rises linearly inside the stage, as the official CvT code.
        rates = np.linspace(0.0, self.drop_path_rate, self.depth)
        for index in range(self.depth):
            x, aux = CvtBlock(self.num_heads, mlp_ratio=self.mlp_ratio, with_cls_token=self.with_cls_token,
                              drop_path_rate=float(rates[index]), norm_eps=self.norm_eps,
                              proj_drop_rate=self.proj_drop_rate, dtype=self.dtype, param_dtype=self.param_dtype,
                              name=f"blocks_{index}", **(self.block_kwargs or {}))(
                x, (grid_h, grid_w), train, capture_attention)
            if capture_attention:
                attention.append(aux["attention"])
        cls_token = None
        if self.with_cls_token:
            cls_token, x = x[:, :1], x[:, 1:]
        return x.reshape(batch, grid_h, grid_w, channels), cls_token, attention


class ConvolutionalVisionTransformer(param_groups.LayerGroups, nn.Module):
    """CvT classifier; `__call__(images NHWC, train) -> (logits, intermediates)`.

    intermediates: `stages` (per-stage token maps (B, h, w, C)), `cls_token` (B, 1, C) of the last stage,
    `attention` (per-stage lists of weights, when `capture_attention`), `pre_logits` (B, C).
    Per-stage settings (`embed_dims`, `depths`, `num_heads`, `mlp_ratios`, `patch_*`, `cls_token`) are
    tuples with one entry per stage. `drop_path_rate` is the last stage's maximum rate (the paper's recipe
    uses stochastic depth only there: DROP_PATH_RATE [0, 0, r]); `drop_path_rates` sets every stage.
    """

    num_classes: int = 1000
    img_size: Union[int, Tuple[int, int]] = 224
    in_chans: int = 3
    embed_dims: Sequence[int] = (64, 192, 384)
    depths: Sequence[int] = (1, 2, 10)
    num_heads: Sequence[int] = (1, 3, 6)
    mlp_ratios: Sequence[float] = (4.0, 4.0, 4.0)
    patch_sizes: Sequence[int] = (7, 3, 3)
    patch_strides: Sequence[int] = (4, 2, 2)
    patch_paddings: Sequence[int] = (2, 1, 1)
    cls_token: Sequence[bool] = (False, False, True)
    qkv_bias: bool = True
    qkv_projection: str = "dw_bn"
    kernel_qkv: int = 3
    stride_q: int = 1
    stride_kv: int = 2
    padding_q: int = 1
    padding_kv: int = 1
    norm_eps: float = 1e-5
    drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    drop_path_rates: Optional[Sequence[float]] = None
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @property
    def num_stages(self) -> int:
        """Returns the number of stages."""
        return len(self.depths)

    def stage_grids(self) -> Tuple[Tuple[int, int], ...]:
        """Returns the token grid (h, w) of every stage at `img_size`."""
        height, width = layers.to_2tuple(self.img_size)
        grids = []
        for kernel, stride, padding in zip(self.patch_sizes, self.patch_strides, self.patch_paddings):
            height = _conv_output(height, kernel, stride, padding)
            width = _conv_output(width, kernel, stride, padding)
            grids.append((height, width))
        return tuple(grids)

    def validate(self) -> None:
        """Raises ValueError naming the valid choices if the settings cannot build a model."""
        from vitjax.kernels import ATTENTION_IMPLS
        per_stage = dict(embed_dims=self.embed_dims, num_heads=self.num_heads, mlp_ratios=self.mlp_ratios,
                         patch_sizes=self.patch_sizes, patch_strides=self.patch_strides,
                         patch_paddings=self.patch_paddings, cls_token=self.cls_token)
        if self.drop_path_rates is not None:
            per_stage["drop_path_rates"] = self.drop_path_rates
        for field, values in per_stage.items():
            if len(values) != self.num_stages:
                raise ValueError(f"{field} has {len(values)} entries but depths has {self.num_stages} stages")
        if any(self.cls_token[:-1]):
            raise ValueError("Only the last stage can carry a cls token: cls_token must be (False, ..., x)")
        for dim, heads in zip(self.embed_dims, self.num_heads):
            if dim % heads:
                raise ValueError(f"embed_dim {dim} is not divisible by num_heads {heads}")
        if self.qkv_projection not in QKV_PROJECTIONS:
            raise ValueError(f"Unknown qkv_projection {self.qkv_projection!r}; valid choices: {QKV_PROJECTIONS}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"Unknown attention_impl {self.attention_impl!r}; valid choices: "
                             f"{list(ATTENTION_IMPLS)}")
        if any(min(grid) < 1 for grid in self.stage_grids()):
            raise ValueError(f"img_size {self.img_size} is too small: stage grids {self.stage_grids()}")

    def _stage_drop_path_rates(self) -> Tuple[float, ...]:
        if self.drop_path_rates is not None:
            return tuple(float(rate) for rate in self.drop_path_rates)
        return (0.0,) * (self.num_stages - 1) + (float(self.drop_path_rate),)

    def group_matcher(self) -> param_groups.Matcher:
        """Returns the regexes that group the params for layer-wise lr decay, in timm's style."""
        # Stage 0's convolutional embedding is the stem; a later stage's embedding and cls token join its
        # first block, as a timm stage's downsample does.
        return dict(
            stem=r"^stages_0/patch_embed",
            blocks=[(r"^stages_(\d+)/(?:patch_embed|cls_token)", (0,)),
                    (r"^stages_(\d+)/blocks_(\d+)", None),
                    (r"^norm", (param_groups.MERGE_WITH_PREVIOUS,))])

    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns regexes of the param paths not weight-decayed, as the official CvT's no_weight_decay."""
        return (r"^stages_\d+/(?:cls_token|pos_embed)$",)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False,
                 capture_attention: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (logits, intermediates) for NHWC `images`."""
        x = images.astype(self.dtype)
        block_kwargs = dict(qkv_bias=self.qkv_bias, qkv_projection=self.qkv_projection, kernel_size=self.kernel_qkv,
                            stride_q=self.stride_q, stride_kv=self.stride_kv, padding_q=self.padding_q,
                            padding_kv=self.padding_kv, attn_drop_rate=self.attn_drop_rate,
                            attention_impl=self.attention_impl)
        intermediates: Dict[str, Any] = {"stages": []}
        attention = []
        cls_token = None
        for stage, stage_rate in enumerate(self._stage_drop_path_rates()):
            x, cls_token, stage_attention = CvtStage(
                self.embed_dims[stage], self.depths[stage], self.num_heads[stage], self.patch_sizes[stage],
                self.patch_strides[stage], self.patch_paddings[stage], mlp_ratio=self.mlp_ratios[stage],
                with_cls_token=bool(self.cls_token[stage]), drop_path_rate=stage_rate, block_kwargs=block_kwargs,
                norm_eps=self.norm_eps, proj_drop_rate=self.proj_drop_rate, dtype=self.dtype,
                param_dtype=self.param_dtype, name=f"stages_{stage}")(x, train, capture_attention)
            intermediates["stages"].append(x)
            attention.append(stage_attention)
        if capture_attention:
            intermediates["attention"] = attention
        norm = layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, name="norm")
        if cls_token is not None:
            intermediates["cls_token"] = cls_token
            pooled = norm(cls_token[:, 0])
        else:
            pooled = norm(x.reshape(x.shape[0], -1, x.shape[-1])).mean(axis=1)
        intermediates["pre_logits"] = pooled
        pooled = nn.Dropout(self.drop_rate)(pooled, deterministic=not train)
        if not self.num_classes:
            return pooled, intermediates
        logits = layers.classifier_head(self.num_classes, False, self.dtype, self.param_dtype)(pooled)
        return logits, intermediates


# --- registry: the paper's sizes (Table 2) and the released 384 fine-tunes ----------------------------------------

_CVT_SIZES = {
    "cvt_13": dict(embed_dims=(64, 192, 384), depths=(1, 2, 10), num_heads=(1, 3, 6)),
    "cvt_21": dict(embed_dims=(64, 192, 384), depths=(1, 4, 16), num_heads=(1, 3, 6)),
    "cvt_w24": dict(embed_dims=(192, 768, 1024), depths=(2, 2, 20), num_heads=(3, 12, 16)),
}

# timm has no CvT: the preprocessing of Microsoft's release (ImageNet statistics, bicubic; crop 0.875 at 224,
# none at 384), as its configs and the PaddleViT / Hugging Face ports state.
for _name, _settings in _CVT_SIZES.items():
    register_model(_name, ConvolutionalVisionTransformer, family="cvt", pretrained_cfg=dict(crop_pct=0.875),
                   **_settings)
    register_model(f"{_name}_384", ConvolutionalVisionTransformer, family="cvt", img_size=384,
                   pretrained_cfg=dict(crop_pct=1.0), **_settings)
