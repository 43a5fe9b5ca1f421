"""AdaLog's full pipeline: q/k/v operand quantization, RepQ-ViT's reparameterisation, the FPCS searches."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import models, quant
from vitjax.models import layers
from vitjax.quant import adalog, reparam, search


@pytest.fixture(scope="module")
def vit_setup():
    model = models.create("vit", variant="mu/4", num_classes=10, img_size=16, in_chans=1, embed_dim=32, depth=1,
                          num_heads=2, mlp_dim=64)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
    images = jax.random.normal(jax.random.key(1), (8, 16, 16, 1))
    return model, variables, images, jax.jit(model.apply)(variables, images)[0]


def relative_error(out, ref):
    return float(jnp.abs(out - ref).max() / jnp.abs(ref).max())


def test_operands_hook_default_off_and_applied():
    """Without the hook attention is unchanged; with it the hook's q, k, v are what attention uses."""
    rng = np.random.default_rng(0)
    query, key, value = (jnp.asarray(rng.normal(size=(2, 5, 2, 4)), jnp.float32) for _ in range(3))
    plain, _ = layers.multihead_attention(query, key, value)
    seen = []

    def hook(q, k, v):
        seen.append(q.shape)
        return q, k, jnp.zeros_like(v)

    with layers.attention_operands_hook(hook):
        zeroed, _ = layers.multihead_attention(query, key, value)
    assert seen == [(2, 5, 2, 4)] and float(jnp.abs(zeroed).max()) == 0.0
    again, _ = layers.multihead_attention(query, key, value)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(plain))
    assert float(jnp.abs(plain).max()) > 0.1


def official_reparam(ln_weight, ln_bias, weight, bias, scale, zero_point):
    """NumPy transcription of AdaLog's `AsymmetricallyChannelWiseBatchingQuantLinear.reparam_step1` (torch layout:
    weight (out, in))."""
    channel_min = -zero_point * scale
    target_channel_scale = np.mean(scale)
    target_channel_zero_point = np.round(np.mean(zero_point))
    target_channel_min = -target_channel_zero_point * target_channel_scale
    r = scale / target_channel_scale
    b = channel_min / r - target_channel_min
    new_weight = weight * r.reshape(1, -1)
    return (ln_weight / r, ln_bias / r - b, new_weight, bias + (new_weight @ b.reshape(-1, 1)).reshape(-1),
            target_channel_scale, target_channel_zero_point)


def test_reparam_equals_official_rule_and_per_channel_quantization():
    """The fold equals the official rule; quantizing the folded input with the target grid and running the
    folded layer gives the original layer on per-channel quantized inputs (exactly, up to fp32 rounding)."""
    rng = np.random.default_rng(0)
    width, out = 12, 7
    x_norm = rng.normal(size=(40, width)).astype(np.float32) * rng.uniform(0.2, 4.0, width).astype(np.float32)
    ln_scale, ln_bias = rng.normal(1.0, 0.2, width).astype(np.float32), rng.normal(0, 0.2, width).astype(np.float32)
    kernel, bias = rng.normal(0, 0.2, (width, out)).astype(np.float32), rng.normal(0, 0.1, out).astype(np.float32)
    normalized = (x_norm - x_norm.mean(-1, keepdims=True)) / x_norm.std(-1, keepdims=True)
    x = normalized * ln_scale + ln_bias
    bits = 4
    scale, zero = search.search_input_self(x, bits, channel_wise=True)
    assert scale.shape == (width,) and np.ptp(scale) > 0.1 * scale.mean()
    r, b, target_scale, target_zero = reparam.fold(scale, zero)
    norm, new_kernel, new_bias = reparam.apply_fold({"scale": ln_scale, "bias": ln_bias}, kernel, bias, r, b)
    expected = official_reparam(ln_scale, ln_bias, kernel.T, bias, scale, zero)
    for ours, theirs in zip((norm["scale"], norm["bias"], new_kernel.T, new_bias, target_scale, target_zero),
                            expected):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)
    # FP32: the folded norm and layer compute the same function
    folded_x = normalized * norm["scale"] + norm["bias"]
    np.testing.assert_allclose(folded_x @ new_kernel + new_bias, x @ kernel + bias, rtol=1e-5, atol=1e-5)
    # quantized: one per-tensor grid on the folded input == per-channel grids on the original
    per_tensor = search.quantize_array(folded_x, (target_scale, target_zero), bits) @ new_kernel + new_bias
    per_channel = search.quantize_array(x, (scale, zero), bits) @ kernel + bias
    np.testing.assert_allclose(per_tensor, per_channel, rtol=1e-5, atol=1e-5)
    naive = search.quantize_array(x, (target_scale, target_zero), bits) @ kernel + bias
    assert np.abs(naive - x @ kernel - bias).mean() > 1.5 * np.abs(per_channel - x @ kernel - bias).mean()


def test_adalog_pipeline_on_vit(vit_setup):
    """AdaLog W4A4: 2 post-LN inputs folded with the FP32 function kept to 1e-5; q/k/v per head on 16 levels."""
    model, variables, images, reference = vit_setup
    calibration = [images[:4]]
    qmodel, qvariables = quant.quantize(model, variables, calibration, method="adalog", w_bits=4, a_bits=4)
    assert qmodel.reparameterized == ("blocks_0/attn/qkv", "blocks_0/mlp/fc1")
    folded = {key: value for key, value in qvariables.items() if key != "quant"}
    assert relative_error(jax.jit(model.apply)(folded, images)[0], reference) <= 1e-5
    assert not np.allclose(folded["params"]["blocks_0"]["norm1"]["scale"],
                           nn.meta.unbox(variables["params"]["blocks_0"]["norm1"]["scale"]))
    grids = qvariables["quant"]["operands"]["blocks_0/attn/operands_0"]
    assert set(grids) == {"query", "key", "value"} and grids["query"]["scale"].shape == (1, 1, 2, 1)
    # a random-init model: only a loose bound (the digits experiment compares methods on trained models)
    assert relative_error(jax.jit(qmodel.apply)(qvariables, images)[0], reference) < 0.3
    # the operands really are quantized: each head of q takes at most 16 values
    specs = dict(qmodel.operands)
    spec = specs["blocks_0/attn/operands_0"]
    query = jax.random.normal(jax.random.key(2), (2, 17, 2, 16))
    quantized = np.asarray(spec.apply(query, grids["query"]))
    assert max(len(np.unique(quantized[:, :, h])) for h in range(2)) <= 16


def test_scores_search_beats_min_max_per_head():
    """The per-head q, k grids of the official search give a smaller q k^T error than per-head min-max grids."""
    rng = np.random.default_rng(1)
    query = rng.normal(0, 1, (4, 9, 2, 8)).astype(np.float32) * np.array([1.0, 5.0], np.float32)[None, None, :, None]
    query[0, 0, 0, 0] = 12.0   # an outlier
    key = rng.normal(0, 1, (4, 9, 2, 8)).astype(np.float32)
    (qs, qz), (ks, kz) = search.calibrate_scores(query, key, 4, rounds=1, steps=3)
    assert qs.shape == (2,) and qs[1] > 1.2 * qs[0]

    def per_head(scale, zero):
        return scale.reshape(1, 1, -1, 1), zero.reshape(1, 1, -1, 1)

    reference = np.einsum("bqhd,bkhd->bhqk", query, key)
    found = np.einsum("bqhd,bkhd->bhqk", search.quantize_array(query, per_head(qs, qz), 4),
                      search.quantize_array(key, per_head(ks, kz), 4))

    def minmax(x):
        low, high = x.min(axis=(0, 1, 3)), x.max(axis=(0, 1, 3))
        scale = (high - low) / 15
        return per_head(scale, np.round(-low / scale))

    plain = np.einsum("bqhd,bkhd->bhqk", search.quantize_array(query, minmax(query), 4),
                      search.quantize_array(key, minmax(key), 4))
    assert np.mean((found - reference) ** 2) < 0.8 * np.mean((plain - reference) ** 2)


def test_reparam_bad_input_fails_before_compile(vit_setup):
    model, variables, images, _ = vit_setup
    with pytest.raises(ValueError, match="method='adalog'"):
        quant.quantize(model, variables, [images], method="mse", reparam=True)
    with pytest.raises(ValueError, match="reparam must be"):
        quant.quantize(model, variables, [images], method="adalog", reparam="yes")
    levit = models.create("levit_128s", num_classes=10, img_size=64)
    shapes = jax.eval_shape(levit.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    levit_variables = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    with pytest.raises(ValueError, match="Valid choices for it: reparam=None or False"):
        quant.quantize(levit, levit_variables, [np.zeros((1, 64, 64, 3), np.float32)], method="adalog",
                       reparam=True, apply_kwargs=dict(train=False))


PIPELINE = os.path.join(os.path.dirname(__file__), "fixtures", "adalog", "pipeline.npz")


@pytest.fixture(scope="module")
def official():
    return dict(np.load(PIPELINE))


# FPCS's last refinements try scales ~1e-5 apart, many with exactly the same error; torch.topk breaks such ties in
# no documented order, so the official and our scales may differ by one of them: equal zero points, equal
# errors, scales within SCALE_RTOL.
SCALE_RTOL = 1e-4


def test_reparam_pipeline_equals_official(official):
    """Per-channel grids, the fold, the per-tensor search after it and the quantized output equal the official
    `AsymmetricallyChannelWiseBatchingQuantLinear` (W4A4, 3 search rounds, FPCS)."""
    x = official["ln_out"].reshape(-1, 12)
    scale, zero = search.search_input_self(x, 4, channel_wise=True)
    np.testing.assert_allclose(scale, official["channel_scale"], rtol=SCALE_RTOL)
    np.testing.assert_array_equal(zero, official["channel_zero"])
    r, b, _, _ = reparam.fold(official["channel_scale"], official["channel_zero"])
    norm, kernel, bias = reparam.apply_fold({"scale": official["ln_scale"], "bias": official["ln_bias"]},
                                            official["reparam_weight"].T, official["reparam_bias"], r, b)
    np.testing.assert_allclose(norm["scale"], official["folded_ln_scale"], rtol=1e-6)
    np.testing.assert_allclose(norm["bias"], official["folded_ln_bias"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(kernel.T, official["folded_weight"], rtol=1e-6)
    np.testing.assert_allclose(bias, official["folded_bias"], rtol=1e-5, atol=1e-7)
    folded_x = x / r - b
    weight_grid, input_grid = search.calibrate_linear(folded_x, kernel, bias, 4, 4)
    np.testing.assert_allclose(weight_grid[0], official["folded_w_scale"], rtol=SCALE_RTOL)
    np.testing.assert_array_equal(weight_grid[1], official["folded_w_zero"])
    np.testing.assert_allclose(input_grid[0], official["folded_a_scale"], rtol=SCALE_RTOL)
    np.testing.assert_array_equal(input_grid[1], official["folded_a_zero"])
    out = search.quantize_array(folded_x, input_grid, 4) @ search.quantize_array(kernel, weight_grid, 4) + bias
    expected = official["reparam_quant_out"].reshape(out.shape)
    assert np.abs(out - expected).max() <= SCALE_RTOL * np.abs(expected).max()
    reference = x @ official["reparam_weight"].T + official["reparam_bias"]
    ours, theirs = np.mean((out - reference) ** 2), np.mean((expected - reference) ** 2)
    assert abs(ours - theirs) <= 1e-5 * theirs


def test_attention_searches_equal_official(official):
    """The per-head q, k grids (q k^T), the post-softmax base with the per-head v grid (weights v) and the
    post-GELU layer's AdaLog scale and base and kernel grids equal the official searches (W4A4, 3 rounds)."""
    to_ours = lambda array: np.transpose(array, (0, 2, 1, 3))  # noqa: E731  (B, H, N, D) -> (B, N, H, D)
    (query_scale, query_zero), (key_scale, key_zero) = search.calibrate_scores(
        to_ours(official["query"]), to_ours(official["key"]), 4)
    np.testing.assert_allclose(query_scale, official["query_scale"], rtol=SCALE_RTOL)
    np.testing.assert_allclose(key_scale, official["key_scale"], rtol=SCALE_RTOL)
    np.testing.assert_array_equal(query_zero, official["query_zero"])
    np.testing.assert_array_equal(key_zero, official["key_zero"])
    q, (value_scale, value_zero) = search.calibrate_mixing(official["attention"], to_ours(official["value"]), 4, 4)
    assert q == int(official["softmax_q"])
    np.testing.assert_allclose(value_scale, official["value_scale"], rtol=SCALE_RTOL)
    np.testing.assert_array_equal(value_zero, official["value_zero"])
    x = official["post_gelu"].reshape(-1, 16)
    (w_scale, w_zero), (scale, q) = adalog.calibrate_post_gelu(x, official["gelu_weight"].T, official["gelu_bias"],
                                                               4, 4, search.SEARCH_ROUNDS)
    assert q == int(official["gelu_q"]) and abs(scale - float(official["gelu_scale"])) <= 1e-6 * scale
    np.testing.assert_allclose(w_scale, official["gelu_w_scale"], rtol=SCALE_RTOL)
    np.testing.assert_array_equal(w_zero, official["gelu_w_zero"])


def test_eight_bit_grids_reach_a_skewed_range_while_official_widths_keep_the_official_candidates():
    """Above the official 6 bits, zero points follow each candidate's range; at 3-6 bits they stay the official
    ones around 2^(b-1)."""
    rng = np.random.default_rng(0)
    # skewed (zero near one end: zero point ~ 23 of 255) and symmetric channels
    kernel = np.concatenate([rng.uniform(-0.1, 1.0, (64, 3)), rng.normal(0, 0.3, (64, 1))], 1).astype(np.float32)
    for kind in ("weight", "conv"):
        grid = search.search_weight_self(kernel, 8, kind)
        error = np.abs(search.quantize_array(kernel, grid, 8) - kernel).max(0)
        assert (error <= 1.01 * grid[0] / 2).all(), (kind, error, grid)       # within half a step everywhere
    for bits in (3, 4, 6):
        _, zero_points = search.percentile_candidates(kernel.T, bits, "weight")
        count = search.zero_point_count(bits, "weight")
        official = np.arange(2 ** (bits - 1) - count // 2, 2 ** (bits - 1) + count // 2)
        np.testing.assert_array_equal(np.unique(zero_points), official)
    assert search.zero_point_count(6, "conv") == 32 and search.zero_point_count(8, "conv") == 16
