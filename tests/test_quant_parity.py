"""AdaLog's quantizers and hyperparameter searches equal its official code (tests/fixtures/adalog/README.md)."""
import os

import jax.numpy as jnp
import numpy as np
import pytest

from vitjax.quant import quantizers

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "adalog", "adalog.npz")


@pytest.fixture(scope="module")
def fixture():
    return dict(np.load(FIXTURE))


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_quantizer_forwards_equal_official(fixture, bits):
    """AdaLog (post-softmax, post-GELU shifted), log2 and asymmetric uniform: equal to the official outputs."""
    soft, post_gelu = jnp.asarray(fixture["soft"]), jnp.asarray(fixture["post_gelu"])
    cases = {
        "adalog_soft": quantizers.adalog_quantize(soft, 1.0, 23, bits),
        "adalog_gelu": quantizers.adalog_quantize(post_gelu, 2.1, 41, bits, quantizers.GELU_SHIFT),
        "log2_soft": quantizers.log2_quantize(soft, 1.0, bits),
        "uniform_gelu": quantizers.uniform_quantize(post_gelu, 0.21, 2.4, bits),
    }
    for name, ours in cases.items():
        expected = fixture[f"{name}_{bits}"]
        assert np.abs(np.asarray(ours) - expected).max() <= 1e-5 * np.abs(expected).max(), name


@pytest.mark.parametrize("bits", [3, 4])
def test_softmax_log_base_search_equals_official(fixture, bits):
    """The post-softmax base search picks the official q (values quantized per head as the official matmul)."""
    to_ours = lambda value: np.transpose(value, (0, 2, 1, 3))  # noqa: E731  (B, H, N, D) -> (B, N, H, D)
    q = quantizers.search_adalog_softmax(fixture["attention"], to_ours(fixture["value"]), bits,
                                         value_sim=to_ours(fixture[f"value_sim_{bits}"]))
    assert q == int(fixture[f"softmax_q_{bits}"])


def test_gelu_fpcs_search_equals_official(fixture):
    """The post-GELU Fast Progressive Combining Search gives the official (scale, q) at 4 bits."""
    candidates = quantizers.positive_percentiles(fixture["post_gelu"], (0.9, 1.0)) + quantizers.GELU_SHIFT
    np.testing.assert_allclose(candidates, fixture["gelu_ud"], rtol=1e-6)
    scale, q = quantizers.search_adalog_gelu(fixture["post_gelu"], fixture["weight"].T, fixture["bias"], 4,
                                             kernel_sim=fixture["weight_sim"].T)
    assert q == int(fixture["gelu_q"])
    assert abs(scale - float(fixture["gelu_scale"])) <= 1e-5 * float(fixture["gelu_scale"])
