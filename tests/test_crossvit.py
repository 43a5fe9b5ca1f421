"""CrossViT: parity with timm 1.0.31 (branch resize included), registry, converter errors, training mode."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vitjax import convert, models  # noqa: E402
from vitjax.models import crossvit  # noqa: E402


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


# crossvit_tiny_240 shrunk: 120 px for the 12-patch branch, 112 px (bicubic-resized by 224/240) for the
# 16-patch one; the second block has a fusion depth of 1 (timm's `fusion.{b}.{j}` layout).
SMALL = dict(img_size=120, embed_dim=(24, 48), num_heads=(2, 4), depth=((1, 2, 0), (1, 1, 1)), num_classes=5)


def timm_and_vitjax(name, **overrides):
    """Returns (timm logits, vitjax logits, intermediates) for a re-randomised, converted timm CrossViT."""
    settings = {**SMALL, **overrides}
    timm_kwargs = {key: [list(v) for v in value] if key == "depth" else (list(value) if isinstance(value, tuple)
                                                                          else value)
                   for key, value in settings.items()}
    reference = timm.create_model(name, pretrained=False, **timm_kwargs).eval()
    randomize_(reference)
    size = settings["img_size"]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(images).numpy()
    variables = convert.from_timm(reference.state_dict(), name, **settings)
    model = models.create(name, **settings)
    ours, intermediates = jax.jit(model.apply)(variables, jnp.asarray(images.numpy().transpose(0, 2, 3, 1)))
    return expected, np.asarray(ours), intermediates, reference


@pytest.mark.parametrize("name, overrides", [
    ("crossvit_tiny_240", {}),
    ("crossvit_9_dagger_240", dict(global_pool="avg")),
    ("crossvit_tiny_240", dict(crop_scale=True, depth=((1, 1, 0),))),
])
def test_timm_parity(name, overrides):
    expected, ours, intermediates, _ = timm_and_vitjax(name, **overrides)
    assert ours.shape == expected.shape == (2, 5)
    assert relative_error(ours, expected) <= 1e-5
    assert intermediates["pre_logits"].shape == (2, 72)
    assert [x.shape for x in intermediates["blocks"][-1]] == [(2, 101, 24), (2, 50, 48)]


def test_branch_resize_matches_torch_bicubic():
    """The 16-patch branch sees torch's bicubic resize of the input, reproduced to float32 rounding."""
    images = torch.randn(2, 3, 240, 240, generator=torch.Generator().manual_seed(3))
    size = crossvit.scaled_sizes(240, (1.0, 224 / 240))[1]
    assert size == (224, 224)
    expected = torch.nn.functional.interpolate(images, size=size, mode="bicubic", align_corners=False).numpy()
    ours = crossvit.scale_image(jnp.asarray(images.numpy().transpose(0, 2, 3, 1)), size, crop_scale=False)
    assert relative_error(np.asarray(ours).transpose(0, 3, 1, 2), expected) <= 1e-6


def test_converter_errors_name_the_key():
    reference = timm.create_model("crossvit_tiny_240", pretrained=False, img_size=120, embed_dim=[24, 48],
                                  num_heads=[2, 4], depth=[[1, 1, 0]], num_classes=5)
    state = {key: value.numpy() for key, value in reference.state_dict().items()}
    settings = dict(SMALL, depth=((1, 1, 0),))
    missing = "blocks.0.fusion.1.attn.wk.weight"
    with pytest.raises(KeyError, match=missing.replace(".", r"\.")):
        convert.from_timm({k: v for k, v in state.items() if k != missing}, "crossvit_tiny_240", **settings)
    bad = "blocks.0.revert_projs.0.2.bias"
    with pytest.raises(ValueError, match="blocks_0/revert_projs_0/fc/bias"):
        convert.from_timm({**state, bad: np.zeros(7, np.float32)}, "crossvit_tiny_240", **settings)
    # The original IBM layout (`pos_embed.0`) converts too.
    renamed = {k.replace("pos_embed_", "pos_embed.").replace("cls_token_", "cls_token."): v for k, v in state.items()}
    variables = convert.from_timm(renamed, "crossvit_tiny_240", **settings)
    np.testing.assert_array_equal(variables["params"]["pos_embed_1"], state["pos_embed_1"])


def test_param_count_matches_timm():
    expected = sum(p.numel() for p in timm.create_model("crossvit_15_dagger_240").parameters())
    model = models.create("crossvit_15_dagger_240")
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 240, 240, 3))))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(flax.linen.meta.unbox(shapes))) == expected


def test_registry_and_validation():
    timm_names = set(timm.list_models("crossvit*"))
    assert set(models.list_models("crossvit")) == timm_names
    with pytest.raises(ValueError, match="not divisible by its patch size"):
        models.create("crossvit_tiny_240", img_size=100)
    with pytest.raises(ValueError, match="global_pool"):
        models.create("crossvit_tiny_240", global_pool="map")


def test_train_mode_and_gradients_on_small_input():
    """A 32 px input works with patch sizes (4, 8) and a 24 px second branch."""
    model = models.create("crossvit_tiny_240", img_size=32, img_scale=(1.0, 0.75), patch_size=(4, 8),
                          embed_dim=(16, 32), num_heads=(2, 2), depth=((1, 1, 0),), num_classes=10,
                          drop_path_rate=0.2, drop_rate=0.1)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    params = random_variables(model, (32, 32, 3))["params"]
    rngs = {"dropout": jax.random.key(2), "drop_path": jax.random.key(3)}

    def loss_fn(params):
        logits, _ = model.apply({"params": params}, images, train=True, rngs=rngs)
        return jnp.mean(logits ** 2)

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert np.isfinite(float(loss)) and all(np.isfinite(norms)) and sum(norms) > 0
