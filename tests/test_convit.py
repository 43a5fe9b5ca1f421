"""ConViT: parity with timm 1.0.31 (GPSA and MHSA blocks), local init, registry, converter errors, training."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vitjax import convert, models  # noqa: E402
from vitjax.models import convit  # noqa: E402

from parity_utils import (  # noqa: E402
    assert_converter_errors, assert_create_rejects, parameter_count, randomize_, relative_error, run_parity,
    train_gradients)


def spread_gates(key, noise):
    """`randomize_` hook: gating parameters N(0, 1), so the gates spread over (0.1, 0.9) and both attentions
    count."""
    return noise if key.endswith("gating_param") else None


# Two GPSA blocks, then the class token joins and one MHSA block runs.
SHRUNK = dict(depth=3, local_up_to_layer=2, patch_size=8, num_classes=7)


def reference_model(**overrides) -> "torch.nn.Module":
    """Returns a re-randomised eval-mode timm convit_tiny (32 px) with `overrides`."""
    reference = timm.create_model("convit_tiny", pretrained=False, img_size=32, **SHRUNK, **overrides).eval()
    randomize_(reference, special=spread_gates)
    return reference


@pytest.mark.parametrize("overrides", [{}, dict(qkv_bias=True, global_pool="avg")])
def test_timm_parity(overrides):
    expected, ours, intermediates, model, variables, images = run_parity(
        reference_model(**overrides), "convit_tiny", img_size=32, **SHRUNK, **overrides)
    assert ours.shape == expected.shape == (2, 7)
    assert relative_error(ours, expected) <= 1e-5
    assert [block.shape for block in intermediates["blocks"]] == [(2, 16, 192)] * 2 + [(2, 17, 192)]
    assert intermediates["pre_logits"].shape == (2, 192)
    if not overrides:
        # Capturing the mixed GPSA maps takes the explicit-weights path: same logits, rows summing to one.
        captured, captured_intermediates = jax.jit(lambda v, x: model.apply(v, x, capture_attention=True))(
            variables, images)
        assert relative_error(captured, expected) <= 1e-5
        maps = captured_intermediates["attention"]
        assert [m.shape for m in maps] == [(2, 4, 16, 16)] * 2 + [(2, 4, 17, 17)]
        np.testing.assert_allclose(np.asarray(maps[0]).sum(-1), 1.0, atol=1e-5)


def test_local_init_matches_timm():
    """GPSA starts as a convolution: timm's local_init of pos_proj (9 heads: a 3x3 grid) and the identity v."""
    reference = timm.create_model("convit_small", pretrained=False, depth=1, local_up_to_layer=1,
                                  global_pool="avg", img_size=32)
    expected = reference.blocks[0].attn.pos_proj.weight.detach().numpy().T   # (3, heads)
    kernel = np.asarray(convit.local_pos_proj_init(9, 1.0)(jax.random.key(0), (3, 9)))
    np.testing.assert_array_equal(kernel, expected)
    identity = np.asarray(convit._identity_value_init(jax.random.key(0), (432, 9, 48)))
    np.testing.assert_array_equal(identity.reshape(432, 432), reference.blocks[0].attn.v.weight.detach().numpy())


def test_registry_matches_timm_names_and_parameter_counts():
    assert models.list_models("convit") == sorted(timm.list_models("convit*"))
    # timm 1.0.31's counts (ConViT paper Table 1: Ti 6M, S 27M, B 86M), from shapes only.
    for name, count in {"convit_tiny": 5_710_512, "convit_base": 86_540_040}.items():
        assert parameter_count(models.create(name)) == count, name


def test_bad_state_dict_names_the_key():
    state = dict(timm.create_model("convit_tiny", pretrained=False, img_size=32, **SHRUNK).state_dict())
    assert_converter_errors(
        state, "convit_tiny", dict(img_size=32, **SHRUNK), missing="blocks.1.attn.gating_param",
        unexpected={"blocks.2.attn.pos_proj.weight": torch.zeros(4, 3)},
        misshapen={"blocks.0.attn.pos_proj.bias": (torch.zeros(5), "blocks_0/attn/pos_proj/bias")})


def test_bad_settings_fail_at_create():
    assert_create_rejects("convit_tiny", [
        (dict(img_size=200), "not divisible by patch_size"),
        (dict(embed_dim=50), "per-head width"),
        (dict(depth=10), "class token"),
        (dict(global_pool="map"), "valid choices"),
    ])


def test_trains_with_dropouts_and_gradients_are_finite():
    settings = dict(SHRUNK, img_size=32, drop_path_rate=0.3, drop_rate=0.1, attn_drop_rate=0.1,
                    proj_drop_rate=0.1)
    model = models.create("convit_tiny", **settings)
    # Converted random weights stand in for `model.init`, whose RNG graph costs seconds of CPU compile here.
    variables = convert.from_timm(reference_model().state_dict(), "convit_tiny", **settings)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    _, grads = train_gradients(model, variables["params"], images, labels=jnp.array([1, 3]))
    # The gates and the positional projection learn.
    assert float(jnp.abs(grads["blocks_0"]["attn"]["gating_param"]).sum()) > 0
    assert float(jnp.abs(grads["blocks_1"]["attn"]["pos_proj"]["kernel"]).sum()) > 0
