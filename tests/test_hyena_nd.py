"""Hyena N-D: parity with the official Itamarzimm/HyenaND code (fixture: the hybrid DeiT with order-2 Hyena blocks,
the "seq" flips and an attention block; a pure Hyena DeiT of order 3 with the square-root decay window), parameter
counts of every registered name, the method schedules, converter errors and validation."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import convert, models
from vitjax.models import hyena_nd

from parity_utils import (assert_converter_errors, assert_create_rejects, fixture_entries, measured_param_counts,
                          relative_error)

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hyena_nd", "hyena_nd.npz")
HYBRID = dict(img_size=32, patch_size=8, num_classes=5, embed_dim=16, depth=4, num_heads=2, filter_order=8)
ORDER3 = dict(HYBRID, depth=2, order=3, sqrt_decay=True)
CASES = {"hybrid": ("hyena2dattn_deit_tiny_patch16_224", HYBRID), "order3": ("hyena2d_deit_tiny_patch16_224", ORDER3)}


@pytest.fixture(scope="module")
def data():
    return dict(np.load(FIXTURE))


@pytest.mark.parametrize("kind", sorted(CASES))
def test_official_parity(data, kind):
    name, settings = CASES[kind]
    variables = convert.from_torch(fixture_entries(data, f"{kind}/state"), name, **settings)
    model = models.create(name, **settings)
    logits, _ = jax.jit(model.apply)(variables, jnp.asarray(data["images"]))
    assert relative_error(logits, data[f"{kind}/logits"]) <= 1e-5


def test_method_schedules_follow_the_official_blocks():
    assert hyena_nd.block_mixers("hyena2dattn", 12) == ("hyena2d",) * 7 + ("attention",) * 5
    assert hyena_nd.block_mixers("attnhyena2d", 4) == ("attention",) * 3 + ("hyena2d",)
    assert hyena_nd.block_mixers("onebyone", 3) == ("hyena2d", "attention", "hyena2d")


def test_long_convolution_is_zero_padded():
    """fft_conv2d is the non-circular convolution: a kernel tap at (0, 1) moves each token one column right and
    drops the last column (a circular one would wrap it round)."""
    from vitjax.models import fft_mixer
    u = jax.random.normal(jax.random.key(0), (1, 3, 4, 2))
    kernel = jnp.zeros((3, 4, 2)).at[0, 1].set(1.0)
    shifted = jax.jit(fft_mixer.fft_conv2d)(u, kernel)
    np.testing.assert_allclose(shifted[:, :, 1:], u[:, :, :-1], atol=1e-6)
    np.testing.assert_allclose(shifted[:, :, 0], 0.0, atol=1e-6)


def test_parameter_counts_equal_the_official_code(data):
    """The official counts equal experiments/out/model_table.json's, which test_registry checks against the models."""
    counts = dict(zip(data["param_names"].tolist(), data["param_counts"].tolist()))
    assert sorted(counts) == models.list_models("_deit_") and all("hyena" in name for name in counts)
    assert measured_param_counts(counts) == counts


def test_converter_errors_and_validation(data):
    state = fixture_entries(data, "hybrid/state")
    name = CASES["hybrid"][0]
    assert_converter_errors(
        state, name, HYBRID, missing="blocks.0.attn.filter_fn.pos_emb.z",
        unexpected={"blocks.1.attn.extra": np.zeros(3, np.float32)},
        misshapen={"blocks.2.attn.filter_fn.bias": (np.zeros(3, np.float32), "blocks_2/attn/filter_fn/bias")})
    with pytest.raises(ValueError, match="another img_size"):
        convert.from_torch(state, name, **{**HYBRID, "img_size": 40})
    bad = dict(state)
    bad["blocks.0.attn.filter_fn.implicit_filter.3.freq"] = bad["blocks.0.attn.filter_fn.implicit_filter.3.freq"] + 1
    with pytest.raises(ValueError, match="shares one sine"):
        convert.from_torch(bad, name, **HYBRID)
    assert_create_rejects(name, [
        (dict(method="hyena"), "Unknown method 'hyena'; valid choices"),
        (dict(directional_mode="4dir"), "Unknown directional_mode '4dir'; valid choices"),
        (dict(window_mode="learn"), "Unknown window_mode 'learn'; valid choices"),
        (dict(img_size=(224, 192)), "must be square"),
        (dict(order=1), "order must be at least 2"),
        (dict(num_heads=5), "num_heads=5 must divide embed_dim=192"),
    ])
