r"""Checkpoint fault injection: each way a run's checkpoints go wrong, and how the next run ends.

    python experiments/fault_injection.py               # every case, 10 random SIGKILLs (~5 min on 2 CPU cores)
    python experiments/fault_injection.py --kills=20

The tiny runlocal digits ViT (drop-path on, so the rng position matters too) trains 8 steps with an
asynchronous checkpoint every 2; the cases start from a copy of a run stopped after step 4 (complete
steps 2 and 4), damage it with `tests/faults.py`, and run again to step 8. "exact" means final
metrics and every metrics.jsonl record equal the unbroken run's, bit for bit (timings aside). Signals
go to a real `python -m vitjax.main` child whose batches are slowed down (0.3 s) so they land mid-run.
The tests in tests/test_fault_injection.py assert the same outcomes; this script writes the table.
Writes experiments/out/fault_injection.{md,json}.
"""
import argparse
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from experiment_io import write_outputs  # noqa: E402

import jax  # noqa: E402

import faults  # noqa: E402  (tests/faults.py)
from vitjax import checkpoint, config_utils, parallel, train  # noqa: E402

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
OVERRIDES = dict(total_steps=8, log_every_steps=1, eval_every_steps=4, checkpoint_every_steps=2, keep_checkpoints=3,
                 checkpoint_async=True, progress_bar=False)
TIMING = ("images_per_sec", "steps_per_sec")


def make_config(**overrides):
    """Returns the runlocal digits config with the suite's cadence, drop-path 0.1 and `overrides`."""
    config = config_utils.load_config("configs/digits_vit.py:runlocal", {**OVERRIDES, **overrides})
    config.model.drop_path_rate = 0.1
    return config


def run(config, workdir: str, **kwargs) -> Dict[str, Any]:
    """Returns train_and_evaluate's final metrics on this process's first device."""
    mesh = parallel.create_mesh(dict(data=1, fsdp=1, model=1), devices=jax.devices()[:1])
    return train.train_and_evaluate(config, workdir, mesh=mesh, **kwargs)


def records(workdir: str) -> List[Dict[str, Any]]:
    """Returns WORKDIR/metrics.jsonl without wall-clock fields."""
    with open(os.path.join(workdir, "metrics.jsonl")) as file:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in file]


class Suite:
    """The cases, sharing one unbroken reference run and one run stopped after step 4."""

    def __init__(self, root: str):
        self.root = root
        self.reference_dir = os.path.join(root, "reference")
        self.reference = run(make_config(), self.reference_dir)
        self.stopped = os.path.join(root, "stopped")
        run(make_config(), self.stopped, stop_after_steps=4)
        self.count = 0

    def copy(self) -> str:
        """Returns a fresh copy of the stopped workdir."""
        self.count += 1
        workdir = os.path.join(self.root, f"case{self.count}")
        shutil.copytree(self.stopped, workdir)
        return workdir

    def exact(self, final, workdir: str, reference_dir: str = None, reference=None) -> bool:
        """Returns whether a run's final metrics and records equal the unbroken run's."""
        return final == (reference or self.reference) and records(workdir) == records(reference_dir or self.reference_dir)

    def resume_after(self, damage: Callable[[str], Any]) -> Dict[str, Any]:
        """Returns the outcome of damaging a copy of the stopped run (steps 2, 4) and running it to step 8."""
        workdir = self.copy()
        directory = os.path.join(workdir, "checkpoints")
        damage(directory)
        verdict = checkpoint.verify_step(directory, 4).status
        final = run(make_config(), workdir)
        if checkpoint.damaged_steps(directory):
            outcome = f"step 4 {verdict}: moved aside, the run fell back to step 2"
        else:
            outcome = f"step 4 {verdict}: the run resumed from it"
        return dict(outcome=outcome, exact=self.exact(final, workdir))


def error_outcome(function: Callable[[], Any]) -> Dict[str, Any]:
    """Returns {outcome: "ErrorType: first line"} of the error `function` raises (or says it raised none)."""
    try:
        function()
    except Exception as error:  # noqa: BLE001 - the error is the outcome
        lines = [line.strip() for line in str(error).strip().splitlines()]
        text = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]  # a list follows: show its first item
        sentences = text.split(". ")  # whole sentences, as many as fit in about 200 characters
        shown = next((". ".join(sentences[:n]) for n in range(len(sentences), 0, -1)
                      if len(". ".join(sentences[:n])) <= 200), text[:200] + " ...")
        return dict(outcome=f"{type(error).__name__}: {shown}", exact=None)
    return dict(outcome="no error (unexpected)", exact=None)


def case_every_step_damaged(suite: Suite) -> Dict[str, Any]:
    workdir = suite.copy()
    directory = os.path.join(workdir, "checkpoints")
    faults.damage_data_files(directory, 4)
    faults.damage_metadata_file(directory, 2, "state/_METADATA")
    result = error_outcome(lambda: run(make_config(), workdir))
    result["outcome"] += f" (moved aside: {', '.join(checkpoint.damaged_steps(directory))})"
    return result


def case_full_disk(suite: Suite) -> Dict[str, Any]:
    workdir = suite.copy()
    with faults.failing_writer():
        first = error_outcome(lambda: run(make_config(), workdir))
    final = run(make_config(), workdir)
    return dict(outcome=first["outcome"] + "; rerun resumed from step 4", exact=suite.exact(final, workdir))


def case_config_changed(suite: Suite) -> Dict[str, Any]:
    workdir = suite.copy()
    config = make_config()
    config.optim.blr = 0.03
    return error_outcome(lambda: run(config, workdir))


def case_other_model(suite: Suite) -> Dict[str, Any]:
    workdir = suite.copy()
    config = make_config()
    config.model.embed_dim = 48
    return error_outcome(lambda: run(config, workdir, allow_config_change=True))


def case_nan_in_restored_step(suite: Suite) -> Dict[str, Any]:
    workdir = suite.copy()
    directory = os.path.join(workdir, "checkpoints")
    state = checkpoint.load_state(directory, 4)
    state["params"]["head"]["bias"] = np.asarray(state["params"]["head"]["bias"]).copy()
    state["params"]["head"]["bias"][3] = np.nan
    with open(os.path.join(directory, "4", "meta", "metadata")) as file:
        meta = {key: value for key, value in json.load(file).items() if key != "step"}
    shutil.rmtree(os.path.join(directory, "4"))
    writer = checkpoint.Checkpointer(directory, keep=3, async_save=False)
    writer.save(4, state, meta)
    writer.close()
    result = error_outcome(lambda: run(make_config(), workdir))
    result["outcome"] = re.sub(r" \(the first step after.*", " (the first after the restore): step 4 verified, "
                               "its params/head/bias not finite", result["outcome"])
    return result


def case_nan_unfingerprinted(suite: Suite) -> Dict[str, Any]:
    workdir = suite.copy()
    directory = os.path.join(workdir, "checkpoints")
    for step in (2, 4):
        shutil.rmtree(os.path.join(directory, str(step), "fingerprints"))
    faults.fill_with_ones(directory, 4)
    result = error_outcome(lambda: run(make_config(), workdir))
    result["outcome"] = re.sub(r" \(the first step after.*", " (the first after the restore): step 4 has no "
                               "fingerprints, cannot be verified, may be damaged", result["outcome"])
    return result


def case_signal(suite: Suite, number: int) -> Dict[str, Any]:
    """SIGTERM or SIGINT to a `python -m vitjax.main` child at step >= 3; then an in-process resume."""
    workdir = os.path.join(suite.root, f"signal{number}")
    child = subprocess.Popen(faults.child_command(suite.root, workdir, OVERRIDES | {"model.drop_path_rate": 0.1},
                                                  seconds_per_batch=0.3),
                             cwd=REPO, env=faults.child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    faults.wait_for_step(child, workdir, 3)
    child.send_signal(number)
    _, stderr = child.communicate(timeout=600)
    match = re.search(r"Preempted by (\w+) at step (\d+): saved step \d+ to \S+ in (\d+\.\d+) s \((\d+\.\d+) s after", stderr)
    if child.returncode != 75 or not match:
        return dict(outcome=f"exit {child.returncode}, no PREEMPTED line: {stderr[-300:]}", exact=False)
    step, save_s, after_s = int(match.group(2)), float(match.group(3)), float(match.group(4))
    final = run(make_config(), workdir)
    # The preempted step's eval is skipped: compare every record but that one's eval metrics.
    got, want = records(workdir), records(suite.reference_dir)
    same = final == suite.reference and len(got) == len(want) and all(
        a == {k: v for k, v in b.items() if not (a["step"] == step and k.startswith("eval/"))} for a, b in zip(got, want))
    return dict(outcome=f"exit 75 at step {step}: saved in {save_s:.2f} s, {after_s:.2f} s after the signal; "
                        f"resumed from step {step}", exact=same, saved_step=step, save_seconds=save_s,
                seconds_after_signal=after_s)


def case_sigkills(suite: Suite, kills: int, seed: int = 0) -> Dict[str, Any]:
    """`kills` runs SIGKILLed at random moments (a save every step, async), each resumed in-process to the end."""
    # Evaluation only at the end: the kills land in training steps and their saves, not in evaluations.
    overrides = OVERRIDES | dict(total_steps=12, eval_every_steps=12, checkpoint_every_steps=1, keep_checkpoints=2)
    reference_dir = os.path.join(suite.root, "reference12")
    reference = run(make_config(**{k: v for k, v in overrides.items() if k != "progress_bar"}), reference_dir)
    rng = random.Random(seed)
    exact, during_save, killed_at = 0, 0, []
    for index in range(kills):
        workdir = os.path.join(suite.root, f"kill{index}")
        child = subprocess.Popen(faults.child_command(suite.root, workdir, overrides | {"model.drop_path_rate": 0.1},
                                                      seconds_per_batch=0.2),
                                 cwd=REPO, env=faults.child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        faults.wait_for_step(child, workdir, 1)
        time.sleep(rng.uniform(0.0, 1.6))
        child.kill()
        child.wait(timeout=60)
        directory = os.path.join(workdir, "checkpoints")
        during_save += bool(glob.glob(os.path.join(directory, "*.orbax-checkpoint-tmp*")))
        killed_at.append(faults.last_logged_step(workdir))
        final = run(make_config(**{k: v for k, v in overrides.items() if k != "progress_bar"}), workdir)
        exact += suite.exact(final, workdir, reference_dir, reference)
    return dict(outcome=f"{exact}/{kills} resumed exactly; {during_save} of the kills landed during a save "
                        f"(an unfinished step left); killed after steps {killed_at}", exact=exact == kills,
                kills=kills, during_save=during_save, killed_after_steps=killed_at)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10, help="Random SIGKILLs (each a child run, ~15 s).")
    parser.add_argument("--out", default=OUT_DIR)
    args = parser.parse_args()
    os.chdir(REPO)

    root = tempfile.mkdtemp(prefix="fault_injection_")
    suite = Suite(root)
    cases = [("damaged data files, newest step (64 bytes in each OCDBT data file)",
              lambda: suite.resume_after(lambda d: faults.damage_data_files(d, 4)))]
    cases += [(f"damaged metadata file, newest step: {name}",
               lambda name=name: suite.resume_after(lambda d: faults.damage_metadata_file(d, 4, name)))
              for name in faults.METADATA_FILES]
    cases += [("one bit flipped in one array of the newest step (files well-formed)",
               lambda: suite.resume_after(lambda d: faults.flip_bit(d, 4))),
              ("missing array in the newest step (params/blocks_0/attn/qkv/kernel)",
               lambda: suite.resume_after(lambda d: faults.remove_array(d, 4))),
              ("half-written step 6 (a torn temporary directory)",
               lambda: suite.resume_after(lambda d: faults.half_written_step(d, 4, 6))),
              ("every step damaged", lambda: case_every_step_damaged(suite)),
              ("full disk during the save of step 6 (writer raises ENOSPC)", lambda: case_full_disk(suite)),
              ("config changed between runs (optim.blr)", lambda: case_config_changed(suite)),
              ("another model on resume, --allow_config_change", lambda: case_other_model(suite)),
              ("NaN loss in the first step after a restore (a saved NaN)", lambda: case_nan_in_restored_step(suite)),
              ("NaN loss after restoring a step saved without fingerprints, one array 0xff",
               lambda: case_nan_unfingerprinted(suite)),
              ("SIGTERM mid-run (python -m vitjax.main)", lambda: case_signal(suite, signal.SIGTERM)),
              ("SIGINT mid-run (python -m vitjax.main)", lambda: case_signal(suite, signal.SIGINT)),
              (f"SIGKILL at {args.kills} random moments, a save every step (async)",
               lambda: case_sigkills(suite, args.kills))]
    results = []
    for name, function in cases:
        start = time.time()
        try:
            result = function()
        except Exception:  # noqa: BLE001 - a case that crashes is reported, not hidden
            result = dict(outcome="CRASHED: " + traceback.format_exc().strip().splitlines()[-1], exact=False)
        result.update(case=name, seconds=time.time() - start, outcome=result["outcome"].replace(root, "$TMP"))
        results.append(result)
        print(f"{name}: {result['outcome']} exact={result['exact']} ({result['seconds']:.1f} s)", flush=True)
    shutil.rmtree(root, ignore_errors=True)

    exact_text = {True: "yes", False: "NO", None: "-"}
    table = "\n".join(
        ["Checkpoint fault injection (tiny digits ViT, 8 steps, async checkpoint every 2; cases start from a run "
         "stopped after step 4). exact: final metrics and every metrics record equal the unbroken run's.", "",
         "| case | outcome | exact | seconds |", "|---|---|:-:|---:|"]
        + [f"| {r['case']} | {r['outcome'].replace('|', '/')} | {exact_text[r['exact']]} | {r['seconds']:.1f} |"
           for r in results]
        + ["", f"Unbroken run's final metrics: {json.dumps(suite.reference)}"])
    print(table)
    print("wrote", write_outputs(args.out, "fault_injection", table,
                                 dict(reference=suite.reference, cases=results, kills=args.kills)))


if __name__ == "__main__":
    main()
