"""Real int8 execution through qwix (`vitjax.quant.int8`): the dots are s8 x s8 -> s32, the output equals
qwix's simulated (fake-quantized) run of the same quantization, and bad settings fail before compile."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import models, quant
from vitjax.quant import int8

qwix = pytest.importorskip("qwix")
# qwix 0.1.8 asks flax for nnx.VariableState, which flax 0.12 deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*VariableState.*:DeprecationWarning")

TINY_VIT = dict(variant="mu/4", num_classes=10, img_size=16, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                mlp_dim=64)
# int8 products summed in int32 vs the same integers summed in fp32 by the simulation: exact while the
# sums stay below 2^24, then equal up to the rescaling's rounding.
INT8_VS_FAKE_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def tiny_vit():
    images = jnp.asarray(np.random.default_rng(0).standard_normal((4, 16, 16, 1)), jnp.float32)
    model = models.create("vit", **TINY_VIT)
    return model, model.init(jax.random.key(0), images), images


def _relative_error(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def test_dense_matmuls_run_as_int8_dots(tiny_vit):
    model, variables, images = tiny_vit
    qmodel, qvariables = quant.quantize(model, variables, [images], method="minmax", backend="qwix",
                                        act_granularity="token", apply_kwargs=dict(train=False))
    dots = int8.dot_dtypes(lambda v, x: qmodel.apply(v, x)[0], qvariables, images)
    # Per block: qkv, attention projection, fc1, fc2; plus the head. The two attention matmuls per block
    # (both operands activations) stay fp32.
    assert dots.count(("int8", "int8", "int32")) == 2 * 4 + 1
    assert dots.count(("float32", "float32", "float32")) == 2 * 2
    assert len(dots) == 2 * 4 + 1 + 2 * 2
    hlo = jax.jit(lambda v, x: qmodel.apply(v, x)[0]).lower(qvariables, images).as_text()
    assert hlo.count("stablehlo.dot_general") == len(dots)
    assert "xi8>" in hlo and "-> tensor<4x17x64xi32>" in hlo  # fc1 of a block: (B, N, 64) int32 accumulators
    kernel = qvariables["params"]["blocks_0"]["mlp"]["fc1"]["kernel"]
    assert jnp.dtype(kernel.array.qvalue.dtype) == jnp.int8


def test_int8_output_equals_the_fake_quantized_one(tiny_vit):
    model, variables, images = tiny_vit
    qmodel, qvariables = int8.quantize_int8(model, variables, images)
    fake_model, fake_variables = int8.quantize_int8(model, variables, images, fake=True)
    out = qmodel.apply(qvariables, images)[0]
    fake = fake_model.apply(fake_variables, images)[0]
    fp32 = model.apply(variables, images)[0]
    assert _relative_error(out, fake) <= INT8_VS_FAKE_TOLERANCE
    # ... and the quantization is real: int8 differs from fp32 by far more than that, yet stays close.
    assert 1e-4 < _relative_error(out, fp32) < 5e-2


@pytest.mark.parametrize("settings,match", [
    (dict(method="minmax", w_bits=4, a_bits=4, act_granularity="token"), "W8A8 only"),
    (dict(method="adalog", act_granularity="token"), "absmax grids"),
    (dict(method="minmax"), "act_granularity must be 'token'"),
    (dict(method="minmax", act_granularity="token", backend="int4"), "valid choices"),
])
def test_bad_qwix_settings_fail_before_compile(tiny_vit, settings, match):
    model, variables, images = tiny_vit
    settings = dict(settings)
    settings.setdefault("backend", "qwix")
    with pytest.raises(ValueError, match=match):
        quant.quantize(model, variables, [images], **settings)
    with pytest.raises(ValueError, match="no batches"):
        quant.quantize(model, variables, [], method="minmax", backend="qwix", act_granularity="token")
