"""ConvNeXt / ConvNeXt-V2: parity with timm 1.0.31, registry and parameter counts, converter errors, training."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vitjax import convert, models  # noqa: E402


def randomize_(module: "torch.nn.Module", seed: int = 0, std: float = 0.15) -> None:
    """Redraws every float tensor: norm scales 1 + N(0, 0.1), everything else (layer scale too) N(0, std)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if "norm" in key and key.endswith("weight") and tensor.ndim == 1:
                tensor.copy_(1.0 + 0.1 * noise)
            else:
                tensor.copy_(std * noise)


def relative_error(ours, reference) -> float:
    """Returns max |ours - reference| / max |reference|."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


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
    reference = reference_model(name, **timm_overrides)
    images = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(images).numpy()
    variables = convert.from_timm(reference.state_dict(), name, num_classes=7, img_size=image_size, **overrides)
    model = models.create(name, num_classes=7, img_size=image_size, **overrides)
    ours, intermediates = jax.jit(model.apply)(variables, jnp.asarray(images.numpy().transpose(0, 2, 3, 1)))
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
        model = models.create(name)
        shapes = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
        total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(flax.linen.meta.unbox(shapes["params"])))
        assert total == count, name


def test_bad_state_dict_names_the_key():
    reference = timm.create_model("convnext_atto", pretrained=False, num_classes=7, **SHRUNK)
    state = dict(reference.state_dict())
    kwargs = dict(num_classes=7, img_size=32, **SHRUNK)
    missing = dict(state)
    del missing["stages.2.blocks.1.gamma"]
    with pytest.raises(KeyError, match=r"stages\.2\.blocks\.1\.gamma"):
        convert.from_timm(missing, "convnext_atto", **kwargs)
    extra = dict(state, **{"stages.0.surprise": torch.zeros(3)})
    with pytest.raises(KeyError, match=r"stages\.0\.surprise"):
        convert.from_timm(extra, "convnext_atto", **kwargs)
    wrong = dict(state, **{"stages.1.blocks.0.conv_dw.weight": torch.zeros(80, 1, 5, 5)})
    with pytest.raises(ValueError, match="stages_1/blocks_0/conv_dw/kernel"):
        convert.from_timm(wrong, "convnext_atto", **kwargs)


def test_bad_settings_fail_at_create():
    with pytest.raises(ValueError, match="total stride 32"):
        models.create("convnext_atto", img_size=48)
    with pytest.raises(ValueError, match="valid choices"):
        models.create("convnext_atto", norm_type="batchnorm")
    with pytest.raises(ValueError, match="valid choices"):
        models.create("convnext_atto", stem_type="conv")


def test_trains_with_drop_path_and_gradients_are_finite():
    settings = dict(num_classes=5, img_size=32, drop_path_rate=0.3, drop_rate=0.1, **NARROW)
    model = models.create("convnextv2_atto", **settings)
    # Converted random weights stand in for `model.init`, whose RNG graph costs ~10 s of CPU compile here.
    reference = timm.create_model("convnextv2_atto", pretrained=False, num_classes=5, **NARROW)
    randomize_(reference)
    variables = convert.from_timm(reference.state_dict(), "convnextv2_atto", **settings)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    labels = jnp.array([1, 3])
    rngs = {"dropout": jax.random.key(2), "drop_path": jax.random.key(3)}

    def loss_fn(params):
        logits, _ = model.apply({"params": params}, images, train=True, rngs=rngs)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels])

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(variables["params"])
    assert np.isfinite(float(loss))
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["stages_0"]["blocks_0"]["mlp"]["grn"]["bias"]).sum()) > 0
    # Stochastic depth and dropout make training passes with other rngs differ.
    train_apply = jax.jit(lambda rngs: model.apply(variables, images, train=True, rngs=rngs)[0])
    other = {"dropout": jax.random.key(4), "drop_path": jax.random.key(5)}
    assert not np.allclose(train_apply(rngs), train_apply(other))
