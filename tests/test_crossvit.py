"""CrossViT: parity with timm 1.0.31 (branch resize included), registry, converter errors, training mode."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vitjax import convert, models  # noqa: E402
from vitjax.models import crossvit  # noqa: E402

from parity_utils import (  # noqa: E402
    assert_converter_errors, assert_create_rejects, parameter_count, random_variables, randomize_, relative_error,
    run_parity, train_gradients)


# crossvit_tiny_240 shrunk: 120 px for the 12-patch branch, 112 px (bicubic-resized by 224/240) for the
# 16-patch one; the second block has a fusion depth of 1 (timm's `fusion.{b}.{j}` layout).
SMALL = dict(img_size=120, embed_dim=(24, 48), num_heads=(2, 4), depth=((1, 2, 0), (1, 1, 1)), num_classes=5)


def timm_and_vitjax(name, **overrides):
    """Returns the `run_parity` result of a re-randomised timm CrossViT converted to vitjax."""
    settings = {**SMALL, **overrides}
    timm_kwargs = {key: [list(v) for v in value] if key == "depth" else (list(value) if isinstance(value, tuple)
                                                                          else value)
                   for key, value in settings.items()}
    reference = timm.create_model(name, pretrained=False, **timm_kwargs).eval()
    randomize_(reference)
    return run_parity(reference, name, **settings)


@pytest.mark.parametrize("name, overrides", [
    ("crossvit_tiny_240", {}),
    ("crossvit_9_dagger_240", dict(global_pool="avg")),
    ("crossvit_tiny_240", dict(crop_scale=True, depth=((1, 1, 0),))),
])
def test_timm_parity(name, overrides):
    expected, ours, intermediates, *_ = timm_and_vitjax(name, **overrides)
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
    assert_converter_errors(
        state, "crossvit_tiny_240", settings, missing="blocks.0.fusion.1.attn.wk.weight",
        misshapen={"blocks.0.revert_projs.0.2.bias": (np.zeros(7, np.float32), "blocks_0/revert_projs_0/fc/bias")})
    # The original IBM layout (`pos_embed.0`) converts too.
    renamed = {k.replace("pos_embed_", "pos_embed.").replace("cls_token_", "cls_token."): v for k, v in state.items()}
    variables = convert.from_timm(renamed, "crossvit_tiny_240", **settings)
    np.testing.assert_array_equal(variables["params"]["pos_embed_1"], state["pos_embed_1"])


def test_param_count_matches_timm():
    expected = sum(p.numel() for p in timm.create_model("crossvit_15_dagger_240").parameters())
    assert parameter_count(models.create("crossvit_15_dagger_240"), (240, 240, 3)) == expected


def test_registry_and_validation():
    timm_names = set(timm.list_models("crossvit*"))
    assert set(models.list_models("crossvit")) == timm_names
    assert_create_rejects("crossvit_tiny_240", [
        (dict(img_size=100), "not divisible by its patch size"),
        (dict(global_pool="map"), "global_pool"),
    ])


def test_train_mode_and_gradients_on_small_input():
    """A 32 px input works with patch sizes (4, 8) and a 24 px second branch."""
    model = models.create("crossvit_tiny_240", img_size=32, img_scale=(1.0, 0.75), patch_size=(4, 8),
                          embed_dim=(16, 32), num_heads=(2, 2), depth=((1, 1, 0),), num_classes=10,
                          drop_path_rate=0.2, drop_rate=0.1)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    _, grads = train_gradients(model, random_variables(model, (32, 32, 3))["params"], images)
    assert sum(float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)) > 0
