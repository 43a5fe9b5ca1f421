"""SpectFormer: parity with the official badripatro/SpectFormers code for both architectures (fixture: the vanilla
model's spectral then attention blocks with the official 6 heads; the hierarchical model's BatchNorm stem, spectral
stages, attention stages, class-attention block and token-labelling output), attention_impl="pallas" (interpret mode
on the CPU) equal to "xla", parameter counts of every official name, converter errors and validation."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import convert, models
from vitjax.models import spectformer

from parity_utils import (assert_converter_errors, assert_create_rejects, fixture_entries, measured_param_counts,
                          relative_error)

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "spectformer", "spectformer.npz")
VANILLA = dict(img_size=64, num_classes=5, embed_dim=24, depth=6, mlp_ratio=2, num_heads=6)
HIERARCHICAL = dict(img_size=64, num_classes=5, stem_hidden_dim=8, embed_dims=(64, 128, 32, 48),
                    num_heads=(2, 4, 2, 4), mlp_ratios=(1, 1, 2, 2), depths=(1, 1, 1, 1))
CASES = {"vanilla": ("spectformer-xs", VANILLA), "hierarchical": ("spectformer_s", HIERARCHICAL)}


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
    assert relative_error(logits, data[f"{kind}/logits64"]) <= 1e-5


@pytest.mark.parametrize("module", [spectformer.QKVAttention(2), spectformer.ClassBlock(2, 2.0),
                                    spectformer.AttentionBlock(2)], ids=["qkv", "class", "vanilla"])
def test_pallas_equals_xla(module):
    x = jax.random.normal(jax.random.key(0), (2, 9, 16))
    variables = module.init(jax.random.key(1), x)
    expected = jax.jit(module.apply)(variables, x)
    ours = jax.jit(module.clone(attention_impl="pallas").apply)(variables, x)
    assert relative_error(ours, expected) <= 1e-5


def test_parameter_counts_equal_the_official_code(data):
    """The official counts equal experiments/out/model_table.json's, which test_registry checks against the models."""
    counts = dict(zip(data["param_names"].tolist(), data["param_counts"].tolist()))
    assert sorted(counts) == models.list_models("spectformer")
    assert measured_param_counts(counts) == counts


def test_official_head_counts_and_overrides():
    assert models.create("spectformer-xs").num_heads == 6 and models.create("spectformer-s").num_heads == 6
    assert models.create("spectformer-ti").num_heads == 4 and models.create("spectformer-b").num_heads == 8
    assert models.create("spectformer-s", num_heads=12).num_heads == 12
    # the official evaluation crops: 224 of 256 (vanilla), of int(224 / 0.96) (hierarchical)
    assert models.pretrained_cfg("spectformer-s")["crop_pct"] == 0.875
    assert models.pretrained_cfg("spectformer_s")["crop_pct"] == 0.96


def test_converter_errors_and_validation(data):
    state = fixture_entries(data, "hierarchical/state")
    assert_converter_errors(
        state, "spectformer_s", HIERARCHICAL, missing="block3.0.attn.kv.weight",
        unexpected={"block1.0.attn.extra": np.zeros(3, np.float32)},
        misshapen={"block1.0.attn.complex_weight": (np.zeros((4, 3, 64, 2), np.float32),
                                                    "block1_0/attn/complex_weight")})
    with pytest.raises(ValueError, match="complex_weight"):
        convert.from_torch(fixture_entries(data, "vanilla/state"), "spectformer-xs", **{**VANILLA, "img_size": 96})
    assert_create_rejects("spectformer-xs", [
        (dict(num_heads=5), "does not divide embed_dim=384; valid choices include"),
        (dict(img_size=200), "multiple of patch_size"),
        (dict(spectral_depth=13), r"spectral_depth must be in \[0, depth=12\]"),
        (dict(attention_impl="flash"), "Unknown attention_impl .flash.; valid choices"),
    ])
    assert_create_rejects("spectformer_s", [
        (dict(depths=(3, 4, 6)), "one entry per stage"),
        (dict(spectral_stages=4), r"spectral_stages must be in \[0, 3\]"),
        (dict(img_size=16), "at least 32"),
    ])
