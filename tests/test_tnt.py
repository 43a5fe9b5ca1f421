"""TNT: parity with timm 1.0.31 (current and legacy layouts), registry, converter errors, training mode."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vitjax import convert, models  # noqa: E402


def randomize_(module: "torch.nn.Module", seed: int = 0, std: float = 0.15) -> None:
    """Redraws every float tensor: norm-layer scales 1 + N(0, 0.1), the rest N(0, std)."""
    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._BatchNorm)
    norm_scales = {f"{name}.weight" for name, sub in module.named_modules() if isinstance(sub, norm_types)}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            tensor.copy_(1.0 + 0.1 * noise if key in norm_scales else std * noise)


def random_variables(model, image_shape, seed: int = 0):
    """Returns variables of the model's shapes drawn from N(0, 0.05) (BN variances 1), without compiling init."""
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1,) + image_shape)))
    shapes = flax.linen.meta.unbox(shapes)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: np.ones(s.shape, np.float32) if path[-1].key == "var"
        else rng.normal(0.0, 0.05, s.shape).astype(np.float32), shapes)


def relative_error(ours, reference) -> float:
    """Returns max |ours - reference| / max |reference|."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


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
    size = settings["img_size"]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(images).numpy()
    variables = convert.from_timm(reference.state_dict(), name, **settings)
    model = models.create(name, **settings)
    ours, intermediates = jax.jit(model.apply)(variables, jnp.asarray(images.numpy().transpose(0, 2, 3, 1)))
    assert ours.shape == expected.shape == (2, 5)
    assert relative_error(ours, expected) <= 1e-5
    assert intermediates["pre_logits"].shape == (2, 48)
    assert len(intermediates["blocks"]) == 2


def test_converter_errors_name_the_key():
    reference = timm.create_model("tnt_s_patch16_224", pretrained=False, **SMALL)
    state = {key: value.numpy() for key, value in reference.state_dict().items()}
    missing = "blocks.1.attn_in.qk.weight"
    with pytest.raises(KeyError, match=missing.replace(".", r"\.")):
        convert.from_timm({k: v for k, v in state.items() if k != missing}, "tnt_s_patch16_224", **SMALL)
    with pytest.raises(ValueError, match="blocks_0/norm2_proj/bias"):
        convert.from_timm({**state, "blocks.0.norm2_proj.bias": np.zeros(7, np.float32)}, "tnt_s_patch16_224",
                          **SMALL)


def test_param_count_matches_timm():
    expected = sum(p.numel() for p in timm.create_model("tnt_s_patch16_224").parameters())
    model = models.create("tnt_s_patch16_224")
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 224, 224, 3))))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(flax.linen.meta.unbox(shapes))) == expected


def test_registry_and_validation():
    assert set(models.list_models("tnt_")) == set(timm.list_models("tnt*"))
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        models.create("tnt_s_patch16_224", img_size=40)
    with pytest.raises(ValueError, match="global_pool"):
        models.create("tnt_s_patch16_224", global_pool="map")


def test_train_mode_and_gradients():
    model = models.create("tnt_s_patch16_224", **dict(SMALL, depth=1), drop_path_rate=0.2, drop_rate=0.1)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    params = random_variables(model, (32, 32, 3))["params"]
    rngs = {"dropout": jax.random.key(2), "drop_path": jax.random.key(3)}

    def loss_fn(params):
        logits, _ = model.apply({"params": params}, images, train=True, rngs=rngs)
        return jnp.mean(logits ** 2)

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert np.isfinite(float(loss)) and all(np.isfinite(norms)) and sum(norms) > 0
