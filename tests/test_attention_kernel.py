"""Fused Pallas attention against the pure-jnp reference: outputs, lse, gradients; the impl dispatch.

Every kernel run here is Pallas interpret mode on the CPU (the kernel body evaluated op by op), and the
tests that run one say `interpret` in their name; the `lowers_for_*` tests only build the Triton/Mosaic
lowering for its hardware. Nothing here compiles or runs the kernels on a GPU or TPU.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax.kernels import attention, common, dispatch

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


def _assert_matches(q, k, v, bias, key_bias, cotangent_out, cotangent_lse, *, backend, block_sizes=None,
                    softmax_clip=None):
    def kernel(q, k, v, **kwargs):
        return attention.flash_attention(q, k, v, backend=backend, block_sizes=block_sizes, interpret=True,
                                         softmax_clip=softmax_clip, **kwargs)

    def reference(q, k, v, **kwargs):
        return _reference(q, k, v, softmax_clip=softmax_clip, **kwargs)

    args = (q, k, v, bias, key_bias, cotangent_out, cotangent_lse)
    out, lse, grads = _outputs_and_gradients(kernel, *args)
    ref_out, ref_lse, ref_grads = _outputs_and_gradients(reference, *args)
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
def test_interpret_triton_kernel_matches_reference(case):
    batch, heads, q_len, kv_len, head_dim, dtype, bias_kind = case
    inputs = _inputs(0, batch=batch, q_len=q_len, kv_len=kv_len, heads=heads, head_dim=head_dim,
                     dtype=dtype, bias_kind=bias_kind)
    _assert_matches(*inputs, backend="triton")


@pytest.mark.parametrize("case", [(1, 2, 50, 50, 80, jnp.float32, "both"),
                                  (2, 1, 197, 197, 128, jnp.bfloat16, "key")], ids=_case_id)
def test_interpret_mosaic_kernel_matches_reference(case):
    """The TPU flavour (transposed, zero-padded layout) computes the same thing in interpret mode."""
    batch, heads, q_len, kv_len, head_dim, dtype, bias_kind = case
    inputs = _inputs(1, batch=batch, q_len=q_len, kv_len=kv_len, heads=heads, head_dim=head_dim,
                     dtype=dtype, bias_kind=bias_kind)
    _assert_matches(*inputs, backend="mosaic")


@pytest.mark.parametrize("softmax_clip", [None, (-0.1, 1.1)])
def test_interpret_mosaic_streams_many_key_and_query_blocks(softmax_clip):
    """300 queries x 200 keys in 128-wide tiles: the streamed grids accumulate over several blocks, the last
    partial, in both orders (dQ over keys, dK/dV over queries), and the clipped softmax's two passes."""
    inputs = _inputs(6, batch=1, q_len=300, kv_len=200, heads=2, head_dim=32, dtype=jnp.float32, bias_kind="both")
    tiles = attention.BlockSizes(block_q=128, block_k=128, block_q_dkv=256, block_k_dkv=128, block_q_dq=128,
                                 block_k_dq=256)
    _assert_matches(*inputs, backend="mosaic", block_sizes=tiles, softmax_clip=softmax_clip)


def test_interpret_small_tiles_many_blocks_and_partial_tiles():
    """16-wide tiles give every kernel several full blocks plus a partial one (50 = 3 * 16 + 2)."""
    inputs = _inputs(2, batch=1, q_len=50, kv_len=50, heads=2, head_dim=32, dtype=jnp.float32,
                     bias_kind="both")
    tiles = attention.BlockSizes(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16, block_q_dq=16,
                                 block_k_dq=16)
    _assert_matches(*inputs, backend="triton", block_sizes=tiles)


def test_interpret_padded_query_rows_cannot_overflow_into_nan():
    """A key_bias of +100 would overflow exp() for padded query rows unless they are masked."""
    inputs = _inputs(3, batch=1, q_len=50, kv_len=50, heads=2, head_dim=32, dtype=jnp.float32,
                     bias_kind="key", key_bias_offset=100.0)
    _assert_matches(*inputs, backend="triton")


def test_interpret_broadcast_bias_shapes_get_gradients_in_their_own_shape():
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


def test_interpret_every_impl_that_runs_on_cpu_matches_the_reference():
    q, k, v, bias, key_bias = _small_inputs()
    expected, expected_lse = attention.attention_reference(q, k, v, bias=bias, key_bias=key_bias, return_lse=True)
    for impl in ("xla", "pallas", "auto"):
        out, lse = dispatch.dot_product_attention(q, k, v, bias=bias, key_bias=key_bias, impl=impl,
                                                  return_lse=True)
        assert _relative_error(out, expected) <= FP32_TOLERANCE, impl
        assert _relative_error(lse, expected_lse) <= FP32_TOLERANCE, impl


@pytest.mark.parametrize("impl, operands, kwargs, reason", [
    ("cudnn", "small", {}, "cuDNN needs a CUDA GPU, the platform is cpu"),
    ("pallas", "wide", {}, "head dim 512 > 256"),
    ("pallas", "int", {}, "dtype int32 not supported"),
    ("pallas", "small", dict(return_weights=True), "attention weights were requested"),
    ("cudnn", "small", dict(return_weights=True), "attention weights were requested"),
])
def test_an_explicit_impl_that_cannot_run_raises_with_the_reason(impl, operands, kwargs, reason):
    q = {"small": _small_inputs()[0], "wide": jnp.zeros((1, 4, 1, 512)),
         "int": jnp.zeros((1, 4, 1, 32), jnp.int32)}[operands]
    assert dispatch.unsupported_reason(impl, q, q, q, **kwargs).startswith(reason)
    with pytest.raises(dispatch.UnsupportedAttentionError,
                       match=rf"attention_impl='{impl}' cannot run this call: {reason}.*Valid choices.*'auto'"):
        # Under jit: the refusal happens while tracing, before anything is compiled.
        jax.jit(lambda q: dispatch.dot_product_attention(q, q, q, impl=impl, **kwargs))(q)


def test_auto_falls_back_down_its_preferences_and_logs_each_reason_once(monkeypatch):
    messages = []
    monkeypatch.setattr(dispatch.logging, "warning", lambda message, *args: messages.append(message % args))
    monkeypatch.setattr(dispatch, "_logged_reasons", set())
    # The GPU ranking on the CPU: cuDNN cannot run here, so "auto" must walk past it.
    monkeypatch.setitem(dispatch.AUTO_PREFERENCES, "cpu", ((None, ("cudnn", "pallas", "xla")),))
    q, k, v, bias, key_bias = _small_inputs()
    expected = attention.attention_reference(q, k, v, bias=bias, key_bias=key_bias)
    for _ in range(3):
        out = dispatch.dot_product_attention(q, k, v, bias=bias, key_bias=key_bias, impl="auto")
        assert _relative_error(out, expected) <= FP32_TOLERANCE
    assert messages == ["attention_impl 'auto' runs 'pallas': not 'cudnn': cuDNN needs a CUDA GPU, the platform "
                        "is cpu"], messages
    assert dispatch.choose_impl(q, k, v, bias=bias, key_bias=key_bias) == "pallas"

    out, weights = dispatch.dot_product_attention(q, k, v, impl="auto", return_weights=True)
    _, expected_weights = attention.attention_reference(q, k, v, return_weights=True)
    np.testing.assert_array_equal(weights, expected_weights)
    assert len(messages) == 2 and "runs 'xla'" in messages[1] and "weights" in messages[1], messages

    wide = jnp.asarray(np.random.default_rng(0).standard_normal((1, 4, 1, 512), np.float32))
    out = dispatch.dot_product_attention(wide, wide, wide, impl="auto")
    np.testing.assert_array_equal(out, attention.attention_reference(wide, wide, wide))
    assert len(messages) == 3 and "runs 'xla'" in messages[2] and "head dim 512 > 256" in messages[2], messages


def test_cudnn_refusing_at_trace_time_raises_when_explicit_and_falls_back_under_auto(monkeypatch):
    """cuDNN checks more than we mirror; its own refusal is reported like ours (simulated: no GPU here)."""
    def refuse(*args):
        raise NotImplementedError("cuDNN 9.1 does not support this head dim")

    monkeypatch.setattr(dispatch, "cudnn_unsupported_reason", lambda *args, **kwargs: None)
    monkeypatch.setattr(dispatch, "_cudnn_attention", refuse)
    monkeypatch.setitem(dispatch.AUTO_PREFERENCES, "cpu", ((None, ("cudnn", "xla")),))
    monkeypatch.setattr(dispatch, "_logged_reasons", set())
    q, k, v, _, _ = _small_inputs()
    with pytest.raises(dispatch.UnsupportedAttentionError, match="cuDNN refused it: NotImplementedError: cuDNN 9.1"):
        dispatch.dot_product_attention(q, k, v, impl="cudnn")
    out = dispatch.dot_product_attention(q, k, v, impl="auto")
    np.testing.assert_array_equal(out, attention.attention_reference(q, k, v))
    assert any("cuDNN refused it" in message for message in dispatch._logged_reasons)


def test_auto_is_xla_on_cpu_and_cudnn_reasons_are_specific():
    q, k, v, bias, key_bias = _small_inputs()
    assert dispatch.choose_impl(q, k, v, bias=bias, key_bias=key_bias) == "xla"
    assert "GPU" in dispatch.cudnn_unsupported_reason(q, k, v)


def test_interpret_mode_is_logged_once_as_the_same_kernel_not_a_fallback(monkeypatch):
    messages = []
    monkeypatch.setattr(common.logging, "warning", lambda message, *args: messages.append(message % args))
    monkeypatch.setattr(common, "_logged_interpret", set())
    q, k, v, _, _ = _small_inputs()
    for _ in range(2):
        out = attention.flash_attention(q, k, v)  # interpret defaults to True on a CPU
        assert _relative_error(out, attention.attention_reference(q, k, v)) <= FP32_TOLERANCE
    assert len(messages) == 1, messages
    assert "interpret mode on cpu" in messages[0] and "not a fallback" in messages[0]


def test_a_lowering_for_the_wrong_accelerator_is_refused_with_the_valid_choices(monkeypatch):
    monkeypatch.setattr(common.jax, "default_backend", lambda: "gpu")
    assert common.resolve_backend("test kernel", None, None) == ("triton", False)
    with pytest.raises(ValueError, match=r"'mosaic' compiles for a TPU, the platform is gpu; valid choices here: "
                                         r"\['triton'\], or interpret=True"):
        common.resolve_backend("test kernel", "mosaic", False)


@pytest.mark.parametrize("platform, backend, custom_call", [("cuda", "triton", "triton"),
                                                            ("tpu", "mosaic", "tpu_custom_call")])
def test_forward_and_backward_lowers_for_cuda_and_tpu(platform, backend, custom_call):
    """Not a run: the Triton / Mosaic lowering of all three kernels is built for its hardware from this CPU."""
    shape = jax.ShapeDtypeStruct((2, 197, 12, 64), jnp.bfloat16)
    key_bias = jax.ShapeDtypeStruct((2, 197), jnp.float32)

    def forward_backward(q, k, v, key_bias):
        function = lambda q, k, v, key_bias: attention.flash_attention(  # noqa: E731
            q, k, v, key_bias=key_bias, backend=backend, interpret=False)
        out, pull_back = jax.vjp(function, q, k, v, key_bias)
        return out, pull_back(out)

    text = jax.jit(forward_backward).trace(shape, shape, shape, key_bias).lower(
        lowering_platforms=(platform,)).as_text()
    # One custom call per kernel: forward, dK/dV, dQ.
    calls = [line for line in text.splitlines() if "stablehlo.custom_call @" in line and custom_call in line]
    assert len(calls) == 3, [line[:120] for line in calls]


# ------------------------------------------------------------------------------------------------
# In a model
# ------------------------------------------------------------------------------------------------

def test_interpret_tiny_vit_with_pallas_attention_equals_xla():
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


def test_models_capture_weights_under_any_impl_but_attention_dropout_needs_one_that_forms_them():
    from vitjax.models import layers

    q, k, v, _, _ = _small_inputs()
    expected, expected_weights = attention.attention_reference(q, k, v, return_weights=True)
    for impl in dispatch.ATTENTION_IMPLS:  # capturing is an inspection: it runs "xla" whatever the impl
        out, aux = layers.multihead_attention(q, k, v, impl=impl, capture_attention=True)
        np.testing.assert_array_equal(aux["attention"], expected_weights)
        assert _relative_error(out, expected) <= FP32_TOLERANCE, impl
    rng = jax.random.PRNGKey(0)
    for impl in dispatch.FUSED_IMPLS:
        with pytest.raises(dispatch.UnsupportedAttentionError, match=rf"attention_impl='{impl}' cannot apply "
                                                                     r"attention dropout \(attn_drop_rate=0.1\)"):
            layers.multihead_attention(q, k, v, impl=impl, dropout_rate=0.1, dropout_rng=rng)
    dropped = {impl: layers.multihead_attention(q, k, v, impl=impl, dropout_rate=0.1, dropout_rng=rng)[0]
               for impl in ("xla", "auto")}
    np.testing.assert_array_equal(dropped["auto"], dropped["xla"])
    assert not np.allclose(dropped["xla"], expected)  # the dropout did drop something


@pytest.mark.parametrize("bias_shape", [None, "full", "heads", "key"])
def test_interpret_pallas_under_a_sharded_jit_runs_per_shard_and_matches_the_reference(bias_shape):
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
