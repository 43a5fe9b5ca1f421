"""GMML: parity of the model, head and loss with the official code (fixture), the group masks' coverage against the
official generator's, the corruption, bad settings rejected before compile, and `:runlocal`'s loss falling."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import config_utils, masking, objectives
from vitjax.convert import vit as vit_convert
from vitjax.objectives import gmml
from parity_utils import relative_error
from test_train import read_metrics, run

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "gmml", "gmml.npz")


def fixture_config():
    config = config_utils.default_config()
    config.model_name = "vit"
    config.model = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=4, num_heads=2, mlp_dim=128)
    config.objective = "gmml"
    config.objective_kwargs = dict(recons_blocks=(2, 4), max_block_fraction=0.3)
    return config


def head_params(state, prefix):
    """Returns our ReconstructionHead params from the official RECHead's state dict under `prefix`."""
    params = {f"fc{index}": {"kernel": state[f"{prefix}.mlp.{2 * index}.weight"].T,
                             "bias": state[f"{prefix}.mlp.{2 * index}.bias"]} for index in range(3)}
    # ConvTranspose2d weight (in, out, kh, kw) -> (in, kh, kw, out).
    params["kernel"] = state[f"{prefix}.convTrans.weight"].transpose(0, 2, 3, 1)
    params["bias"] = state[f"{prefix}.convTrans.bias"]
    return params


def load_official(objective, data):
    state = {key[len("state/"):]: data[key] for key in data.files if key.startswith("state/")}
    backbone = {key[len("backbone."):]: value for key, value in state.items() if key.startswith("backbone.")}
    encoder = vit_convert.convert_timm(backbone, objective.module.encoder)["params"]
    return {"params": {"encoder": encoder, "rec_head": head_params(state, "head")}}


def test_model_head_and_loss_equal_the_official_gmml():
    data = np.load(FIXTURE)
    objective = objectives.create("gmml", fixture_config())
    variables = load_official(objective, data)
    reconstruction, _ = objective.module.apply(variables, jnp.asarray(data["corrupted"]), train=False)
    error = relative_error(reconstruction, data["recons"])
    assert error <= 1e-5, error
    loss = gmml.reconstruction_l1(reconstruction, jnp.asarray(data["clean"]), jnp.asarray(data["mask"]))
    assert abs(float(loss) - float(data["loss"])) <= 1e-5 * float(data["loss"])
    full = gmml.reconstruction_l1(reconstruction, jnp.asarray(data["clean"]), None)
    assert abs(float(full) - float(data["loss_all"])) <= 1e-5 * float(data["loss_all"])
    # The copied groups of images 2 and 3 are the next image's pixels, everything else the image's own.
    clean, corrupted, mask = data["clean"], data["corrupted"], data["mask"][..., None] > 0
    for index in (2, 3):
        expected = np.where(mask[index], clean[(index + 1) % 4], clean[index])
        np.testing.assert_array_equal(corrupted[index], expected)


@pytest.mark.parametrize("ratio, size, align", [(0.75, 16, 1), (0.3, 32, 4), (0.5, 32, 4)])
def test_group_masks_cover_what_the_official_generator_covers(ratio, size, align):
    mean, std = np.load(FIXTURE)[f"coverage/{ratio}_{size}_{align}"]
    masks = np.asarray(masking.group_masks(jax.random.key(0), 400, size, size, ratio, align=align))
    shares = masks.mean(axis=(1, 2))
    # 400 draws here, 2000 in the fixture: the means agree within 4 standard errors.
    assert abs(shares.mean() - mean) <= 4 * std * np.sqrt(1 / 400 + 1 / 2000), (shares.mean(), mean)
    assert abs(shares.std() - std) <= 0.2 * std, (shares.std(), std)
    # Aligned masks are unions of whole align x align cells.
    cells = masks.reshape(400, size // align, align, size // align, align)
    assert np.all(cells.min(axis=(2, 4)) == cells.max(axis=(2, 4)))


def test_corrupt_fills_noise_or_another_images_pixels():
    images = jax.random.uniform(jax.random.key(1), (16, 16, 16, 3), minval=5.0, maxval=6.0)  # far from N(0, 1)
    corrupted, mask = gmml.corrupt(jax.random.key(2), images, mask_ratio=0.75, replace_ratio=0.3, replace_prob=0.5,
                                   align=2)
    images, corrupted, mask = map(np.asarray, (images, corrupted, mask))
    np.testing.assert_array_equal(corrupted[mask == 0], images[mask == 0])
    replaced = np.array([np.all(corrupted[i][mask[i] > 0] >= 5.0) for i in range(16)])
    assert 0 < replaced.sum() < 16                       # both branches occur at probability 1/2
    shares = mask.mean(axis=(1, 2))
    assert np.all(shares[~replaced] >= 0.5) and np.all(shares[replaced] >= 0.3)


@pytest.mark.parametrize("change, message", [
    (dict(objective_kwargs=dict(mask_ratio=1.2)), r"mask_ratio must be a number in the open interval \(0, 1\)"),
    (dict(objective_kwargs=dict(mask_ratio=0.0)), r"mask_ratio must be a number in the open interval \(0, 1\)"),
    (dict(objective_kwargs=dict(recons_blocks=(2, 9))), r"recons_blocks must be distinct block numbers in \[1, 4\]"),
    (dict(objective_kwargs=dict(corruption="blur")), r"valid choices: \['noise', 'zeros'\]"),
    (dict(model_name="convnext_tiny"), r"needs a VisionTransformer encoder.*Valid choices: \[.*'vit'"),
    (dict(objective_kwargs=dict(align=3)), r"not divisible by align=3"),
])
def test_bad_settings_are_rejected_with_the_valid_choices(change, message):
    config = fixture_config()
    for key, value in change.items():
        if key == "objective_kwargs":
            config.objective_kwargs.update(value)
        else:
            config[key] = value
    if "model_name" in change:
        config.model = {}
    with pytest.raises(ValueError, match=message):
        objectives.create("gmml", config)


def test_runlocal_loss_falls(tmp_path):
    config = config_utils.load_config("configs/gmml_vit.py:runlocal", {"progress_bar": False,
                                                                       "checkpoint_async": False})
    config.total_steps = 60
    config.log_every_steps = 10
    final = run(config, str(tmp_path / "run"))
    losses = [record["train/loss"] for record in read_metrics(str(tmp_path / "run")) if "train/loss" in record]
    assert losses[-1] < 0.8 * losses[0], losses
    assert 0.1 < final["knn/top1"] <= 1.0
