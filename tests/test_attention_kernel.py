"""Fused Pallas attention (interpret mode on CPU) against the pure-jnp reference: outputs, lse, gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax.kernels import attention, dispatch

BF16_OUTPUT_TOLERANCE = 1.5e-2
BF16_GRADIENT_TOLERANCE = 2e-2
FP32_TOLERANCE = 1e-5


def _relative_error(actual, expected):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def _inputs(seed, *, batch, q_len, kv_len, heads, head_dim, dtype, bias_kind, key_bias_offset=0.0):
    """Returns (q, k, v, bias, key_bias, cotangent of out, cotangent of lse)."""
    # numpy draws: jax.random would compile a few ops per new shape, which dominates this file's time.
    rng = np.random.default_rng(seed)

    def normal(shape, dtype=np.float32):
        return jnp.asarray(rng.standard_normal(shape, np.float32).astype(dtype))

    dtype = jnp.dtype(dtype)
    q = normal((batch, q_len, heads, head_dim), dtype)
    k = normal((batch, kv_len, heads, head_dim), dtype)
    v = normal((batch, kv_len, heads, head_dim), dtype)
    bias = key_bias = None
    if bias_kind in ("full", "both"):  # Swin with shift mask: one bias per image and head.
        bias = normal((batch, heads, q_len, kv_len), dtype)
    if bias_kind == "shared":  # Swin's relative position bias: shared across the batch.
        bias = normal((1, heads, q_len, kv_len))
    if bias_kind in ("key", "both"):  # ToMe: log of each key's token size.
        sizes = rng.uniform(1.0, 8.0, (batch, kv_len)).astype(np.float32)
        key_bias = jnp.asarray(np.log(sizes) + np.float32(key_bias_offset))
    cotangent_out = normal((batch, q_len, heads, head_dim))
    cotangent_lse = normal((batch, heads, q_len))
    return q, k, v, bias, key_bias, cotangent_out, cotangent_lse


def _outputs_and_gradients(function, q, k, v, bias, key_bias, cotangent_out, cotangent_lse):
    """Returns (out, lse, gradients wrt q, k, v, bias, key_bias) of a random projection of out and lse."""
    def loss(q, k, v, bias, key_bias):
        out, lse = function(q, k, v, bias=bias, key_bias=key_bias, return_lse=True)
        value = jnp.sum(out.astype(jnp.float32) * cotangent_out) + jnp.sum(lse * cotangent_lse)
        return value, (out, lse)

    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))
    gradients, (out, lse) = grad_fn(q, k, v, bias, key_bias)
    return out, lse, gradients


def _reference(q, k, v, **kwargs):
    # fp32 everywhere: bf16 kernel results are judged against exact attention of the same inputs.
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    bias = kwargs.pop("bias")
    bias = None if bias is None else bias.astype(jnp.float32)
    return attention.attention_reference(q, k, v, bias=bias, **kwargs)


def _assert_matches(q, k, v, bias, key_bias, cotangent_out, cotangent_lse, *, backend, block_sizes=None):
    def kernel(q, k, v, **kwargs):
        return attention.flash_attention(q, k, v, backend=backend, block_sizes=block_sizes, interpret=True,
                                         **kwargs)

    args = (q, k, v, bias, key_bias, cotangent_out, cotangent_lse)
    out, lse, grads = _outputs_and_gradients(kernel, *args)
    ref_out, ref_lse, ref_grads = _outputs_and_gradients(_reference, *args)
    fp32 = q.dtype == jnp.float32
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == jnp.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    errors = {"out": _relative_error(out, ref_out), "lse": _relative_error(lse, ref_lse)}
    for name, grad, ref_grad, primal in zip(("dq", "dk", "dv", "dbias", "dkey_bias"), grads, ref_grads,
                                            (q, k, v, bias, key_bias)):
        if primal is None:
            assert grad is None
            continue
        assert grad.shape == primal.shape and grad.dtype == primal.dtype, name
        assert np.all(np.isfinite(np.asarray(grad, np.float32))), name
        errors[name] = _relative_error(grad, ref_grad)
    limits = {name: FP32_TOLERANCE if fp32 else
              (BF16_OUTPUT_TOLERANCE if name in ("out", "lse") else BF16_GRADIENT_TOLERANCE)
              for name in errors}
    failed = {name: error for name, error in errors.items() if not error <= limits[name]}
    assert not failed, f"relative errors over {limits}: {failed} (all: {errors})"


# (batch, heads, q_len, kv_len, head_dim, dtype, bias kind): every ViT length and head dim appears,
# each bias kind in fp32 and bf16, full and partial tiles, self- and cross-attention. Shapes stay
# tiny because interpret mode runs each grid step as XLA ops on the CPU.
TRITON_CASES = [
    (2, 2, 1, 1, 32, jnp.float32, None),
    (2, 2, 50, 50, 64, jnp.float32, "key"),
    (1, 2, 50, 50, 80, jnp.bfloat16, "full"),
    (2, 2, 197, 197, 64, jnp.float32, "both"),
    (1, 2, 197, 197, 32, jnp.bfloat16, "key"),
    (1, 2, 256, 256, 128, jnp.float32, "shared"),
    (1, 1, 577, 577, 64, jnp.float32, None),
    (1, 1, 577, 577, 80, jnp.bfloat16, "both"),
    (2, 2, 50, 197, 64, jnp.float32, "both"),
]


def _case_id(case):
    batch, heads, q_len, kv_len, head_dim, dtype, bias_kind = case
    return f"B{batch}H{heads}-N{q_len}x{kv_len}-D{head_dim}-{jnp.dtype(dtype).name}-{bias_kind or 'nobias'}"


@pytest.mark.parametrize("case", TRITON_CASES, ids=_case_id)
def test_triton_kernel_matches_reference(case):
    batch, heads, q_len, kv_len, head_dim, dtype, bias_kind = case
    inputs = _inputs(0, batch=batch, q_len=q_len, kv_len=kv_len, heads=heads, head_dim=head_dim,
                     dtype=dtype, bias_kind=bias_kind)
    _assert_matches(*inputs, backend="triton")


@pytest.mark.parametrize("case", [(1, 2, 50, 50, 80, jnp.float32, "both"),
                                  (2, 1, 197, 197, 128, jnp.bfloat16, "key")], ids=_case_id)
def test_mosaic_kernel_matches_reference(case):
    """The TPU flavour (transposed, zero-padded layout) computes the same thing in interpret mode."""
    batch, heads, q_len, kv_len, head_dim, dtype, bias_kind = case
    inputs = _inputs(1, batch=batch, q_len=q_len, kv_len=kv_len, heads=heads, head_dim=head_dim,
                     dtype=dtype, bias_kind=bias_kind)
    _assert_matches(*inputs, backend="mosaic")


def test_small_tiles_many_blocks_and_partial_tiles():
    """16-wide tiles give every kernel several full blocks plus a partial one (50 = 3 * 16 + 2)."""
    inputs = _inputs(2, batch=1, q_len=50, kv_len=50, heads=2, head_dim=32, dtype=jnp.float32,
                     bias_kind="both")
    tiles = attention.BlockSizes(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16, block_q_dq=16,
                                 block_k_dq=16)
    _assert_matches(*inputs, backend="triton", block_sizes=tiles)


def test_padded_query_rows_cannot_overflow_into_nan():
    """A key_bias of +100 would overflow exp() for padded query rows unless they are masked."""
    inputs = _inputs(3, batch=1, q_len=50, kv_len=50, heads=2, head_dim=32, dtype=jnp.float32,
                     bias_kind="key", key_bias_offset=100.0)
    _assert_matches(*inputs, backend="triton")


def test_broadcast_bias_shapes_get_gradients_in_their_own_shape():
    """A (H, Nq, Nk) bias and a (1, Nk) key_bias broadcast like the reference and fold their gradients."""
    q, k, v, _, _, cotangent_out, _ = _inputs(4, batch=2, q_len=20, kv_len=20, heads=2, head_dim=32,
                                              dtype=jnp.float32, bias_kind=None)
    rng = np.random.default_rng(5)
    bias = jnp.asarray(rng.standard_normal((2, 20, 20), np.float32))
    key_bias = jnp.asarray(rng.standard_normal((1, 20), np.float32))

    def loss(function):
        return lambda q, bias, key_bias: jnp.sum(function(q, k, v, bias=bias, key_bias=key_bias) * cotangent_out)

    kernel = jax.jit(jax.grad(loss(attention.flash_attention), argnums=(0, 1, 2)))(q, bias, key_bias)
    reference = jax.jit(jax.grad(loss(attention.attention_reference), argnums=(0, 1, 2)))(q, bias, key_bias)
    for grad, ref_grad in zip(kernel, reference):
        assert grad.shape == ref_grad.shape
        assert _relative_error(grad, ref_grad) <= FP32_TOLERANCE


def test_flash_attention_rejects_bad_arguments_with_the_valid_choices():
    q = jnp.zeros((1, 4, 2, 32))
    with pytest.raises(ValueError, match="valid choices"):
        attention.flash_attention(q, q, q, backend="cuda")
    with pytest.raises(ValueError, match="not broadcastable"):
        attention.flash_attention(q, q, q, bias=jnp.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="powers of two"):
        attention.flash_attention(q, q, q, block_sizes=attention.BlockSizes(block_q=48))


# ------------------------------------------------------------------------------------------------
# dispatch
# ------------------------------------------------------------------------------------------------

def _small_inputs(head_dim=32, dtype=jnp.float32):
    q, k, v, bias, key_bias, _, _ = _inputs(7, batch=2, q_len=9, kv_len=9, heads=2, head_dim=head_dim,
                                           dtype=dtype, bias_kind="both")
    return q, k, v, bias, key_bias


def test_unknown_impl_lists_the_valid_choices():
    q, k, v, _, _ = _small_inputs()
    with pytest.raises(ValueError, match="valid choices.*xla.*cudnn.*pallas.*auto"):
        dispatch.dot_product_attention(q, k, v, impl="flash")


def test_every_impl_matches_the_reference_on_cpu():
    q, k, v, bias, key_bias = _small_inputs()
    expected, expected_lse = attention.attention_reference(q, k, v, bias=bias, key_bias=key_bias, return_lse=True)
    for impl in dispatch.ATTENTION_IMPLS:
        out, lse = dispatch.dot_product_attention(q, k, v, bias=bias, key_bias=key_bias, impl=impl,
                                                  return_lse=True)
        assert _relative_error(out, expected) <= FP32_TOLERANCE, impl
        assert _relative_error(lse, expected_lse) <= FP32_TOLERANCE, impl


def test_fallbacks_are_logged_once_per_reason(monkeypatch):
    messages = []
    monkeypatch.setattr(dispatch.logging, "warning", lambda message, *args: messages.append(message % args))
    monkeypatch.setattr(dispatch, "_logged_reasons", set())
    q, k, v, bias, key_bias = _small_inputs()
    expected = attention.attention_reference(q, k, v, bias=bias, key_bias=key_bias)
    for _ in range(3):  # cuDNN on a CPU: falls back to xla, logged once.
        out = dispatch.dot_product_attention(q, k, v, bias=bias, key_bias=key_bias, impl="cudnn")
        np.testing.assert_array_equal(out, expected)
    assert len(messages) == 1 and "cudnn" in messages[0] and "xla" in messages[0], messages

    out, weights = dispatch.dot_product_attention(q, k, v, impl="pallas", return_weights=True)
    _, expected_weights = attention.attention_reference(q, k, v, return_weights=True)
    np.testing.assert_array_equal(weights, expected_weights)
    assert len(messages) == 2 and "weights" in messages[1]

    wide = jnp.zeros((1, 4, 1, 512))  # head dim 512: beyond the kernel, so pallas hands over to xla
    out = dispatch.dot_product_attention(wide, wide, wide, impl="pallas")
    assert out.shape == wide.shape and len(messages) == 3 and "head dim" in messages[2]


def test_auto_is_xla_on_cpu_and_cudnn_reasons_are_specific():
    q, k, v, bias, key_bias = _small_inputs()
    assert dispatch.choose_impl(q, k, v, bias=bias, key_bias=key_bias) == "xla"
    assert "GPU" in dispatch.cudnn_unsupported_reason(q, k, v)


# ------------------------------------------------------------------------------------------------
# In a model
# ------------------------------------------------------------------------------------------------

def test_tiny_vit_with_pallas_attention_equals_xla():
    """A 1-block ViT on 32x32 images (17 tokens: a partial tile) gives the same logits and gradients."""
    from vitjax import models

    overrides = dict(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, num_classes=10)
    images = jnp.asarray(np.random.default_rng(8).standard_normal((2, 32, 32, 3), np.float32))
    xla_model = models.create("vit_tiny_patch16_224", attention_impl="xla", **overrides)
    pallas_model = models.create("vit_tiny_patch16_224", attention_impl="pallas", **overrides)
    variables = xla_model.init(jax.random.PRNGKey(0), images, train=False)

    def logits_and_input_gradient(model):
        def loss(images):
            logits, _ = model.apply(variables, images, train=False)
            return jnp.sum(logits * jnp.arange(10.0)), logits
        return jax.jit(jax.grad(loss, has_aux=True))(images)

    xla_grad, xla_logits = logits_and_input_gradient(xla_model)
    pallas_grad, pallas_logits = logits_and_input_gradient(pallas_model)
    assert _relative_error(pallas_logits, xla_logits) <= FP32_TOLERANCE
    assert _relative_error(pallas_grad, xla_grad) <= FP32_TOLERANCE


@pytest.mark.parametrize("bias_shape", [None, "full", "heads", "key"])
def test_pallas_under_a_sharded_jit_runs_per_shard_and_matches_the_reference(bias_shape):
    """On a data=2 x fsdp=2 x model=2 mesh the kernel is shard_mapped over batch and heads; values and grads hold."""
    from flax import linen as nn
    from vitjax import config_utils, parallel
    mesh = parallel.create_mesh(dict(data=2, fsdp=2, model=2))
    rng = np.random.default_rng(11)
    q, k, v = (jnp.asarray(rng.standard_normal((8, 13, 4, 32), np.float32)) for _ in range(3))
    bias = {None: None, "full": (8, 4, 13, 13), "heads": (4, 13, 13), "key": None}[bias_shape]
    bias = None if bias is None else jnp.asarray(rng.standard_normal(bias, np.float32))
    key_bias = jnp.asarray(rng.standard_normal((8, 13), np.float32)) if bias_shape == "key" else None
    cotangent = jnp.asarray(rng.standard_normal(q.shape, np.float32))

    def loss(impl):
        def function(q, k, v, bias, key_bias):
            out = dispatch.dot_product_attention(q, k, v, bias=bias, key_bias=key_bias, impl=impl)
            return jnp.sum(out * cotangent)
        return jax.value_and_grad(function, argnums=(0, 1, 2, 3))

    rules = parallel.logical_rules(config_utils.DEFAULT_SHARDING_RULES)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None, "model", None))
    q, k, v = (jax.device_put(x, sharding) for x in (q, k, v))
    with parallel.use_mesh(mesh), nn.logical_axis_rules(rules):
        jitted = jax.jit(loss("pallas"))
        assert "shard_map" in str(jax.make_jaxpr(loss("pallas"))(q, k, v, bias, key_bias))
        value, grads = jitted(q, k, v, bias, key_bias)
    expected_value, expected_grads = jax.jit(loss("xla"))(q, k, v, bias, key_bias)
    assert _relative_error(value, expected_value) <= FP32_TOLERANCE
    for grad, expected in zip(grads, expected_grads):
        if expected is not None:
            assert grad.shape == expected.shape
            assert _relative_error(grad, expected) <= FP32_TOLERANCE
