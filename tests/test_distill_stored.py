"""Stored teacher probabilities (TinyViT): written once, replayed bit for bit, equal to the online teacher."""
import json
import os
import textwrap

import jax
import numpy as np
import pytest

from vitjax import config_utils, objectives
from vitjax import train as trainer
from vitjax.distill import save_logits, stored
from test_train import one_device_mesh, read_metrics, run, tiny_config

STEPS = 8


def test_dense_probabilities_are_tinyvits_reconstruction():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 7)).astype(np.float32) * 2
    values, indices = stored.top_k_probabilities(logits, 3)
    dense = np.asarray(stored.dense_probabilities(values, indices, 7))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, -1)[:, :3]
    expected = np.repeat(((1 - np.take_along_axis(probs, top, -1).sum(-1)) / 4)[:, None], 7, 1)
    np.put_along_axis(expected, top, np.take_along_axis(probs, top, -1), -1)
    np.testing.assert_allclose(dense, expected, rtol=1e-6)
    np.testing.assert_allclose(dense.sum(-1), 1.0, rtol=1e-6)
    full = np.asarray(stored.dense_probabilities(*stored.top_k_probabilities(logits, 7), 7))
    np.testing.assert_allclose(full, probs, rtol=1e-6)  # k = C: the teacher's whole distribution


def test_fingerprint_sees_every_bit():
    images = np.random.default_rng(1).standard_normal((4, 5, 5, 3)).astype(np.float32)
    base = np.asarray(stored.fingerprint(images))
    assert base.dtype == np.uint32 and len(set(base.tolist())) == 4
    for index in [(0, 0, 0, 0), (2, 4, 4, 2), (3, 2, 1, 0)]:
        changed = images.copy()
        changed[index] = np.nextafter(changed[index], np.float32(np.inf))  # one ulp: the lowest bit
        after = np.asarray(stored.fingerprint(changed))
        assert after[index[0]] != base[index[0]]
        assert np.delete(after, index[0]).tolist() == np.delete(base, index[0]).tolist()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("teacher"))
    config = tiny_config(total_steps=30, batch_size=64, log_every_steps=30, checkpoint_every_steps=30)
    config.optim.blr = 0.02
    run(config, workdir)
    return workdir


def _student_config(teacher_dir, logits_dir, **overrides):
    """Returns a small student (ViT width 16) distilled TinyViT-style from the tiny teacher, with mixup on."""
    config = tiny_config(total_steps=STEPS, batch_size=32, log_every_steps=1, eval_every_steps=STEPS,
                         checkpoint_every_steps=4, **overrides)
    teacher_model = dict(config.model)
    config.model.update(embed_dim=16, num_heads=1, mlp_dim=32)
    config.input.mixup = dict(mixup_alpha=0.8, cutmix_alpha=1.0)  # the device-side draws are replayed too
    config.objective = "distill"
    config.objective_kwargs = dict(teacher="vit", teacher_model=teacher_model, teacher_init=teacher_dir,
                                   teacher_logits=logits_dir, distillation_type="soft_target", topk=10, alpha=1.0)
    return config


def _save(config, **kwargs):
    return save_logits.save_logits(config, batches_per_file=3, mesh=one_device_mesh(), show_progress=False, **kwargs)


def test_store_replays_exactly_and_equals_the_online_teacher(teacher_dir, tmp_path):
    logits_dir = str(tmp_path / "logits")
    config = _student_config(teacher_dir, logits_dir)
    summary = _save(config, value_dtype="float32")
    assert summary["files_written"] == 3 and summary["files_kept"] == 0  # batches [0, 3), [3, 6), [6, 8)
    files = sorted(os.listdir(stored.process_dir(logits_dir, 0)))
    assert files == ["batches_00000000.npz", "batches_00000003.npz", "batches_00000006.npz"]

    # A killed save resumes: the missing file alone is written again, identical.
    path = stored.file_path(logits_dir, 0, 3)
    before = dict(np.load(path))
    os.remove(path)
    again = _save(config, value_dtype="float32")
    assert (again["files_written"], again["files_kept"]) == (1, 2)
    for name, value in np.load(path).items():
        np.testing.assert_array_equal(value, before[name])

    # The student: no teacher in its variables, every image the one the teacher saw (fingerprints equal).
    workdir = str(tmp_path / "student")
    final = run(config, workdir)
    records = [r for r in read_metrics(workdir) if "train/replay_mismatch" in r]
    assert len(records) == STEPS and all(r["train/replay_mismatch"] == 0.0 for r in records)
    assert np.isfinite(final["eval/top1"]) and "eval/teacher_agreement" not in final

    # The stored-probabilities loss equals the online teacher's for the same batch (k = C = 10: exact but fp).
    online_config = _student_config(teacher_dir, None)
    online = objectives.create("distill", online_config)
    from_store = objectives.create("distill", config)
    import vitjax.data as data
    batch = next(data.make_train_iterator(config.input, global_batch_size=config.batch_size, seed=config.seed,
                                          start_step=5))
    batch = {key: batch[key] for key in ("image", "label")}
    _, train_key = trainer.split_run_key(jax.random.PRNGKey(config.seed))
    # jitted, as in the train step: eager mixup rounds differently (XLA fuses lam * x + (1 - lam) * x')
    batch = jax.jit(data.make_batch_transform(config.input, 10))(batch, jax.random.fold_in(train_key, 5))
    example = {"image": batch["image"][:1]}
    abstract = jax.eval_shape(lambda r: online.init_variables(r, example), jax.random.PRNGKey(0))
    teacher = trainer.load_frozen_weights(online, abstract)
    student = trainer.unbox(from_store.init_variables(jax.random.PRNGKey(3), example))
    rng = jax.random.PRNGKey(4)
    loss_online, aux_online = online.train_loss({**student, **teacher}, batch, rng)
    fields = from_store.host_batch_fields(start_step=0, total_steps=STEPS)(5)
    loss_stored, aux_stored = from_store.train_loss(student, {**batch, **fields}, rng)
    np.testing.assert_allclose(float(loss_stored), float(loss_online), rtol=1e-6)
    assert float(aux_stored["metrics"]["replay_mismatch"]) == 0.0
    assert abs(float(aux_online["metrics"]["distill_loss"]) - float(aux_online["metrics"]["base_loss"])) > 1e-3

    # float16 values, TinyViT's storage: the same loss within half precision.
    half_dir = str(tmp_path / "half")
    _save(_student_config(teacher_dir, half_dir), value_dtype="float16")
    half = objectives.create("distill", _student_config(teacher_dir, half_dir))
    loss_half, _ = half.train_loss(student, {**batch, **half.host_batch_fields(start_step=0, total_steps=STEPS)(5)},
                                   rng)
    np.testing.assert_allclose(float(loss_half), float(loss_online), rtol=2e-3)


def test_a_bad_store_stops_before_training(teacher_dir, tmp_path):
    logits_dir = str(tmp_path / "logits")
    config = _student_config(teacher_dir, logits_dir)
    objective = objectives.create("distill", config)
    with pytest.raises(FileNotFoundError, match="No stored teacher logits at .*python -m vitjax.distill.save_logits"):
        objective.host_batch_fields(start_step=0, total_steps=STEPS)
    _save(config)

    other_seed = _student_config(teacher_dir, logits_dir, seed=1)
    with pytest.raises(ValueError, match=r"another augmentation recipe; they differ in: seed \(stored: 0, this run: 1\)"):
        objectives.create("distill", other_seed).host_batch_fields(start_step=0, total_steps=STEPS)
    other_pp = _student_config(teacher_dir, logits_dir)
    other_pp.input.pp_train = other_pp.input.pp_train.replace("padding=1", "padding=2")
    with pytest.raises(ValueError, match=r"differ in: input.pp_train \(stored: .*padding=1"):
        objectives.create("distill", other_pp).host_batch_fields(start_step=0, total_steps=STEPS)
    with pytest.raises(ValueError, match=f"cover {STEPS} batches; this run needs {STEPS + 1}"):
        objective.host_batch_fields(start_step=0, total_steps=STEPS + 1)

    path = stored.file_path(logits_dir, 0, 6)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"file {path} is unreadable .truncated"):
        objective.host_batch_fields(start_step=0, total_steps=STEPS)
    # Through the trainer: the same error, before a step is compiled (no checkpoint, no metrics).
    workdir = str(tmp_path / "student")
    with pytest.raises(ValueError, match=f"file {path} is unreadable"):
        run(config, workdir)
    assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))
    os.remove(path)
    with pytest.raises(ValueError, match=f"file {path} is missing"):
        objective.host_batch_fields(start_step=0, total_steps=STEPS)
    # A shorter run needs only the files up to its last batch.
    assert objective.host_batch_fields(start_step=0, total_steps=6) is not None

    # save_logits refuses to mix settings into an existing store.
    with pytest.raises(ValueError, match="holds a store written with other settings .topk"):
        _save(config, topk=5)


def test_bad_settings_name_the_valid_choices(teacher_dir, tmp_path):
    config = _student_config(teacher_dir, str(tmp_path / "logits"))
    config.objective_kwargs.distillation_type = "soft"
    with pytest.raises(ValueError, match=r"serve the distillation types \('hard', 'soft_target'\)"):
        objectives.create("distill", config)
    config = _student_config(teacher_dir, str(tmp_path / "logits"))
    config.objective_kwargs.topk = 11
    with pytest.raises(ValueError, match=r"topk must be an int in \[1, 10\]"):
        objectives.create("distill", config)
    with pytest.raises(ValueError, match="value_dtype must be one of"):
        _save(_student_config(teacher_dir, str(tmp_path / "x")), value_dtype="int8")
    plain = tiny_config()
    with pytest.raises(ValueError, match="needs a distillation config"):
        _save(plain, out=str(tmp_path / "y"))


def test_runlocal_config_loads():
    config = config_utils.load_config("configs/tiny_vit_distill.py:runlocal")
    assert config.objective_kwargs.teacher_logits == "/tmp/vitjax_tinyvit_logits"
    full = config_utils.load_config("configs/tiny_vit_distill.py:variant=21m,teacher_init=/x.pth,logits=/y")
    assert (full.model_name, full.batch_size, full.objective_kwargs.topk) == ("tiny_vit_21m_224", 4096, 10)
    objectives.create("distill", config)  # the shrunk TinyViT student builds


# Two jax.distributed processes (2 CPU devices each): each writes and reads only its own rows of every batch.
MULTIHOST_CHILD = textwrap.dedent("""
    from test_distill_stored import STEPS, multihost_student_config
    from vitjax import parallel, train
    from vitjax.distill import save_logits
    teacher_dir, logits_dir = sys.argv[4], sys.argv[5]
    config = multihost_student_config(teacher_dir, logits_dir)
    mesh = parallel.create_mesh(dict(data=4))
    summary = save_logits.save_logits(config, batches_per_file=3, mesh=mesh, show_progress=False)
    final = train.train_and_evaluate(config, workdir, mesh=mesh)
    print("FINAL " + json.dumps(dict(local_batch=summary["local_batch"], top1=float(final["eval/top1"]))))
""")


def multihost_student_config(teacher_dir, logits_dir):
    """Returns the mixup student of the stored-logits tests, one workdir per process count (4 steps of 32)."""
    config = _student_config(teacher_dir, logits_dir)
    config.total_steps, config.checkpoint_every_steps, config.eval_batch_size = 4, 4, 120
    return config


def test_each_process_writes_and_reads_its_own_rows(teacher_dir, tmp_path):
    from test_multihost import CHILD_PROLOGUE, start_two_processes
    logits_dir, workdir = str(tmp_path / "logits"), str(tmp_path / "student")
    script = tmp_path / "child.py"
    script.write_text(CHILD_PROLOGUE + MULTIHOST_CHILD)
    children = start_two_processes(script, workdir, extra_args=(teacher_dir, logits_dir))
    outputs = [child.communicate(timeout=600) for child in children]
    for child, (stdout, stderr) in zip(children, outputs):
        assert child.returncode == 0, stderr[-4000:]
    finals = [json.loads(stdout.split("FINAL ", 1)[1]) for stdout, _ in outputs]
    assert finals[0] == finals[1] and finals[0]["local_batch"] == 16
    rows = [np.load(stored.file_path(logits_dir, index, 0)) for index in range(2)]
    assert all(r["fingerprint"].shape == (3, 16) for r in rows)
    assert not set(rows[0]["fingerprint"].ravel()) & set(rows[1]["fingerprint"].ravel())  # other images
    records = [r for r in read_metrics(workdir) if "train/replay_mismatch" in r]
    assert len(records) == 4 and all(r["train/replay_mismatch"] == 0.0 for r in records)
    # One process cannot take the two processes' store: the recipe names the process count.
    with pytest.raises(ValueError, match=r"process_count \(stored: 2, this run: 1\)"):
        objectives.create("distill", multihost_student_config(teacher_dir, logits_dir)).host_batch_fields(
            start_step=0, total_steps=4)
