"""TNT: parity with timm 1.0.31 (current and legacy layouts), registry, converter errors, training mode."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vitjax import models  # noqa: E402

from parity_utils import (  # noqa: E402
    assert_converter_errors, assert_create_rejects, parameter_count, random_variables, randomize_, relative_error,
    run_parity, train_gradients)


# tnt_s shrunk: 32 px -> 2x2 patches of 16 px, 4x4 pixels each; narrow and 2 blocks deep.
SMALL = dict(img_size=32, embed_dim=48, inner_dim=8, depth=2, num_heads_outer=3, num_heads_inner=2, num_classes=5)


@pytest.mark.parametrize("name, overrides", [
    ("tnt_s_patch16_224", {}),
    ("tnt_s_legacy_patch16_224", {}),
    ("tnt_s_patch16_224", dict(img_size=48, patch_size=8, qkv_bias=True, global_pool="avg")),
])
def test_timm_parity(name, overrides):
    settings = {**SMALL, **overrides}
    reference = timm.create_model(name, pretrained=False, **settings).eval()
    randomize_(reference)
    expected, ours, intermediates, *_ = run_parity(reference, name, **settings)
    assert ours.shape == expected.shape == (2, 5)
    assert relative_error(ours, expected) <= 1e-5
    assert intermediates["pre_logits"].shape == (2, 48)
    assert len(intermediates["blocks"]) == 2


def test_converter_errors_name_the_key():
    reference = timm.create_model("tnt_s_patch16_224", pretrained=False, **SMALL)
    state = {key: value.numpy() for key, value in reference.state_dict().items()}
    assert_converter_errors(
        state, "tnt_s_patch16_224", SMALL, missing="blocks.1.attn_in.qk.weight",
        misshapen={"blocks.0.norm2_proj.bias": (np.zeros(7, np.float32), "blocks_0/norm2_proj/bias")})


def test_param_count_matches_timm():
    expected = sum(p.numel() for p in timm.create_model("tnt_s_patch16_224").parameters())
    assert parameter_count(models.create("tnt_s_patch16_224")) == expected


def test_registry_and_validation():
    assert set(models.list_models("tnt_")) == set(timm.list_models("tnt*"))
    assert_create_rejects("tnt_s_patch16_224", [
        (dict(img_size=40), "not divisible by patch_size"),
        (dict(global_pool="map"), "global_pool"),
    ])


def test_train_mode_and_gradients():
    model = models.create("tnt_s_patch16_224", **dict(SMALL, depth=1), drop_path_rate=0.2, drop_rate=0.1)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    _, grads = train_gradients(model, random_variables(model, (32, 32, 3))["params"], images)
    assert sum(float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)) > 0
