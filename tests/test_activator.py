"""Activator: parity with the official Abdullah-88/Activator models (with and without the MLP), parameter counts of
both official models, converter errors and settings validation."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import convert, models

from parity_utils import (assert_converter_errors, assert_create_rejects, fixture_entries, measured_param_counts,
                          relative_error)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "activator", "activator.npz")
SMALL = dict(img_size=16, patch_size=4, num_classes=5, embed_dim=16, hidden_dim=24, depth=2, drop_rate=0.5)
NAMES = ("activator", "activator_only_geglu")


@pytest.fixture(scope="module")
def fixture():
    return dict(np.load(FIXTURE))


@pytest.mark.parametrize("name", NAMES)
def test_official_parity(fixture, name):
    variables = convert.from_torch(fixture_entries(fixture, f"{name}/state"), name, **SMALL)
    model = models.create(name, **SMALL)
    logits, intermediates = jax.jit(model.apply)(variables, jnp.asarray(fixture["images"]))
    assert intermediates["blocks"][-1].shape == (2, 16, 16)
    assert relative_error(logits, fixture[f"{name}/logits"]) <= 1e-5
    assert relative_error(logits, fixture[f"{name}/logits64"]) <= 1e-5
    # Dropout (the official 0.5) acts in training only, in the MLP.
    train_logits, _ = jax.jit(lambda v, rng: model.apply(v, jnp.asarray(fixture["images"]), train=True,
                                                         rngs={"dropout": rng}))(variables, jax.random.key(0))
    assert (relative_error(train_logits, logits) > 1e-2) == (name == "activator")


def test_parameter_counts_equal_the_official_code(fixture):
    counts = dict(zip(fixture["param_names"].tolist(), fixture["param_counts"].tolist()))
    assert sorted(counts) == models.list_models("activator")
    assert measured_param_counts(counts) == counts


def test_converter_errors_and_validation(fixture):
    state = fixture_entries(fixture, "activator/state")
    assert_converter_errors(
        state, "activator", SMALL, missing="model.1.actgu.norm.weight",
        unexpected={"model.0.actgu.extra": np.zeros(3, np.float32)},
        misshapen={"model.0.ffn.net.3.bias": (np.zeros(3, np.float32), "blocks_0/mlp/fc2/bias")})
    with pytest.raises(KeyError, match="ffn.net.0.weight"):  # a full model's weights do not fit the only-GEGLU one
        convert.from_torch(state, "activator_only_geglu", **SMALL)
    assert_create_rejects("activator", [
        (dict(img_size=30), "multiple of patch_size"),
        (dict(depth=0), "depth must be >= 1"),
        (dict(drop_rate=1.0), "drop_rate must be in"),
        (dict(heads=2), "Unknown option"),
    ])
