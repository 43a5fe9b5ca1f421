"""Kill and resume: a run SIGKILLed mid-way and resumed ends with the params and metrics of an unbroken run."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np

from vitjax import checkpoint
from test_train import REPO, read_metrics, run, tiny_config

TOTAL_STEPS = 8
KILL_AFTER_SAVE_OF_STEP = 4
OVERRIDES = dict(total_steps=TOTAL_STEPS, log_every_steps=1, eval_every_steps=4, checkpoint_every_steps=2,
                 keep_checkpoints=1)

# The child process trains with async checkpoints and SIGKILLs itself right after the save of
# step 4 was started, so that save may be caught half-written: a resume must then fall back on
# step 2 (keep_checkpoints=1: orbax deletes step 2 only once step 4 is complete).
CHILD = textwrap.dedent(f"""
    import os, signal, sys
    sys.path.insert(0, {REPO!r})
    sys.path.insert(0, {os.path.join(REPO, "tests")!r})
    from test_train import one_device_mesh, tiny_config
    from vitjax import checkpoint, train

    original_save = checkpoint.Checkpointer.save

    def save_then_die(self, step, state, meta=None):
        started = original_save(self, step, state, meta)
        if step == {KILL_AFTER_SAVE_OF_STEP}:
            os.kill(os.getpid(), signal.SIGKILL)
        return started

    checkpoint.Checkpointer.save = save_then_die
    config = tiny_config(**{OVERRIDES!r})
    config.checkpoint_async = True
    config.model.drop_path_rate = 0.1
    train.train_and_evaluate(config, sys.argv[1], mesh=one_device_mesh())
""")


def make_config():
    """Returns the resume test's config (drop-path on, so the rng position matters too)."""
    config = tiny_config(**OVERRIDES)
    config.checkpoint_async = True
    config.model.drop_path_rate = 0.1
    return config


def test_killed_and_resumed_run_matches_unbroken_run(tmp_path):
    unbroken, broken = str(tmp_path / "unbroken"), str(tmp_path / "broken")
    final_unbroken = run(make_config(), unbroken)

    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.run([sys.executable, str(script), broken], cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    steps_after_kill = checkpoint.complete_steps(os.path.join(broken, "checkpoints"))
    assert steps_after_kill in ((2,), (4,)), steps_after_kill  # the newest complete one survives

    final_resumed = run(make_config(), broken)

    assert final_resumed == final_unbroken
    records_unbroken, records_resumed = read_metrics(unbroken), read_metrics(broken)
    assert [r["step"] for r in records_resumed] == list(range(1, TOTAL_STEPS + 1))
    timing = ("images_per_sec", "steps_per_sec")
    strip = lambda records: [{k: v for k, v in r.items() if k not in timing} for r in records]  # noqa: E731
    assert strip(records_resumed) == strip(records_unbroken)

    state_unbroken = checkpoint.load_state(os.path.join(unbroken, "checkpoints"))
    state_resumed = checkpoint.load_state(os.path.join(broken, "checkpoints"))
    assert int(state_resumed["step"]) == TOTAL_STEPS
    for a, b in zip(jax.tree.leaves(state_unbroken), jax.tree.leaves(state_resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(state_unbroken) == jax.tree.structure(state_resumed)
    with open(os.path.join(broken, "checkpoints", str(TOTAL_STEPS), "meta", "metadata")) as f:
        assert json.load(f)["data_step"] == TOTAL_STEPS


def test_stop_after_steps_checkpoints_and_resumes(tmp_path):
    """A graceful stop (as on preemption) saves its step; the next run picks up from there to the end."""
    workdir = str(tmp_path / "stopped")
    config = tiny_config(total_steps=4, log_every_steps=1, checkpoint_every_steps=0)
    stopped = run(config, workdir, stop_after_steps=2)
    assert stopped["step"] == 2 and "eval/top1" not in stopped
    assert checkpoint.complete_steps(os.path.join(workdir, "checkpoints")) == (2,)
    final = run(tiny_config(total_steps=4, log_every_steps=1, checkpoint_every_steps=0), workdir)
    assert final["step"] == 4 and "eval/top1" in final
    assert [record["step"] for record in read_metrics(workdir)] == [1, 2, 3, 4]


def test_unfinished_save_is_removed_before_the_same_step_is_saved_again(tmp_path):
    directory = str(tmp_path / "checkpoints")
    first = checkpoint.Checkpointer(directory, keep=1, async_save=False)
    first.save(2, {"w": np.ones(3, np.float32)})
    first.close()
    unfinished = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1700000000"
    (unfinished / "state").mkdir(parents=True)
    (unfinished / "state" / "half_written").write_bytes(b"\0" * 64)
    assert checkpoint.complete_steps(directory) == (2,)  # inspection neither lists nor touches it
    assert unfinished.exists()

    resumed = checkpoint.Checkpointer(directory, keep=1)
    assert not unfinished.exists()
    assert resumed.save(4, {"w": np.full(3, 4.0, np.float32)})
    resumed.close()
    assert checkpoint.complete_steps(directory) == (4,)
    assert sorted(os.listdir(directory)) == ["4"]
    np.testing.assert_array_equal(checkpoint.load_state(directory)["w"], np.full(3, 4.0, np.float32))
