"""SatMAE++: parity of the group-channel and RGB models (encoder, decoder, multi-scale outputs, each loss and the
total) with the official code (fixture), the input pyramid, bad settings rejected before compile, the band data
ops, and `:runlocal` (digits with synthetic bands) through the trainer with a falling loss."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import config_utils, objectives
from vitjax.convert import satmae as satmae_convert
from vitjax.models import satmae as satmae_model
from parity_utils import relative_error
from test_train import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "satmae", "satmae_pp.npz")
TOLERANCE = 1e-5


def fixture_config(grouped=True, **kwargs):
    """The shrunk configuration of the fixture (tests/fixtures/satmae/README.md)."""
    config = config_utils.default_config()
    config.model_name = "vit_tiny_patch16_224"
    config.model = dict(img_size=8, patch_size=2, in_chans=10 if grouped else 3, embed_dim=32, depth=1, num_heads=4,
                        mlp_dim=128)
    config.objective = "satmae"
    config.objective_kwargs = dict(decoder_embed_dim=16, decoder_depth=2 if grouped else 1, decoder_num_heads=2)
    if grouped:
        config.objective_kwargs.update(group_embed_dim=8, decoder_group_embed_dim=8, proj_ratio=2)
    else:
        config.objective_kwargs.update(channel_groups=None)
    config.objective_kwargs.update(kwargs)
    return config


def official_params(data, prefix):
    return {key.split("/params/", 1)[1]: data[key] for key in data.files if key.startswith(f"{prefix}/params/")}


def nhwc(array):
    return jnp.asarray(np.asarray(array).transpose(0, 2, 3, 1))


@pytest.mark.parametrize("masking", ["independent", "spatial"])
def test_group_channel_model_and_losses_equal_the_official_satmae_pp(masking):
    data = np.load(FIXTURE)
    objective = objectives.create("satmae", fixture_config(spatial_mask=masking == "spatial"))
    variables = satmae_convert.convert_pretrain(official_params(data, "group"), objective.module)
    images = nhwc(data["group/pixels_4x"].astype(np.float32) / 255.0)
    prefix = f"group/{masking}"
    total, metrics, outputs = objective.losses(variables, images, False, jax.random.key(0),
                                               noise=jnp.asarray(data[f"{prefix}/noise"]))
    errors = {"input": relative_error(outputs["pyramid"][0], nhwc(data["group/image"])),
              "latent": relative_error(outputs["aux"]["latent"], data[f"{prefix}/latent"]),
              "pred": relative_error(outputs["pred"], data[f"{prefix}/pred"]),
              "mse": relative_error(jnp.mean(metrics["mse"]), data[f"{prefix}/mse"]),
              "l1_2x": relative_error(jnp.mean(metrics["l1_2x"]), data[f"{prefix}/l1_2x"]),
              "l1_4x": relative_error(jnp.mean(metrics["l1_4x"]), data[f"{prefix}/l1_4x"]),
              "total": relative_error(jnp.mean(total), data[f"{prefix}/total"])}
    if masking == "independent":
        errors["pred_2x"] = relative_error(outputs["scales"][0], nhwc(data[f"{prefix}/pred_2x"]))
        errors["pred_4x"] = relative_error(outputs["scales"][1], nhwc(data[f"{prefix}/pred_4x"]))
    print(prefix, {key: f"{value:.1e}" for key, value in errors.items()})
    assert max(errors.values()) <= TOLERANCE, errors
    np.testing.assert_array_equal(outputs["aux"]["mask"], data[f"{prefix}/mask"])
    # The per-patch normalised target (--norm_pix_loss) on the same prediction.
    norm_pix = objectives.create("satmae", fixture_config(spatial_mask=masking == "spatial", norm_pix_loss=True))
    _, metrics, _ = norm_pix.losses(variables, images, False, jax.random.key(0),
                                    noise=jnp.asarray(data[f"{prefix}/noise"]))
    assert relative_error(jnp.mean(metrics["mse"]), data[f"{prefix}/mse_norm_pix"]) <= TOLERANCE


def test_rgb_model_and_losses_equal_the_official_satmae_pp():
    data = np.load(FIXTURE)
    objective = objectives.create("satmae", fixture_config(grouped=False))
    assert objective.num_scales == 1 and objective.input_size == 16
    variables = satmae_convert.convert_pretrain(official_params(data, "rgb"), objective.module)
    images = nhwc(data["rgb/pixels_2x"].astype(np.float32) / 255.0)
    total, metrics, outputs = objective.losses(variables, images, False, jax.random.key(0),
                                               noise=jnp.asarray(data["rgb/noise"]))
    errors = {"latent": relative_error(outputs["aux"]["latent"], data["rgb/latent"]),
              "pred": relative_error(outputs["pred"], data["rgb/pred"]),
              "pred_2x": relative_error(outputs["scales"][0], nhwc(data["rgb/pred_2x"])),
              "mse": relative_error(jnp.mean(metrics["mse"]), data["rgb/mse"]),
              "l1_2x": relative_error(jnp.mean(metrics["l1_2x"]), data["rgb/l1_2x"]),
              "total": relative_error(jnp.mean(total), data["rgb/total"])}
    print("rgb", {key: f"{value:.1e}" for key, value in errors.items()})
    assert max(errors.values()) <= TOLERANCE, errors
    np.testing.assert_array_equal(outputs["aux"]["mask"], data["rgb/mask"])


def test_reference_fp32_noise_is_below_the_tolerance():
    """The official fp32 against its own fp64 run: how much of the 1e-5 budget is the reference's rounding."""
    data = np.load(FIXTURE)
    errors = {key: relative_error(data[f"group/independent/{key}"], data[f"group/independent64/{key}"])
              for key in ("latent", "pred", "l1_4x")}
    print("official fp32 vs fp64", {key: f"{value:.1e}" for key, value in errors.items()})
    assert max(errors.values()) < 1e-5, errors


def test_the_input_pyramid_is_bilinear_halving_and_init_matches_the_converted_tree():
    images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
    small = satmae_model.downsample2x(images)
    # Bilinear halving at align_corners=False samples between each pixel pair: the 2x2 mean.
    np.testing.assert_allclose(small[0, 3, 5], images[0, 6:8, 10:12].mean(axis=(0, 1)), rtol=1e-6)
    data = np.load(FIXTURE)
    objective = objectives.create("satmae", fixture_config())
    converted = satmae_convert.convert_pretrain(official_params(data, "group"), objective.module)
    init = jax.eval_shape(lambda: objective.init_variables(jax.random.key(0), {"image": jnp.zeros((2, 32, 32, 10))}))
    assert (jax.tree.map(np.shape, converted)
            == jax.tree.map(lambda x: x.shape, __import__("flax").linen.meta.unbox(init)))


@pytest.mark.parametrize("change, message", [
    (dict(mask_ratio=1.0), r"mask_ratio must be a number in the open interval \(0, 1\)"),
    (dict(mask_ratio=0.0), r"mask_ratio must be a number in the open interval \(0, 1\)"),
    (dict(channel_groups=((0, 1, 2), (3, 4, 5))), r"must split the 10 input bands \[0, 1, .*9\].*or None for the RGB"),
    (dict(channel_groups=((0, 1, 2, 3, 4), (4, 5, 6, 7, 8, 9))), r"each band in exactly one group"),
    (dict(num_scales=0), r"num_scales must be an int >= 1"),
    (dict(scale_weights=(1.0,)), r"one weight per scale \(2\)"),
    (dict(group_embed_dim=6), r"group_embed_dim 6 must be even and leave embed_dim 32 a positive multiple of 4"),
    (dict(model_name="convnext_atto"), r"needs a VisionTransformer encoder.*Valid choices: \[.*'vit_"),
    (dict(model=dict(img_size=8, patch_size=2, in_chans=10, num_classes=10)), r"config.model.num_classes must be 0"),
])
def test_bad_settings_are_rejected_with_the_valid_choices(change, message):
    config = fixture_config()
    for key, value in change.items():
        if key in ("model_name", "model"):
            config[key] = value
        else:
            config.objective_kwargs[key] = value
    with pytest.raises(ValueError, match=message):
        objectives.create("satmae", config)


def test_a_batch_at_the_wrong_scale_is_rejected_before_compile():
    objective = objectives.create("satmae", fixture_config())
    with pytest.raises(ValueError, match=r"largest scale: \(batch,\) \+ \(32, 32, 10\)"):
        objective.init_variables(jax.random.key(0), {"image": jnp.zeros((2, 8, 8, 10))})


def test_band_ops_select_normalise_and_synthesise_bands():
    from vitjax.data import ops
    import tensorflow as tf
    image = tf.reshape(tf.range(2 * 3 * 13, dtype=tf.float32), (2, 3, 13))
    selected = ops.build_preprocess("select_bands(drop=(0, 9, 10))")({"image": image}, tf.constant([0, 0], tf.int64))
    np.testing.assert_array_equal(selected["image"].numpy(),
                                  image.numpy()[..., [1, 2, 3, 4, 5, 6, 7, 8, 11, 12]])
    digit = tf.constant(np.arange(64, dtype=np.float32).reshape(8, 8, 1) * 4)
    bands = ops.build_preprocess("synthetic_bands(6)")({"image": digit}, tf.constant([0, 0], tf.int64))["image"]
    bands = bands.numpy()
    assert bands.shape == (8, 8, 6) and bands.dtype == np.float32
    np.testing.assert_array_equal(bands[..., 0], digit.numpy()[..., 0])
    # Every band differs from the others (derived, not copies) and stays in the input's [0, 255] range.
    assert min(np.abs(bands[..., i] - bands[..., j]).max() for i in range(6) for j in range(i)) > 1.0
    assert bands.min() >= 0 and bands.max() <= 255
    # SentinelNormalize: mean - 2 std -> 0, mean + 2 std -> 1, clipped, 256 levels (floor, as their uint8 cast).
    mean, std = np.asarray(ops.SENTINEL2_MEAN, np.float32), np.asarray(ops.SENTINEL2_STD, np.float32)
    raw = tf.constant(np.stack([mean - 2 * std, mean + 2 * std, mean, mean + 5 * std])[:, None, :])   # (4, 1, 13)
    normalized = ops.build_preprocess("sentinel_normalize")({"image": raw}, tf.constant([0, 0], tf.int64))["image"]
    np.testing.assert_allclose(normalized.numpy()[:, 0, 0], [0.0, 1.0, 127 / 255, 1.0], atol=1e-6)
    # The recipe's pipeline on a fake eurosat/all example (64 px, 13 float bands): 384 px, the 10 kept bands.
    config = config_utils.load_config("configs/satmae_pp.py")
    example = {"image": tf.constant(np.random.default_rng(0).uniform(0, 3000, (64, 64, 13)).astype(np.float32))}
    out = ops.build_preprocess(config.input.pp_train)(example, tf.constant([1, 2], tf.int64))["image"].numpy()
    assert out.shape == (384, 384, 10) and -0.2 < out.min() and out.max() < 1.2
    with pytest.raises(ValueError, match=r"num_bands must be an int in \[1, 8\]"):
        ops.build_preprocess("synthetic_bands(9)")
    with pytest.raises(ValueError, match=r"exactly one of keep= or drop="):
        ops.build_preprocess("select_bands()")


def test_runlocal_loss_falls(tmp_path):
    workdir = str(tmp_path / "satmae")
    result = subprocess.run(
        [sys.executable, "-m", "vitjax.main", "--config=configs/satmae_pp.py:runlocal", f"--workdir={workdir}",
         "--config.total_steps=20", "--config.batch_size=32", "--config.log_every_steps=5",
         "--config.progress_bar=False"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, XLA_FLAGS="", JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"))
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(workdir)
    losses = [record["train/loss"] for record in records if "train/loss" in record]
    print("runlocal losses", losses, records[-1])
    assert len(losses) == 4 and losses[-1] < 0.6 * losses[0], losses
    l1 = [record["train/l1_4x"] for record in records if "train/l1_4x" in record]
    assert l1[-1] < l1[0], l1
    # The encoder's class token separates the digits far above chance (kNN at the end of the run).
    knn = [record["knn/top1"] for record in records if "knn/top1" in record]
    assert len(knn) == 1 and 0.3 < knn[0] <= 1.0, knn


def test_config_builds_the_official_recipe(tmp_path):
    config = config_utils.validate_config(config_utils.load_config(f"configs/satmae_pp.py:data_dir={tmp_path}"))
    assert (config.batch_size, config.total_epochs, config.optim.blr, config.optim.b2) == (2048, 50, 1e-4, 0.95)
    objective = objectives.create("satmae", config)
    backbone = objective.module.backbone
    assert (backbone.embed_dim, backbone.depth, backbone.patch_size, backbone.img_size, backbone.in_chans) == (
        1024, 24, 8, 96, 10)
    assert backbone.channel_groups == ((0, 1, 2, 6), (3, 4, 5, 7), (8, 9)) and objective.input_size == 384
    assert "select_bands(drop=(0, 9, 10))" in config.input.pp_train


def test_a_classifier_init_from_a_satmae_run_takes_its_encoder():
    """Fine-tuning from a SatMAE++ (RGB variant) run: `init_from` finds the MAE encoder under `backbone/encoder`
    (the multi-scale head and decoder stay behind) and loads every trunk tensor of a ViT classifier unchanged."""
    from vitjax import pytree, weights
    config = fixture_config(grouped=False)
    config.optim.lr, config.total_steps = 1e-3, 1
    objective = objectives.create("satmae", config_utils.validate_config(config))
    pretrained_variables = jax.tree.map(np.asarray, pytree.unbox(jax.jit(objective.init_variables)(
        jax.random.key(0), objective.example_batch(None))))
    config.model.update(num_classes=10, global_pool="token")
    config.objective, config.objective_kwargs = "mae_finetune", {}
    classifier = objectives.create("mae_finetune", config_utils.validate_config(config))
    target = jax.jit(classifier.init_variables)(jax.random.key(1), {"image": np.zeros((1, 8, 8, 3), np.float32)})
    plan = weights.plan(target, weights.Pretrained(pretrained_variables, "satmae_run", "vitjax", "a SatMAE++ run"),
                        classifier.init_from_rules())
    encoder = pytree.param_paths(pretrained_variables["params"]["backbone"]["encoder"])
    loaded = {path[len("params/"):] for path, (action, _) in plan.actions.items() if action == "loaded"}
    assert loaded == set(encoder), plan.table()
    params = pytree.param_paths(pytree.unbox(plan.apply(target)["params"]))
    for path in loaded:
        np.testing.assert_array_equal(np.asarray(params[path]), encoder[path])
