"""G2SD's generic distillation: its losses equal the official code's on a fixture, the teacher gets no gradient,
bad settings fail before compile, and :runlocal trains through the trainer from a tiny MAE teacher."""
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parity_utils import fixture_entries
from vitjax import checkpoint, config_utils, objectives, train
from vitjax.convert import mae as mae_convert
from vitjax.objectives import g2sd
from test_train import read_metrics, run

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "g2sd", "g2sd.npz")


def _build(tmp_path, supervise_all=True, encoder_weight=0.0):
    """Returns the objective at the fixture's shrunk sizes (see tests/fixtures/g2sd/README.md)."""
    config = config_utils.load_config(f"configs/g2sd_vit.py:runlocal,teacher_init={tmp_path}")
    config.model = dict(variant="mu/8", img_size=32, in_chans=3, embed_dim=16, depth=2, num_heads=2, mlp_dim=64)
    config.objective_kwargs.update(
        decoder_embed_dim=16, decoder_depth=2, decoder_num_heads=2,
        teacher_model=dict(variant="mu/8", img_size=32, in_chans=3, embed_dim=32, depth=2, num_heads=2, mlp_dim=128),
        teacher_decoder_embed_dim=24, teacher_decoder_depth=3, teacher_decoder_num_heads=2, layer_index=2,
        supervise_all=supervise_all, encoder_weight=encoder_weight)
    return objectives.create("g2sd", config)


def _variables(objective, data):
    student = fixture_entries(data, "student")
    predictors = {name: {key: value for key, value in student.items() if key.startswith(name)}
                  for name in ("decoderfeature_pred", "encoderfeature_pred")}
    mae_keys = {key: value for key, value in student.items() if not key.startswith(tuple(predictors))}
    params = mae_convert.convert_pretrain(mae_keys, objective.module)["params"]

    def mlp(prefix):
        return {"fc1": {"kernel": student[f"{prefix}.fc1.weight"].T, "bias": student[f"{prefix}.fc1.bias"]},
                "fc2": {"kernel": student[f"{prefix}.fc2.weight"].T, "bias": student[f"{prefix}.fc2.bias"]}}

    params[g2sd.FEATURE_PRED] = mlp("decoderfeature_pred")
    if objective.encoder_predictor is not None:
        params[g2sd.ENCODER_PRED] = mlp("encoderfeature_pred")
    teacher = mae_convert.convert_pretrain(fixture_entries(data, "teacher"), objective.teacher_module)
    return jax.tree.map(jnp.asarray, {"params": params, g2sd.TEACHER: teacher})


@pytest.mark.parametrize("supervise_all,encoder_weight", [(True, 0.0), (False, 0.0), (True, 0.5)])
def test_losses_equal_the_official_code(tmp_path, supervise_all, encoder_weight):
    data = np.load(FIXTURE)
    objective = _build(tmp_path, supervise_all, encoder_weight)
    variables = _variables(objective, data)
    images, noise = jnp.asarray(data["images"]), jnp.asarray(data["noise"])
    losses = objective.distillation_losses(variables, images, noise, train=False)
    expected = data["loss_decoder"] if supervise_all else data["loss_decoder_masked"]
    assert abs(float(losses["decoder_loss"].mean()) - float(expected)) <= 1e-5 * abs(float(expected))
    if encoder_weight:
        assert abs(float(losses["encoder_loss"].mean()) - float(data["loss_encoder"])) <= 1e-5 * float(
            data["loss_encoder"])
        np.testing.assert_allclose(float(losses["loss"].mean()),
                                   float(expected) + encoder_weight * float(data["loss_encoder"]), rtol=1e-5)
    # The teacher is frozen: no gradient reaches it; the student and the predictor get one.
    grads = jax.grad(lambda v: objective.distillation_losses(v, images, noise, train=False)["loss"].mean())(variables)
    assert not any(np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(grads[g2sd.TEACHER]))
    assert np.any(np.asarray(grads["params"][g2sd.FEATURE_PRED]["fc1"]["kernel"]))
    assert all(np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(grads["params"]["decoder"]["blocks_1"]))


def test_bad_settings_fail_before_compile(tmp_path):
    config = config_utils.load_config(f"configs/g2sd_vit.py:runlocal,teacher_init={tmp_path}")
    config.objective_kwargs.layer_index = 2
    with pytest.raises(ValueError, match=r"layer_index must be an int in \[1, 1\]"):
        objectives.create("g2sd", config)
    config = config_utils.load_config(f"configs/g2sd_vit.py:runlocal,teacher_init={tmp_path}")
    config.objective_kwargs.teacher_init = None
    with pytest.raises(ValueError, match="needs objective_kwargs.teacher_init.*Valid sources"):
        objectives.create("g2sd", config)
    config = config_utils.load_config(f"configs/g2sd_vit.py:runlocal,teacher_init={tmp_path}")
    config.objective_kwargs.teacher_model = dict(config.objective_kwargs.teacher_model, variant="mu/4")
    with pytest.raises(ValueError, match="same patches"):
        objectives.create("g2sd", config)
    config = config_utils.load_config(f"configs/g2sd_vit.py:runlocal,teacher_init={tmp_path}")
    config.model_name = "resnet18"
    with pytest.raises(ValueError, match="MAE needs a VisionTransformer encoder"):
        objectives.create("g2sd", config)


def test_runlocal_trains_from_a_tiny_mae_teacher(tmp_path):
    teacher_dir = str(tmp_path / "mae")
    teacher = config_utils.load_config("configs/mae_b16.py:runlocal", {"progress_bar": False,
                                                                       "checkpoint_async": False})
    teacher.total_steps = 20
    run(teacher, teacher_dir)
    config = config_utils.load_config(f"configs/g2sd_vit.py:runlocal,teacher_init={teacher_dir}",
                                      {"progress_bar": False, "checkpoint_async": False})
    config.total_steps, config.log_every_steps = 40, 10
    workdir = str(tmp_path / "g2sd")
    final = run(config, workdir)
    losses = [r["train/decoder_loss"] for r in read_metrics(workdir) if "train/decoder_loss" in r]
    assert losses[-1] < 0.8 * losses[0] and np.isfinite(final["eval/loss"])
    # Stage 2 starts from stage 1's student encoder (init_from takes its encoder subtree).
    specific = config_utils.load_config(f"configs/g2sd_vit.py:stage=specific,runlocal,init_from={workdir},"
                                        f"teacher_init={teacher_dir}")
    student = objectives.create("distill", specific)
    abstract = jax.eval_shape(lambda r: student.init_variables(r, {"image": jnp.zeros((1, 8, 8, 1))}),
                              jax.random.PRNGKey(0))
    fitted = train.plan_init_from(specific, student, abstract).apply(
        jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), flax.linen.meta.unbox(dict(abstract))))
    encoder = checkpoint.load_state(os.path.join(workdir, "checkpoints"))["params"]["encoder"]
    np.testing.assert_array_equal(np.asarray(fitted["params"]["blocks_0"]["mlp"]["fc1"]["kernel"]),
                                  np.asarray(encoder["blocks_0"]["mlp"]["fc1"]["kernel"]))
