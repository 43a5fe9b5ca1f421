"""Multi-host: two processes (jax.distributed over gloo, 2 CPU devices each) train like one process with 4 devices.

Each process reads only its own slice of every global batch and of the eval split; the step,
losses, eval metrics and the checkpoint written together must equal the single-process run's.
A SIGTERM to one of them makes both save the same step (JAX's preemption service) and stop.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np

import faults
from vitjax import checkpoint, parallel, train
from test_train import REPO, read_metrics, tiny_config

OVERRIDES = dict(total_steps=4, log_every_steps=1, eval_every_steps=4, checkpoint_every_steps=2, keep_checkpoints=1,
                 eval_batch_size=120)

# Both child scripts start so: two CPU devices per process, gloo collectives, jax.distributed on localhost.
CHILD_PROLOGUE = textwrap.dedent(f"""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, {REPO!r})
    sys.path.insert(0, {os.path.join(REPO, "tests")!r})
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, process_id, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(coordinator_address="localhost:" + port, num_processes=2, process_id=process_id)
""")

CHILD = CHILD_PROLOGUE + textwrap.dedent(f"""
    from test_train import tiny_config
    from vitjax import parallel, train
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
    final = train.train_and_evaluate(tiny_config(**{OVERRIDES!r}), workdir, mesh=parallel.create_mesh(dict(data=4)))
    print("FINAL " + json.dumps({{key: float(value) for key, value in final.items()}}))
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def start_two_processes(script, workdir, extra_args=()) -> list:
    """Returns the two `jax.distributed` processes running `script` (coordinator port, index, workdir, extra_args)."""
    port = str(free_port())
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    return [subprocess.Popen([sys.executable, str(script), port, str(index), workdir, *extra_args], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for index in range(2)]


def test_two_processes_train_like_one_process_with_their_devices(tmp_path):
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    final_single = train.train_and_evaluate(tiny_config(**OVERRIDES), single,
                                            mesh=parallel.create_mesh(dict(data=4), devices=jax.devices()[:4]))

    script = tmp_path / "child.py"
    script.write_text(CHILD)
    children = start_two_processes(script, multi)
    outputs = [child.communicate(timeout=600) for child in children]
    for child, (stdout, stderr) in zip(children, outputs):
        assert child.returncode == 0, stderr[-4000:]
    finals = [json.loads(stdout.split("FINAL ", 1)[1]) for stdout, _ in outputs]

    assert finals[0] == finals[1]  # every process returns the same global metrics
    for key, value in final_single.items():
        np.testing.assert_allclose(finals[0][key], float(value), rtol=1e-5, err_msg=key)
    losses = lambda workdir: [r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r]  # noqa: E731
    assert len(losses(multi)) == OVERRIDES["total_steps"]
    np.testing.assert_allclose(losses(multi), losses(single), rtol=1e-5)

    assert checkpoint.complete_steps(os.path.join(multi, "checkpoints")) == (4,)
    state_single = checkpoint.load_state(os.path.join(single, "checkpoints"))
    state_multi = checkpoint.load_state(os.path.join(multi, "checkpoints"))
    assert jax.tree.structure(state_single) == jax.tree.structure(state_multi)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state_single), jax.tree.leaves(state_multi)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        name = jax.tree_util.keystr(path)
        if "qkv" in name and "bias" in name and "params" in name:
            # The key bias shifts a query's logits by a constant: softmax ignores it, its true gradient
            # is 0, and Adam turns the all-reduce's rounding noise into full-size steps. Compare q and v.
            a, b = a[[0, 2]], b[[0, 2]]
        # Gloo's all-reduce sums in another order than one process does: compare at the leaf's scale.
        assert np.max(np.abs(a - b), initial=0.0) <= 1e-5 * np.max(np.abs(a), initial=0.0) + 1e-12, name


PREEMPTED_OVERRIDES = dict(OVERRIDES, total_steps=12, checkpoint_every_steps=4, keep_checkpoints=2)

# Batches slowed down so that the signal lands mid-run; a preempted process prints its step and exits 75.
PREEMPTED_CHILD = CHILD_PROLOGUE + textwrap.dedent(f"""
    import faults
    faults.slow_down_batches(0.3)
    from test_train import tiny_config
    from vitjax import parallel, train
    try:
        train.train_and_evaluate(tiny_config(**{PREEMPTED_OVERRIDES!r}), workdir, mesh=parallel.create_mesh(dict(data=4)))
    except train.Preempted as error:
        print("PREEMPTED " + json.dumps(dict(step=error.step, signal=error.signal_name)), flush=True)
        sys.exit(75)
""")


def test_sigterm_to_one_process_makes_both_save_the_same_step_and_the_run_resumes(tmp_path):
    multi = str(tmp_path / "multi")
    script = tmp_path / "preempted_child.py"
    script.write_text(PREEMPTED_CHILD)
    children = start_two_processes(script, multi)
    assert faults.wait_for_step(children[0], multi, 2) >= 2
    children[1].send_signal(signal.SIGTERM)  # the platform's notice reaches one host first; JAX tells the other
    outputs = [child.communicate(timeout=600) for child in children]
    for child, (stdout, stderr) in zip(children, outputs):
        assert child.returncode == 75, stderr[-4000:]
    steps = [json.loads(stdout.split("PREEMPTED ", 1)[1])["step"] for stdout, _ in outputs]
    assert steps[0] == steps[1] and 2 <= steps[0] < PREEMPTED_OVERRIDES["total_steps"], steps
    saved = steps[0]
    for _, stderr in outputs:
        assert re.search(rf"Preempted by SIGTERM at step {saved}: saved step {saved} to \S+ in \d+\.\d\d s", stderr)
    directory = os.path.join(multi, "checkpoints")
    assert checkpoint.complete_steps(directory)[-1] == saved
    assert checkpoint.verify_step(directory, saved).status == "verified"

    # The next run (here one process with the same 4 devices) resumes from the saved step to the end.
    mesh = parallel.create_mesh(dict(data=4), devices=jax.devices()[:4])
    final = train.train_and_evaluate(tiny_config(**PREEMPTED_OVERRIDES), multi, mesh=mesh)
    assert final["step"] == PREEMPTED_OVERRIDES["total_steps"]
    assert [r["step"] for r in read_metrics(multi)] == list(range(1, PREEMPTED_OVERRIDES["total_steps"] + 1))
    single = str(tmp_path / "single")
    final_single = train.train_and_evaluate(tiny_config(**PREEMPTED_OVERRIDES), single, mesh=mesh)
    for key, value in final_single.items():  # gloo sums in another order than one process: not bit-exact
        np.testing.assert_allclose(final[key], value, rtol=1e-5, err_msg=key)
