"""Shared building blocks, written once and reused by every architecture family.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `kv`, `classes`) and activations are
constrained to (`batch`, `length`, `embed`), so a mesh rule set shards any model without touching it.
"""
import contextlib
import contextvars
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.kernels import ATTENTION_IMPLS, UnsupportedAttentionError, dot_product_attention
from vitjax.kernels.dispatch import FUSED_IMPLS

Dtype = Any
Initializer = Callable[..., jax.Array]

# timm's default init for linear layers (ViT, DeiT); big_vision and MAE use xavier_uniform instead.
trunc_normal_init = nn.initializers.truncated_normal(stddev=0.02)
xavier_uniform_init = nn.initializers.xavier_uniform()


def to_2tuple(value: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """Returns `value` as an (h, w) pair."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"Expected an int or a pair, got {value!r}")
        return int(value[0]), int(value[1])
    return int(value), int(value)


class _LogicallyPartitioned(nn.LogicallyPartitioned):
    """A LogicallyPartitioned that skips the sharding constraint while its value has another rank.

    nn.DenseGeneral initializes its kernel flat, unboxes it and reshapes it; under a global mesh the
    unbox would constrain the flat kernel with the full-rank names and fail (at init, and in every
    apply, where flax re-traces the init to check shapes).
    """

    def unbox(self, apply_constraint=True):
        return super().unbox(apply_constraint and np.ndim(self.value) == len(self.names))


def logical(init: Initializer, axes: Tuple[Optional[str], ...]) -> Initializer:
    """Returns `init` wrapped so the parameter carries the logical axis names `axes`."""

    def boxed_init(*args, **kwargs):
        return _LogicallyPartitioned(init(*args, **kwargs), tuple(axes))

    return boxed_init


def constrain(x: jax.Array, axes: Tuple[Optional[str], ...]) -> jax.Array:
    """Returns `x` with a logical sharding constraint (a no-op outside a mesh/rules context)."""
    return nn.with_logical_constraint(x, axes)


def gelu(x: jax.Array) -> jax.Array:
    """Returns the exact (erf) GELU, as PyTorch's nn.GELU() and timm use."""
    return nn.gelu(x, approximate=False)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """Returns the tanh-approximated GELU (PyTorch's GELU(approximate='tanh'); SigLIP's `gelu_pytorch_tanh`)."""
    return nn.gelu(x, approximate=True)


def quick_gelu(x: jax.Array) -> jax.Array:
    """Returns x * sigmoid(1.702 x), the GELU approximation OpenAI's CLIP weights were trained with."""
    return x * jax.nn.sigmoid(1.702 * x)


# MLP activations by name, so configs and registered variants can pick one.
ACTIVATIONS = {"gelu": gelu, "gelu_tanh": gelu_tanh, "quick_gelu": quick_gelu}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Returns the activation function called `name`; raises ValueError listing the valid names."""
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; valid choices: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class PatchEmbed(nn.Module):
    """Splits an NHWC image into patches with a strided conv; returns (tokens (B, N, C), grid (h, w))."""

    patch_size: Union[int, Tuple[int, int]] = 16
    embed_dim: int = 768
    use_bias: bool = True
    kernel_init: Initializer = trunc_normal_init
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> Tuple[jax.Array, Tuple[int, int]]:
        patch = to_2tuple(self.patch_size)
        x = nn.Conv(
            self.embed_dim, kernel_size=patch, strides=patch, padding="VALID", use_bias=self.use_bias,
            kernel_init=logical(self.kernel_init, (None, None, None, "embed")),
            bias_init=logical(nn.initializers.zeros, ("embed",)),
            dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(images)
        batch, grid_h, grid_w, channels = x.shape
        x = x.reshape(batch, grid_h * grid_w, channels)
        return constrain(x, ("batch", "length", "embed")), (grid_h, grid_w)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and a pluggable attention implementation.

    `attention_impl` picks the kernel (`vitjax.kernels.ATTENTION_IMPLS`). `capture_attention` runs the
    XLA path whatever the impl (only it materialises the weights); attention-weight dropout needs them
    too, so it works with "xla" and "auto" and raises with "cudnn"/"pallas" (see `multihead_attention`).
    """

    num_heads: int
    qkv_bias: bool = True
    qk_norm: bool = False
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    norm_eps: float = 1e-6
    attention_impl: str = "xla"
    kernel_init: Initializer = trunc_normal_init
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    proj_bias: bool = True  # MetaFormer's attention has no output-projection bias
    # Outlier-free attention (Bondarenko et al. 2023), off by default: see `softmax_clip_for` and `AttentionGate`.
    softmax_kind: str = "softmax"
    clip_gamma: Optional[float] = None
    clip_alpha: Optional[float] = None
    clip_zeta: float = 1.0
    attn_gate: Optional[str] = None
    attn_gate_init: float = 0.5

    @nn.compact
    def __call__(self, x: jax.Array, *, bias: Optional[jax.Array] = None,
                 key_bias: Optional[jax.Array] = None, train: bool = False,
                 capture_attention: bool = False, return_keys: bool = False,
                 return_qkv: bool = False, qkv_only: bool = False,
                 attention_weights: Optional[jax.Array] = None,
                 logit_multiplier: Optional[jax.Array] = None) -> Tuple[Optional[jax.Array], dict]:
        """Returns (output (B, N, C), aux): aux holds `attention` weights when captured, with
        `return_keys` `key_mean` (B, N, head_dim), the keys averaged over heads (ToMe's metric), and with
        `return_qkv` the per-head `query`, `key` and `value` (B, N, H, head_dim) (token reduction, `vitjax.tokens`).

        `qkv_only` returns (None, aux with query, key, value) without attending; `attention_weights`
        (B, H, N, N) replaces softmax(q k^T) (MCTF's one-step-ahead attention: weights merged with the tokens).
        `logit_multiplier` (H, N, N) multiplies the scaled logits before the softmax (the GMM mask, `plugins`).
        """
        channels = x.shape[-1]
        if channels % self.num_heads:
            raise ValueError(f"Width {channels} is not divisible by num_heads={self.num_heads}")
        head_dim = channels // self.num_heads
        qkv = nn.DenseGeneral(
            (3, self.num_heads, head_dim), use_bias=self.qkv_bias,
            kernel_init=logical(self.kernel_init, ("embed", None, "heads", "kv")),
            bias_init=logical(nn.initializers.zeros, (None, "heads", "kv")),
            dtype=self.dtype, param_dtype=self.param_dtype, name="qkv")(x)
        query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.qk_norm:
            query = nn.LayerNorm(self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                                 name="q_norm")(query)
            key = nn.LayerNorm(self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                               name="k_norm")(key)
        if qkv_only:
            return None, {"query": query, "key": key, "value": value}
        if attention_weights is None:
            out, aux = attend(self, query, key, value, bias=bias, key_bias=key_bias, train=train,
                              capture_attention=capture_attention, logit_multiplier=logit_multiplier)
        else:
            if self.softmax_kind != "softmax":
                raise ValueError(f"softmax_kind={self.softmax_kind!r} cannot take precomputed attention_weights "
                                 "(MCTF's merged attention); valid choice there: 'softmax'")
            aux = {"attention": attention_weights} if capture_attention else {}
            weights = attention_weights
            if train and self.attn_drop_rate > 0:
                keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.attn_drop_rate, weights.shape)
                weights = jnp.where(keep, weights / (1.0 - self.attn_drop_rate), 0.0)
            out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(value.dtype), value)
        if self.attn_gate is not None:
            # The gate multiplies each head's output, so it works whatever kernel computed it.
            gate = AttentionGate(self.attn_gate, self.attn_gate_init, dtype=self.dtype, param_dtype=self.param_dtype,
                                 name="gate")(x.reshape(x.shape[:-1] + (self.num_heads, head_dim)))
            out = out * gate[..., None].astype(out.dtype)
        if return_keys:
            aux["key_mean"] = key.mean(axis=2)
        if return_qkv:
            aux["query"], aux["key"], aux["value"] = query, key, value
        out = project_heads(self, out, channels, train=train, use_bias=self.proj_bias, kernel_init=self.kernel_init)
        return out, aux


def heads_dense(module: nn.Module, tokens: jax.Array, num_heads: int, head_dim: int, name: str,
                use_bias: bool = True) -> jax.Array:
    """Returns tokens (B, N, C) projected to heads (B, N, H, D) by a DenseGeneral `name` of `module`.

    Call it inside `module`'s compact __call__ (the Dense becomes its submodule); uses module.dtype / param_dtype.
    """
    return nn.DenseGeneral(
        (num_heads, head_dim), use_bias=use_bias,
        kernel_init=logical(trunc_normal_init, ("embed", "heads", "kv")),
        bias_init=logical(nn.initializers.zeros, ("heads", "kv")),
        dtype=module.dtype, param_dtype=module.param_dtype, name=name)(tokens)


SOFTMAX_KINDS = ("softmax", "clipped")
ATTENTION_GATES = (None, "linear", "mlp")


def check_outlier_free(softmax_kind: str = "softmax", clip_gamma: Optional[float] = None,
                       clip_alpha: Optional[float] = None, clip_zeta: float = 1.0, attn_gate: Optional[str] = None,
                       attn_gate_init: float = 0.5) -> None:
    """Raises ValueError naming the valid choices when the outlier-free attention settings are not usable."""
    if softmax_kind not in SOFTMAX_KINDS:
        raise ValueError(f"Unknown softmax_kind {softmax_kind!r}; valid choices: {list(SOFTMAX_KINDS)}")
    if attn_gate not in ATTENTION_GATES:
        raise ValueError(f"Unknown attn_gate {attn_gate!r}; valid choices: {list(ATTENTION_GATES)}")
    if attn_gate is not None and not 0.0 < attn_gate_init < 1.0:
        raise ValueError(f"attn_gate_init is the gate's initial probability, in (0, 1); got {attn_gate_init}")
    if softmax_kind == "softmax":
        if clip_gamma is not None or clip_alpha is not None:
            raise ValueError("clip_gamma / clip_alpha need softmax_kind='clipped'")
        return
    if (clip_gamma is None) == (clip_alpha is None):
        raise ValueError("softmax_kind='clipped' needs exactly one of clip_gamma (gamma <= 0) or clip_alpha "
                         f"(gamma = -alpha / sequence length, alpha >= 0); got clip_gamma={clip_gamma}, "
                         f"clip_alpha={clip_alpha}")
    if clip_gamma is not None and clip_gamma > 0:
        raise ValueError(f"clip_gamma must be <= 0 (the clipped softmax stretches below 0), got {clip_gamma}")
    if clip_alpha is not None and clip_alpha < 0:
        raise ValueError(f"clip_alpha must be >= 0, got {clip_alpha}")
    if clip_zeta < 1.0:
        raise ValueError(f"clip_zeta must be >= 1 (the clipped softmax stretches above 1), got {clip_zeta}")


def softmax_clip_for(module: nn.Module, kv_len: int) -> Optional[Tuple[float, float]]:
    """Returns (gamma, zeta) of `module`'s clipped softmax for `kv_len` keys, or None for the plain softmax.

    With clip_alpha, gamma = -alpha / kv_len, as the official code derives it from the sequence length.
    """
    check_outlier_free(module.softmax_kind, module.clip_gamma, module.clip_alpha, module.clip_zeta)
    if module.softmax_kind == "softmax":
        return None
    gamma = module.clip_gamma if module.clip_gamma is not None else -module.clip_alpha / kv_len
    return float(gamma), float(module.clip_zeta)


def _torch_linear_init(in_axis: int, out_axis: int, batch_axis=()) -> Initializer:
    """Returns PyTorch nn.Linear's default kernel init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (the official gate's)."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=in_axis, out_axis=out_axis,
                                            batch_axis=batch_axis)


def _torch_bias_init(fan_in: int) -> Initializer:
    """Returns PyTorch nn.Linear's default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


class AttentionGate(nn.Module):
    """The gated attention's gate: sigmoid(G_h(x_h)) per head and token, x_h the head's slice of the input.

    "linear": G_h is a Linear(head_dim -> 1) per head, its bias initialised to logit(init) so the gate
    starts near `init` (the paper's default); "mlp": Linear(head_dim -> head_dim // 4), ReLU, Linear(-> 1)
    per head (the official code's --attn_gate_mlp, default PyTorch init). Returns (B, N, H) gates.
    """

    kind: str = "linear"
    init: float = 0.5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, heads: jax.Array) -> jax.Array:
        num_heads, head_dim = heads.shape[-2:]
        x = heads.astype(self.dtype)
        if self.kind == "linear":
            kernel = self.param("kernel", logical(_torch_linear_init(-1, -2), ("heads", "kv")),
                                (num_heads, head_dim), self.param_dtype)
            bias_value = float(np.log(self.init / (1.0 - self.init)))
            bias = self.param("bias", logical(nn.initializers.constant(bias_value), ("heads",)),
                              (num_heads,), self.param_dtype)
            logit = jnp.einsum("bnhd,hd->bnh", x, kernel.astype(self.dtype)) + bias.astype(self.dtype)
        elif self.kind == "mlp":
            hidden = max(head_dim // 4, 1)
            fc1_kernel = self.param("fc1_kernel", logical(_torch_linear_init(-2, -1, (0,)), ("heads", "kv", None)),
                                    (num_heads, head_dim, hidden), self.param_dtype)
            fc1_bias = self.param("fc1_bias", logical(_torch_bias_init(head_dim), ("heads", None)),
                                  (num_heads, hidden), self.param_dtype)
            fc2_kernel = self.param("fc2_kernel", logical(_torch_linear_init(-1, -2, (0,)), ("heads", None)),
                                    (num_heads, hidden), self.param_dtype)
            fc2_bias = self.param("fc2_bias", logical(_torch_bias_init(hidden), ("heads",)),
                                  (num_heads,), self.param_dtype)
            hidden_act = jax.nn.relu(jnp.einsum("bnhd,hde->bnhe", x, fc1_kernel.astype(self.dtype))
                                     + fc1_bias.astype(self.dtype))
            logit = jnp.einsum("bnhe,he->bnh", hidden_act, fc2_kernel.astype(self.dtype)) + fc2_bias.astype(self.dtype)
        else:
            raise ValueError(f"Unknown attn_gate {self.kind!r}; valid choices: {list(ATTENTION_GATES[1:])}")
        return jax.nn.sigmoid(logit)


def attend(module: nn.Module, query, key, value, *, train: bool, bias=None, key_bias=None,
           capture_attention: bool = False, logit_multiplier=None):
    """Returns `multihead_attention` with `module`'s attention_impl, attention dropout (attn_drop_rate) and,
    when it has the fields (`Attention`), its clipped softmax."""
    dropping = train and module.attn_drop_rate > 0
    softmax_clip = softmax_clip_for(module, key.shape[1]) if hasattr(module, "softmax_kind") else None
    return multihead_attention(
        query, key, value, bias=bias, key_bias=key_bias, impl=module.attention_impl,
        dropout_rate=module.attn_drop_rate if train else 0.0,
        dropout_rng=module.make_rng("dropout") if dropping else None, capture_attention=capture_attention,
        softmax_clip=softmax_clip, logit_multiplier=logit_multiplier)


def project_heads(module: nn.Module, out: jax.Array, channels: int, *, train: bool, use_bias: bool = True,
                  kernel_init: Initializer = trunc_normal_init) -> jax.Array:
    """Returns heads (B, N, H, D) projected back to (B, N, channels) by `module`'s "proj", then proj dropout.

    Call it inside `module`'s compact __call__; uses module.proj_drop_rate, dtype and param_dtype.
    """
    out = nn.DenseGeneral(
        channels, axis=(-2, -1), use_bias=use_bias,
        kernel_init=logical(kernel_init, ("heads", "kv", "embed")),
        bias_init=logical(nn.initializers.zeros, ("embed",)),
        dtype=module.dtype, param_dtype=module.param_dtype, name="proj")(out)
    return nn.Dropout(module.proj_drop_rate)(out, deterministic=not train)


def check_attention_impl(impl: str) -> None:
    """Raises ValueError naming the valid choices when `impl` is not an attention implementation."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"Unknown attention_impl {impl!r}; valid choices: {list(ATTENTION_IMPLS)}")


def check_attention_dropout(impl: str, dropout_rate: float) -> None:
    """Raises when `impl` is a fused kernel asked for attention dropout, which needs the weights it never forms."""
    if dropout_rate > 0.0 and impl in FUSED_IMPLS:
        raise UnsupportedAttentionError(
            f"attention_impl={impl!r} cannot apply attention dropout (attn_drop_rate={dropout_rate}): it needs the "
            f"attention weights, which fused kernels never materialise. Valid choices: attention_impl 'xla' or "
            f"'auto' (runs 'xla' here), or attn_drop_rate=0.")


# Off (None) unless `attention_weights_hook` is active: vitjax.quant fake-quantizes post-softmax weights with it.
_attention_weights_hook: contextvars.ContextVar = contextvars.ContextVar("attention_weights_hook", default=None)


@contextlib.contextmanager
def attention_weights_hook(hook: Callable[[jax.Array, jax.Array], jax.Array]) -> Iterator[None]:
    """Yields with `hook(weights (B, H, Nq, Nk), value)` replacing the softmax weights of every `multihead_attention`.

    While active, attention runs the "xla" path (only it forms the weights); the hook runs at trace time.
    """
    token = _attention_weights_hook.set(hook)
    try:
        yield
    finally:
        _attention_weights_hook.reset(token)


# Off (None) unless `attention_operands_hook` is active: vitjax.quant fake-quantizes q, k and v with it.
_attention_operands_hook: contextvars.ContextVar = contextvars.ContextVar("attention_operands_hook", default=None)


@contextlib.contextmanager
def attention_operands_hook(hook: Callable[[jax.Array, jax.Array, jax.Array], Any]) -> Iterator[None]:
    """Yields with `hook(query, key, value)` (each (B, N, H, D)) replacing the operands of every `multihead_attention`.

    The hook runs at trace time and returns the new (query, key, value); any attention implementation takes them.
    """
    token = _attention_operands_hook.set(hook)
    try:
        yield
    finally:
        _attention_operands_hook.reset(token)


def multihead_attention(query, key, value, *, bias=None, key_bias=None, impl="xla",
                        dropout_rate=0.0, dropout_rng=None, capture_attention=False, softmax_clip=None,
                        logit_multiplier=None):
    """Returns (attention output (B, Nq, H, D), aux dict with `attention` (B, H, Nq, Nk) when captured).

    The one place every architecture computes softmax attention, so `impl` applies to all of them.
    Both paths below need the weights, which only "xla" materialises: capturing them (an inspection,
    e.g. for visualisation) always runs "xla"; attention dropout (training) passes `impl` on, so
    "auto" runs "xla" (logged once) and an explicit "cudnn"/"pallas" raises instead of silently not running.
    softmax_clip: (gamma, zeta) of the clipped softmax (Bondarenko et al. 2023), None for the plain one;
    the captured / hooked weights are the clipped ones.
    logit_multiplier: broadcastable to (B, H, Nq, Nk), multiplies the scaled logits q k^T / sqrt(D) before
    the softmax (and before `bias` is added). Being a product with q k^T it is no additive bias, so the
    logits are formed here and every impl receives them as its full `bias`, with a zero query.
    """
    aux = {}
    operands_hook = _attention_operands_hook.get()
    if operands_hook is not None:
        query, key, value = operands_hook(query, key, value)
    if logit_multiplier is not None:
        query, bias = _multiplied_logits(query, key, bias, logit_multiplier)
    weights_hook = _attention_weights_hook.get()
    if not capture_attention:
        check_attention_dropout(impl, dropout_rate)
    if dropout_rate > 0.0 or capture_attention or weights_hook is not None:
        weights_impl = "xla" if capture_attention or weights_hook is not None else impl
        _, weights = dot_product_attention(query, key, value, bias=bias, key_bias=key_bias,
                                           impl=weights_impl, return_weights=True, softmax_clip=softmax_clip)
        if weights_hook is not None:
            weights = weights_hook(weights, value)
        if capture_attention:
            aux["attention"] = weights
        if dropout_rate > 0.0:
            keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
            weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(value.dtype), value)
        return out, aux
    return dot_product_attention(query, key, value, bias=bias, key_bias=key_bias, impl=impl,
                                 softmax_clip=softmax_clip), aux


def _multiplied_logits(query, key, bias, multiplier):
    """Returns (zero query, bias): the bias holds multiplier * q k^T / sqrt(D) (+ the given bias), (B, H, Nq, Nk)."""
    compute = jnp.promote_types(query.dtype, jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", query.astype(compute), key.astype(compute),
                        precision=jax.lax.Precision.HIGHEST) * (query.shape[-1] ** -0.5)
    logits = logits * jnp.asarray(multiplier, compute)
    if bias is not None:
        logits = logits + jnp.asarray(bias, compute)
    return jnp.zeros_like(query), logits


class Mlp(nn.Module):
    """Two-layer MLP (fc1, activation, dropout, fc2, dropout); returns the same width as its input."""

    hidden_features: int
    out_features: Optional[int] = None
    activation: Callable[[jax.Array], jax.Array] = gelu
    drop_rate: float = 0.0
    use_bias: bool = True
    kernel_init: Initializer = trunc_normal_init
    bias_init: Initializer = nn.initializers.zeros
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        out_features = self.out_features or x.shape[-1]
        x = nn.Dense(self.hidden_features, use_bias=self.use_bias,
                     kernel_init=logical(self.kernel_init, ("embed", "mlp")),
                     bias_init=logical(self.bias_init, ("mlp",)),
                     dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x)
        x = self.activation(x)
        x = constrain(x, ("batch", "length", "mlp"))
        x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
        x = nn.Dense(out_features, use_bias=self.use_bias,
                     kernel_init=logical(self.kernel_init, ("mlp", "embed")),
                     bias_init=logical(self.bias_init, ("embed",)),
                     dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(x)
        return nn.Dropout(self.drop_rate)(x, deterministic=not train)


class DropPath(nn.Module):
    """Stochastic depth: zeroes whole samples of a residual branch with probability `rate` (rng `drop_path`)."""

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, rate: Optional[Any] = None) -> jax.Array:
        rate = self.rate if rate is None else rate
        if not train or (isinstance(rate, (int, float)) and rate == 0.0):
            return x
        keep_prob = 1.0 - rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        keep = jax.random.bernoulli(self.make_rng("drop_path"), keep_prob, shape)
        return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros_like(x))


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (CaiT); parameter `gamma` starts at `init_values`."""

    init_values: float = 1e-5
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param("gamma", logical(nn.initializers.constant(self.init_values), ("embed",)),
                           (x.shape[-1],), self.param_dtype)
        return x * gamma.astype(x.dtype)


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: Optional[str] = None) -> nn.LayerNorm:
    """Returns a LayerNorm whose scale and bias carry the `embed` logical axis."""
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
                        scale_init=logical(nn.initializers.ones, ("embed",)),
                        bias_init=logical(nn.initializers.zeros, ("embed",)))


def posemb_sincos_1d(positions: np.ndarray, dim: int, temperature: float = 10000.0) -> np.ndarray:
    """Returns (len(positions), dim) fixed sin-cos embeddings: [sin(p w_i), cos(p w_i)], w_i = T^(-2i/dim)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / temperature ** omega
    angles = np.asarray(positions, np.float64).reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def posemb_sincos_2d(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0,
                     style: str = "mae") -> np.ndarray:
    """Returns (grid_h * grid_w, dim) fixed 2-D sin-cos position embeddings, row-major over the grid.

    style "mae": MAE/MoCo-v3's table, [sin(x w), cos(x w), sin(y w), cos(y w)] with w_i = T^(-i/(dim/4)),
    where x is the column and y the row index.
    style "big_vision": big_vision's `posemb_sincos_2d`, w_i = T^(-i/(dim/4 - 1)).
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding width must be divisible by 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64),
                             indexing="ij")
    if style == "mae":
        return np.concatenate([posemb_sincos_1d(cols, dim // 2, temperature),
                               posemb_sincos_1d(rows, dim // 2, temperature)], axis=1).astype(np.float32)
    if style == "big_vision":
        omega = np.arange(dim // 4, dtype=np.float64) / (dim // 4 - 1)
        omega = 1.0 / temperature ** omega
        y = rows.reshape(-1)[:, None] * omega[None, :]
        x = cols.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)
    raise ValueError(f"Unknown sin-cos style {style!r}; valid choices: ('mae', 'big_vision')")


def resample_posemb(posemb: np.ndarray, new_grid: Tuple[int, int], num_prefix_tokens: int = 0,
                    old_grid: Optional[Tuple[int, int]] = None, method: str = "bicubic",
                    antialias: bool = True) -> np.ndarray:
    """Returns a (1, prefix + new_h * new_w, C) position embedding resized from its (1, prefix + h*w, C) grid.

    The prefix (cls/dist token) rows are kept; the grid is resized as an image exactly as timm's
    `resample_abs_pos_embed` does when loading a checkpoint (torch interpolate, bicubic, antialias=True).
    """
    posemb = np.asarray(posemb)
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    if old_grid is None:
        side = int(round(np.sqrt(grid.shape[1])))
        if side * side != grid.shape[1]:
            raise ValueError(f"Cannot infer a square grid from {grid.shape[1]} position embeddings; pass old_grid")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return posemb
    grid = grid.reshape(1, old_grid[0], old_grid[1], -1)
    grid = resize_like_torch(grid, new_grid, method, antialias)
    grid = grid.reshape(1, new_grid[0] * new_grid[1], -1)
    return np.concatenate([prefix, grid.astype(posemb.dtype)], axis=1)


def resize_like_torch(image: np.ndarray, size: Tuple[int, int], method: str = "bicubic",
                      antialias: bool = False) -> np.ndarray:
    """Returns NHWC `image` resized like torch.nn.functional.interpolate(align_corners=False, antialias=...)."""
    valid = ("bicubic", "bilinear")
    if method not in valid:
        raise ValueError(f"Unknown resize method {method!r}; valid choices: {list(valid)}")
    out = np.asarray(image, np.float64)
    for axis, new_len in ((1, size[0]), (2, size[1])):
        matrix = _interp_matrix(out.shape[axis], new_len, method, antialias)
        out = np.moveaxis(np.tensordot(matrix, np.moveaxis(out, axis, 0), axes=(1, 0)), 0, axis)
    return out


def _cubic(x: float, a: float) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


def _interp_matrix(in_len: int, out_len: int, method: str, antialias: bool) -> np.ndarray:
    """Returns the (out_len, in_len) matrix of torch's 1-D resampling (bicubic A=-0.75, or PIL's A=-0.5 with AA)."""
    matrix = np.zeros((out_len, in_len))
    scale = in_len / out_len
    if antialias:
        # torch's `_upsample_*_aa` (PIL's algorithm): a filter stretched by the scale when downsampling.
        taps = 4 if method == "bicubic" else 2
        support = taps / 2 * scale if scale >= 1.0 else taps / 2
        inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
        kernel = (lambda x: _cubic(x, -0.5)) if method == "bicubic" else (lambda x: max(0.0, 1.0 - abs(x)))
        for i in range(out_len):
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), in_len)
            weights = np.array([kernel((j - center + 0.5) * inv_scale) for j in range(lo, hi)])
            matrix[i, lo:hi] = weights / weights.sum()
        return matrix
    for i in range(out_len):
        src = (i + 0.5) * scale - 0.5
        if method == "bilinear":
            src = max(src, 0.0)
            lo = int(np.floor(src))
            frac = src - lo
            taps = {lo: 1.0 - frac}
            taps[min(lo + 1, in_len - 1)] = taps.get(min(lo + 1, in_len - 1), 0.0) + frac
        else:
            lo = int(np.floor(src))
            t = src - lo
            weights = (_cubic(t + 1, -0.75), _cubic(t, -0.75), _cubic(1 - t, -0.75), _cubic(2 - t, -0.75))
            taps = {}
            for offset, weight in zip(range(-1, 3), weights):
                index = min(max(lo + offset, 0), in_len - 1)
                taps[index] = taps.get(index, 0.0) + weight
        for index, weight in taps.items():
            matrix[i, index] += weight
    return matrix


class MapHead(nn.Module):
    """Multihead attention pooling with a learned latent query (timm's AttentionPoolLatent); returns (B, C)."""

    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    mlp_activation: str = "gelu"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, key_bias: Optional[jax.Array] = None) -> jax.Array:
        """`key_bias` (B, N) is added to every key's logit: log(size) makes a merged token count `size` times."""
        batch, _, channels = x.shape
        head_dim = channels // self.num_heads
        latent = self.param("latent", logical(nn.initializers.normal(channels ** -0.5), (None, None, "embed")),
                            (1, 1, channels), self.param_dtype)
        query = nn.DenseGeneral((self.num_heads, head_dim), use_bias=self.qkv_bias,
                                kernel_init=logical(trunc_normal_init, ("embed", "heads", "kv")),
                                dtype=self.dtype, param_dtype=self.param_dtype, name="q")(
            jnp.broadcast_to(latent.astype(x.dtype), (batch, 1, channels)))
        key_value = nn.DenseGeneral((2, self.num_heads, head_dim), use_bias=self.qkv_bias,
                                    kernel_init=logical(trunc_normal_init, ("embed", None, "heads", "kv")),
                                    dtype=self.dtype, param_dtype=self.param_dtype, name="kv")(x)
        out, _ = multihead_attention(query, key_value[:, :, 0], key_value[:, :, 1], key_bias=key_bias,
                                     impl=self.attention_impl)
        out = nn.DenseGeneral(channels, axis=(-2, -1),
                              kernel_init=logical(trunc_normal_init, ("heads", "kv", "embed")),
                              dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(out)
        y = layer_norm(self.norm_eps, self.dtype, self.param_dtype, name="norm")(out)
        out = out + Mlp(int(channels * self.mlp_ratio), activation=activation(self.mlp_activation),
                        dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(y, train)
        return out[:, 0]


POOLING_TYPES = ("token", "avg", "map", "")


def pool_tokens(x: jax.Array, pool: str, num_prefix_tokens: int) -> jax.Array:
    """Returns pooled features: the first token (`token`), the mean of non-prefix tokens (`avg`), or all (``)."""
    if pool == "token":
        return x[:, 0]
    if pool == "avg":
        return x[:, num_prefix_tokens:].mean(axis=1)
    if pool == "":
        return x
    raise ValueError(f"Unknown pooling {pool!r}; valid choices: {POOLING_TYPES}")


def head_init(zero_init: bool) -> Tuple[Initializer, Initializer]:
    """Returns (kernel_init, bias_init) of a classifier head: zeros (big_vision) or timm's trunc-normal."""
    if zero_init:
        return nn.initializers.zeros, nn.initializers.zeros
    return trunc_normal_init, nn.initializers.zeros


def classifier_head(num_classes: int, zero_init: bool, dtype: Dtype, param_dtype: Dtype,
                    name: str = "head") -> nn.Dense:
    """Returns the Dense classifier head with the `classes` logical axis."""
    kernel_init, bias_init = head_init(zero_init)
    return nn.Dense(num_classes, kernel_init=logical(kernel_init, ("embed", "classes")),
                    bias_init=logical(bias_init, ("classes",)),
                    dtype=dtype, param_dtype=param_dtype, name=name)


__all__ = [
    "ACTIVATIONS", "Attention", "BatchNorm", "DropPath", "LayerScale", "MapHead", "Mlp", "PatchEmbed", "POOLING_TYPES",
    "activation", "attention_operands_hook", "attention_weights_hook",
    "classifier_head", "constrain", "gelu", "gelu_tanh", "quick_gelu",
    "layer_norm", "logical",
    "multihead_attention", "pool_tokens",
    "posemb_sincos_1d", "posemb_sincos_2d", "resample_posemb", "resize_like_torch", "to_2tuple", "trunc_normal_init",
    "xavier_uniform_init",
]


# --- BatchNorm blocks (TinyViT, LeViT, CvT, ...) ----------------------------------------------------------------

# PyTorch's default init of nn.Linear / nn.Conv2d weights (kaiming_uniform with a=sqrt(5)):
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. variance 1 / (3 fan_in).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class BatchNorm(nn.Module):
    """BatchNorm over the last axis with PyTorch's semantics; returns the normalised input.

    Params `scale` and `bias`, statistics `mean` and `var` in the `batch_stats` collection (flax's
    nn.BatchNorm names, so checkpoints and converters are unchanged). As torch: `momentum` weighs the
    batch (running = (1 - momentum) * running + momentum * batch), the batch variance is two-pass and
    biased for normalising but unbiased (x n / (n - 1)) when folded into the running variance. flax's
    BatchNorm folds in the biased one, so its running variances drift from torch's by n / (n - 1) per
    update (a 2x2 map at batch 2: 8/7). Statistics are reduced in fp32. Under jit on a sharded batch the
    means are over the global batch, as torch's SyncBatchNorm.
    """

    use_running_average: bool
    momentum: float = 0.1
    eps: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    scale_init: float = 1.0
    dtype: Optional[Dtype] = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        running_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        inputs = x.astype(jnp.float32)
        if self.use_running_average:
            mean, var = running_mean.value, running_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(inputs, axes)
            var = jnp.mean(jnp.square(inputs - mean), axes)
            if not self.is_initializing():
                count = x.size // features
                unbiased = var * (count / max(count - 1, 1))
                running_mean.value = (1.0 - self.momentum) * running_mean.value + self.momentum * mean
                running_var.value = (1.0 - self.momentum) * running_var.value + self.momentum * unbiased
        y = (inputs - mean) * jax.lax.rsqrt(var + self.eps)
        if self.use_scale:
            y = y * self.param("scale", logical(nn.initializers.constant(self.scale_init), ("embed",)),
                               (features,), self.param_dtype).astype(jnp.float32)
        if self.use_bias:
            y = y + self.param("bias", logical(nn.initializers.zeros, ("embed",)), (features,),
                               self.param_dtype).astype(jnp.float32)
        return y.astype(self.dtype or x.dtype)


def batch_norm(train: bool, *, momentum: float = 0.1, eps: float = 1e-5, scale_init: float = 1.0,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               name: Optional[str] = None) -> BatchNorm:
    """Returns a `BatchNorm` (PyTorch's semantics) using batch statistics when `train`, else running ones."""
    return BatchNorm(use_running_average=not train, momentum=momentum, eps=eps, scale_init=scale_init,
                     dtype=dtype, param_dtype=param_dtype, name=name)


CHANNEL_NORM_TYPES = ("layernorm", "rmsnorm", "simplenorm", "groupnorm")


class ChannelNorm(nn.Module):
    """PyTorch-exact normalisation of NHWC maps or tokens: params `scale` (and `bias` with use_bias).

    `layernorm` and `rmsnorm` normalise over the channel (last) axis; `simplenorm` is timm's
    `x * rsqrt(var(x) + eps) * weight` with the *unbiased* variance and no centring; `groupnorm` is
    GroupNorm with one group (over every axis but the batch). Statistics are computed in fp32 with a
    two-pass variance, as PyTorch does: deep in a residual stream the mean can dwarf the spread.
    """

    norm_type: str = "layernorm"
    eps: float = 1e-6
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.norm_type not in CHANNEL_NORM_TYPES:
            raise ValueError(f"Unknown norm_type {self.norm_type!r}; valid choices: {CHANNEL_NORM_TYPES}")
        channels = x.shape[-1]
        axes = tuple(range(1, x.ndim)) if self.norm_type == "groupnorm" else (-1,)
        compute = x.astype(jnp.float32)
        if self.norm_type == "simplenorm":
            denominator = jnp.var(compute, axis=axes, keepdims=True, ddof=1)
        else:
            if self.norm_type != "rmsnorm":
                compute = compute - jnp.mean(compute, axis=axes, keepdims=True)
            denominator = jnp.mean(jnp.square(compute), axis=axes, keepdims=True)
        scale = self.param("scale", logical(nn.initializers.ones, ("embed",)), (channels,), self.param_dtype)
        out = compute * jax.lax.rsqrt(denominator + self.eps) * scale.astype(jnp.float32)
        if self.use_bias:
            bias = self.param("bias", logical(nn.initializers.zeros, ("embed",)), (channels,), self.param_dtype)
            out = out + bias.astype(jnp.float32)
        return out.astype(self.dtype)


class ConvBN(nn.Module):
    """Bias-free conv then BatchNorm (timm's ConvNorm); NHWC in, NHWC out; params `conv` and `bn`.

    `padding` is symmetric, as torch's Conv2d(padding=p); `bn_scale_init` 0 zero-inits a residual branch.
    """

    features: int
    kernel_size: int = 1
    strides: int = 1
    padding: int = 0
    groups: int = 1
    bn_scale_init: float = 1.0
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    kernel_init: Initializer = torch_default_init
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Conv(self.features, kernel_size=to_2tuple(self.kernel_size), strides=to_2tuple(self.strides),
                    padding=[(self.padding, self.padding)] * 2, feature_group_count=self.groups, use_bias=False,
                    kernel_init=logical(self.kernel_init, (None, None, None, "embed")),
                    dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
        return batch_norm(train, momentum=self.bn_momentum, eps=self.bn_eps, scale_init=self.bn_scale_init,
                          dtype=self.dtype, param_dtype=self.param_dtype, name="bn")(x)


__all__ += ["CHANNEL_NORM_TYPES", "ChannelNorm", "ConvBN", "attend", "batch_norm", "heads_dense", "project_heads",
            "torch_default_init"]


# --- windows (Swin, TinyViT, ...) -------------------------------------------------------------------------------

def window_partition(x: jax.Array, window: Tuple[int, int]) -> jax.Array:
    """Returns (B * num_windows, wh * ww, C) windows of an NHWC map whose sides are multiples of `window`.

    Windows are ordered (image, window row, window column), as timm's `window_partition`.
    """
    batch, height, width, channels = x.shape
    wh, ww = window
    x = x.reshape(batch, height // wh, wh, width // ww, ww, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, channels)


def window_reverse(windows: jax.Array, window: Tuple[int, int], height: int, width: int) -> jax.Array:
    """Returns the (B, height, width, C) map that `window_partition` split into `windows`."""
    wh, ww = window
    channels = windows.shape[-1]
    x = windows.reshape(-1, height // wh, width // ww, wh, ww, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


__all__ += ["window_partition", "window_reverse"]


# --- image resize inside a model (CrossViT's branch inputs) ------------------------------------------------------

def resize_images_like_torch(images: jax.Array, size: Tuple[int, int], method: str = "bicubic") -> jax.Array:
    """Returns NHWC `images` resized as torch's F.interpolate(size=size, align_corners=False) does, under jit.

    torch computes each source coordinate in float32 (`scale * (i + 0.5) - 0.5`, one rounding as with FMA) and
    the tap weights from it; `_torch_runtime_interp_matrix` repeats that arithmetic so the weights match to
    float32 rounding (measured max relative error of outputs ~5e-7; float64 weights would differ by ~1e-5).
    """
    valid = ("bicubic", "bilinear")
    if method not in valid:
        raise ValueError(f"Unknown resize method {method!r}; valid choices: {list(valid)}")
    height, width = images.shape[1:3]
    if (height, width) == tuple(size):
        return images
    rows = jnp.asarray(_torch_runtime_interp_matrix(height, size[0], method), jnp.float32)
    cols = jnp.asarray(_torch_runtime_interp_matrix(width, size[1], method), jnp.float32)
    out = jnp.einsum("oh,bhwc->bowc", rows, images.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    out = jnp.einsum("pw,bowc->bopc", cols, out, precision=jax.lax.Precision.HIGHEST)
    return out.astype(images.dtype)


def _torch_runtime_interp_matrix(in_len: int, out_len: int, method: str) -> np.ndarray:
    """Returns the (out_len, in_len) float32 weights of torch's 1-D bicubic (A=-0.75) / bilinear upsample kernel."""
    f32 = np.float32
    scale = float(f32(in_len) / f32(out_len))
    matrix = np.zeros((out_len, in_len), np.float64)
    for i in range(out_len):
        src = float(f32(scale * (i + 0.5) - 0.5))
        if method == "bilinear":
            src = max(src, 0.0)
            lo = int(np.floor(src))
            frac = float(f32(min(max(src - lo, 0.0), 1.0)))
            hi = lo + 1 if lo < in_len - 1 else lo
            matrix[i, lo] += float(f32(1.0 - frac))
            matrix[i, hi] += frac
            continue
        lo = min(int(np.floor(src)), in_len - 1)
        t = float(f32(min(max(src - lo, 0.0), 1.0)))
        weights = (_cubic(t + 1, -0.75), _cubic(t, -0.75), _cubic(1 - t, -0.75), _cubic(2 - t, -0.75))
        for offset, weight in enumerate(weights):
            matrix[i, min(max(lo - 1 + offset, 0), in_len - 1)] += float(f32(weight))
    return matrix


__all__ += ["resize_images_like_torch"]
