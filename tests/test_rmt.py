"""RMT: parity with the official qhfan/RMT code (fixture: decomposed row/column attention with the 1-D decays, whole-map
attention with the 2-D Manhattan decay, layer scales, BatchNorm statistics), attention_impl="pallas" (interpret mode on
the CPU) equal to "xla" with the decay biases, the decay masks, parameter counts of every official name, converter
errors."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import convert, models
from vitjax.models import rmt

from parity_utils import (assert_converter_errors, assert_create_rejects, fixture_entries, measured_param_counts,
                          relative_error)

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "rmt", "rmt.npz")
SMALL = dict(img_size=64, num_classes=5, embed_dims=(16, 32, 48, 64), depths=(2, 1, 1, 1), num_heads=(2, 2, 4, 4),
             heads_ranges=(4, 4, 6, 6), mlp_ratios=(3, 3, 3, 3), decomposed=(True, True, False, False),
             layer_scales=(False, False, True, True), projection=32)


def test_official_parity():
    data = dict(np.load(FIXTURE))
    variables = convert.from_timm(fixture_entries(data, "state"), "rmt_b", **SMALL)
    model = models.create("rmt_b", **SMALL)
    logits, intermediates = jax.jit(model.apply)(variables, jnp.asarray(data["images"]))
    assert [x.shape[1:] for x in intermediates["stages"]] == [(16, 16, 16), (8, 8, 32), (4, 4, 48), (2, 2, 64)]
    assert relative_error(logits, data["logits"]) <= 1e-5
    assert relative_error(logits, data["logits64"]) <= 1e-5


@pytest.mark.parametrize("decomposed", [True, False])
def test_pallas_equals_xla_with_decay_biases(decomposed):
    """MaSA on a 3x4 map: rows then columns with the 1-D decays, or the whole map with the 2-D decay."""
    x = jax.random.normal(jax.random.key(0), (1, 3, 4, 16))
    xla = rmt.ManhattanSelfAttention(2, 2.0, 4.0, decomposed)
    variables = xla.init(jax.random.key(1), x)
    pallas = rmt.ManhattanSelfAttention(2, 2.0, 4.0, decomposed, attention_impl="pallas")
    expected = jax.jit(xla.apply)(variables, x)
    ours = jax.jit(pallas.apply)(variables, x)
    assert relative_error(ours, expected) <= 1e-5


def test_decay_masks_are_manhattan_distances_times_the_log_decay():
    decay = rmt.retention_decay(2, 2.0, 4.0)
    np.testing.assert_allclose(decay, np.log(1 - 2.0 ** np.array([-2.0, -4.0])), rtol=1e-6)
    mask = rmt.decay_mask_2d(3, 4, decay)
    assert mask.shape == (2, 12, 12)
    assert mask[1, 0, 11] == pytest.approx(5 * decay[1])    # (0, 0) to (2, 3): |2| + |3|
    np.testing.assert_allclose(rmt.decay_mask_1d(4, decay)[0, 3], np.array([3, 2, 1, 0]) * decay[0], rtol=1e-6)


def test_parameter_counts_equal_the_official_code():
    """The official counts equal experiments/out/model_table.json's, which test_registry checks against the models."""
    data = np.load(FIXTURE)
    counts = dict(zip(data["param_names"].tolist(), data["param_counts"].tolist()))
    assert sorted(counts) == models.list_models("rmt_")
    assert measured_param_counts(counts) == counts


def test_converter_errors_and_validation():
    data = dict(np.load(FIXTURE))
    state = fixture_entries(data, "state")
    assert_converter_errors(
        state, "rmt_b", SMALL, missing="layers.2.blocks.0.gamma_1",
        unexpected={"layers.1.blocks.0.retention.extra": np.zeros(3, np.float32)},
        misshapen={"layers.0.blocks.1.ffn.fc2.bias": (np.zeros(3, np.float32), "layers_0/blocks_1/ffn/fc2/bias")})
    with pytest.raises(ValueError, match="other num_heads / init_values / heads_ranges"):
        convert.from_timm(state, "rmt_b", **{**SMALL, "heads_ranges": (5, 4, 6, 6)})
    assert_create_rejects("rmt_t", [
        (dict(depths=(2, 2, 8)), "one entry per stage"),
        (dict(num_heads=(3, 4, 8, 16)), "heads of an even width"),
        (dict(img_size=16), "at least 32"),
        (dict(attention_impl="flash"), "Unknown attention_impl .flash.; valid choices"),
    ])


def test_layer_ids_end_each_stage_with_its_downsampling():
    import flax.linen as nn
    settings = dict(img_size=32, embed_dims=(16, 16), depths=(2, 1), num_heads=(2, 2), init_values=(2, 2),
                    heads_ranges=(4, 6), mlp_ratios=(2, 2), decomposed=(True, False), layer_scales=(False, True),
                    projection=16)
    model = models.create("rmt_b", **settings)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    ids, num_layers = model.layer_ids(nn.meta.unbox(shapes["params"]))
    assert num_layers == 3
    assert int(ids["patch_embed_proj_10/scale"]) == 0
    assert int(ids["layers_0/downsample_reduction/kernel"]) == 2
    assert int(ids["layers_1/blocks_0/gamma_1/gamma"]) == 3
    assert int(ids["proj/kernel"]) == 3 and int(ids["head/kernel"]) == 4
