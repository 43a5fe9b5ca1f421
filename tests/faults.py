"""Fault injection for checkpoints: damage a finished step's files in the ways disks and copies do.

Shared by tests/test_fault_injection.py (the proof) and experiments/fault_injection.py (the table).
Each helper damages one step of a checkpoints directory in place and returns what it touched.
"""
import contextlib
import errno
import glob
import os
import shutil
import sys
from typing import Iterator, List


def step_dir(checkpoints: str, step: int) -> str:
    """Returns the directory of one step."""
    return os.path.join(checkpoints, str(step))


def overwrite_bytes(path: str, count: int = 64) -> None:
    """Overwrites `count` bytes in the middle of a file with 0xff (a bad sector, a torn copy)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as file:
        file.seek(max(0, size // 2 - count // 2))
        file.write(b"\xff" * min(count, size))


def damage_data_files(checkpoints: str, step: int) -> List[str]:
    """Overwrites 64 bytes inside each OCDBT data file of the step's state (the arrays' chunks); returns them."""
    files = sorted(glob.glob(os.path.join(step_dir(checkpoints, step), "state", "ocdbt.process_*", "d", "*")))
    assert files, f"no OCDBT data files in step {step}"
    for path in files:
        overwrite_bytes(path)
    return files


# Metadata files of a step: orbax's tree metadata, the OCDBT manifest, vitjax's meta and fingerprints.
METADATA_FILES = ("state/_METADATA", "state/manifest.ocdbt", "meta/metadata", "fingerprints/metadata",
                  "_CHECKPOINT_METADATA")


def damage_metadata_file(checkpoints: str, step: int, name: str) -> str:
    """Overwrites 64 bytes in the middle of one metadata file of the step (one of METADATA_FILES); returns its path."""
    if name not in METADATA_FILES:
        raise ValueError(f"Unknown metadata file {name!r}; valid choices: {list(METADATA_FILES)}")
    path = os.path.join(step_dir(checkpoints, step), name)
    overwrite_bytes(path)
    return path


def remove_array(checkpoints: str, step: int, leaf: str = "params.blocks_0.attn.qkv.kernel") -> List[str]:
    """Deletes one array (its zarr metadata and chunks) from the step's OCDBT database; returns the deleted keys."""
    import tensorstore as ts
    store = ts.KvStore.open({"driver": "ocdbt",
                             "base": f"file://{os.path.join(step_dir(checkpoints, step), 'state')}/"}).result()
    prefix = leaf.encode() + b"/"
    keys = [key for key in store.list().result() if key.startswith(prefix)]
    assert keys, f"no array {leaf} in step {step}"
    for key in keys:
        store.delete_range(ts.KvStore.KeyRange(inclusive_min=key, exclusive_max=key + b"\0")).result()
    return [key.decode() for key in keys]


def rewrite_array(checkpoints: str, step: int, leaf: str, change) -> None:
    """Rewrites one array of the step through tensorstore as change(values) (silent bit rot: the files stay well-formed).

    `leaf` is orbax's name of the array ("params.blocks_0.attn.qkv.kernel"); only a fingerprint can tell.
    """
    import tensorstore as ts
    array = ts.open({"driver": "zarr", "kvstore": {
        "driver": "ocdbt", "base": f"file://{os.path.join(step_dir(checkpoints, step), 'state')}/",
        "path": f"{leaf}/"}}, open=True).result()
    array.write(change(array.read().result().copy())).result()


def flip_bit(checkpoints: str, step: int, leaf: str = "params.blocks_0.attn.qkv.kernel", bit: int = 0) -> None:
    """Flips one bit of the first element of one float32 array of the step."""
    import numpy as np

    def flip(values):
        values.reshape(-1)[:1].view(np.uint32)[0] ^= np.uint32(1 << bit)
        return values
    rewrite_array(checkpoints, step, leaf, flip)


def fill_with_ones(checkpoints: str, step: int, leaf: str = "params.head.bias") -> None:
    """Sets every bit of one float32 array of the step (0xff bytes: NaN, as the issue's overwritten files gave)."""
    import numpy as np
    rewrite_array(checkpoints, step, leaf, lambda values: np.full_like(values.view(np.uint32), 0xFFFFFFFF).view(
        values.dtype))


def half_written_step(checkpoints: str, source_step: int, step: int) -> str:
    """Leaves a torn save of `step` as orbax would: a temporary directory with truncated files; returns it."""
    target = os.path.join(checkpoints, f"{step}.orbax-checkpoint-tmp-1700000000")
    shutil.copytree(step_dir(checkpoints, source_step), target)
    for path in glob.glob(os.path.join(target, "state", "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "r+b") as file:
                file.truncate(os.path.getsize(path) // 2)
    return target


@contextlib.contextmanager
def failing_writer(after_writes: int = 0) -> Iterator[List[int]]:
    """Makes orbax's array writer raise ENOSPC (a full disk) after `after_writes` arrays; yields the write count."""
    from orbax.checkpoint._src.serialization import serialization
    original = serialization.async_serialize_from_host
    writes = [0]

    async def full_disk(*args, **kwargs):
        writes[0] += 1
        if writes[0] > after_writes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await original(*args, **kwargs)

    serialization.async_serialize_from_host = full_disk
    try:
        yield writes
    finally:
        serialization.async_serialize_from_host = original


# =============================================================================================
# Child runs: the real command line, with batches slowed down so that a signal lands mid-run
# =============================================================================================
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The command line, on one device of the parent's eight fake ones: the numerics of the tests' in-process
# runs (the number of CPU devices changes XLA's code, and so the last bits of a result).
CHILD = """
import sys
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
import faults
faults.slow_down_batches({seconds_per_batch!r})
from absl import app
from test_train import one_device_mesh
from vitjax import main, train
train_and_evaluate = train.train_and_evaluate
train.train_and_evaluate = lambda config, workdir, **kwargs: train_and_evaluate(config, workdir, mesh=one_device_mesh(),
                                                                                **kwargs)
app.run(main.main, flags_parser=main.parse_flags)
"""


class _SlowData:
    """vitjax.data whose train batches each take `seconds` longer: a run long enough to be interrupted."""

    def __init__(self, seconds: float):
        import vitjax.data
        self._data, self._seconds = vitjax.data, seconds

    def __getattr__(self, name):
        return getattr(self._data, name)

    def make_train_iterator(self, *args, **kwargs):
        import time
        for batch in self._data.make_train_iterator(*args, **kwargs):
            time.sleep(self._seconds)
            yield batch


def slow_down_batches(seconds: float) -> None:
    """Makes the trainer's train batches each take `seconds` longer (in this process)."""
    from vitjax import train
    train._data_module = lambda: _SlowData(seconds)


def child_command(script_dir: str, workdir: str, overrides: dict, seconds_per_batch: float) -> List[str]:
    """Returns the argv of a `python -m vitjax.main` run on the runlocal digits with `overrides`, batches slowed down."""
    script = os.path.join(script_dir, "vitjax_child.py")
    with open(script, "w") as file:
        file.write(CHILD.format(repo=REPO, tests=os.path.join(REPO, "tests"), seconds_per_batch=seconds_per_batch))
    flags = [f"--config.{key}={value}" for key, value in overrides.items()]
    return [sys.executable, script, "--config=configs/digits_vit.py:runlocal", f"--workdir={workdir}",
            "--config.progress_bar=False"] + flags


def child_env() -> dict:
    """Returns the environment of a child run: this process's (8 fake CPU devices), its compilation cache."""
    import jax
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    if jax.config.jax_compilation_cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
    return env


def last_logged_step(workdir: str) -> int:
    """Returns the step of the last complete line of WORKDIR/metrics.jsonl (0 when there is none)."""
    import json
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as file:
            lines = [line for line in file.read().split("\n")[:-1] if line.strip()]
    except FileNotFoundError:
        return 0
    return json.loads(lines[-1])["step"] if lines else 0


def wait_for_step(process, workdir: str, step: int, timeout: float = 300.0) -> int:
    """Waits until the child logged `step` (returns the last logged step) or exited (returns -1)."""
    import time
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            return -1
        logged = last_logged_step(workdir)
        if logged >= step:
            return logged
        time.sleep(0.02)
    raise TimeoutError(f"the child did not log step {step} in {timeout} s")
