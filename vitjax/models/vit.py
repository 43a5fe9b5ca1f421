"""Vision Transformer (Dosovitskiy et al. 2021) and DeiT (Touvron et al. 2021), with its distillation token.

Variants follow the ViT and big_vision papers: "Ti/16", "B/16", "L/14", ... (`decode_variant`).
The parameter tree mirrors timm's module names so weights convert by a plain key table.
"""
from typing import Any, Dict, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import layers, param_groups, plugins
from vitjax.models.registry import (
    IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD, register_model)
from vitjax import adapt as adapt_lib
from vitjax import tokens

# Width, depth, MLP width and heads of each size (ViT paper Table 1; big_vision's `decode_variant`).
VARIANT_WIDTH = {"mu": 32, "Ti": 192, "S": 384, "M": 512, "B": 768, "L": 1024, "H": 1280, "g": 1408}
VARIANT_DEPTH = {"mu": 1, "Ti": 12, "S": 12, "M": 12, "B": 12, "L": 24, "H": 32, "g": 40}
VARIANT_MLP_DIM = {"mu": 128, "Ti": 768, "S": 1536, "M": 2048, "B": 3072, "L": 4096, "H": 5120, "g": 6144}
VARIANT_HEADS = {"mu": 2, "Ti": 3, "S": 6, "M": 8, "B": 12, "L": 16, "H": 16, "g": 16}


def decode_variant(variant: str) -> Dict[str, Any]:
    """Returns the constructor settings of a variant string like "B/16" or "Ti" (size[/patch])."""
    size, _, patch = variant.partition("/")
    if size not in VARIANT_WIDTH:
        raise ValueError(f"Unknown ViT size {size!r} in variant {variant!r}; valid sizes: {list(VARIANT_WIDTH)}")
    settings = dict(embed_dim=VARIANT_WIDTH[size], depth=VARIANT_DEPTH[size],
                    mlp_dim=VARIANT_MLP_DIM[size], num_heads=VARIANT_HEADS[size])
    if patch:
        if not patch.isdigit():
            raise ValueError(f"Patch size in variant {variant!r} must be an integer, e.g. 'B/16'")
        settings["patch_size"] = int(patch)
    return settings


class Block(nn.Module):
    """Pre-norm transformer block; returns (tokens, aux) so it can run under `nn.scan`."""

    num_heads: int
    mlp_dim: int
    qkv_bias: bool = True
    qk_norm: bool = False
    init_values: Optional[float] = None
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-6
    attention_impl: str = "xla"
    kernel_init: layers.Initializer = layers.trunc_normal_init
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32
    mlp_activation: str = "gelu"  # a name in layers.ACTIVATIONS (CLIP: quick_gelu, SigLIP: gelu_tanh)
    # Token reduction (`vitjax.tokens`): a per-block hook around attention; None leaves the block as it is.
    token_reducer: Optional[tokens.BlockReducer] = None
    # Parameter-efficient adaptation (`vitjax.adapt`): its `mlp_branch` runs beside the MLP; None: no branch.
    adapt_method: Optional[adapt_lib.Method] = None
    # Outlier-free attention (layers.Attention's fields; the model's `outlier_free` settings).
    outlier_free: Optional[Dict[str, Any]] = None
    # The Gaussian mixture mask (`plugins.GaussianMixtureMask`) with this many kernels over the token grid
    # `gmm_grid`, multiplying the attention logits; 0 leaves attention as it is.
    gmm_kernels: int = 0
    gmm_grid: Optional[Tuple[int, int]] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, capture_attention: bool = False,
                 drop_path_rate: Optional[jax.Array] = None,
                 token_state: Optional[Dict[str, Any]] = None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        """Returns (tokens, aux); `drop_path_rate`, when given (a scanned per-layer value), overrides the field.

        With `token_reducer` set, `token_state` (sizes, masks, ...) comes in and aux["token_state"] goes out.
        """
        drop_path_rate = self.drop_path_rate if drop_path_rate is None else drop_path_rate
        norm = lambda name: layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, name)  # noqa: E731
        norm1 = norm("norm1")
        attention = layers.Attention(
            self.num_heads, qkv_bias=self.qkv_bias, qk_norm=self.qk_norm, attn_drop_rate=self.attn_drop_rate,
            proj_drop_rate=self.proj_drop_rate, norm_eps=self.norm_eps, attention_impl=self.attention_impl,
            kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype, name="attn",
            **(self.outlier_free or {}))
        reducer = self.token_reducer
        stage = None if reducer is None else reducer.stage
        key_bias = None if reducer is None else reducer.key_bias(token_state)
        weights = None
        if stage == tokens.BEFORE_ATTENTION:
            # The reducer sees this block's attention on the unreduced tokens, reduces them, and may hand back
            # the attention weights of the reduced tokens (MCTF's one-step-ahead attention).
            _, probe = attention(norm1(x), key_bias=key_bias, train=train, qkv_only=True)
            x, token_state = reducer(x, tokens.AttentionView(probe["query"], probe["key"], probe["value"], key_bias),
                                     token_state)
            token_state = dict(token_state)
            weights = token_state.pop("attention_weights", None)
            key_bias = reducer.key_bias(token_state)
        multiplier = None
        if self.gmm_kernels:
            multiplier = plugins.GaussianMixtureMask(self.num_heads, self.gmm_kernels, self.gmm_grid,
                                                     param_dtype=self.param_dtype, name="gmm")()
        y, aux = attention(norm1(x), key_bias=key_bias, train=train, capture_attention=capture_attention,
                           return_qkv=stage in (tokens.AFTER_ATTENTION, tokens.AFTER_MLP),
                           attention_weights=weights, logit_multiplier=multiplier)
        view = None
        if stage in (tokens.AFTER_ATTENTION, tokens.AFTER_MLP):
            view = tokens.AttentionView(aux.pop("query"), aux.pop("key"), aux.pop("value"), key_bias)
        if self.init_values is not None:
            y = layers.LayerScale(self.init_values, self.param_dtype, name="ls1")(y)
        x = x + layers.DropPath()(y, train, rate=drop_path_rate)
        if stage == tokens.AFTER_ATTENTION:
            x, token_state = reducer(x, view, token_state)
        branch = None if self.adapt_method is None else self.adapt_method.mlp_branch(x, train)
        y = layers.Mlp(self.mlp_dim, activation=layers.activation(self.mlp_activation),
                       drop_rate=self.proj_drop_rate, kernel_init=self.kernel_init,
                       dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(norm("norm2")(x), train)
        if self.init_values is not None:
            y = layers.LayerScale(self.init_values, self.param_dtype, name="ls2")(y)
        x = x + layers.DropPath()(y, train, rate=drop_path_rate)
        if branch is not None:
            x = x + branch
        if stage == tokens.AFTER_MLP:
            x, token_state = reducer(x, view, token_state)
        x = layers.constrain(x, ("batch", "length", "embed"))
        aux = dict(aux, tokens=x)
        if reducer is not None:
            aux["token_state"] = token_state
        return x, aux


class VisionTransformer(nn.Module):
    """ViT / DeiT classifier; `__call__` returns (logits, intermediates).

    intermediates: `patch_embed` (B, N, C), `blocks` (per-block tokens: a list, or a (depth, B, N, C) array
    when scanned), `attention` (per-block weights, when `capture_attention`), `pre_logits` (B, C).
    A distilled DeiT in training returns (cls_logits, dist_logits); at inference their mean.

    `token_reduction=dict(method=..., ...)` turns on a token-reduction method (`vitjax.tokens`: "tome",
    "evit", ...; None leaves the model exactly as it is); it then adds intermediates[method], at least
    `token_counts` per block. `tome=dict(r=..., ...)` is `token_reduction=dict(method="tome", r=..., ...)`;
    ToMe's entry has `merges` and `sizes` per block (B, N_l), the final `size`, and with trace_source
    `sources` per block (B, N_l, N_in): which input tokens each token holds.
    """

    num_classes: int = 1000
    img_size: Union[int, Tuple[int, int]] = 224
    patch_size: Union[int, Tuple[int, int]] = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: Optional[int] = None
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_norm: bool = False
    init_values: Optional[float] = None
    class_token: bool = True
    distilled: bool = False
    no_embed_class: bool = False
    pos_embed: str = "learn"
    global_pool: str = "token"
    fc_norm: Optional[bool] = None
    representation_size: Optional[int] = None
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-6
    head_zero_init: bool = False
    weight_init: str = "timm"
    remat: bool = False
    scan: bool = False
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32
    token_reduction: Optional[Any] = None  # dict(method=..., settings) (see vitjax.tokens) or a tokens.Method
    tome: Optional[Any] = None  # ToMe settings: a dict (see vitjax.tokens.tome) or a ToMeConfig
    # CLIP's image tower (timm's `pre_norm`): a LayerNorm `norm_pre` after the position embedding, and a
    # patch embedding without bias.
    pre_norm: bool = False
    mlp_activation: str = "gelu"  # a name in layers.ACTIVATIONS (OpenAI CLIP: quick_gelu, SigLIP: gelu_tanh)
    # Parameter-efficient adaptation: dict(method=<a name of vitjax.adapt.list_methods()>, ...) or an adapt.Method;
    # None leaves the model exactly as it is (see vitjax.adapt).
    adapt: Optional[Any] = None
    # Outlier-free attention (Bondarenko et al. 2023) in every block, off by default: softmax_kind "clipped"
    # with clip_gamma (<= 0) or clip_alpha (gamma = -alpha / tokens) and clip_zeta (>= 1); attn_gate "linear"
    # or "mlp" with attn_gate_init, the gate's starting probability (see layers.Attention).
    softmax_kind: str = "softmax"
    clip_gamma: Optional[float] = None
    clip_alpha: Optional[float] = None
    clip_zeta: float = 1.0
    attn_gate: Optional[str] = None
    attn_gate_init: float = 0.5
    # Plug-ins (vitjax.models.plugins), off by default. global_pool="ggem": GGeM pooling of the patch tokens
    # with `ggem_groups` groups (None: one per head) and exponents starting at `ggem_p_init`.
    ggem_groups: Optional[int] = None
    ggem_p_init: float = 3.0
    # "poly": adaptive polyphase patch embedding (shift-equivariant; needs pos_embed "conv" or "none").
    patch_embed_type: str = "standard"
    # "gmm": the Gaussian mixture mask with `gmm_kernels` kernels on every block's attention logits.
    attention_mask: Optional[str] = None
    gmm_kernels: int = 3

    POS_EMBED_TYPES = ("learn", "sincos2d", "conv", "none")
    GLOBAL_POOL_TYPES = layers.POOLING_TYPES + ("ggem",)
    WEIGHT_INITS = ("timm", "xavier")

    def validate(self) -> None:
        """Raises ValueError naming the valid choices if the settings cannot build a model."""
        from vitjax.kernels import ATTENTION_IMPLS
        img, patch = layers.to_2tuple(self.img_size), layers.to_2tuple(self.patch_size)
        if img[0] % patch[0] or img[1] % patch[1]:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        choices = dict(global_pool=self.GLOBAL_POOL_TYPES, pos_embed=self.POS_EMBED_TYPES,
                       weight_init=self.WEIGHT_INITS, attention_impl=ATTENTION_IMPLS,
                       mlp_activation=tuple(layers.ACTIVATIONS), patch_embed_type=plugins.PATCH_EMBED_TYPES,
                       attention_mask=plugins.ATTENTION_MASKS)
        for field, valid in choices.items():
            if getattr(self, field) not in valid:
                raise ValueError(f"Unknown {field} {getattr(self, field)!r}; valid choices: {list(valid)}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' needs class_token=True; use 'avg' or 'map' without one")
        if self.distilled and not self.class_token:
            raise ValueError("A distilled model (DeiT) needs class_token=True")
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        layers.check_outlier_free(**self.outlier_free_settings())
        method = self.token_method()
        self._validate_plugins(method)
        if method is not None:
            if self.scan:
                raise ValueError(f"token_reduction {method.name!r} needs scan=False: reduced blocks see different "
                                 "token counts, which nn.scan cannot stack")
            method.check(self.depth, self.num_prefix_tokens, self.class_token)
            method.plan(self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1], self.depth,
                        self.num_prefix_tokens)
        adaptation = self.adapt_method()
        if adaptation is not None:
            adaptation.check_model(self.depth, self.num_prefix_tokens, self.scan, method is not None)

    def _validate_plugins(self, method: Optional[tokens.Method]) -> None:
        if self.global_pool == "ggem":
            groups = self.ggem_groups or self.num_heads
            if groups < 1 or self.embed_dim % groups:
                raise ValueError(f"ggem_groups={self.ggem_groups} must divide embed_dim {self.embed_dim} "
                                 "(None: one group per head)")
            if self.ggem_p_init <= 0:
                raise ValueError(f"ggem_p_init must be > 0 (1: the mean), got {self.ggem_p_init}")
            if method is not None or self.distilled:
                raise ValueError("global_pool='ggem' needs token_reduction=None and distilled=False; valid "
                                 f"pools there: {list(self.GLOBAL_POOL_TYPES)}")
        if self.patch_embed_type == "poly" and self.pos_embed not in ("conv", "none"):
            raise ValueError(f"patch_embed_type='poly' needs a shift-equivariant position encoding; pos_embed "
                             f"{self.pos_embed!r} is absolute. Valid choices: ['conv', 'none']")
        if self.attention_mask == "gmm":
            if self.gmm_kernels < 1:
                raise ValueError(f"gmm_kernels must be >= 1, got {self.gmm_kernels}")
            if self.num_prefix_tokens or method is not None:
                raise ValueError("attention_mask='gmm' masks patch tokens by their grid offsets: it needs "
                                 "class_token=False, distilled=False and token_reduction=None (as the official "
                                 "GMM-ViT, which pools with global_pool='avg')")

    def outlier_free_settings(self) -> Dict[str, Any]:
        """Returns the outlier-free attention settings every block's attention takes."""
        return dict(softmax_kind=self.softmax_kind, clip_gamma=self.clip_gamma, clip_alpha=self.clip_alpha,
                    clip_zeta=self.clip_zeta, attn_gate=self.attn_gate, attn_gate_init=self.attn_gate_init)

    def adapt_method(self) -> Optional[adapt_lib.Method]:
        """Returns the adaptation method of `adapt`, or None."""
        return adapt_lib.parse(self.adapt)

    def adapt_info(self) -> adapt_lib.ModelInfo:
        """Returns what the adaptation hooks need to know of this model."""
        patch = layers.to_2tuple(self.patch_size)
        return adapt_lib.ModelInfo(self.num_prefix_tokens, self.depth, self.in_chans * patch[0] * patch[1],
                                   self.grid_size)

    def token_method(self) -> Optional[tokens.Method]:
        """Returns the token-reduction method (from `token_reduction` or the `tome` shorthand), or None."""
        return tokens.resolve(self.token_reduction, self.tome)

    @property
    def num_prefix_tokens(self) -> int:
        """Returns the number of tokens before the patches (cls, dist)."""
        return int(self.class_token) + int(self.distilled)

    @property
    def grid_size(self) -> Tuple[int, int]:
        """Returns the patch grid (h, w) at `img_size`."""
        img, patch = layers.to_2tuple(self.img_size), layers.to_2tuple(self.patch_size)
        return img[0] // patch[0], img[1] // patch[1]

    def _kernel_init(self) -> layers.Initializer:
        return layers.trunc_normal_init if self.weight_init == "timm" else layers.xavier_uniform_init

    def embed(self, images: jax.Array, train: bool, patch_indices: Optional[jax.Array] = None) -> jax.Array:
        """Returns the token sequence after patch embedding, prefix tokens and position embedding.

        `patch_indices` (B, K) keeps only those patches (after position embedding), prefix tokens first.
        """
        if self.patch_embed_type == "poly":
            x, grid = plugins.PolyPatchEmbed(layers.to_2tuple(self.patch_size), self.embed_dim,
                                             kernel_init=self._kernel_init(), dtype=self.dtype,
                                             param_dtype=self.param_dtype, name="patch_embed")(images)
        else:
            x, grid = layers.PatchEmbed(self.patch_size, self.embed_dim, use_bias=not self.pre_norm,
                                        kernel_init=self._kernel_init(), dtype=self.dtype,
                                        param_dtype=self.param_dtype, name="patch_embed")(images)
        if grid != self.grid_size:
            raise ValueError(f"Input grid {grid} does not match the model's {self.grid_size} "
                             f"(img_size={self.img_size}); resample position embeddings to change resolution")
        if self.pos_embed == "conv":
            # The patch tokens alone, on their grid, before any prefix token (the official PolyViT's order).
            x = plugins.PosConv(grid, dtype=self.dtype, param_dtype=self.param_dtype, name="pos_conv")(x)
        batch, _, channels = x.shape
        prefix = []
        token_init = layers.logical(nn.initializers.normal(1e-6 if self.weight_init == "timm" else 0.02),
                                    (None, None, "embed"))
        if self.class_token:
            cls = self.param("cls_token", token_init, (1, 1, channels), self.param_dtype)
            prefix.append(jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, channels)))
        if self.distilled:
            dist = self.param("dist_token", token_init, (1, 1, channels), self.param_dtype)
            prefix.append(jnp.broadcast_to(dist.astype(x.dtype), (batch, 1, channels)))
        num_pos = grid[0] * grid[1] + (0 if self.no_embed_class else len(prefix))
        if self.pos_embed == "learn":
            posemb = self.param("pos_embed", layers.logical(nn.initializers.normal(0.02), (None, None, "embed")),
                                (1, num_pos, channels), self.param_dtype).astype(x.dtype)
        elif self.pos_embed == "sincos2d":
            table = layers.posemb_sincos_2d(grid[0], grid[1], channels)
            if not self.no_embed_class and prefix:
                table = np.concatenate([np.zeros((len(prefix), channels), np.float32), table])
            posemb = jnp.asarray(table[None], x.dtype)
        else:  # "none", or "conv" (applied above)
            posemb = None
        if self.no_embed_class:
            x = x if posemb is None else x + posemb
            x = jnp.concatenate(prefix + [x], axis=1)
        else:
            x = jnp.concatenate(prefix + [x], axis=1)
            x = x if posemb is None else x + posemb
        if patch_indices is not None:
            num_prefix = len(prefix)
            kept = jnp.take_along_axis(x[:, num_prefix:], patch_indices[:, :, None].astype(jnp.int32), axis=1)
            x = jnp.concatenate([x[:, :num_prefix], kept], axis=1)
        x = nn.Dropout(self.pos_drop_rate)(x, deterministic=not train)
        if self.pre_norm:
            x = layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, name="norm_pre")(x)
        return layers.constrain(x, ("batch", "length", "embed"))

    def block_kwargs(self) -> Dict[str, Any]:
        """Returns the constructor settings shared by every block."""
        return dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim or int(self.embed_dim * self.mlp_ratio),
                    qkv_bias=self.qkv_bias, qk_norm=self.qk_norm, init_values=self.init_values,
                    proj_drop_rate=self.proj_drop_rate, attn_drop_rate=self.attn_drop_rate,
                    norm_eps=self.norm_eps, attention_impl=self.attention_impl, mlp_activation=self.mlp_activation,
                    kernel_init=self._kernel_init(), dtype=self.dtype, param_dtype=self.param_dtype,
                    adapt_method=self.adapt_method(), outlier_free=self.outlier_free_settings(),
                    **(dict(gmm_kernels=self.gmm_kernels, gmm_grid=self.grid_size)
                       if self.attention_mask == "gmm" else {}))

    def encode(self, x: jax.Array, train: bool, capture_attention: bool,
               adapt_carry: Any = None) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (tokens after all blocks, per-block aux) of an embedded sequence; `adapt_carry`: see vitjax.adapt."""
        block_cls = Block
        if self.remat:
            # self=0, x=1, train=2, capture_attention=3: the flags must stay Python bools.
            block_cls = nn.remat(Block, prevent_cse=not self.scan, static_argnums=(2, 3))
        drop_path_rates = np.linspace(0.0, self.drop_path_rate, self.depth)
        method = self.token_method()
        if method is not None:
            return self._encode_reduced(block_cls, method, x, train, capture_attention, drop_path_rates, adapt_carry)
        if self.scan:
            # The scanned block is one module, so its stochastic-depth rate is fed per layer as a scanned input.
            scanned = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={
                "params": True, "dropout": True, "drop_path": True},
                in_axes=(nn.broadcast, nn.broadcast, 0), length=self.depth,
                metadata_params={nn.PARTITION_NAME: "layers"})
            x, aux = scanned(name="blocks", **self.block_kwargs())(
                x, train, capture_attention, jnp.asarray(drop_path_rates, jnp.float32))
            return x, {"blocks": aux["tokens"], **({"attention": aux["attention"]} if capture_attention else {})}
        tokens, attention = [], []
        adaptation, info = self.adapt_method(), self.adapt_info()
        for index in range(self.depth):
            if adaptation is not None:
                x = adaptation.before_block(x, index, adapt_carry, info, train)
            x, aux = block_cls(drop_path_rate=float(drop_path_rates[index]), name=f"blocks_{index}",
                               **self.block_kwargs())(x, train, capture_attention)
            if adaptation is not None:
                x, adapt_carry = adaptation.after_block(x, index, adapt_carry, info, train)
            tokens.append(aux["tokens"])
            if capture_attention:
                attention.append(aux["attention"])
        adapt_aux = {} if adapt_carry is None else {"adapt_carry": adapt_carry}
        return x, {"blocks": tokens, **adapt_aux, **({"attention": attention} if capture_attention else {})}

    def _encode_reduced(self, block_cls, method: tokens.Method, x: jax.Array, train: bool,
                        capture_attention: bool, drop_path_rates: np.ndarray,
                        adapt_carry: Any = None) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns `encode`'s result with token reduction: each block's token count is a Python int of the plan."""
        if self.scan:
            raise ValueError(f"token_reduction {method.name!r} needs scan=False: reduced blocks see different "
                             "token counts")
        plan = method.plan(x.shape[1], self.depth, self.num_prefix_tokens)
        state = method.initial_state(x, self.num_prefix_tokens)
        block_tokens, attention, states = [], [], []
        adaptation, info = self.adapt_method(), self.adapt_info()
        for index in range(self.depth):
            if adaptation is not None:
                x = adaptation.before_block(x, index, adapt_carry, info, train)
            x, aux = block_cls(drop_path_rate=float(drop_path_rates[index]), name=f"blocks_{index}",
                               token_reducer=plan.blocks[index], **self.block_kwargs())(
                x, train, capture_attention, None, state)
            state = aux.pop("token_state", state)
            states.append(state)
            block_tokens.append(aux["tokens"])
            if capture_attention:
                attention.append(aux["attention"])
        summary = method.summarize(plan, tuple(states), tuple(block_tokens))
        summary["final_state"] = state
        return x, {"blocks": block_tokens, method.name: summary,
                   **({"attention": attention} if capture_attention else {})}

    def group_matcher(self) -> param_groups.Matcher:
        """Returns timm's group_matcher(coarse=False) over vitjax param paths (see param_groups)."""
        return dict(
            stem=r"^(?:cls_token|dist_token|reg_token|pos_embed|pos_conv|patch_embed|norm_pre)",
            blocks=[(r"^blocks_(\d+)", None), (r"^norm", (param_groups.MERGE_WITH_PREVIOUS,))])

    def layer_ids(self, params) -> Tuple[Dict[str, param_groups.LayerIds], int]:
        """Returns ({path: layer id}, num_layers) for layer-wise lr decay, numbered by `group_matcher`."""
        stacked = ("blocks",) if self.scan else ()
        return param_groups.layer_ids_from_matcher(params, self.group_matcher(), stacked=stacked)

    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns regexes of the param paths not weight-decayed, as timm's no_weight_decay."""
        return (r"^(?:pos_embed|cls_token|reg_token|dist_token)$",)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False, capture_attention: bool = False,
                 patch_indices: Optional[jax.Array] = None) -> Tuple[Any, Dict[str, Any]]:
        """Returns (logits, intermediates); `patch_indices` (B, K) encodes only those patches (MAE, FLIP)."""
        adaptation = self.adapt_method()
        if adaptation is None:
            return self._forward(images, train, capture_attention, patch_indices, None)
        with adaptation.intercept(train):
            return self._forward(images, train, capture_attention, patch_indices, adaptation)

    def _forward(self, images, train, capture_attention, patch_indices, adaptation):
        if self.attention_mask == "gmm" and patch_indices is not None:
            raise ValueError("attention_mask='gmm' needs every patch (its mask is over the full grid); "
                             "patch_indices must be None")
        x = self.embed(images, train, patch_indices)
        intermediates: Dict[str, Any] = {}
        carry = None
        if adaptation is not None:
            x, carry = adaptation.after_embed(x, self.adapt_info(), train)
        x, block_aux = self.encode(x, train, capture_attention, carry)
        carry = block_aux.pop("adapt_carry", carry)
        side = None
        if adaptation is not None:
            x = adaptation.after_blocks(x, self.adapt_info())
            side = adaptation.pooled(images, carry, self.adapt_info(), train)
        intermediates.update(block_aux)
        use_fc_norm = self.global_pool in ("avg", "ggem") if self.fc_norm is None else self.fc_norm
        if not use_fc_norm:
            x = layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, name="norm")(x)
        intermediates["encoded"] = x
        if self.distilled and side is None:
            return self._distilled_head(x, train, intermediates)
        method = self.token_method()
        final_state = block_aux[method.name]["final_state"] if method is not None else {}
        weights = None if method is None else method.pool_weights(final_state)
        if self.global_pool == "map":
            # timm pools the patch tokens only; after token reduction the method's key bias (ToMe: log size,
            # so a merged token weighs as the patches it holds; ATS: its padding mask) applies here too.
            pool_bias = None if method is None else method.pool_key_bias(final_state)
            pool_bias = None if pool_bias is None else pool_bias[:, self.num_prefix_tokens:]
            pooled = layers.MapHead(self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
                                    norm_eps=self.norm_eps, attention_impl=self.attention_impl, dtype=self.dtype,
                                    param_dtype=self.param_dtype, mlp_activation=self.mlp_activation,
                                    name="attn_pool")(
                x[:, self.num_prefix_tokens:], train, key_bias=pool_bias)
        elif self.global_pool == "ggem":
            pooled = plugins.GGeMPool(self.ggem_groups or self.num_heads, self.ggem_p_init,
                                      param_dtype=self.param_dtype, name="ggem")(x[:, self.num_prefix_tokens:])
        elif self.global_pool == "avg" and weights is not None:
            # A merged token stands for `size` patches, so it counts that many times in the mean.
            pooled = tokens.weighted_average(x[:, self.num_prefix_tokens:], weights[:, self.num_prefix_tokens:])
        else:
            pooled = layers.pool_tokens(x, self.global_pool, self.num_prefix_tokens)
        if use_fc_norm:
            pooled = layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, name="fc_norm")(pooled)
        if self.representation_size:
            pooled = nn.tanh(nn.Dense(self.representation_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                      kernel_init=layers.logical(self._kernel_init(), ("embed", "mlp")),
                                      name="pre_logits")(pooled))
        if side is not None:
            # The adaptation's features (HST) replace the pooled tokens; the pooling above still builds its
            # frozen params (norm, fc_norm), so base checkpoints load unchanged, and XLA drops its compute.
            pooled = side
        intermediates["pre_logits"] = pooled
        pooled = nn.Dropout(self.drop_rate)(pooled, deterministic=not train)
        if not self.num_classes:
            return pooled, intermediates
        logits = layers.classifier_head(self.num_classes, self.head_zero_init, self.dtype, self.param_dtype)(pooled)
        return logits, intermediates

    def _distilled_head(self, x: jax.Array, train: bool, intermediates: Dict[str, Any]):
        cls, dist = x[:, 0], x[:, 1]
        intermediates["pre_logits"] = (cls + dist) / 2
        if not self.num_classes:
            return intermediates["pre_logits"], intermediates
        cls = nn.Dropout(self.drop_rate)(cls, deterministic=not train)
        dist = nn.Dropout(self.drop_rate)(dist, deterministic=not train)
        logits = layers.classifier_head(self.num_classes, self.head_zero_init, self.dtype, self.param_dtype)(cls)
        dist_logits = layers.classifier_head(self.num_classes, self.head_zero_init, self.dtype, self.param_dtype,
                                             name="head_dist")(dist)
        if train:
            return (logits, dist_logits), intermediates
        return (logits + dist_logits) / 2, intermediates


# --- scanned <-> unscanned parameter layouts ------------------------------------------------------------------

def scan_params(params: Dict[str, Any], depth: int) -> Dict[str, Any]:
    """Returns `params` with `blocks_0..blocks_{depth-1}` stacked into one `blocks` tree (layer axis first)."""
    params = dict(params)
    missing = [f"blocks_{i}" for i in range(depth) if f"blocks_{i}" not in params]
    if missing:
        raise KeyError(f"Cannot scan: missing {missing}")
    per_block = [params.pop(f"blocks_{i}") for i in range(depth)]
    params["blocks"] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_block)
    return params


def unscan_params(params: Dict[str, Any]) -> Dict[str, Any]:
    """Returns `params` with the stacked `blocks` tree split into `blocks_0`, `blocks_1`, ..."""
    params = dict(params)
    if "blocks" not in params:
        raise KeyError("Cannot unscan: no 'blocks' entry")
    stacked = params.pop("blocks")
    depth = jax.tree.leaves(stacked)[0].shape[0]
    for index in range(depth):
        params[f"blocks_{index}"] = jax.tree.map(lambda leaf, i=index: leaf[i], stacked)
    return params


# --- registry: timm names (and big_vision-style variants through "vit") ------------------------------------------

def _vit(variant: str, **settings) -> Dict[str, Any]:
    return {**decode_variant(variant), **settings}


_TIMM_VITS = {
    "vit_tiny_patch16_224": _vit("Ti/16"),
    "vit_tiny_patch16_384": _vit("Ti/16", img_size=384),
    "vit_small_patch32_224": _vit("S/32"),
    "vit_small_patch16_224": _vit("S/16"),
    "vit_small_patch16_384": _vit("S/16", img_size=384),
    "vit_small_patch8_224": _vit("S/8"),
    "vit_medium_patch16_gap_256": _vit("M/16", img_size=256, class_token=False, global_pool="avg",
                                       qkv_bias=False, init_values=1e-6, fc_norm=False),
    "vit_base_patch32_224": _vit("B/32"),
    "vit_base_patch16_224": _vit("B/16"),
    "vit_base_patch16_384": _vit("B/16", img_size=384),
    "vit_base_patch8_224": _vit("B/8"),
    "vit_large_patch32_224": _vit("L/32"),
    "vit_large_patch16_224": _vit("L/16"),
    "vit_large_patch16_384": _vit("L/16", img_size=384),
    "vit_large_patch14_224": _vit("L/14"),
    "vit_huge_patch14_224": _vit("H/14"),
    "vit_giant_patch14_224": _vit("g/14"),
    "vit_base_patch16_gap_224": _vit("B/16", class_token=False, global_pool="avg"),
    "vit_base_patch16_siglip_224": _vit("B/16", class_token=False, global_pool="map"),
    "deit_tiny_patch16_224": _vit("Ti/16"),
    "deit_small_patch16_224": _vit("S/16"),
    "deit_base_patch16_224": _vit("B/16"),
    "deit_base_patch16_384": _vit("B/16", img_size=384),
    "deit_tiny_distilled_patch16_224": _vit("Ti/16", distilled=True),
    "deit_small_distilled_patch16_224": _vit("S/16", distilled=True),
    "deit_base_distilled_patch16_224": _vit("B/16", distilled=True),
    "deit_base_distilled_patch16_384": _vit("B/16", img_size=384, distilled=True),
}

# The preprocessing of each name's released weights (timm's default pretrained_cfg): the AugReg /
# big_vision ViTs take inputs in [-1, 1]; DeiT and DINO (vit_small_patch8_224) ImageNet statistics;
# fine-tunes at 384 are not cropped. "vit" (any variant, no weights of its own) takes the ViT default.
_VIT_PRETRAINED = dict(mean=IMAGENET_INCEPTION_MEAN, std=IMAGENET_INCEPTION_STD, crop_pct=0.9)
_DEIT_PRETRAINED = dict(crop_pct=0.9)
_PRETRAINED_CHANGES = {
    "vit_medium_patch16_gap_256": dict(crop_pct=0.95),
    "vit_small_patch8_224": dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD),
}
for _name, _settings in _TIMM_VITS.items():
    _pretrained = {**(_DEIT_PRETRAINED if _name.startswith("deit_") else _VIT_PRETRAINED),
                   **(dict(crop_pct=1.0) if _name.endswith("_384") else {}), **_PRETRAINED_CHANGES.get(_name, {})}
    register_model(_name, VisionTransformer, family="vit", pretrained_cfg=_pretrained, **_settings)


def _from_variant(variant: str = "B/16", **overrides) -> VisionTransformer:
    return VisionTransformer(**{**decode_variant(variant), **overrides})


register_model("vit", _from_variant, family="vit", module_class=VisionTransformer,
               extra_args=("variant",), pretrained_cfg=_VIT_PRETRAINED, variant="B/16")
