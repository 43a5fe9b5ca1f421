"""Outlier-free attention (Bondarenko et al. 2023): clipped softmax and gated attention, their parity with the
official code (tests/fixtures/outlier_free), the Pallas kernel's clipped softmax (interpret mode), and the
outlier metrics (max infinity norm, kurtosis) of `vitjax.evaluate.outliers`.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import models
from vitjax.evaluate import evaluators, outliers
from vitjax.kernels import attention, dispatch
from vitjax.models import layers

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "outlier_free", "outlier_free.npz")
FP32_TOLERANCE = 1e-5
# Pallas (interpret) against XLA, both fp32: the kernel sums in another order (online softmax, tiles).
KERNEL_TOLERANCE = 2e-5
TINY_VIT = dict(variant="mu/4", num_classes=10, img_size=16, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                mlp_dim=64)

# fixture case -> layers.Attention settings (the official code's arguments in make_outlier_free_fixture.py)
CASES = {
    "vanilla": dict(),
    "clip_gamma": dict(softmax_kind="clipped", clip_gamma=-0.03),
    "clip_stretch": dict(softmax_kind="clipped", clip_gamma=-0.1, clip_zeta=1.1),
    "clip_alpha": dict(softmax_kind="clipped", clip_alpha=4.0),
    "gate_linear": dict(attn_gate="linear", attn_gate_init=0.25),
    "gate_mlp": dict(attn_gate="mlp"),
    "gate_linear_clip": dict(softmax_kind="clipped", clip_gamma=-0.03, attn_gate="linear"),
}


def _relative_error(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def _official_params(data, case, heads, head_dim, channels):
    """Returns layers.Attention params from the official module's weights, with an identity output projection."""
    def linear(name):
        return data[f"{case}/{name}.weight"], data[f"{case}/{name}.bias"]

    kernels, biases = zip(*(linear(name) for name in ("query", "key", "value")))
    params = {
        "qkv": {"kernel": np.stack([w.T.reshape(channels, heads, head_dim) for w in kernels], axis=1),
                "bias": np.stack([b.reshape(heads, head_dim) for b in biases])},
        # The official BertSelfAttention stops at the heads' context; its projection lives in BertSelfOutput.
        "proj": {"kernel": np.eye(channels, dtype=np.float32).reshape(heads, head_dim, channels),
                 "bias": np.zeros(channels, np.float32)},
    }
    if f"{case}/alpha.0.weight" in data:
        params["gate"] = {"kernel": np.stack([data[f"{case}/alpha.{h}.weight"][0] for h in range(heads)]),
                          "bias": np.stack([data[f"{case}/alpha.{h}.bias"][0] for h in range(heads)])}
    if f"{case}/alpha.0.0.weight" in data:
        params["gate"] = {
            "fc1_kernel": np.stack([data[f"{case}/alpha.{h}.0.weight"].T for h in range(heads)]),
            "fc1_bias": np.stack([data[f"{case}/alpha.{h}.0.bias"] for h in range(heads)]),
            "fc2_kernel": np.stack([data[f"{case}/alpha.{h}.2.weight"][0] for h in range(heads)]),
            "fc2_bias": np.stack([data[f"{case}/alpha.{h}.2.bias"][0] for h in range(heads)])}
    return jax.tree.map(jnp.asarray, params)


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_official_code(case):
    data = np.load(FIXTURE)
    x = data["x"]
    heads, channels = 2, x.shape[-1]
    module = layers.Attention(heads, **CASES[case])
    params = _official_params(data, case, heads, channels // heads, channels)
    out, _ = module.apply({"params": params}, jnp.asarray(x, jnp.float32))
    error = _relative_error(out, data[f"{case}/out64"])
    torch_fp32_error = _relative_error(data[f"{case}/out32"], data[f"{case}/out64"])
    assert error <= FP32_TOLERANCE, (case, error, torch_fp32_error)
    if f"{case}/dx64" in data:
        r = jnp.asarray(data["r"], jnp.float32)
        dx = jax.grad(lambda x: jnp.sum(module.apply({"params": params}, x)[0] * r))(jnp.asarray(x, jnp.float32))
        assert _relative_error(dx, data[f"{case}/dx64"]) <= FP32_TOLERANCE, case


def test_parity_fixture_exercises_the_clip_and_the_gate():
    """The fixture's cases differ from the vanilla one: the clip and the gates change the output."""
    data = np.load(FIXTURE)
    for case in ("clip_gamma", "clip_stretch", "clip_alpha"):
        # Same weights drawn in order, so the vanilla output with this case's weights is recomputable.
        heads, channels = 2, data["x"].shape[-1]
        params = _official_params(data, case, heads, channels // heads, channels)
        plain, _ = layers.Attention(heads).apply({"params": params}, jnp.asarray(data["x"], jnp.float32))
        assert _relative_error(plain, data[f"{case}/out64"]) > 1e-2, case


def _kernel_inputs(seed=0, batch=2, length=50, heads=2, head_dim=16):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(1.5 * rng.standard_normal((batch, length, heads, head_dim), np.float32)) for _ in range(3))
    bias = jnp.asarray(rng.standard_normal((1, heads, length, length), np.float32))
    key_bias = jnp.asarray(rng.standard_normal((batch, length), np.float32))
    cotangent = jnp.asarray(rng.standard_normal((batch, length, heads, head_dim), np.float32))
    return q, k, v, bias, key_bias, cotangent


@pytest.mark.parametrize("backend,softmax_clip", [("triton", (-0.03, 1.0)), ("mosaic", (-0.1, 1.1))])
def test_pallas_clipped_softmax_matches_xla_interpret(backend, softmax_clip):
    """Forward and all five gradients; 50 tokens in 16-wide tiles, so a partial key / query block is in play."""
    q, k, v, bias, key_bias, cotangent = _kernel_inputs()
    tiles = attention.BlockSizes(16, 16, 16, 16, 16, 16) if backend == "triton" else None

    def pallas(q, k, v, bias, key_bias):
        return attention.flash_attention(q, k, v, bias=bias, key_bias=key_bias, softmax_clip=softmax_clip,
                                         backend=backend, interpret=True, block_sizes=tiles)

    def xla(q, k, v, bias, key_bias):
        return attention.attention_reference(q, k, v, bias=bias, key_bias=key_bias, softmax_clip=softmax_clip)

    operands = (q, k, v, bias, key_bias)
    expected = xla(*operands)
    # The clip is active: some weights are clipped to exactly 0.
    _, weights = attention.attention_reference(q, k, v, bias=bias, key_bias=key_bias, softmax_clip=softmax_clip,
                                               return_weights=True)
    assert 0.2 < float(jnp.mean(weights == 0.0)) < 0.99
    assert _relative_error(pallas(*operands), expected) <= KERNEL_TOLERANCE
    loss = lambda fn: lambda *a: jnp.sum(fn(*a) * cotangent)  # noqa: E731
    grads = jax.grad(loss(pallas), argnums=range(5))(*operands)
    expected_grads = jax.grad(loss(xla), argnums=range(5))(*operands)
    for name, got, want in zip(("q", "k", "v", "bias", "key_bias"), grads, expected_grads):
        assert _relative_error(got, want) <= KERNEL_TOLERANCE, name


def test_cudnn_refuses_the_clipped_softmax_before_compile():
    q, k, v, *_ = _kernel_inputs(length=8)
    reason = dispatch.unsupported_reason("cudnn", q, k, v, softmax_clip=(-0.03, 1.0))
    assert "clipped softmax" in reason
    with pytest.raises(dispatch.UnsupportedAttentionError, match="clipped softmax"):
        dispatch.dot_product_attention(q, k, v, impl="cudnn", softmax_clip=(-0.03, 1.0))


def test_vit_gated_clipped_pallas_equals_xla_interpret():
    """Gating multiplies the kernel's output, so a gated, clipped ViT gives the same logits on both."""
    settings = dict(TINY_VIT, depth=1, softmax_kind="clipped", clip_gamma=-0.05, attn_gate="linear",
                    attn_gate_init=0.25)
    images = jnp.asarray(np.random.default_rng(1).standard_normal((2, 16, 16, 1), np.float32))
    xla_model = models.create("vit", **settings)
    pallas_model = models.create("vit", attention_impl="pallas", **settings)
    variables = xla_model.init(jax.random.key(0), images)
    assert variables["params"]["blocks_0"]["attn"]["gate"]["bias"].value.shape == (2,)
    gate_bias = variables["params"]["blocks_0"]["attn"]["gate"]["bias"].value
    np.testing.assert_allclose(gate_bias, np.log(0.25 / 0.75), rtol=1e-6)  # logit(attn_gate_init)

    # Gradients through the kernel are test_pallas_clipped_softmax_matches_xla_interpret's; here the forward.
    expected = xla_model.apply(variables, images)[0]
    assert _relative_error(pallas_model.apply(variables, images)[0], expected) <= KERNEL_TOLERANCE


def flax_unbox(tree):
    import flax
    return flax.linen.meta.unbox(tree)


def test_defaults_leave_the_vit_unchanged():
    images = jnp.asarray(np.random.default_rng(2).standard_normal((2, 16, 16, 1), np.float32))
    plain = models.create("vit", **TINY_VIT)
    variables = plain.init(jax.random.key(0), images)
    assert "gate" not in variables["params"]["blocks_0"]["attn"]
    explicit = models.create("vit", softmax_kind="softmax", attn_gate=None, **TINY_VIT)
    np.testing.assert_array_equal(plain.apply(variables, images)[0], explicit.apply(variables, images)[0])
    # gamma = 0, zeta = 1 is the plain softmax: the clipped path reduces to it.
    clipped = models.create("vit", softmax_kind="clipped", clip_gamma=0.0, **TINY_VIT)
    np.testing.assert_allclose(clipped.apply(variables, images)[0], plain.apply(variables, images)[0], atol=1e-6)


@pytest.mark.parametrize("settings,match", [
    (dict(softmax_kind="clip"), "valid choices"),
    (dict(softmax_kind="clipped"), "exactly one of clip_gamma"),
    (dict(softmax_kind="clipped", clip_gamma=-0.1, clip_alpha=4.0), "exactly one of clip_gamma"),
    (dict(softmax_kind="clipped", clip_gamma=0.1), "clip_gamma must be <= 0"),
    (dict(softmax_kind="clipped", clip_alpha=4.0, clip_zeta=0.9), "clip_zeta must be >= 1"),
    (dict(clip_gamma=-0.1), "need softmax_kind='clipped'"),
    (dict(attn_gate="conv"), "valid choices"),
    (dict(attn_gate="linear", attn_gate_init=1.0), "in \\(0, 1\\)"),
])
def test_bad_settings_fail_at_construction(settings, match):
    with pytest.raises(ValueError, match=match):
        models.create("vit", **TINY_VIT, **settings)


def test_kurtosis_and_inf_norm_against_numpy():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 5, 8)).astype(np.float32)
    x[1, 2, 4] = 40.0  # an outlier: heavy tail in example 1 only
    flat = x.reshape(3, -1).astype(np.float64)
    centred = flat - flat.mean(1, keepdims=True)
    expected = (centred ** 4).mean(1) / (flat.std(1, ddof=1) ** 4 + 1e-6)
    np.testing.assert_allclose(outliers.kurtosis(jnp.asarray(x)), expected, rtol=1e-5)
    np.testing.assert_allclose(outliers.inf_norm(jnp.asarray(x)), np.abs(flat).max(1), rtol=1e-6)
    assert expected[1] > 20 > expected[0]


def test_outlier_metrics_of_a_vit_and_an_injected_outlier():
    images = np.random.default_rng(4).standard_normal((6, 16, 16, 1)).astype(np.float32)
    model = models.create("vit", **TINY_VIT)
    variables = model.init(jax.random.key(0), images)
    metrics = outliers.outlier_metrics(model, variables, [images[:3], {"image": images[3:]}])
    assert metrics["num_examples"] == 6
    expected_names = {f"{place}{i}/{m}" for place in ("block", "ffn") for i in (0, 1) for m in ("inf_norm", "kurtosis")}
    assert set(k for k in metrics if "/" in k) == expected_names
    _, intermediates = model.apply(variables, images)
    last = np.asarray(intermediates["blocks"][1]).reshape(6, -1)
    assert metrics["block1/inf_norm"] == pytest.approx(np.abs(last).max(1).mean(), rel=1e-5)
    assert metrics["max_inf_norm"] == max(metrics["block0/inf_norm"], metrics["block1/inf_norm"])
    assert metrics["avg_kurtosis"] == pytest.approx(np.mean([v for k, v in metrics.items() if k.endswith("/kurtosis")]))
    # A huge bias on one channel of the last FFN output is an outlier in the residual stream.
    params = flax_unbox(variables["params"])
    params["blocks_1"]["mlp"]["fc2"]["bias"] = params["blocks_1"]["mlp"]["fc2"]["bias"].at[3].set(50.0)
    spiked = outliers.outlier_metrics(model, {"params": params}, [images[:3], images[3:]])
    assert spiked["max_inf_norm"] > 45 and spiked["max_ffn_inf_norm"] > 45
    assert spiked["block1/kurtosis"] > 5 * metrics["block1/kurtosis"]


def test_outliers_is_an_evaluator_kind():
    import ml_collections
    config = ml_collections.ConfigDict(dict(evals=dict(outliers=dict(kind="outliers", max_batches=2))))
    assert evaluators.validate_evals(config)["outliers"]["max_batches"] == 2
    config.evals.outliers.max_batches = 0
    with pytest.raises(ValueError, match="max_batches"):
        evaluators.validate_evals(config)
