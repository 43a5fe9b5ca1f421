"""Distillation (DeiT): the loss is the paper's, the teacher is loaded frozen, and a distilled student trains."""
import os

import jax
import numpy as np
import pytest

from vitjax import checkpoint, objectives
from vitjax.objectives import distill
from test_train import read_metrics, run, tiny_config


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("distillation_type", ["hard", "soft"])
def test_loss_is_deits(distillation_type):
    rng = np.random.default_rng(0)
    cls, dist, teacher = (rng.standard_normal((6, 5)).astype(np.float32) * 3 for _ in range(3))
    labels = rng.dirichlet(np.ones(5), size=6).astype(np.float32)  # mixed labels
    alpha, tau = 0.3, 2.0
    loss, parts = distill.distillation_loss(cls, dist, teacher, labels, distillation_type=distillation_type,
                                            alpha=alpha, tau=tau)
    base = -(labels * _log_softmax(cls.astype(np.float64))).sum(-1).mean()
    if distillation_type == "hard":
        expected = -_log_softmax(dist.astype(np.float64))[np.arange(6), teacher.argmax(-1)].mean()
    else:
        log_t, log_s = _log_softmax(teacher / tau), _log_softmax(dist / tau)
        expected = (np.exp(log_t) * (log_t - log_s)).sum() * tau ** 2 / dist.size  # summed, / (B x classes)
    np.testing.assert_allclose(float(parts["base_loss"]), base, rtol=1e-5)
    np.testing.assert_allclose(float(parts["distill_loss"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(loss), (1 - alpha) * base + alpha * expected, rtol=1e-5)
    grad = jax.grad(lambda t: distill.distillation_loss(cls, dist, t, labels, distillation_type=distillation_type,
                                                        alpha=alpha, tau=tau)[0])(teacher)
    assert not np.any(np.asarray(grad))  # the teacher gets no gradient


def _student_config(teacher_workdir, **kwargs):
    config = tiny_config(total_steps=150, batch_size=128, log_every_steps=10, eval_every_steps=150,
                         checkpoint_every_steps=150)
    config.optim.blr = 0.02
    teacher_model = dict(config.model)
    config.model.distilled = True  # a DeiT student: class token + distillation token
    config.objective = "distill"
    config.objective_kwargs = dict(teacher="vit", teacher_model=teacher_model, teacher_init=teacher_workdir, **kwargs)
    return config


def test_a_distilled_deit_learns_from_a_frozen_teacher(tmp_path):
    teacher_dir = str(tmp_path / "teacher")
    teacher_config = tiny_config(total_steps=200, batch_size=128, log_every_steps=200, checkpoint_every_steps=200)
    teacher_config.optim.blr = 0.02
    teacher_final = run(teacher_config, teacher_dir)
    assert teacher_final["eval/top1"] > 0.5

    student_dir = str(tmp_path / "student")
    final = run(_student_config(teacher_dir), student_dir)
    records = read_metrics(student_dir)
    train = [r for r in records if "train/distill_loss" in r]
    assert train and all(np.isfinite([r["train/loss"], r["train/base_loss"], r["train/distill_loss"]]).all()
                         for r in train)
    assert train[-1]["train/distill_loss"] < train[0]["train/distill_loss"] - 0.5
    assert final["eval/teacher_agreement"] > 0.3 and final["eval/top1"] > 0.3  # chance: 0.1 (measured: 0.58, 0.55)

    # The teacher in the student's checkpoint is the loaded one, untouched by training.
    loaded = checkpoint.load_state(os.path.join(teacher_dir, "checkpoints"))["params"]
    kept = checkpoint.load_state(os.path.join(student_dir, "checkpoints"))["model_state"]["teacher"]["params"]
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(kept)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_settings_name_the_valid_choices(tmp_path):
    with pytest.raises(ValueError, match="valid choices: .'hard', 'soft'."):
        objectives.create("distill", _student_config(str(tmp_path), distillation_type="logits"))
    with pytest.raises(ValueError, match="needs objective_kwargs.teacher_init"):
        objectives.create("distill", _student_config(None))
    with pytest.raises(ValueError, match="Unknown objective_kwargs .'temperature'."):
        objectives.create("distill", _student_config(str(tmp_path), temperature=2.0))
    with pytest.raises(FileNotFoundError, match="nothing at .*missing.pth. Valid sources: a vitjax workdir"):
        objectives.create("distill", _student_config(str(tmp_path / "missing.pth")))
