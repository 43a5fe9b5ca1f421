"""ConvNeXt / ConvNeXt-V2: parity with timm 1.0.31, registry and parameter counts, converter errors, training."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vitjax import convert, models  # noqa: E402

from parity_utils import (  # noqa: E402
    assert_converter_errors, assert_create_rejects, parameter_count, randomize_, relative_error, run_parity,
    train_gradients)


SHRUNK = dict(depths=(1, 1, 2, 1))
NARROW = dict(depths=(1, 1, 1, 1), dims=(32, 48, 64, 80))


def reference_model(name: str, **overrides) -> "torch.nn.Module":
    """Returns a re-randomised eval-mode timm model with 7 classes."""
    reference = timm.create_model(name, pretrained=False, num_classes=7, **overrides).eval()
    randomize_(reference)
    return reference


# Each case covers a different part: the channels-first (conv_mlp) LayerNorm path; SimpleNorm with the
# overlapping GELU stem; RMSNorm with the tiered stem; GRN (V2, no layer scale) with norm-before-pool (at
# 64 px, where the last map is 2x2 and pooling does not commute with the norm); Linear MLPs and the hidden
# head layer. Each is (name, timm overrides, vitjax overrides, image size).
@pytest.mark.parametrize("name, timm_overrides, overrides, image_size", [
    ("convnext_atto", SHRUNK, SHRUNK, 32),
    ("convnext_zepto_rms_ols", SHRUNK, SHRUNK, 32),
    ("convnext_atto_ols", dict(NARROW, norm_layer="rmsnorm2d"), dict(NARROW, norm_type="rmsnorm"), 32),
    ("convnextv2_atto", dict(NARROW, head_norm_first=True), dict(NARROW, head_norm_first=True), 64),
    ("convnext_large_mlp", dict(NARROW, head_hidden_size=96), dict(NARROW, head_hidden_size=96), 32),
])
def test_timm_parity(name, timm_overrides, overrides, image_size):
    expected, ours, intermediates, model, _, _ = run_parity(
        reference_model(name, **timm_overrides), name, num_classes=7, img_size=image_size, **overrides)
    assert ours.shape == expected.shape == (2, 7)
    assert relative_error(ours, expected) <= 1e-5
    dims = model.dims
    assert [stage.shape for stage in intermediates["stages"]] == [
        (2, image_size // 4 // 2 ** index, image_size // 4 // 2 ** index, dims[index]) for index in range(4)]
    assert intermediates["pre_logits"].shape == (2, model.head_hidden_size or dims[-1])


def test_registry_matches_timm_names_and_parameter_counts():
    timm_names = {name for name in timm.list_models("convnext*") if not name.startswith("test_")}
    assert set(models.list_models("convnext")) == timm_names
    # Parameter counts of timm 1.0.31 (ConvNeXt paper Table: T 29M, S 50M, B 89M), from shapes only.
    expected = {"convnext_tiny": 28_589_128, "convnextv2_atto": 3_708_400, "convnext_zepto_rms_ols": 2_164_232}
    for name, count in expected.items():
        assert parameter_count(models.create(name)) == count, name


def test_bad_state_dict_names_the_key():
    reference = timm.create_model("convnext_atto", pretrained=False, num_classes=7, **SHRUNK)
    assert_converter_errors(
        reference.state_dict(), "convnext_atto", dict(num_classes=7, img_size=32, **SHRUNK),
        missing="stages.2.blocks.1.gamma", unexpected={"stages.0.surprise": torch.zeros(3)},
        misshapen={"stages.1.blocks.0.conv_dw.weight": (torch.zeros(80, 1, 5, 5), "stages_1/blocks_0/conv_dw/kernel")})


def test_bad_settings_fail_at_create():
    assert_create_rejects("convnext_atto", [
        (dict(img_size=48), "total stride 32"),
        (dict(norm_type="batchnorm"), "valid choices"),
        (dict(stem_type="conv"), "valid choices"),
    ])


def test_trains_with_drop_path_and_gradients_are_finite():
    settings = dict(num_classes=5, img_size=32, drop_path_rate=0.3, drop_rate=0.1, **NARROW)
    model = models.create("convnextv2_atto", **settings)
    # Converted random weights stand in for `model.init`, whose RNG graph costs ~10 s of CPU compile here.
    reference = timm.create_model("convnextv2_atto", pretrained=False, num_classes=5, **NARROW)
    randomize_(reference)
    variables = convert.from_timm(reference.state_dict(), "convnextv2_atto", **settings)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    _, grads = train_gradients(model, variables["params"], images, labels=jnp.array([1, 3]))
    assert float(jnp.abs(grads["stages_0"]["blocks_0"]["mlp"]["grn"]["bias"]).sum()) > 0
    # Stochastic depth and dropout make training passes with other rngs differ.
    train_apply = jax.jit(lambda rngs: model.apply(variables, images, train=True, rngs=rngs)[0])
    assert not np.allclose(train_apply({"dropout": jax.random.key(2), "drop_path": jax.random.key(3)}),
                           train_apply({"dropout": jax.random.key(4), "drop_path": jax.random.key(5)}))
