"""HorNet: parity with the official raoyongming/HorNet code (fixture; 7x7 depthwise and global-filter variants, the
filter stored at the rfft2 grid and resized to it), parameter counts of every official name, converter errors."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import convert, models
from vitjax.models import hornet

from parity_utils import (assert_converter_errors, assert_create_rejects, fixture_entries, measured_param_counts,
                          relative_error)

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hornet", "hornet.npz")
SMALL = dict(img_size=64, depths=(1, 1, 1, 1), base_dim=8, num_classes=5)
# The gf case: stage 3's filter is stored at its 4x4 maps' rfft2 grid (4, 3), stage 4's at (7, 4), resized to (2, 2).
CASES = {"7x7": ("hornet_tiny_7x7", {}), "gf": ("hornet_tiny_gf", dict(filter_sizes=(None, None, (4, 3), (7, 4))))}


def _case(data, case):
    state = fixture_entries(data, "7x7/state")
    if case == "gf":
        # The 7x7 model's depthwise convs of stages 2 and 3 are the global filters here; the rest is shared.
        state = {key: value for key, value in state.items()
                 if not (key.startswith(("stages.2.", "stages.3.")) and ".gnconv.dwconv." in key)}
        state.update(fixture_entries(data, "gf/state"))
    name, extra = CASES[case]
    return state, name, {**SMALL, **extra}


@pytest.mark.parametrize("case", sorted(CASES))
def test_official_parity(case):
    data = dict(np.load(FIXTURE))
    state, name, settings = _case(data, case)
    variables = convert.from_timm(state, name, **settings)
    model = models.create(name, **settings)
    logits, intermediates = jax.jit(model.apply)(variables, jnp.asarray(data["images"]))
    assert logits.shape == (2, 5)
    assert [x.shape[1:] for x in intermediates["stages"]] == [(16, 16, 8), (8, 8, 16), (4, 4, 32), (2, 2, 64)]
    assert relative_error(logits, data[f"{case}/logits"]) <= 1e-5
    assert relative_error(logits, data[f"{case}/logits64"]) <= 1e-5


def test_align_corners_resize_matches_torch():
    torch = pytest.importorskip("torch")
    weight = np.random.default_rng(0).normal(size=(2, 3, 7, 4)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(weight), size=(4, 3), mode="bilinear",
                                               align_corners=True).numpy()
    ours = np.einsum("oh,pw,bchw->bcop", hornet.align_corners_matrix(7, 4), hornet.align_corners_matrix(4, 3), weight)
    assert relative_error(ours, expected) <= 1e-6


def test_parameter_counts_equal_the_official_code():
    """The official counts equal experiments/out/model_table.json's, which test_registry checks against the models."""
    data = np.load(FIXTURE)
    counts = dict(zip(data["param_names"].tolist(), data["param_counts"].tolist()))
    assert sorted(counts) == models.list_models("hornet")
    assert measured_param_counts(counts) == counts


def test_converter_errors_and_validation():
    data = dict(np.load(FIXTURE))
    state, name, settings = _case(data, "gf")
    assert_converter_errors(
        state, name, settings, missing="stages.3.0.gnconv.dwconv.complex_weight",
        unexpected={"stages.0.0.gnconv.extra": np.zeros(3, np.float32)},
        misshapen={"stages.1.0.gnconv.pws.1.bias": (np.zeros(3, np.float32), "stages_1/blocks_0/gnconv/pws_1/bias")})
    assert_create_rejects("hornet_tiny_7x7", [
        (dict(img_size=200), "multiple of 32"),
        (dict(orders=(2, 3, 4)), "one entry per stage"),
        (dict(base_dim=5), r"divisible by 2\^\(order - 1\)"),
    ])
