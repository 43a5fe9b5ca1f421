"""DeiT-LT: the long-tailed split, the class-balanced weights, the official loss, deferred re-weighting, the mixup
stop, bad settings, and configs/deit_lt.py:runlocal training a few steps."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import config_utils, data, objectives
from vitjax.data import sources
from vitjax.objectives import distill
from test_train import read_metrics, run

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "deit_lt", "deit_lt_loss.npz")
# The DeiT-LT / LDAM code's CIFAR-10-LT (5,000 per class, imbalance 100): 12,406 images.
CIFAR10_LT_100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
DIGITS_LT_10 = [142, 111, 86, 66, 51, 39, 30, 23, 18, 14]  # class 0 holds 142 < 1437 / 10: it keeps them all


def _digits_input(**long_tail):
    config = config_utils.load_config("configs/digits_vit.py")
    return dict(config.input.to_dict(), long_tail=long_tail or None)


def test_long_tail_split_keeps_the_cifar_lt_counts_deterministically():
    labels = np.repeat(np.arange(10), 5000)[np.random.RandomState(1).permutation(50_000)]
    kept = sources.long_tail_indices(labels, 10, 100, seed=0)
    assert np.bincount(labels[kept]).tolist() == CIFAR10_LT_100 and len(kept) == 12_406
    assert np.array_equal(kept, sources.long_tail_indices(labels, 10, 100, seed=0))
    other = sources.long_tail_indices(labels, 10, 100, seed=1)
    assert np.bincount(labels[other]).tolist() == CIFAR10_LT_100 and not np.array_equal(kept, other)
    assert len(np.unique(kept)) == len(kept)


def test_long_tail_digits_train_split_only(caplog):
    config = _digits_input(imbalance=10, seed=0)
    caplog.set_level("INFO")
    assert data.train_class_counts(config).tolist() == DIGITS_LT_10
    info = data.dataset_info(config)
    assert info["num_train_examples"] == sum(DIGITS_LT_10) == 580 and info["num_eval_examples"] == 360
    batches = data.make_train_iterator(config, global_batch_size=116, seed=0)
    seen = np.concatenate([next(batches)["label"] for _ in range(5)])  # one epoch of the 580
    assert np.bincount(seen, minlength=10).tolist() == DIGITS_LT_10
    def test_counts(input_config):
        labels = np.concatenate([batch["label"][batch["mask"]] for batch in
                                 data.make_eval_iterator(input_config, global_batch_size=120)])
        return np.bincount(labels).tolist()
    assert test_counts(config) == test_counts(_digits_input())  # the test split stays as it is: 35 to 37 per class
    assert min(test_counts(config)) >= 35
    assert "per class [142, 111, 86, 66, 51, 39, 30, 23, 18, 14]" in caplog.text


def test_class_weights_are_the_official_effective_number_weights():
    fixture = np.load(FIXTURE)
    weights = distill.class_balanced_weights(fixture["counts"], float(fixture["beta"]))
    np.testing.assert_allclose(weights, fixture["weights"], rtol=1e-6)
    assert weights.sum() == pytest.approx(len(weights)) and np.all(np.diff(weights) > 0)  # rarer class, more weight
    np.testing.assert_allclose(distill.class_balanced_weights([100, 10, 1], 0.0), [1, 1, 1], rtol=1e-6)


def test_loss_matches_the_official_deit_lt_loss_before_and_after_drw():
    """The official DistillationLoss (val-iisc/DeiT-LT losses.py): before DRW with mixed labels, unweighted; in DRW
    with --no-mixup-drw plain CE on the labels and the weighted hard distillation."""
    f = np.load(FIXTURE)
    alpha = float(f["alpha"])
    args = (f["class_logits"], f["dist_logits"], f["teacher_logits"])
    loss, parts = distill.distillation_loss(*args, f["soft_labels"], distillation_type="hard", alpha=alpha, tau=1.0)
    np.testing.assert_allclose(float(loss), float(f["loss_pre"]), rtol=1e-5)
    np.testing.assert_allclose(alpha * float(parts["distill_loss"]), float(f["dist_pre"]), rtol=1e-5)
    one_hot = np.eye(5, dtype=np.float32)[f["int_labels"]]
    loss, parts = distill.distillation_loss(*args, one_hot, distillation_type="hard", alpha=alpha, tau=1.0,
                                            class_weights=f["weights"])
    np.testing.assert_allclose(float(loss), float(f["loss_drw"]), rtol=1e-5)
    np.testing.assert_allclose((1 - alpha) * float(parts["base_loss"]), float(f["base_drw"]), rtol=1e-5)
    np.testing.assert_allclose(alpha * float(parts["distill_loss"]), float(f["dist_drw"]), rtol=1e-5)
    assert abs(float(f["dist_drw"]) - float(f["dist_pre"])) > 0.1  # the weights matter on this fixture


def test_mixup_and_smoothing_stop_at_the_step():
    config = dict(_digits_input(), label_smoothing=0.1,
                  mixup=dict(mixup_alpha=0.8, cutmix_alpha=1.0, stop_step=3))
    transform = data.make_batch_transform(config, 10)
    images = jnp.asarray(np.random.RandomState(0).normal(size=(8, 16, 16, 1)), jnp.float32)
    batch = dict(image=images, label=jnp.arange(8, dtype=jnp.int32))
    before = transform(batch, jax.random.PRNGKey(0), jnp.int32(2))
    after = transform(batch, jax.random.PRNGKey(0), jnp.int32(3))
    assert float(jnp.abs(before["image"] - images).max()) > 0.1 and float(before["label"].max()) < 0.95
    np.testing.assert_array_equal(np.asarray(after["image"]), np.asarray(images))
    np.testing.assert_array_equal(np.asarray(after["label"]), np.eye(10, dtype=np.float32)[:8])
    with pytest.raises(ValueError, match=r"call the batch transform with the step"):
        transform(batch, jax.random.PRNGKey(0))


def _lt_student(teacher_dir, **kwargs):
    config = config_utils.load_config(f"configs/deit_lt.py:runlocal,teacher_init={teacher_dir}",
                                      dict(progress_bar=False, checkpoint_async=False))
    config.objective_kwargs.update(kwargs)
    return config


@pytest.mark.parametrize("where, settings, message", [
    ("input", dict(long_tail=dict(imbalance=0.5)), r"input.long_tail.imbalance must be a number >= 1"),
    ("input", dict(long_tail=dict(ratio=10)), r"Unknown input.long_tail key\(s\) ratio; valid keys: imbalance, seed"),
    ("input", dict(long_tail=dict(imbalance=10), source="stream"), r"needs it in memory: input.source 'auto' or"),
    ("input", dict(mixup=dict(mixup_alpha=0.8, stop_step=-1)), r"input.mixup.stop_step must be None or an int"),
    ("objective", dict(class_balance_beta=1.0), r"class_balance_beta must be None or a number in \[0, 1\)"),
    ("objective", dict(distillation_type="soft"), r"weighs the 'hard' distillation \(DeiT-LT\); distillation_type"),
    ("objective", dict(class_balance_beta=None), r"drw_step and class_counts .* need objective_kwargs.class_bal"),
    ("objective", dict(drw_step=-2), r"drw_step must be an int >= 0"),
    ("objective", dict(class_counts=[5, 0] + [5] * 8), r"class_counts must hold 10 ints >= 1"),
    ("objective", dict(teacher_size=0), r"teacher_size must be None or an int >= 1"),
])
def test_bad_settings_fail_before_anything_compiles(tmp_path, where, settings, message):
    config = _lt_student(str(tmp_path))
    if where == "input":
        with pytest.raises(ValueError, match=message):
            data.validate_input_config(dict(config.input.to_dict(), **settings))
    else:
        with pytest.raises(ValueError, match=message):
            objectives.create("distill", _lt_student(str(tmp_path), **settings))


def test_an_imbalance_that_empties_a_class_is_refused_with_the_counts():
    with pytest.raises(ValueError, match=r"imbalance=1000.0 leaves classes \[7, 8, 9\] without an example"):
        data.dataset_info(_digits_input(imbalance=1000, seed=0))


def test_runlocal_teacher_then_student_switches_the_weights_at_drw_step(tmp_path):
    """configs/deit_lt.py:runlocal shrunk to a few steps: the SAM ResNet teacher on the long-tailed digits, then
    the DeiT student whose distillation weights switch on at drw_step (read in every logged step)."""
    teacher_dir, student_dir = str(tmp_path / "teacher"), str(tmp_path / "student")
    teacher = config_utils.load_config("configs/deit_lt.py:stage=teacher,runlocal", dict(
        progress_bar=False, checkpoint_async=False, total_steps=4, batch_size=32))
    teacher.optim.warmup_steps = 1
    assert teacher.optim.name == "sam" and teacher.input.long_tail.imbalance == 10
    run(teacher, teacher_dir)
    student = _lt_student(teacher_dir, drw_step=3)
    student.update(total_steps=5, batch_size=32, log_every_steps=1)
    student.optim.warmup_steps = 1
    student.input.mixup.stop_step = 3
    final = run(student, student_dir)
    records = [record for record in read_metrics(student_dir) if "train/class_weighted" in record]
    assert [record["train/class_weighted"] for record in records] == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert all(np.isfinite(record["train/loss"]) for record in records)
    assert 0.0 <= final["eval/top1"] <= 1.0 and "eval/teacher_agreement" in final

    # The objective's loss at a step past drw_step is the weighted one, before it the plain mean.
    objective = objectives.create("distill", student)
    np.testing.assert_allclose(objective.class_weights,
                               distill.class_balanced_weights(DIGITS_LT_10, 0.9999), rtol=1e-6)
    fields = objective.host_batch_fields(start_step=0, total_steps=5)
    assert fields(2)["train_step"].tolist() == [2] * 32
    rng = np.random.RandomState(0)
    batch = dict(image=jnp.asarray(rng.normal(size=(32, 16, 16, 1)), jnp.float32),
                 label=jnp.asarray(np.eye(10)[rng.randint(0, 10, 32)], jnp.float32))
    variables = objective.init_variables(jax.random.PRNGKey(0), batch)
    losses = {step: objective.train_loss(variables, dict(batch, **fields(step)), jax.random.PRNGKey(1))[1]["metrics"]
              for step in (2, 3)}
    assert float(losses[2]["class_weighted"]) == 0.0 and float(losses[3]["class_weighted"]) == 1.0
    assert abs(float(losses[2]["distill_loss"]) - float(losses[3]["distill_loss"])) > 1e-4
    np.testing.assert_allclose(float(losses[2]["base_loss"]), float(losses[3]["base_loss"]), rtol=1e-6)

    # teacher_size: the teacher sees the student's images resized (bicubic) to its own input side.
    resized = objectives.create("distill", _lt_student(teacher_dir, teacher_size=8))
    teacher_variables = resized.init_variables(jax.random.PRNGKey(0), batch)[distill.TEACHER]
    small = jax.image.resize(batch["image"], (32, 8, 8, 1), "bicubic")
    expected, _ = resized.teacher.apply(teacher_variables, small, train=False)
    np.testing.assert_allclose(np.asarray(resized.teacher_logits(teacher_variables, batch["image"])),
                               np.asarray(expected), rtol=1e-5, atol=1e-6)
    full, _ = resized.teacher.apply(teacher_variables, batch["image"], train=False)
    assert float(jnp.abs(full - expected).max()) > 1e-3
