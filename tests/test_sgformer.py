"""SG-Former: parity with the official OliverRensu/SG-Former code (fixture: 224 px, every block kind: hybrid-scale
attention making significance maps at sr 8 / 4 / 2, self-guided token reallocation with the official merge lengths,
full attention; one-group GroupNorm stem and mergings), checked in float64 because the official float32 logits are
themselves 2% from its float64 ones (significances of thousands of tokens tie or come within rounding, and the sort
decides which tokens merge); attention_impl="pallas" (interpret mode on the CPU) equal to "xla" in the self-guided
attention; the merge segments and nearest upsampling; parameter counts of every official name; converter errors and
validation."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import convert, models
from vitjax.models import sgformer

from parity_utils import (assert_converter_errors, assert_create_rejects, fixture_entries, measured_param_counts,
                          relative_error)

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "sgformer", "sgformer.npz")
SMALL = dict(img_size=224, num_classes=5, embed_dims=(8, 16, 32, 32), num_heads=(2, 2, 4, 2), depths=(2, 2, 2, 1))


def _images(data):
    """Returns the fixture's inputs: each coarse pixel repeated 4x4, as the generator made them."""
    return np.repeat(np.repeat(data["coarse_images"], 4, axis=1), 4, axis=2)


def test_official_parity_in_float64_and_float32_within_the_official_float32_error():
    data = dict(np.load(FIXTURE))
    variables = convert.from_torch(fixture_entries(data, "state"), "sgformer_s", **SMALL)
    with jax.enable_x64(True):
        model = models.create("sgformer_s", dtype=jnp.float64, param_dtype=jnp.float64, **SMALL)
        logits64, intermediates = jax.jit(model.apply)(jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables),
                                                       jnp.asarray(_images(data), jnp.float64))
        assert logits64.dtype == jnp.float64
    assert [x.shape[1:] for x in intermediates["stages"]] == [(56, 56, 8), (28, 28, 16), (14, 14, 32), (7, 7, 32)]
    assert [x.shape[1:] for x in intermediates["significance"]] == [(56, 56), (28, 28), (14, 14)]
    assert relative_error(logits64, data["logits64"]) <= 1e-10
    # float32: the official code's own float32 error is the yardstick (ours is of the same size, not smaller).
    official_error = relative_error(data["logits"], data["logits64"])
    assert 1e-3 < official_error < 0.05
    logits, _ = jax.jit(models.create("sgformer_s", **SMALL).apply)(variables, jnp.asarray(_images(data)))
    assert relative_error(logits, data["logits64"]) <= 3 * official_error


def test_pallas_equals_xla_in_the_self_guided_attention():
    x = jax.random.normal(jax.random.key(0), (1, 196, 16))
    significance = jax.random.uniform(jax.random.key(1), (1, 14, 14))
    xla = sgformer.SGAttention(4, 2, "guided")
    variables = nn.meta.unbox(xla.init(jax.random.key(2), x, 14, 14, significance))
    expected, _ = jax.jit(xla.apply, static_argnums=(2, 3))(variables, x, 14, 14, significance)
    pallas = sgformer.SGAttention(4, 2, "guided", attention_impl="pallas")
    ours, _ = jax.jit(pallas.apply, static_argnums=(2, 3))(variables, x, 14, 14, significance)
    assert relative_error(ours, expected) <= 1e-5


def test_merge_segments_and_nearest_upsampling():
    # 56x56 at sr 8: the least significant quarter in 4 runs of 196, the middle half in 28 runs of 56, the most
    # significant quarter in 28 runs of 28: 60 keys instead of 3136.
    assert sgformer.segments(3136, 8) == ((784, 196), (1568, 56), (784, 28))
    assert sgformer.segments(196, 4) == ((49, 49), (98, 14), (49, 7))
    assert sgformer.segments(196, 2) == ((98, 2), (98, 1))
    with pytest.raises(ValueError, match="224 px"):
        sgformer.segments(49, 2)
    torch = pytest.importorskip("torch")
    source = torch.arange(3, dtype=torch.float32).view(1, 1, 1, 3)
    expected = torch.nn.functional.interpolate(source, (1, 28), mode="nearest")[0, 0, 0].numpy().astype(int)
    np.testing.assert_array_equal(sgformer.nearest_index(3, 28), expected)


def test_parameter_counts_equal_the_official_code():
    """The official counts equal experiments/out/model_table.json's, which test_registry checks against the models."""
    data = np.load(FIXTURE)
    counts = dict(zip(data["param_names"].tolist(), data["param_counts"].tolist()))
    assert sorted(counts) == models.list_models("sgformer_")
    assert measured_param_counts(counts) == counts


def test_converter_errors_and_validation():
    data = dict(np.load(FIXTURE))
    state = fixture_entries(data, "state")
    assert_converter_errors(
        state, "sgformer_s", SMALL, missing="block2.1.attn.f3.weight",
        unexpected={"block3.1.attn.f3.weight": np.zeros((1, 2), np.float32)},
        misshapen={"block1.1.attn.f1.weight": (np.zeros((1, 195), np.float32), "block1_1/attn/f1/kernel")})
    assert_create_rejects("sgformer_s", [
        (dict(depths=(2, 4, 16)), "one entry per stage"),
        (dict(depths=(3, 4, 16, 1)), "depth must be even"),
        (dict(num_heads=(1, 4, 8, 16)), "num_heads must be even"),
        (dict(sr_ratios=(8, 4, 3, 1)), "sr_ratios must each be one of"),
        (dict(img_size=192), "224"),
        (dict(attention_impl="flash"), "Unknown attention_impl .flash.; valid choices"),
    ])
