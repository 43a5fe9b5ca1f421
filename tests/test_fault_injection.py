"""Fault injection: every way a checkpoint goes wrong ends in an exact resume or a clear error naming the problem.

The cases, and where each is proven:
  damaged data files, metadata files, a flipped bit, a missing array       -> fallback, exact  (here)
  every step damaged                                                       -> NoGoodCheckpointError (here)
  a half-written step                                                      -> removed, exact  (here)
  a full disk during a save                                                -> CheckpointSaveError, then exact (here)
  another model on resume (allow_config_change)                            -> CheckpointMismatchError (here)
  a config changed between runs                                            -> ConfigChangedError
                                                          (test_init_from.py::test_resuming_with_a_changed_config_shows_the_diff)
  SIGTERM or SIGINT mid-run                                                -> exit 75, exact (here)
  SIGKILL at random moments, during async saves                            -> exact (here; a kill right after a
                                                                              save started: test_resume.py)
  SIGTERM in a two-process run                                             -> both save one step (test_multihost.py)
  NaN in the first step after a restore                                    -> points at the checkpoint (here)
experiments/fault_injection.py runs the same cases and writes their table.
"""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import faults
from vitjax import checkpoint, train
from test_train import read_metrics, run, tiny_config

OVERRIDES = dict(total_steps=8, log_every_steps=1, eval_every_steps=4, checkpoint_every_steps=2, keep_checkpoints=3)
TIMING = ("images_per_sec", "steps_per_sec")


def make_config(**overrides):
    """Returns the suite's config: 8 steps, a checkpoint every 2 (async), drop-path on so the rng position matters."""
    config = tiny_config(**{**OVERRIDES, **overrides})
    config.checkpoint_async = True
    config.model.drop_path_rate = 0.1
    return config


def strip_timing(records):
    """Returns metrics records without their wall-clock fields."""
    return [{key: value for key, value in record.items() if key not in TIMING} for record in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Returns (final metrics, metrics records) of the unbroken 8-step run."""
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    final = run(make_config(), workdir)
    return final, strip_timing(read_metrics(workdir))


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """Returns a workdir stopped after step 4 (complete steps 2 and 4), to be copied, never changed."""
    workdir = str(tmp_path_factory.mktemp("stopped") / "run")
    assert run(make_config(), workdir, stop_after_steps=4)["step"] == 4
    assert checkpoint.complete_steps(os.path.join(workdir, "checkpoints")) == (2, 4)
    return workdir


def copy_of(stopped: str, tmp_path) -> str:
    """Returns a fresh copy of the stopped workdir."""
    workdir = str(tmp_path / "run")
    shutil.copytree(stopped, workdir)
    return workdir


def assert_exact(final, workdir, reference):
    """Asserts that the run in `workdir` ended with the unbroken run's final metrics and metrics records."""
    final_reference, records_reference = reference
    assert final == final_reference
    assert strip_timing(read_metrics(workdir)) == records_reference


DAMAGES = {
    "data_files": lambda directory: faults.damage_data_files(directory, 4),
    "one_bit_flipped": lambda directory: faults.flip_bit(directory, 4),
    "missing_array": lambda directory: faults.remove_array(directory, 4),
    **{name: (lambda directory, name=name: faults.damage_metadata_file(directory, 4, name))
       for name in ("state/_METADATA", "state/manifest.ocdbt", "meta/metadata", "fingerprints/metadata")},
}


# A failed read leaves orbax's other reads of the step to fail into a closed event loop: pytest reports
# each as an unraisable exception (outside pytest, vitjax.checkpoint drops them).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_newest_step_is_moved_aside_and_the_run_falls_back(damage, stopped, reference, tmp_path, caplog):
    workdir = copy_of(stopped, tmp_path)
    directory = os.path.join(workdir, "checkpoints")
    DAMAGES[damage](directory)
    assert checkpoint.verify_step(directory, 4).status == "damaged"

    final = run(make_config(), workdir)

    assert_exact(final, workdir, reference)
    moved = checkpoint.damaged_steps(directory)
    assert len(moved) == 1 and moved[0].startswith("4.damaged-"), moved
    assert checkpoint.complete_steps(directory) == (4, 6, 8)  # step 4 written again by the replay; keep 3
    report = open(os.path.join(directory, moved[0], "vitjax_damage_report.txt")).read()
    messages = "\n".join(record.getMessage() for record in caplog.records)
    assert f"Checkpoint step 4 at {directory}/4 is damaged: " in messages
    assert "falling back to step 2" in messages and "Resuming from step 2" in messages
    failing = re.findall(r"(\S+): fingerprint [0-9a-f]{8}, saved [0-9a-f]{8}", report)
    if damage == "one_bit_flipped":  # readable but wrong: the leaf is named, with both fingerprints
        assert failing == ["params/blocks_0/attn/qkv/kernel"], report
    elif damage == "data_files":  # 64 bytes into compressed chunks: garbage values, or a chunk that fails to decode
        assert (failing and all(leaf.split("/")[0] in ("params", "opt_state") for leaf in failing)
                ) or "unreadable" in report, report
    else:  # unreadable: the reader's own error
        assert "unreadable" in report and not failing, report


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_every_step_damaged_stops_before_compiling_and_keeps_the_steps(stopped, tmp_path, monkeypatch):
    workdir = copy_of(stopped, tmp_path)
    directory = os.path.join(workdir, "checkpoints")
    faults.flip_bit(directory, 4)
    faults.damage_metadata_file(directory, 2, "state/_METADATA")
    compiled = []
    monkeypatch.setattr(train, "jit_train_step", lambda *args, **kwargs: compiled.append(1))
    with pytest.raises(checkpoint.NoGoodCheckpointError, match=r"every complete step is damaged(.|\n)*step 4 -> "
                                                              r".*4\.damaged-\d+: .*fingerprint(.|\n)*step 2 -> "
                                                              r".*2\.damaged-\d+: unreadable"):
        run(make_config(), workdir)
    assert compiled == []
    assert checkpoint.complete_steps(directory) == ()
    assert [name.split(".")[0] for name in checkpoint.damaged_steps(directory)] == ["2", "4"]
    assert [record["step"] for record in read_metrics(workdir)] == [1, 2, 3, 4]  # nothing overwritten


def test_a_half_written_step_is_removed_and_the_run_resumes_exactly(stopped, reference, tmp_path):
    workdir = copy_of(stopped, tmp_path)
    directory = os.path.join(workdir, "checkpoints")
    torn = faults.half_written_step(directory, 4, 6)
    assert checkpoint.complete_steps(directory) == (2, 4)
    final = run(make_config(), workdir)
    assert_exact(final, workdir, reference)
    assert not os.path.exists(torn) and checkpoint.damaged_steps(directory) == ()


def test_a_full_disk_during_a_save_stops_with_the_step_named_then_resumes_exactly(stopped, reference, tmp_path):
    workdir = copy_of(stopped, tmp_path)
    directory = os.path.join(workdir, "checkpoints")
    with faults.failing_writer() as writes:
        with pytest.raises(checkpoint.CheckpointSaveError,
                           match=r"Saving checkpoint step 6 to .* failed: OSError: \[Errno 28\] No space left on "
                                 r"device.*complete steps on disk: \[2, 4\]"):
            run(make_config(), workdir)
    assert writes[0] >= 1
    assert checkpoint.complete_steps(directory) == (2, 4)
    final = run(make_config(), workdir)
    assert_exact(final, workdir, reference)


def test_another_model_on_resume_is_refused_before_compiling_and_nothing_is_moved(stopped, tmp_path):
    workdir = copy_of(stopped, tmp_path)
    config = make_config()
    config.model.embed_dim = 48
    with pytest.raises(checkpoint.CheckpointMismatchError,
                       match=r"step 4 holds a different train state(.|\n)*params/blocks_0/attn/proj/bias: saved "
                             r"\[32\] float32, the run has \[48\] float32"):
        run(config, workdir, allow_config_change=True)
    assert checkpoint.complete_steps(os.path.join(workdir, "checkpoints")) == (2, 4)


def test_nan_in_the_first_step_after_a_restore_points_at_the_restored_checkpoint(stopped, tmp_path):
    """A verified step holding a NaN (saved by a run already broken) is named as the cause, not the learning rate."""
    workdir = copy_of(stopped, tmp_path)
    directory = os.path.join(workdir, "checkpoints")
    state = checkpoint.load_state(directory, 4)
    state["params"]["head"]["bias"] = np.asarray(state["params"]["head"]["bias"]).copy()
    state["params"]["head"]["bias"][3] = np.nan
    meta = json.load(open(os.path.join(directory, "4", "meta", "metadata")))
    shutil.rmtree(os.path.join(directory, "4"))
    writer = checkpoint.Checkpointer(directory, keep=3, async_save=False)
    writer.save(4, state, {key: value for key, value in meta.items() if key != "step"})
    writer.close()
    assert checkpoint.verify_step(directory, 4).status == "verified"

    with pytest.raises(FloatingPointError) as error:
        run(make_config(), workdir)
    message = str(error.value)
    assert "Non-finite train/loss = nan at step 5 (the first step after resuming from checkpoint step 4" in message
    assert "matches its fingerprints" in message and "['params/head/bias']" in message and "not finite" in message
    assert checkpoint.complete_steps(directory) == (2, 4)


def test_nan_after_restoring_an_unfingerprinted_damaged_step_says_it_cannot_be_verified(stopped, tmp_path):
    """The issue's case on a step saved before fingerprints: the message points at the step, not the learning rate."""
    workdir = copy_of(stopped, tmp_path)
    directory = os.path.join(workdir, "checkpoints")
    for step in (2, 4):
        shutil.rmtree(os.path.join(directory, str(step), "fingerprints"))
    faults.fill_with_ones(directory, 4)
    assert checkpoint.verify_step(directory, 4).status == "unverifiable"
    with pytest.raises(FloatingPointError, match=r"at step 5 \(the first step after resuming from checkpoint step 4"
                                                 r".*has no fingerprints .*cannot be verified and may be damaged"):
        run(make_config(), workdir)


def test_verify_command_lists_steps_and_says_which_one_a_run_restores(stopped, tmp_path, capsys):
    workdir = copy_of(stopped, tmp_path)
    directory = os.path.join(workdir, "checkpoints")
    faults.flip_bit(directory, 4)
    faults.half_written_step(directory, 2, 6)

    assert checkpoint.cli(["verify", workdir]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^\s+4  damaged\s+\d+\.\d\d  params/blocks_0/attn/qkv/kernel: fingerprint [0-9a-f]{8}, "
                     r"saved [0-9a-f]{8}$", out, re.M), out
    assert re.search(r"^\s+2  verified\s+\d+\.\d\d\s*$", out, re.M), out
    assert "6.orbax-checkpoint-tmp-1700000000  unfinished" in out
    assert "A run restores step 2 (moving damaged step(s) [4] aside first)." in out
    assert os.path.isdir(os.path.join(directory, "4"))  # verifying moves nothing

    checkpoint.move_aside(directory, 4, ["test"])
    assert checkpoint.cli(["verify", workdir, "--step=2"]) == 0
    out = capsys.readouterr().out
    assert "Step 2: verified." in out and re.search(r"4\.damaged-\d+\s+moved aside", out), out
    with pytest.raises(ValueError, match=r"Usage: python -m vitjax.checkpoint verify WORKDIR .*commands: \['verify'\]"):
        checkpoint.cli(["check", workdir])

    result = subprocess.run([sys.executable, "-m", "vitjax.checkpoint", "verify", workdir], cwd=faults.REPO,
                            capture_output=True, text=True, timeout=300, env=faults.child_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "A run restores step 2." in result.stdout and "Traceback" not in result.stderr


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_saves_the_current_step_exits_75_and_the_run_resumes_exactly(signal_name, reference, tmp_path):
    """The platform's SIGTERM (or a Ctrl-C) mid-run, through `python -m vitjax.main`: one line, status 75, exact resume."""
    workdir = str(tmp_path / "run")
    overrides = dict(OVERRIDES, checkpoint_async=True, **{"model.drop_path_rate": 0.1})
    child = subprocess.Popen(faults.child_command(str(tmp_path), workdir, overrides, seconds_per_batch=0.5),
                             cwd=faults.REPO, env=faults.child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    assert faults.wait_for_step(child, workdir, 3) >= 3
    child.send_signal(getattr(signal, signal_name))
    stdout, stderr = child.communicate(timeout=300)

    assert child.returncode == 75, stderr[-3000:]
    match = re.search(rf"PREEMPTED: Preempted by {signal_name} at step (\d+): saved step \1 to \S+ in (\d+\.\d\d) s "
                      r"\((\d+\.\d\d) s after the signal\); the next run resumes from step \1\.", stderr)
    assert match, stderr[-3000:]
    saved = int(match.group(1))
    assert 3 <= saved < OVERRIDES["total_steps"]
    assert float(match.group(2)) <= float(match.group(3)) < 30.0
    directory = os.path.join(workdir, "checkpoints")
    assert checkpoint.complete_steps(directory)[-1] == saved
    assert checkpoint.verify_step(directory, saved).status == "verified"

    final = run(make_config(), workdir)
    final_reference, records_reference = reference
    assert final == final_reference
    # The preempted step's evaluation is skipped (the seconds after SIGTERM are for saving): compare the rest.
    records = strip_timing(read_metrics(workdir))
    assert [r["step"] for r in records] == list(range(1, OVERRIDES["total_steps"] + 1))
    for record, expected in zip(records, records_reference):
        if record["step"] == saved:
            expected = {key: value for key, value in expected.items() if not key.startswith("eval/")}
        assert record == expected


def test_sigkill_at_random_moments_including_async_saves_resumes_exactly(tmp_path):
    """Two SIGKILLs at random moments of a run saving every step asynchronously, then an exact finish.

    Saves of this model take about a tenth of a step here, so a random kill lands in one now and then;
    test_resume.py kills right after a save started, every time.
    """
    # Evaluation only at the end: the kills land in training steps and their saves, not in evaluations.
    overrides = dict(OVERRIDES, total_steps=12, eval_every_steps=12, checkpoint_async=True, checkpoint_every_steps=1,
                     keep_checkpoints=2, **{"model.drop_path_rate": 0.1})
    unbroken, workdir = str(tmp_path / "unbroken"), str(tmp_path / "run")
    final_unbroken = run(make_config(total_steps=12, eval_every_steps=12), unbroken)
    rng = random.Random(0)
    for _ in range(2):
        child = subprocess.Popen(faults.child_command(str(tmp_path), workdir, overrides, seconds_per_batch=0.2),
                                 cwd=faults.REPO, env=faults.child_env(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
        start = faults.last_logged_step(workdir)
        assert faults.wait_for_step(child, workdir, start + 1) > start, child.communicate()[1][-3000:]
        time.sleep(rng.uniform(0.0, 0.3))
        child.kill()
        child.communicate(timeout=60)
        assert child.returncode == -signal.SIGKILL
    directory = os.path.join(workdir, "checkpoints")
    newest = checkpoint.complete_steps(directory)[-1]
    assert newest < 12 and checkpoint.verify_step(directory, newest).status == "verified"
    final = run(make_config(total_steps=12, eval_every_steps=12), workdir)
    assert final == final_unbroken
    assert strip_timing(read_metrics(workdir)) == strip_timing(read_metrics(unbroken))


def reference_fingerprint(words: np.ndarray) -> str:
    """Returns the fingerprint of uint32 words, in numpy: sum_i fmix32(word_i ^ (i * 0x9E3779B9)) mod 2^32."""
    with np.errstate(over="ignore"):
        h = words.ravel().astype(np.uint32) ^ (np.arange(words.size, dtype=np.uint32) * np.uint32(0x9E3779B9))
        h ^= h >> 16
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> 13
        h *= np.uint32(0xC2B2AE35)
        h ^= h >> 16
    return f"{int(h.sum(dtype=np.uint64)) % 2**32:08x}"


def test_fingerprints_do_not_depend_on_the_layout_and_catch_one_flipped_bit():
    values = np.random.default_rng(0).standard_normal((8, 12)).astype(np.float32)
    tree = {"a": values, "b": values.astype(jax.numpy.bfloat16), "c": np.arange(5) > 2, "step": np.int32(7)}
    plain = checkpoint.fingerprints(tree)
    assert plain["a"] == reference_fingerprint(values.view(np.uint32))
    assert plain["b"] == reference_fingerprint(tree["b"].view(np.uint16).astype(np.uint32))
    assert plain["c"] == reference_fingerprint(tree["c"].astype(np.uint32))
    assert plain["step"] == reference_fingerprint(np.asarray([7], np.uint32))
    # Pinned: a change of algorithm would fail every checkpoint written before it.
    assert checkpoint.fingerprints({"x": np.arange(10, dtype=np.float32)}) == {"x": "71eb89e6"}
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("rows", "cols"))
    layout = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("rows", "cols"))
    sharded = dict(tree, a=jax.device_put(values, layout))
    assert checkpoint.fingerprints(sharded) == plain
    flipped = values.copy()
    flipped.view(np.uint32)[5, 7] ^= 1 << 9
    assert checkpoint.fingerprints(dict(tree, a=flipped))["a"] != plain["a"]
    swapped = values.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert checkpoint.fingerprints(dict(tree, a=swapped))["a"] != plain["a"]
    assert checkpoint.fingerprints(dict(tree, a=values.reshape(12, 8)))["a"] == plain["a"]  # the shape is recorded apart


def test_load_params_verifies_the_leaves_it_reads(tmp_path):
    directory = str(tmp_path / "checkpoints")
    state = {"params": {"w": np.arange(6, dtype=np.float32)}, "opt_state": {"mu": np.ones(6, np.float32)}}
    writer = checkpoint.Checkpointer(directory, keep=2, async_save=False)
    writer.save(1, state)
    writer.close()
    np.testing.assert_array_equal(checkpoint.load_params(directory, parts=("params",))["params"]["w"], np.arange(6))
    path = os.path.join(directory, "1", "fingerprints", "metadata")
    record = json.load(open(path))
    saved = record["leaves"]["params/w"]["fingerprint"]
    record["leaves"]["params/w"]["fingerprint"] = "00000000"  # as if the array's bytes had changed on disk
    json.dump(record, open(path, "w"))
    with pytest.raises(checkpoint.CheckpointDamagedError,
                       match=rf"step 1 at .* is damaged: params/w: fingerprint {saved}, saved 00000000"):
        checkpoint.load_params(directory, parts=("params",))
    record["leaves"]["opt_state/mu"]["fingerprint"] = "00000000"  # a leaf it does not read does not matter
    record["leaves"]["params/w"]["fingerprint"] = saved
    json.dump(record, open(path, "w"))
    assert checkpoint.load_params(directory, parts=("params",))["params"]["w"].shape == (6,)


def test_every_config_that_checkpoints_periodically_keeps_a_step_to_fall_back_to():
    from vitjax import config_utils
    names = sorted(name for name in os.listdir(os.path.join(faults.REPO, "configs")) if name.endswith(".py"))
    assert len(names) >= 10
    for name in names:
        config = config_utils.load_config(f"configs/{name}")
        if config.checkpoint_every_steps:
            assert config.keep_checkpoints >= 2, name


def test_typed_prng_keys_are_fingerprinted_saved_and_verified(tmp_path):
    """A state holding a new-style key (`jax.random.key`, as experiments make) saves and verifies like raw key data."""
    state = {"rng": jax.random.key(3), "w": np.arange(6, dtype=np.float32)}
    assert checkpoint.fingerprints(state)["rng"] == checkpoint.fingerprints({"rng": jax.random.PRNGKey(3)})["rng"]
    assert checkpoint.fingerprint_record(state, {})["leaves"]["rng"]["dtype"] == "key<fry>"
    checkpointer = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=2, async_save=False)
    assert checkpointer.save(1, state, {"seed": 0})
    checkpointer.close()
    assert checkpoint.verify_step(str(tmp_path / "checkpoints"), 1).status == "verified"
