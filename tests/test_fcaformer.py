"""FcaFormer: parity with the official hkzhang-git/FcaFormer code (fixture: ConvNeXt stages, Fca stages whose blocks
attend to the cross tokens of up to cab_max_d = 2 earlier blocks, a 6x6 map whose cross tokens come from a ceil(6/4)
grid, BatchNorm statistics), attention_impl="pallas" (interpret mode on the CPU) equal to "xla" with the bias table and
the cross-token biases, parameter counts of every official name, converter errors and validation."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax import convert, models
from vitjax.models import fcaformer

from parity_utils import (assert_converter_errors, assert_create_rejects, fixture_entries, measured_param_counts,
                          relative_error)

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "fcaformer", "fcaformer.npz")
SMALL = dict(img_size=96, num_classes=5, embed_dims=(16, 24, 24, 32), depths=(1, 2, 4, 2), num_heads=(0, 0, 2, 2),
             cab_max_d=2)


def _images(data):
    """Returns the fixture's inputs: each coarse pixel repeated 4x4, as the generator made them."""
    return jnp.asarray(np.repeat(np.repeat(data["coarse_images"], 4, axis=1), 4, axis=2))


def test_official_parity():
    data = dict(np.load(FIXTURE))
    variables = convert.from_torch(fixture_entries(data, "state"), "fcaformer_l1", **SMALL)
    model = models.create("fcaformer_l1", **SMALL)
    logits, intermediates = jax.jit(model.apply)(variables, _images(data))
    assert [x.shape[1:] for x in intermediates["stages"]] == [(24, 24, 16), (12, 12, 24), (6, 6, 24), (3, 3, 32)]
    assert relative_error(logits, data["logits"]) <= 1e-5
    assert relative_error(logits, data["logits64"]) <= 1e-5
    # 4 cross tokens per block on the 6x6 map; the stage's last block carries at most cab_max_d = 2 blocks' worth.
    assert variables["params"]["layer_2"]["blocks_3"]["s_token_bias"].shape == (2, 8)
    assert "dw_conv" not in variables["params"]["layer_2"]["blocks_3"]


def test_pallas_equals_xla_with_bias_table_and_cross_tokens():
    x = jax.random.normal(jax.random.key(0), (1, 5, 3, 16))
    cross = jax.random.normal(jax.random.key(1), (1, 4, 16))
    xla = fcaformer.FcaBlock(16, 2, 4, True)
    variables = nn.meta.unbox(xla.init(jax.random.key(2), x, cross))
    # Non-zero bias tables, so the bias reaches the kernel.
    params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jax.random.normal(jax.random.key(3), leaf.shape) * 0.5
        if path[-1].key in ("attention_biases", "s_token_bias") else leaf, variables["params"])
    variables = {**variables, "params": params}
    expected, expected_cross = jax.jit(xla.apply)(variables, x, cross)
    ours, ours_cross = jax.jit(fcaformer.FcaBlock(16, 2, 4, True, attention_impl="pallas").apply)(variables, x, cross)
    assert relative_error(ours, expected) <= 1e-5
    assert expected_cross.shape == (1, 2, 16)  # ceil(5 / 4) x ceil(3 / 4)
    assert relative_error(ours_cross, expected_cross) <= 1e-5


def test_bias_index_numbers_offsets_in_order_of_first_appearance():
    index = fcaformer.attention_bias_index(2, 3)
    assert index.shape == (6, 6) and index.max() == 5  # (|dy|, |dx|) in {0, 1} x {0, 1, 2}
    assert index[0].tolist() == [0, 1, 2, 3, 4, 5]      # from (0, 0): (0,0) (0,1) (0,2) (1,0) (1,1) (1,2)
    assert index[5, 0] == index[0, 5] and index[4, 4] == 0


def test_parameter_counts_equal_the_official_code():
    """The official counts equal experiments/out/model_table.json's, which test_registry checks against the models."""
    data = np.load(FIXTURE)
    counts = dict(zip(data["param_names"].tolist(), data["param_counts"].tolist()))
    assert sorted(counts) == models.list_models("fcaformer_")
    assert measured_param_counts(counts) == counts


def test_converter_errors_and_validation():
    data = dict(np.load(FIXTURE))
    state = fixture_entries(data, "state")
    assert_converter_errors(
        state, "fcaformer_l1", SMALL, missing="layer_2.blocks.1.s_scale_factors",
        unexpected={"layer_3.blocks.1.dw_conv.weight": np.zeros((32, 1, 7, 7), np.float32)},
        misshapen={"layer_2.blocks.2.attention_biases": (
            np.zeros((2, 9), np.float32), "layer_2/blocks_2/attention_biases")})
    assert_create_rejects("fcaformer_l1", [
        (dict(depths=(2, 2, 6)), "one entry per stage"),
        (dict(num_heads=(0, 0, 5, 10)), "heads"),
        (dict(img_size=200), "multiple of 32"),
        (dict(cab_max_d=0), "cab_max_d"),
        (dict(attention_impl="flash"), "Unknown attention_impl .flash.; valid choices"),
    ])
