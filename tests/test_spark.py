"""SparK: parity of the sparse encoder's multi-scale features, the densified maps, the decoder's reconstruction and
the loss with the official code (fixture), its masks, bad settings rejected before compile, `:runlocal` through
the trainer with a falling loss, and a fine-tune that loads the pretrained ConvNeXt encoder through `init_from`."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import config_utils, objectives
from vitjax.objectives import spark
from parity_utils import relative_error
from test_train import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "spark", "spark_convnext.npz")
TOLERANCE = 1e-5


def fixture_config(densify_norm="ln"):
    config = config_utils.default_config()
    config.model_name = "convnext_atto"
    config.model = dict(img_size=64, depths=(1, 1, 1, 1), dims=(4, 8, 16, 32))
    config.objective = "spark"
    config.objective_kwargs = dict(decoder_width=32, densify_norm=densify_norm)
    return config


def conv(weight, bias=None):
    """Returns {"kernel" (HWIO), "bias"} of a torch Conv2d (O, I, kh, kw)."""
    out = {"kernel": weight.transpose(2, 3, 1, 0)}
    if bias is not None:
        out["bias"] = bias
    return out


def official_variables(data, densify_norm):
    """Returns our {"params", "batch_stats"} from the official SparK state dict in the fixture."""
    state = {key.split("/params/", 1)[1]: data[key] for key in data.files if key.startswith("ln/params/")}
    if densify_norm != "ln":   # the 'bn' model shares the encoder and decoder, not the densify layers
        state = {key: value for key, value in state.items() if not key.startswith(("densify", "mask_tokens"))}
        state.update({key.split("/params/", 1)[1]: data[key] for key in data.files
                      if key.startswith(f"{densify_norm}/params/")})
    cnn = "sparse_encoder.sp_cnn."
    encoder = {"stem_0": conv(state[cnn + "downsample_layers.0.0.weight"], state[cnn + "downsample_layers.0.0.bias"]),
               "stem_1": {"scale": state[cnn + "downsample_layers.0.1.weight"],
                          "bias": state[cnn + "downsample_layers.0.1.bias"]},
               "head": {"norm": {"scale": np.ones(32, np.float32), "bias": np.zeros(32, np.float32)}}}
    for stage in range(4):
        params = {}
        if stage:
            down = f"{cnn}downsample_layers.{stage}."
            params["downsample_norm"] = {"scale": state[down + "0.weight"], "bias": state[down + "0.bias"]}
            params["downsample_conv"] = conv(state[down + "1.weight"], state[down + "1.bias"])
        block = f"{cnn}stages.{stage}.0."
        params["blocks_0"] = {
            "conv_dw": conv(state[block + "dwconv.weight"], state[block + "dwconv.bias"]),
            "norm": {"scale": state[block + "norm.weight"], "bias": state[block + "norm.bias"]},
            "mlp": {name: {"kernel": state[f"{block}pw{name}.weight"].T, "bias": state[f"{block}pw{name}.bias"]}
                    for name in ("conv1", "conv2")},
            "gamma": state[block + "gamma"]}
        params["blocks_0"]["mlp"] = {"fc1": params["blocks_0"]["mlp"].pop("conv1"),
                                     "fc2": params["blocks_0"]["mlp"].pop("conv2")}
        encoder[f"stages_{stage}"] = params
    decoder, stats = {}, {}
    for index in range(5):
        prefix = f"dense_decoder.dec.{index}."
        # ConvTranspose2d (in, out, kh, kw): a transposed conv is a conv of the dilated input with the kernel flipped.
        up = state[prefix + "up_sample.weight"].transpose(2, 3, 0, 1)[::-1, ::-1].copy()
        decoder[f"blocks_{index}"] = {
            "up_sample": {"kernel": up, "bias": state[prefix + "up_sample.bias"]},
            "conv_0": conv(state[prefix + "conv.0.weight"]), "conv_1": conv(state[prefix + "conv.3.weight"]),
            "bn_0": {"scale": state[prefix + "conv.1.weight"], "bias": state[prefix + "conv.1.bias"]},
            "bn_1": {"scale": state[prefix + "conv.4.weight"], "bias": state[prefix + "conv.4.bias"]}}
        stats[f"blocks_{index}"] = {
            name: {"mean": state[f"{prefix}conv.{torch_index}.running_mean"],
                   "var": state[f"{prefix}conv.{torch_index}.running_var"]}
            for name, torch_index in (("bn_0", 1), ("bn_1", 4))}
    decoder["proj"] = conv(state["dense_decoder.proj.weight"], state["dense_decoder.proj.bias"])
    params = {"encoder": encoder, "decoder": decoder}
    batch_stats = {"decoder": stats}
    for index in range(4):
        params[f"mask_token_{index}"] = state[f"mask_tokens.{index}"].reshape(-1)
        if densify_norm != "none":
            params[f"densify_{index}_norm"] = {"scale": state[f"densify_norms.{index}.weight"],
                                               "bias": state[f"densify_norms.{index}.bias"]}
        if densify_norm == "bn":
            batch_stats[f"densify_{index}_norm"] = {"mean": state[f"densify_norms.{index}.running_mean"],
                                                    "var": state[f"densify_norms.{index}.running_var"]}
        if index:
            params[f"densify_{index}_proj"] = conv(state[f"densify_projs.{index}.weight"],
                                                   state[f"densify_projs.{index}.bias"])
    return {"params": params, "batch_stats": batch_stats}


@pytest.mark.parametrize("densify_norm, mode", [("ln", "train"), ("ln", "eval"), ("bn", "train")])
def test_features_decoder_and_loss_equal_the_official_spark(densify_norm, mode):
    data = np.load(FIXTURE)
    objective = objectives.create("spark", fixture_config(densify_norm))
    variables = official_variables(data, densify_norm)
    images, active = jnp.asarray(data["images"]), jnp.asarray(data["active"], jnp.float32)
    # Our init's tree must be the converted one: nothing missing, nothing extra, the same shapes.
    init = jax.eval_shape(lambda: objective.init_variables(jax.random.key(0), {"image": images}))
    assert (jax.tree.map(np.shape, jax.tree.map(np.asarray, variables))
            == jax.tree.map(lambda x: x.shape, __import__("flax").linen.meta.unbox(init)))
    loss, _, reconstruction, aux, _ = objective.loss_given_mask(variables, images, active, mode == "train",
                                                                jax.random.key(0))
    prefix = f"{densify_norm}/{mode}"
    errors = {f"features_{i}": relative_error(aux["features"][i], data[f"{prefix}/features_{i}"]) for i in range(4)}
    errors.update({f"to_dec_{i}": relative_error(aux["to_decode"][i], data[f"{prefix}/to_dec_{i}"])
                   for i in range(4)})
    if f"{prefix}/reconstruction" in data.files:
        errors["reconstruction"] = relative_error(reconstruction, data[f"{prefix}/reconstruction"])
    if f"{prefix}/reconstruction_0" in data.files:
        errors["reconstruction"] = relative_error(reconstruction[:1], data[f"{prefix}/reconstruction_0"])
    errors["loss"] = relative_error(loss, data[f"{prefix}/loss"])
    print(prefix, {key: f"{value:.1e}" for key, value in errors.items()})
    assert max(errors.values()) <= TOLERANCE, errors
    # Removed cells of every feature map are empty: nothing leaked through the convs.
    for feature in aux["features"]:
        cells = np.repeat(np.repeat(data["active"], feature.shape[1] // 2, 1), feature.shape[2] // 2, 2)
        assert np.all(np.asarray(feature)[~cells.astype(bool)] == 0)


def test_random_active_keeps_round_of_the_kept_share_per_image():
    active = np.asarray(spark.random_active(jax.random.key(0), 64, (7, 7), 0.6))
    # round(49 x 0.4) = 20 (MAE's int() would keep 19), a different subset per image.
    assert np.all(active.reshape(64, -1).sum(axis=1) == 20)
    assert len({row.tobytes() for row in active.reshape(64, -1)}) == 64
    # Every cell is kept equally often (20/49 = 0.41) within sampling error.
    frequency = np.asarray(spark.random_active(jax.random.key(1), 4096, (7, 7), 0.6)).mean(axis=0)
    assert np.all(np.abs(frequency - 20 / 49) < 0.04), frequency


@pytest.mark.parametrize("change, message", [
    (dict(objective_kwargs=dict(mask_ratio=1.2)), r"mask_ratio must be a number in the open interval \(0, 1\)"),
    (dict(objective_kwargs=dict(mask_ratio=0.0)), r"mask_ratio must be a number in the open interval \(0, 1\)"),
    (dict(objective_kwargs=dict(mask_ratio=0.9)), r"keeps 0 of the 4 patches"),
    (dict(objective_kwargs=dict(densify_norm="gn")), r"valid choices: \['ln', 'bn', 'none'\]"),
    (dict(objective_kwargs=dict(decoder_width=16)), r"halves to 0 over 5 upsampling blocks; use at least 32"),
    (dict(model_name="vit_tiny_patch16_224", model=dict(img_size=64)),
     r"SparK needs a ConvNeXt encoder; model 'vit_tiny_patch16_224' is a VisionTransformer\. "
     r"Valid choices: \[.*'convnext_small'"),
    (dict(model_name="convnextv2_atto", model=dict(img_size=64)), r"patch stem and no GRN.*valid choices"),
    (dict(model=dict(img_size=64, num_classes=10)), r"config.model.num_classes must be 0"),
])
def test_bad_settings_are_rejected_with_the_valid_choices(change, message):
    config = fixture_config()
    for key, value in change.items():
        if key == "objective_kwargs":
            config.objective_kwargs.update(value)
        else:
            config[key] = value
    with pytest.raises(ValueError, match=message):
        objectives.create("spark", config)
    assert "convnextv2_atto" not in spark.sparse_convnext_names()
    assert "convnext_atto_ols" not in spark.sparse_convnext_names()


def test_runlocal_loss_falls_and_a_finetune_loads_the_encoder(tmp_path):
    from vitjax import checkpoint, train
    workdir = str(tmp_path / "spark")
    result = subprocess.run(
        [sys.executable, "-m", "vitjax.main", "--config=configs/spark_convnext.py:runlocal", f"--workdir={workdir}",
         "--config.total_steps=30", "--config.batch_size=32", "--config.log_every_steps=5",
         "--config.progress_bar=False"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, XLA_FLAGS="", JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"))
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(workdir)
    losses = [record["train/loss"] for record in records if "train/loss" in record]
    print("runlocal losses", losses, records[-1])
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses
    # The frozen encoder's features are better than chance on the 10 digits (kNN at the end of the run).
    knn = [record["knn/top1"] for record in records if "knn/top1" in record]
    assert len(knn) == 1 and 0.3 < knn[0] <= 1.0, knn
    # Fine-tuning a ConvNeXt classifier from the SparK run: every encoder param loads, only the head is new.
    finetune = config_utils.load_config("configs/spark_convnext.py:runlocal")
    finetune.objective, finetune.objective_kwargs = "supervised", {}
    finetune.model = dict(finetune.model, num_classes=10)
    finetune.init_from = workdir
    objective = objectives.create("supervised", finetune)
    abstract = jax.eval_shape(objective.init_variables, jax.random.key(0), {"image": jnp.zeros((2, 64, 64, 1))})
    plan = train.plan_init_from(finetune, objective, abstract)
    counts = plan.counts()
    num_params = len(jax.tree.leaves(abstract["params"]))
    assert counts["loaded"] == num_params - 2 and counts["re-initialised"] == 2, counts   # head/fc kernel, bias
    saved = checkpoint.load_params(workdir, parts=("params",))["params"]["encoder"]
    loaded = plan.values["params"]
    for path in ("stem_0/kernel", "stages_3/blocks_0/conv_dw/kernel", "head/norm/scale"):
        node = saved
        for key in path.split("/"):
            node = node[key]
        np.testing.assert_array_equal(loaded[path], node)


def test_convnext_sparse_mode_is_default_off_and_ignores_removed_patches():
    from vitjax import models
    model = models.create("convnext_atto", img_size=64, num_classes=0, depths=(1, 1, 1, 1), dims=(4, 8, 16, 32))
    images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    variables = model.init(jax.random.key(1), images)
    dense, dense_aux = model.apply(variables, images)
    # Everything kept: the sparse mode is the dense model.
    _, all_kept = model.apply(variables, images, active=jnp.ones((2, 2, 2)))
    for ours, reference in zip(all_kept["stages"], dense_aux["stages"]):
        np.testing.assert_array_equal(ours, reference)
    # New pixels inside a removed patch change nothing anywhere; in a kept one they do.
    active = jnp.asarray([[[1, 0], [0, 1]], [[0, 1], [1, 1]]], jnp.float32)
    _, sparse = model.apply(variables, images, active=active)
    _, changed = model.apply(variables, images.at[0, :32, 32:].add(5.0), active=active)
    for ours, reference in zip(changed["stages"], sparse["stages"]):
        np.testing.assert_array_equal(ours, reference)
    _, kept_changed = model.apply(variables, images.at[0, :32, :32].add(5.0), active=active)
    assert np.max(np.abs(kept_changed["stages"][-1] - sparse["stages"][-1])) > 1e-3
    assert dense.shape == (2, 32)


@pytest.mark.parametrize("variant, drop_path", [("convnext_small", 0.2), ("convnext_large", 0.4)])
def test_config_builds_the_official_recipe(tmp_path, variant, drop_path):
    config = config_utils.validate_config(config_utils.load_config(
        f"configs/spark_convnext.py:variant={variant},data_dir={tmp_path}"))
    assert (config.batch_size, config.total_epochs, config.optim.name, config.optim.blr, config.optim.b2,
            config.optim.clip_grad_norm) == (4096, 1600, "lamb", 2e-4, 0.999, 5.0)
    assert config.optim.warmup_init_lr == pytest.approx(0.005 * 3.2e-3)
    assert "inception_crop(224, scale=(0.67, 1.0)" in config.input.pp_train
    module = objectives.create("spark", config).module
    assert (module.encoder.drop_path_rate, module.decoder_width, module.densify_norm) == (drop_path, 768, "ln")
    assert objectives.create("spark", config).grid == (7, 7)
