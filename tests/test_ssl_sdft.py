"""Self-distillation further pretraining (sdft) and the medical MAE recipe: the distillation term against a NumPy
transcription, zero with the teacher's weights, the MAE loss, term and total against the official code (fixture), bad settings rejected before compile, `:runlocal` through
`python -m vitjax.main` with a tiny MAE run as the round-1 teacher."""
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import checkpoint, config_utils, objectives, train
from vitjax.models import mae as mae_model
from vitjax.objectives import sdft
from test_train import REPO, read_metrics, run


def test_distance_equals_a_numpy_transcription_and_the_teacher_gets_no_gradient():
    rng = np.random.default_rng(0)
    student, teacher = (rng.standard_normal((5, 7)).astype(np.float32) for _ in range(2))
    expected = np.sum((student.astype(np.float64) - teacher) ** 2) / 5  # torch MSELoss(sum) / batch
    np.testing.assert_allclose(float(sdft.representation_distance(student, teacher)), expected, rtol=1e-6)
    grad_student, grad_teacher = jax.grad(sdft.representation_distance, argnums=(0, 1))(student, teacher)
    np.testing.assert_allclose(np.asarray(grad_student), 2 * (student - teacher) / 5, rtol=1e-5, atol=1e-7)
    assert not np.any(np.asarray(grad_teacher))
    tokens = rng.standard_normal((2, 5, 3)).astype(np.float32)
    np.testing.assert_array_equal(sdft.pooled_representation(tokens, True, 1), tokens[:, 0])
    np.testing.assert_allclose(sdft.pooled_representation(tokens, False, 0), tokens.mean(1), rtol=1e-6)


def _config(teacher_init, **kwargs):
    config = config_utils.load_config(f"configs/sdft_vit.py:runlocal,teacher_init={teacher_init}",
                                      {"progress_bar": False, "checkpoint_async": False})
    config.objective_kwargs.update(kwargs)
    return config


def test_term_is_the_encoders_distance_and_zero_with_the_teachers_weights(tmp_path):
    objective = objectives.create("sdft", _config(tmp_path, distill_weight=0.5))
    images = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    variables = jax.tree.map(lambda x: getattr(x, "value", x), objective.init_variables(jax.random.key(1),
                             {"image": images}), is_leaf=lambda x: hasattr(x, "value"))
    # The term by hand: class token after the final norm of the whole image, for student and teacher.
    encoder = objective.module.encoder
    student = encoder.apply({"params": variables["params"]["encoder"]}, images)[0][:, 0]
    teacher = encoder.apply(variables["teacher"], images)[0][:, 0]
    expected = np.sum((np.asarray(student, np.float64) - np.asarray(teacher)) ** 2) / 4
    rng = jax.random.key(2)
    loss, aux = objective.train_loss(variables, {"image": images}, rng)
    metrics = aux["metrics"]
    assert expected > 1e-3
    np.testing.assert_allclose(float(metrics["distill_loss"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(metrics["mae_loss"]) + 0.5 * expected, rtol=1e-5)
    # MAE's own loss of the student, same rng split: the wrapper adds to it and changes nothing else.
    mae_loss, _ = objectives.mae.MAE.train_loss(objective, {"params": variables["params"]}, {"image": images},
                                                jax.random.split(rng)[0])
    np.testing.assert_allclose(float(metrics["mae_loss"]), float(mae_loss), rtol=1e-6)

    same = dict(variables, teacher={"params": variables["params"]["encoder"]})
    loss, aux = objective.train_loss(same, {"image": images}, rng)
    assert float(aux["metrics"]["distill_loss"]) == 0.0
    np.testing.assert_allclose(float(loss), float(mae_loss), rtol=1e-6)


@pytest.mark.parametrize("teacher,kwargs,error,message", [
    ("", {}, ValueError, r"needs objective_kwargs.teacher_init.*Valid sources"),
    ("/nonexistent/round1", {}, FileNotFoundError, r"nothing at /nonexistent/round1"),
    (None, dict(distill_weight=-0.1), ValueError, r"distill_weight must be a number >= 0"),
    (None, dict(mask_ratio=1.0), ValueError, r"mask_ratio"),
])
def test_bad_settings_are_rejected_before_compile(tmp_path, teacher, kwargs, error, message):
    config = _config(tmp_path if teacher is None else teacher, **kwargs)
    if teacher == "":
        config.objective_kwargs.teacher_init = None
    with pytest.raises(error, match=message):
        objectives.create("sdft", config)


def test_runlocal_loss_falls_through_main_with_a_tiny_mae_teacher(tmp_path):
    teacher_dir = str(tmp_path / "round1")
    teacher = config_utils.load_config("configs/sdft_vit.py:runlocal,round=1",
                                       {"progress_bar": False, "checkpoint_async": False})
    assert teacher.objective == "mae"
    teacher.total_steps, teacher.optim.warmup_steps = 4, 2
    run(teacher, teacher_dir)
    # The frozen collection the trainer loads is the round-1 run's encoder, exactly.
    objective = objectives.create("sdft", _config(teacher_dir))
    abstract = jax.eval_shape(objective.init_variables, jax.random.key(0), {"image": jnp.zeros((2, 8, 8, 1))})
    loaded = train.load_frozen_weights(objective, abstract)["teacher"]["params"]
    saved = checkpoint.load_params(teacher_dir, parts=("params",))["params"]["encoder"]
    jax.tree.map(np.testing.assert_array_equal, loaded, saved)
    # Round 2 starts from the pretrained MAE (here the same tiny run): every encoder and decoder param loads.
    config = _config(teacher_dir)
    config.init_from = teacher_dir
    plan = train.plan_init_from(config, objective, abstract)
    assert plan.counts()["loaded"] == len(jax.tree.leaves(abstract["params"])) and plan.counts()["re-initialised"] == 0

    workdir = str(tmp_path / "round2")
    result = subprocess.run(
        [sys.executable, "-m", "vitjax.main", f"--config=configs/sdft_vit.py:runlocal,teacher_init={teacher_dir}",
         f"--workdir={workdir}", "--config.total_steps=20", "--config.log_every_steps=5",
         "--config.progress_bar=False"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, XLA_FLAGS="", JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [r for r in read_metrics(workdir) if "train/loss" in r]
    losses = [r["train/loss"] for r in records]
    assert len(losses) == 4 and losses[-1] < 0.5 * losses[0], losses
    # Both parts fall: the student's reconstruction, and its distance to the round-1 encoder.
    assert records[-1]["train/mae_loss"] < records[0]["train/mae_loss"]
    assert records[-1]["train/distill_loss"] < 0.5 * records[0]["train/distill_loss"]


@pytest.mark.parametrize("variant,decoder_depth,width", [("S/16", 2, 384), ("B/16", 8, 768)])
def test_medical_mae_config_builds_the_papers_recipe(tmp_path, variant, decoder_depth, width):
    config = config_utils.validate_config(config_utils.load_config(
        f"configs/mae_medical.py:variant={variant},data_dir={tmp_path},nih_stats"))
    assert (config.objective, config.batch_size, config.total_epochs, config.optim.warmup_epochs) == \
        ("mae", 2048, 800, 40)
    assert "inception_crop(224, scale=(0.5, 1.0)" in config.input.pp_train and "0.5056" in config.input.pp_train
    module = objectives.create("mae", config).module
    assert (module.mask_ratio, module.decoder_depth, module.decoder_embed_dim, module.encoder.embed_dim) == \
        (0.9, decoder_depth, 512, width)


def test_medical_mae_runlocal_steps_remove_nine_tenths(tmp_path):
    config = config_utils.validate_config(config_utils.load_config("configs/mae_medical.py:runlocal"))
    objective = objectives.create(config.objective, config)
    images = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    variables = objective.init_variables(jax.random.key(1), {"image": images})
    variables = jax.tree.map(lambda x: getattr(x, "value", x), variables, is_leaf=lambda x: hasattr(x, "value"))
    _, aux = objective.module.apply(variables, images, rngs={"masking": jax.random.key(2)})
    np.testing.assert_array_equal(np.asarray(aux["mask"]).sum(1), [15] * 4)  # int(16 x 0.1) = 1 patch kept
    loss, _ = objective.train_loss(variables, {"image": images}, jax.random.key(3))
    assert objective.norm_pix_loss is False and np.isfinite(float(loss))


# ---- parity with the official code (seanie12/self-distillation, transformers 4.17 ViTMAE) ----------------------
SDFT_FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "sdft", "sdft.npz")


def _timm_keys(state, prefix):
    """Returns HF ViT / ViTMAE keys under `prefix` renamed to the official MAE's (timm's), q, k, v fused."""
    renames = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
               "embeddings.patch_embeddings.projection": "patch_embed.proj", "layernorm": "norm",
               "decoder.decoder_embed": "decoder_embed", "decoder.mask_token": "mask_token",
               "decoder.decoder_pos_embed": "decoder_pos_embed", "decoder.decoder_norm": "decoder_norm",
               "decoder.decoder_pred": "decoder_pred"}
    layer_parts = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
                   "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
    flat = {key[len(prefix):].removeprefix("vit."): value for key, value in state.items() if key.startswith(prefix)}
    out = {}
    for key, value in flat.items():
        for stack, name in (("encoder.layer.", "blocks."), ("decoder.decoder_layers.", "decoder_blocks.")):
            if key.startswith(stack):
                index, rest = key[len(stack):].split(".", 1)
                part, kind = rest.rsplit(".", 1)
                if part == "attention.attention.query":
                    out[f"{name}{index}.attn.qkv.{kind}"] = np.concatenate(
                        [flat[f"{stack}{index}.attention.attention.{qkv}.{kind}"] for qkv in ("query", "key", "value")])
                elif not part.startswith("attention.attention."):
                    out[f"{name}{index}.{layer_parts[part]}.{kind}"] = value
                break
        else:
            base, kind = key.rsplit(".", 1) if key.endswith((".weight", ".bias")) else (key, "")
            out[renames[base] + (f".{kind}" if kind else "")] = value
    return out


def _transformers_417_decoder_norm(next_fun, args, kwargs, context):
    """Runs the MAE decoder's final LayerNorm with eps 1e-5: transformers 4.17's ViTMAE builds `decoder_norm` without
    `config.layer_norm_eps` (1e-12 everywhere else), which the official self-distillation runs used."""
    module = context.module
    if (context.method_name == "__call__" and isinstance(module, flax.linen.LayerNorm) and module.name == "norm"
            and isinstance(module.parent, mae_model.MaeDecoder)):
        x = args[0]
        mean = x.mean(-1, keepdims=True)
        variance = jnp.square(x - mean).mean(-1, keepdims=True)
        params = module.variables["params"]
        return (x - mean) / jnp.sqrt(variance + 1e-5) * params["scale"] + params["bias"]
    return next_fun(*args, **kwargs)


@pytest.mark.parametrize("decoder_norm_eps", ["1e-12", "1e-5"])
def test_mae_loss_and_distillation_term_equal_the_official_self_distillation(tmp_path, decoder_norm_eps):
    from parity_utils import relative_error
    from vitjax.convert import mae as mae_convert
    data = np.load(SDFT_FIXTURE)
    state = {key: data[key] for key in data.files}
    config = _config(tmp_path)
    # The fixture's shrunk ViTMAE: transformers' LayerNorm eps 1e-12, hidden 32 x 2 layers, decoder 16 x 1.
    config.model = dict(variant="mu/2", img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=4,
                        mlp_dim=128, norm_eps=1e-12)
    config.objective_kwargs.update(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mask_ratio=0.75,
                                   norm_pix_loss=True, distill_weight=1.0)
    objective = objectives.create("sdft", config)
    params = mae_convert.convert_pretrain(_timm_keys(state, "student/"), objective.module)["params"]
    teacher = mae_convert.convert_encoder(_timm_keys(state, "teacher/"), objective.module.encoder)
    variables = {"params": params, "teacher": {"params": teacher}}
    images = jnp.asarray(data["samples"].transpose(0, 2, 3, 1))
    interceptor = _transformers_417_decoder_norm if decoder_norm_eps == "1e-5" else (
        lambda next_fun, args, kwargs, context: next_fun(*args, **kwargs))
    with flax.linen.intercept_methods(interceptor):
        pred, aux = objective.module.apply({"params": params}, images, noise=jnp.asarray(data["noise"]))
    mae_loss = objectives.mae.masked_mse(images, pred, aux["mask"], objective.module.patch_size, True)
    distill = objective.distill_term(variables, images, jax.random.key(0), train=True)
    errors = {"pred": relative_error(pred, data["pred"]), "mae_loss": relative_error(mae_loss, data["mae_loss"]),
              "distill_loss": relative_error(distill, data["distill_loss"]),
              "total": relative_error(mae_loss + distill, data["total"])}
    print(f"sdft vs official (decoder norm eps {decoder_norm_eps})", {k: f"{v:.1e}" for k, v in errors.items()})
    np.testing.assert_array_equal(aux["mask"], data["mask"])
    if decoder_norm_eps == "1e-5":   # the reference's own decoder: every output within 1e-5
        assert max(errors.values()) <= 1e-5, errors
    else:   # vitjax's MAE (one eps): the losses within 1e-5; the prediction off by the decoder norm's eps only
        assert max(errors[key] for key in ("mae_loss", "distill_loss", "total")) <= 1e-5, errors
        assert 5e-6 < errors["pred"] < 3e-5, errors
