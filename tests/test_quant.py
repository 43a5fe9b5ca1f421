"""vitjax.quant: fake quantizers, straight-through gradients, quantize() on registered models, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import models, quant
from vitjax.quant import calibrate, quantizers


def tiny_vit():
    return models.create("vit", variant="mu/4", num_classes=10, img_size=16, in_chans=1, embed_dim=32, depth=2,
                         num_heads=2, mlp_dim=64)


@pytest.fixture(scope="module")
def vit_setup():
    model = tiny_vit()
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
    images = jax.random.normal(jax.random.key(1), (8, 16, 16, 1))
    return model, variables, images, jax.jit(model.apply)(variables, images)[0]


def relative_error(out, ref):
    return float(jnp.abs(out - ref).max() / jnp.abs(ref).max())


def test_uniform_grid_and_rules():
    """Values land on the grid within half a step; per-channel ranges; MSE and percentile clip outliers."""
    x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    low, high = quantizers.uniform_range(x, 4, "minmax", keep_axes=(-1,))
    assert low.shape == (1, 8) and np.allclose(low[0], x.min(0)) and np.allclose(high[0], x.max(0))
    scale, zero = quantizers.uniform_params(low, high, 4)
    out = np.asarray(quantizers.uniform_quantize(jnp.asarray(x), scale, zero, 4))
    assert np.abs(out - x).max() <= scale.max() / 2 + 1e-6
    assert max(len(np.unique(out[:, c])) for c in range(8)) <= 16
    # a few outliers: the MSE-optimal and percentile grids clip them and have less error than min-max's
    tails = np.random.default_rng(1).normal(size=20000).astype(np.float32)
    tails[:5] = [50.0, -50.0, 40.0, -45.0, 30.0]
    errors = {}
    for rule in quantizers.UNIFORM_RULES:
        grid = quantizers.uniform_params(*quantizers.uniform_range(tails, 4, rule), 4)
        quantized = np.asarray(quantizers.uniform_quantize(jnp.asarray(tails), *grid, 4))
        errors[rule] = float(np.mean((quantized - tails) ** 2))
    assert errors["mse"] < 0.7 * errors["minmax"] and errors["percentile"] < 0.7 * errors["minmax"], errors
    assert errors["mse"] <= errors["percentile"] * 1.0001
    # the jax path (dynamic quantization) finds a grid as good as the numpy one (calibration); near-ties may differ
    grid = quantizers.uniform_params(*quantizers.uniform_range(jnp.asarray(tails), 4, "mse"), 4)
    jax_error = float(jnp.mean((quantizers.uniform_quantize(jnp.asarray(tails), *grid, 4) - tails) ** 2))
    assert abs(jax_error - errors["mse"]) <= 1e-3 * errors["mse"]


def test_dynamic_per_token_keeps_small_tokens():
    """Per-token grids: a token of tiny values keeps its precision, where a per-tensor grid zeroes it."""
    x = jnp.stack([jnp.linspace(-100.0, 100.0, 16), jnp.linspace(-0.01, 0.01, 16)])
    per_token = quantizers.dynamic_uniform(x, 4)
    assert float(jnp.abs(per_token[1] - x[1]).max()) < 0.01 / 15 + 1e-7
    grid = quantizers.uniform_params(*quantizers.uniform_range(np.asarray(x), 4, "minmax"), 4)
    assert float(jnp.abs(quantizers.uniform_quantize(x, *grid, 4)[1]).max()) == 0.0


def test_straight_through_gradients():
    """d quantize / dx is 1 inside the range and 0 outside (uniform); about 1 for log2 and AdaLog."""
    x = jnp.array([-3.0, -0.5, 0.2, 0.4, 5.0])  # the grid spans [-1.0, 0.5]
    grad = jax.grad(lambda v: quantizers.uniform_quantize(v, 0.1, 10.0, 4).sum())(x)
    np.testing.assert_array_equal(np.asarray(grad), [0.0, 1.0, 1.0, 1.0, 0.0])
    probs = jnp.array([0.9, 0.3, 0.05, 0.01])
    for fn in (lambda v: quantizers.log2_quantize(v, 1.0, 4), lambda v: quantizers.adalog_quantize(v, 1.0, 23, 4)):
        grad = np.asarray(jax.grad(lambda v: fn(v).sum())(probs))
        assert np.all(grad > 0.5) and np.all(grad < 2.0), grad


def test_quantized_vit_accuracy_and_ste(vit_setup):
    """W8A8 is within 2% (uniform) / 20% (log grids) of fp32; W4A4 is further; gradients reach every kernel (QAT)."""
    model, variables, images, reference = vit_setup
    calibration = [images[:4], {"image": images[4:]}]
    errors = {}
    for method in ("mse", "adalog"):
        qmodel, qvariables = quant.quantize(model, variables, calibration, method=method, w_bits=8, a_bits=8)
        errors[method] = relative_error(jax.jit(qmodel.apply)(qvariables, images)[0], reference)
    assert errors["mse"] < 0.02 and errors["adalog"] < 0.2, errors
    qmodel, qvariables = quant.quantize(model, variables, calibration, method="minmax", w_bits=4, a_bits=4)
    assert relative_error(jax.jit(qmodel.apply)(qvariables, images)[0], reference) > 3 * errors["mse"]
    # the plan: 2 blocks x (qkv, proj, fc1, fc2) + patch embed + head; 2 softmax points
    assert len(qmodel.layers) == 10 and [name for name, _ in qmodel.softmax] == [
        "blocks_0/attn/softmax_0", "blocks_1/attn/softmax_0"]
    assert [p.name for p in qmodel.layers if p.post_gelu] == ["blocks_0/mlp/fc2", "blocks_1/mlp/fc2"]

    def loss(params):
        logits, _ = qmodel.apply({**qvariables, "params": params}, images)
        return jnp.mean(jax.nn.log_softmax(logits)[:, 0])

    grads = jax.jit(jax.grad(loss))(qvariables["params"])
    kernels = [grads["blocks_0"]["attn"]["qkv"]["kernel"], grads["blocks_1"]["mlp"]["fc2"]["kernel"],
               grads["patch_embed"]["proj"]["kernel"], grads["head"]["kernel"]]
    assert all(np.isfinite(k).all() and float(jnp.abs(k).max()) > 0 for k in kernels)


def test_adalog_softmax_search_finds_the_best_base():
    """The searched q has the least output error of the candidates; on flat attention AdaLog beats uniform at 3 bits."""
    rng = np.random.default_rng(0)
    attention = np.asarray(jax.nn.softmax(rng.normal(0, 1.0, (4, 2, 17, 17)).astype(np.float32), axis=-1))
    value = rng.normal(size=(4, 17, 2, 8)).astype(np.float32)
    reference = np.einsum("bhqk,bkhd->bhqd", attention, value)
    mse = lambda a: float(np.mean((np.einsum("bhqk,bkhd->bhqd", np.asarray(a), value) - reference) ** 2))  # noqa: E731
    q = quantizers.search_adalog_softmax(attention, value, 3)
    best = mse(quantizers.adalog_quantize(jnp.asarray(attention), 1.0, q, 3))
    assert all(best <= mse(quantizers.adalog_quantize(jnp.asarray(attention), 1.0, other, 3)) for other in (10, 37, 80))
    grid = quantizers.uniform_params(*quantizers.uniform_range(attention, 3, "minmax"), 3)
    assert best < 0.5 * mse(quantizers.uniform_quantize(jnp.asarray(attention), *grid, 3))


def test_swin_and_token_granularity():
    """Any registered model: a Swin quantizes (window attention found), per-token activations run."""
    model = models.create("swin_tiny_patch4_window7_224", img_size=32, embed_dim=16, depths=(2, 1),
                          num_heads=(1, 2), window_size=4, num_classes=10)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    variables = jax.jit(model.init)(jax.random.key(1), images)
    reference = jax.jit(model.apply)(variables, images)[0]
    qmodel, qvariables = quant.quantize(model, variables, [images], method="mse", w_bits=8, a_bits=8,
                                        act_granularity="token")
    assert len(qmodel.softmax) == 3 and all(spec.quantizer == "dynamic" for _, spec in qmodel.inputs)
    assert relative_error(jax.jit(qmodel.apply)(qvariables, images)[0], reference) < 0.03


def test_bad_input_fails_before_compile(vit_setup):
    """Bit widths outside 2..8, no calibration batches, unknown methods, log methods without softmax attention."""
    model, variables, images, _ = vit_setup
    for bits in (1, 9, 4.5, True):
        with pytest.raises(ValueError, match="2..8"):
            quant.quantize(model, variables, [images], w_bits=bits)
        with pytest.raises(ValueError, match="a_bits"):
            quant.quantize(model, variables, [images], a_bits=bits)
    with pytest.raises(ValueError, match="no batches"):
        quant.quantize(model, variables, [])
    with pytest.raises(ValueError, match=r"valid choices: \('minmax', 'percentile', 'mse', 'log2', 'adalog'\)"):
        quant.quantize(model, variables, [images], method="gptq")
    with pytest.raises(ValueError, match="act_granularity"):
        quant.quantize(model, variables, [images], act_granularity="channel")
    resnet = models.create("resnet18", num_classes=10)
    small = jnp.zeros((1, 32, 32, 3))
    resnet_variables = jax.eval_shape(lambda: resnet.init(jax.random.key(0), small))
    resnet_variables = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), resnet_variables)
    for method in quant.LOG_METHODS:
        with pytest.raises(ValueError, match="no softmax attention.*valid choices for it: \\('minmax'"):
            quant.quantize(resnet, resnet_variables, [small], method=method)


def test_discover_names_points_in_call_order(vit_setup):
    """Points are named by module path, in call order; the first layer's input is quantized at 8 bits."""
    model, variables, images, _ = vit_setup
    points, softmax, operands = calibrate.discover(lambda: model.apply(variables, images[:1]))
    assert [p.name for p in points][:3] == ["patch_embed/proj", "blocks_0/attn/qkv", "blocks_0/attn/proj"]
    assert points[1].output_axes == (1, 2, 3) and points[0].output_axes == (3,)
    qmodel, _ = quant.quantize(model, variables, [images], method="minmax", w_bits=4, a_bits=4)
    bits = dict((name, spec.bits) for name, spec in qmodel.inputs)
    assert bits["patch_embed/proj"] == 8 and bits["head"] == 4
