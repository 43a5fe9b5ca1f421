"""MAE: parity with the official implementation (fixture), masking, loss, training, pictures, configs."""
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax.convert import mae as mae_convert
from vitjax.models import mae as mae_model
from vitjax.models import vit
from vitjax.objectives import mae as mae_objective

from parity_utils import relative_error

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = pathlib.Path(__file__).resolve().parents[2] / "shared/fixtures/mae/mae_reference_tiny.npz"


@pytest.fixture(scope="module")
def reference():
    if not FIXTURE.exists():
        pytest.skip(f"MAE reference fixture not found at {FIXTURE} (the shared/ folder beside the repo)")
    data = np.load(FIXTURE)
    state_dict = {key[len("param/"):]: data[key] for key in data.files if key.startswith("param/")}
    meta = json.loads(str(data["meta_json"]))
    module, variables = mae_convert.load_official(
        state_dict, num_heads=meta["num_heads"], decoder_num_heads=meta["decoder_num_heads"],
        mask_ratio=meta["mask_ratio"])
    images = np.transpose(data["in/imgs_nchw"], (0, 2, 3, 1))
    pred, aux = jax.jit(lambda v, x, n: module.apply(v, x, noise=n))(variables, images, data["in/noise"])
    return dict(data=data, meta=meta, module=module, variables=variables, images=images, pred=pred, aux=aux,
                state_dict=state_dict)


def test_fixture_parity_encoder_mask_and_prediction(reference):
    data, aux = reference["data"], reference["aux"]
    module = reference["module"]
    assert (module.encoder.embed_dim, module.encoder.depth, module.decoder_embed_dim, module.decoder_depth) == \
        (64, 2, 32, 2)
    np.testing.assert_array_equal(np.asarray(aux["ids_restore"]), data["out/ids_restore"])
    np.testing.assert_array_equal(np.asarray(aux["mask"]), data["out/mask"])
    assert relative_error(aux["latent"], data["out/latent"]) < 1e-5
    # The prediction does not depend on the loss; the fixture stores it for both settings.
    assert relative_error(reference["pred"], data["out/raw_pix/pred"]) < 1e-5
    assert relative_error(reference["pred"], data["out/norm_pix/pred"]) < 1e-5


@pytest.mark.parametrize("norm_pix_loss,key", [(False, "raw_pix"), (True, "norm_pix")])
def test_fixture_parity_loss(reference, norm_pix_loss, key):
    loss = mae_objective.masked_mse(reference["images"], reference["pred"], reference["aux"]["mask"],
                                    reference["meta"]["patch_size"], norm_pix_loss)
    expected = float(reference["data"][f"out/{key}/loss"])
    assert abs(float(loss) - expected) / abs(expected) < 1e-5


def test_converter_checks_sincos_tables_and_unexpected_keys(reference):
    data = reference["data"]
    state_dict = {key[len("param/"):]: data[key] for key in data.files if key.startswith("param/")}
    bad = dict(state_dict, pos_embed=state_dict["pos_embed"] + 0.5)
    with pytest.raises(ValueError, match="sin-cos"):
        mae_convert.load_official(bad, num_heads=4, decoder_num_heads=4)
    with pytest.raises(KeyError, match="surprise"):
        mae_convert.load_official(dict(state_dict, surprise=np.zeros(3)), num_heads=4, decoder_num_heads=4)
    with pytest.raises(ValueError, match="num_heads"):
        mae_convert.load_official(state_dict)  # width 64 has no paper default


def test_converter_reads_encoder_only_and_finetuned_checkpoints(reference):
    data = reference["data"]
    state_dict = {key[len("param/"):]: data[key] for key in data.files if key.startswith("param/")}
    encoder_only = {k: v for k, v in state_dict.items() if not k.startswith(("decoder", "mask_token"))}
    assert mae_convert.checkpoint_kind(encoder_only) == "encoder"
    params = mae_convert.from_official(encoder_only, num_heads=4)["params"]
    np.testing.assert_array_equal(params["encoder"]["blocks_1"]["mlp"]["fc2"]["kernel"],
                                  reference["variables"]["params"]["encoder"]["blocks_1"]["mlp"]["fc2"]["kernel"])
    # A fine-tuned classifier: global pooling with fc_norm (no final norm) and a 10-class head.
    finetuned = {k: v for k, v in encoder_only.items() if not k.startswith("norm.")}
    finetuned.update({"fc_norm.weight": np.ones(64, np.float32), "fc_norm.bias": np.zeros(64, np.float32),
                      "head.weight": np.ones((10, 64), np.float32), "head.bias": np.zeros(10, np.float32)})
    model, variables = mae_convert.load_official(finetuned, num_heads=4)
    assert (model.num_classes, model.global_pool, model.fc_norm) == (10, "avg", True)
    assert variables["params"]["head"]["kernel"].shape == (64, 10)
    np.testing.assert_array_equal(variables["params"]["pos_embed"], finetuned["pos_embed"])


def test_encoder_loads_into_classifier(reference, tmp_path):
    """The official pretrain file, as `config.init_from` of `mae_finetune`, becomes a classifier's trunk whose
    features equal the MAE encoder's; the learned position embeddings start from its sin-cos table."""
    import torch
    from vitjax import config_utils, objectives, weights
    module, variables = reference["module"], reference["variables"]
    path = tmp_path / "mae_pretrain_tiny.pth"
    torch.save({"model": {key: torch.from_numpy(np.asarray(value)) for key, value in reference["state_dict"].items()}},
               path)
    config = config_utils.default_config()
    config.model_name = "vit"
    config.model = dict(variant="mu", embed_dim=64, depth=2, num_heads=4, mlp_dim=256, img_size=32, patch_size=4,
                        num_classes=10, global_pool="token", fc_norm=False, pos_embed="learn")
    config.objective, config.optim.lr, config.total_steps = "mae_finetune", 1e-3, 1
    config.init_from = str(path)
    objective = objectives.create("mae_finetune", config_utils.validate_config(config))
    classifier = objective.module
    images = reference["images"]
    fresh = jax.jit(objective.init_variables)(jax.random.key(0), {"image": images})
    pretrained = weights.load(str(path), model_name="vit", model_overrides=config.model)
    plan = weights.plan(fresh, pretrained, objective.init_from_rules())
    assert plan.counts()["filled"] == 1 and plan.actions["params/pos_embed"][0] == "filled"
    assert {path for path, (action, _) in plan.actions.items() if action == "re-initialised"} == \
        {"params/head/kernel", "params/head/bias"}
    params = plan.apply(fresh)["params"]
    fresh = jax.tree.map(lambda x: getattr(x, "value", x), fresh["params"], is_leaf=lambda x: hasattr(x, "value"))
    _, inter = jax.jit(classifier.apply)({"params": params}, images)
    # All patches kept (noise order = identity) makes the MAE latent the classifier's token sequence.
    identity = jnp.tile(jnp.arange(64, dtype=jnp.float32)[None], (3, 1))
    _, aux = jax.jit(lambda v, x, n: module.apply(v, x, noise=n, mask_ratio=0.0))(variables, images, identity)
    assert relative_error(inter["encoded"], aux["latent"]) < 1e-5
    np.testing.assert_array_equal(np.asarray(params["head"]["kernel"]), np.asarray(fresh["head"]["kernel"]))


def test_random_masking_properties():
    noise = jax.random.uniform(jax.random.key(1), (4, 49))
    out = mae_model.random_masking(noise, 0.75)
    len_keep = int(49 * 0.25)
    assert out["ids_keep"].shape == (4, len_keep)
    mask = np.asarray(out["mask"])
    np.testing.assert_array_equal(mask.sum(axis=1), [49 - len_keep] * 4)   # exact kept count per sample
    for row in range(4):                                                  # mask 0 exactly at the kept ids
        kept = np.zeros(49)
        kept[np.asarray(out["ids_keep"][row])] = 1
        np.testing.assert_array_equal(1 - mask[row], kept)
        # ids_restore inverts the shuffle and the kept ids are the smallest noise.
        np.testing.assert_array_equal(np.sort(np.asarray(out["ids_keep"][row])),
                                      np.sort(np.argsort(np.asarray(noise[row]))[:len_keep]))
    assert len({tuple(np.flatnonzero(m)) for m in mask}) == 4            # per-sample different masks


def _tiny_mae(**kwargs):
    encoder = vit.VisionTransformer(**mae_model.mae_encoder_settings(
        "mu", embed_dim=32, depth=1, num_heads=2, img_size=16, patch_size=4, in_chans=1))
    return mae_model.MaskedAutoencoder(encoder=encoder, decoder_embed_dim=16, decoder_depth=1,
                                       decoder_num_heads=2, **kwargs)


@pytest.fixture(scope="module")
def tiny():
    """A tiny MAE (16x16x1 images, 4x4 patches, mask 0.75: 4 of 16 patches kept), initialised once."""
    module = _tiny_mae()
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
    variables = jax.jit(lambda key, x: mae_model.init_variables(module, key, x))(jax.random.key(1), images)
    return module, variables, images


def test_masking_rng_and_loss_only_on_removed_patches(tiny):
    module, variables, images = tiny
    apply = jax.jit(lambda v, x, key: module.apply(v, x, rngs={"masking": key}))
    pred, aux = apply(variables, images, jax.random.key(2))
    _, aux_same = apply(variables, images, jax.random.key(2))
    _, aux_other = apply(variables, images, jax.random.key(3))
    np.testing.assert_array_equal(aux["mask"], aux_same["mask"])
    assert not np.array_equal(aux["mask"], aux_other["mask"])
    assert aux["latent"].shape == (2, 1 + 4, 32)                        # the encoder saw cls + kept only
    mask = aux["mask"]
    loss = mae_objective.masked_mse(images, pred, mask, 4, True)
    # Changing the prediction of kept patches leaves the loss unchanged; a removed one changes it.
    kept_changed = jnp.where(mask[:, :, None] == 0, pred + 10.0, pred)
    removed_changed = jnp.where(mask[:, :, None] == 1, pred + 10.0, pred)
    assert float(mae_objective.masked_mse(images, kept_changed, mask, 4, True)) == pytest.approx(float(loss))
    assert float(mae_objective.masked_mse(images, removed_changed, mask, 4, True)) > float(loss) + 50
    # norm_pix target: zero mean and unit unbiased variance per patch.
    target = mae_objective.reconstruction_target(images, 4, True)
    np.testing.assert_allclose(np.asarray(target.mean(-1)), 0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(target.var(-1, ddof=1)), 1, atol=1e-3)


def test_patchify_roundtrip_and_order():
    images = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
    patches = mae_model.patchify(images, 4)
    assert patches.shape == (2, 4, 48)
    # Patch 1 is the top-right 4x4 block; its pixels in (row, col, channel) order.
    np.testing.assert_array_equal(patches[0, 1], images[0, :4, 4:8].reshape(-1))
    np.testing.assert_array_equal(mae_model.unpatchify(patches, 4, (2, 2), 3), images)


def test_initialisation_uses_torch_fans(tiny):
    """Fused kernels are xavier-uniform over torch's (out, in) view: bound sqrt(6 / (fan_in + fan_out))."""
    _, variables, _ = tiny
    import flax
    params = flax.linen.meta.unbox(variables["params"])
    width = 32
    qkv = np.asarray(params["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"])
    proj = np.asarray(params["encoder"]["blocks_0"]["attn"]["proj"]["kernel"])
    patch = np.asarray(params["encoder"]["patch_embed"]["proj"]["kernel"])
    for array, fan_in, fan_out in ((qkv, width, 3 * width), (proj, width, width), (patch, 16, width)):
        bound = np.sqrt(6.0 / (fan_in + fan_out))
        assert bound * 0.9 < np.abs(array).max() <= bound
    assert np.asarray(params["encoder"]["cls_token"]).std() == pytest.approx(0.02, rel=0.5)
    assert np.asarray(params["decoder"]["mask_token"]).std() == pytest.approx(0.02, rel=0.5)


def test_reconstruction_picture_size(tiny, tmp_path):
    from PIL import Image

    from vitjax.evaluate import mae_viz
    module, variables, images = tiny
    paths = mae_viz.save_reconstructions(module, variables, images, str(tmp_path), norm_pix_loss=True,
                                         pixel_norm="minus_one_one", upscale=3)
    assert len(paths) == 2
    with Image.open(paths[0]) as picture:
        assert picture.size == (3 * (4 * 16 + 3 * 2), 3 * 16)
    outputs = mae_viz.reconstruct(module, variables, images, rng=jax.random.key(0), norm_pix_loss=True)
    visible = np.asarray(mae_model.unpatchify(
        np.broadcast_to(1 - outputs["mask"][:, :, None], (2, 16, 16)), 4, (4, 4), 1))
    np.testing.assert_allclose(outputs["pasted"] * visible, np.asarray(images) * visible, atol=1e-6)


def _load_config(name, arg=None):
    from vitjax import config_utils
    return config_utils.load_config(f"configs/{name}.py:{arg}" if arg else f"configs/{name}.py")


@pytest.mark.parametrize("variant,width,patch", [("B/16", 768, 16), ("L/16", 1024, 16), ("H/14", 1280, 14)])
def test_mae_configs_build_the_paper_models(tmp_path, variant, width, patch):
    from vitjax import config_utils, objectives
    config = config_utils.validate_config(_load_config("mae_b16", f"variant={variant},data_dir={tmp_path}"))
    assert (config.batch_size, config.total_epochs, config.optim.warmup_epochs) == (4096, 800, 40)
    assert (config.optim.b2, config.optim.blr, config.optim.weight_decay) == (0.95, 1.5e-4, 0.05)
    module = objectives.create("mae", config).module
    assert (module.encoder.embed_dim, module.encoder.patch_size, module.num_patches) == \
        (width, patch, (224 // patch) ** 2)
    assert (module.decoder_embed_dim, module.decoder_depth, module.decoder_num_heads, module.mask_ratio) == \
        (512, 8, 16, 0.75)
    assert module.encoder.pos_embed == "sincos2d" and module.encoder.weight_init == "xavier"
    finetune = config_utils.validate_config(_load_config("mae_finetune_b16", f"variant={variant},data_dir={tmp_path}"))
    objective = objectives.create(finetune.objective, finetune)
    assert objective.module.global_pool == "avg" and objective.module.fc_norm
    probe = config_utils.validate_config(_load_config("mae_linprobe_b16", f"variant={variant},data_dir={tmp_path}"))
    assert probe.optim.name == "lars" and probe.batch_size == 16384
    objectives.create(probe.objective, probe)


def test_mae_trains_on_digits_through_the_trainer(tmp_path):
    """A few MAE steps through the trainer; then the workdir feeds fine-tuning, probing and the picture."""
    from vitjax import config_utils, objectives, train
    config = _load_config("mae_b16", "runlocal")
    config.model.depth = 1
    config.total_steps = 12
    config.batch_size = 16
    config.log_every_steps = 1
    config.optim.blr = 0.05    # lr 3e-3 at batch 16: visible progress in 12 steps
    config.optim.warmup_steps = 2
    config.progress_bar = False
    workdir = tmp_path / "mae"
    # Two devices, params sharded over fsdp: the MAE's logical axes (decoder included) must lay out.
    from vitjax import parallel
    mesh = parallel.create_mesh(dict(data=1, fsdp=2, model=1), devices=jax.devices()[:2])
    train.train_and_evaluate(config, str(workdir), mesh=mesh)
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3])
    assert "eval/loss" in records[-1]

    from vitjax import checkpoint
    encoder = checkpoint.load_params(str(workdir), parts=("params",))["params"]["encoder"]
    assert {"blocks_0", "cls_token", "patch_embed", "norm"} <= set(encoder)

    # Linear probe from the workdir: the encoder is the pretrained one, the head fresh, BN statistics move.
    probe_config = _load_config("mae_linprobe_b16", f"runlocal,init_from={workdir}")
    probe_config.model.depth = 1
    probe = objectives.create("mae_linprobe", config_utils.validate_config(probe_config))
    images = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    batch = {"image": images, "label": jax.nn.one_hot(jnp.arange(4), 10)}
    variables = jax.jit(probe.init_variables)(jax.random.key(0), batch)
    variables = jax.tree.map(lambda x: getattr(x, "value", x), variables,
                             is_leaf=lambda x: hasattr(x, "value"))
    plan = train.plan_init_from(probe.config, probe, variables)
    assert plan.description.endswith("its 'encoder' subtree") and plan.counts()["re-initialised"] == 2  # the head
    params = plan.apply(variables)["params"]
    np.testing.assert_array_equal(params["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"],
                                  encoder["blocks_0"]["attn"]["qkv"]["kernel"])
    loss, aux = jax.jit(probe.train_loss)({**variables, "params": params}, batch, jax.random.key(1))
    assert np.isfinite(float(loss))
    assert not np.allclose(aux["updates"]["batch_stats"]["head_norm"]["mean"], 0)

    from vitjax.evaluate import mae_viz
    mae_viz.cli([f"--checkpoint={workdir}", f"--output_dir={tmp_path / 'viz'}", "--num_images=2"])
    assert len(os.listdir(tmp_path / "viz")) == 2
