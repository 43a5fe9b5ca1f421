"""Checkpoints with orbax: periodic, asynchronous, the last N kept, atomic, verified on restore, resumable.

    python -m vitjax.checkpoint verify WORKDIR     # list the steps, verify each, say which a run restores
                                                    # (exit 0: all verify; 1: a step is damaged or none restores)

Layout: `WORKDIR/checkpoints/<step>/{state,meta,fingerprints}`. `state` is the whole train state
(params, optimizer state, other model collections, step, rng), saved sharded from every host; `meta`
is a small JSON (step, data position, config); `fingerprints` a JSON of one 32-bit fingerprint per
array (see `fingerprints`). Orbax writes a step into a temporary directory and renames it when
complete, so a run killed while writing leaves the previous step as the newest complete one;
`latest_step()` only ever sees complete steps, and leftover temporary directories are removed on start.

A complete step can still be damaged afterwards (a bad disk, a partial copy): `restore_newest_good`
checks every restored array against its fingerprint; a step that fails is reported with its path and
failing leaves, renamed to `<step>.damaged-<unix time>` (outside orbax's step names, never deleted)
and the previous complete step is tried, until one verifies or none is left (`NoGoodCheckpointError`).

Since a batch depends only on (seed, step) and per-step rngs are `fold_in(rng, step)`, the step
is the whole data and rng position: resuming from step s replays exactly the run's steps s+1, ...

Preemption (`PreemptionSignals`): SIGTERM and SIGINT set a flag that the training loop reads at the
next step boundary, where it saves that step synchronously and stops (`vitjax.train`).
"""
import contextlib
import dataclasses
import json
import logging as logging_std
import os
import signal
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from vitjax.pytree import param_paths

# Orbax writes step s into "s.orbax-checkpoint-tmp[-<timestamp>]" and renames it when complete.
_TMP_MARKER = ".orbax-checkpoint-tmp"
# A step found damaged is renamed "s.damaged-<unix time>": not a step name to orbax (neither digits
# nor "<prefix>_<digits>"), so it is never restored, counted or garbage-collected.
_DAMAGED_MARKER = ".damaged-"
_DAMAGE_REPORT = "vitjax_damage_report.txt"
FINGERPRINT_ALGORITHM = "sum-fmix32-v1"
# Failures that say nothing about the files: they must stop the run, not move good steps aside.
_NOT_DAMAGE = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory")


class CheckpointDamagedError(ValueError):
    """A complete checkpoint step whose files cannot be read or whose arrays fail their fingerprints."""

    def __init__(self, step: int, path: str, problems: Sequence[str]):
        self.step, self.path, self.problems = int(step), str(path), tuple(problems)
        shown = self.problems[:5] + ((f"... and {len(self.problems) - 5} more",) if len(self.problems) > 5 else ())
        super().__init__(f"Checkpoint step {step} at {path} is damaged: " + "; ".join(shown))


class NoGoodCheckpointError(RuntimeError):
    """Every complete checkpoint step of a run is damaged: nothing to resume from."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's arrays do not have the shapes and dtypes of the run's state (another model or optimizer)."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint step failed (a full disk, a lost bucket): the step is not complete."""


# =============================================================================================
# Fingerprints: one 32-bit number per array, computed where the array lives
# =============================================================================================
def _fmix32(h: jax.Array) -> jax.Array:
    """Returns MurmurHash3's 32-bit finalizer of `h` (a bijection that spreads every input bit)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(leaf: jax.Array) -> jax.Array:
    """Returns the bits of `leaf` as uint32 words: narrower types widened, 64-bit types split in two."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    if leaf.dtype == jnp.bool_:
        leaf = leaf.astype(jnp.uint8)
    bits = jnp.dtype(leaf.dtype).itemsize * 8
    if bits < 32:
        return jax.lax.bitcast_convert_type(leaf, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(leaf, jnp.uint32)  # 64-bit: a trailing axis of 2


def _shard_fingerprint(words: jax.Array, offsets: jax.Array, global_shape: Tuple[int, ...]) -> jax.Array:
    """Returns sum_i fmix32(word_i ^ (i * golden ratio)) mod 2^32 over one shard's words, i their global flat index.

    `offsets` (uint32, one per axis) place the shard in the global word array of `global_shape`.
    """
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):  # a flat index without a reshape
        position = jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) + offsets[axis]
        index = index + position * jnp.uint32(stride % 2**32)
        stride *= global_shape[axis]
    return jnp.sum(_fmix32(words ^ (index * jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)


# One small single-device program per shard shape: no collective, so nothing here can wait on another
# device. (Cross-device reductions dispatched back to back for every leaf deadlocked XLA's CPU client
# with 8 fake devices on 2 cores: its device threads all waited in rendezvous for peers with no thread.)
_jit_shard_fingerprint = jax.jit(lambda leaf, offsets, global_shape: _shard_fingerprint(
    _words(leaf), offsets, global_shape), static_argnums=(2,))


def _leaf_partial_fingerprint(leaf: Any) -> jax.Array:
    """Returns the sum of the fingerprints of this process's distinct shards of `leaf` (an on-device uint32)."""
    if not isinstance(leaf, jax.Array):
        leaf = jnp.asarray(leaf)
    word_shape = tuple(jax.eval_shape(_words, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)).shape)
    total = None
    for shard in leaf.addressable_shards:
        if shard.replica_id != 0:  # every element counts once, over all replicas and hosts
            continue
        starts = [index.start or 0 for index in shard.index] + [0] * (len(word_shape) - leaf.ndim)
        offsets = jax.device_put(np.asarray(starts, np.uint32), shard.device)
        value = _jit_shard_fingerprint(shard.data, offsets, word_shape)
        total = value if total is None else total + jax.device_put(value, total.devices().pop())
    return total if total is not None else jnp.zeros((), jnp.uint32)


def fingerprints(tree: Any) -> Dict[str, str]:
    """Returns {leaf path: 8 hex digits} of every array in `tree`, the same whatever its sharding and host count."""
    paths = param_paths(tree)
    with jax.set_mesh(None):  # single-device programs, whatever mesh the caller (the trainer) has set
        values = [_leaf_partial_fingerprint(leaf) for leaf in paths.values()]
        partial = np.asarray([int(value) for value in values], np.uint64)
    if jax.process_count() > 1:  # each host summed its own shards of a global array: add the hosts' sums
        from jax.experimental import multihost_utils
        # A host-local leaf (numpy, or an array on this host's devices only: a restored teacher) is whole on
        # every host already; summing the hosts' copies would count it process_count times.
        spread = np.asarray([isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
                             for leaf in paths.values()])
        summed = np.asarray(multihost_utils.process_allgather(partial.astype(np.uint32)), np.uint64).sum(axis=0)
        partial = np.where(spread, summed, partial)
    return {path: f"{int(value) % 2**32:08x}" for path, value in zip(paths, partial)}


def fingerprint_record(tree: Any, meta: Dict[str, Any]) -> Dict[str, Any]:
    """Returns the `fingerprints` item of a step: algorithm, the meta saved with it, and per leaf shape, dtype, fingerprint."""
    values = fingerprints(tree)
    leaves = param_paths(tree)
    return {"algorithm": FINGERPRINT_ALGORITHM, "meta": meta,
            "leaves": {path: {"shape": list(np.shape(leaf)), "dtype": str(leaf.dtype),
                              "fingerprint": values[path]} for path, leaf in leaves.items()}}


def check_fits(record: Dict[str, Any], abstract_state: Any, step: int) -> None:
    """Raises CheckpointMismatchError naming the leaves whose saved shape or dtype the run's state does not have."""
    saved = record["leaves"]
    wanted = {path: (list(leaf.shape), str(leaf.dtype)) for path, leaf in param_paths(abstract_state).items()}
    problems = [f"{path}: not in the checkpoint" for path in wanted if path not in saved]
    problems += [f"{path}: only in the checkpoint" for path in saved if path not in wanted]
    problems += [f"{path}: saved {saved[path]['shape']} {saved[path]['dtype']}, the run has {shape} {dtype}"
                 for path, (shape, dtype) in wanted.items()
                 if path in saved and [saved[path]["shape"], saved[path]["dtype"]] != [shape, dtype]]
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise CheckpointMismatchError(
            f"Checkpoint step {step} holds a different train state than this run builds (another model, optimizer "
            f"or EMA setting):\n  " + "\n  ".join(shown) + "\nResume it with the config that wrote it, or start a "
            "new --workdir with config.init_from pointing at it.")


def compare_fingerprints(record: Dict[str, Any], state: Any, meta: Optional[Dict[str, Any]]) -> List[str]:
    """Returns what in a restored (state, meta) differs from the fingerprints record: [] when all matches."""
    if record.get("algorithm") != FINGERPRINT_ALGORITHM:
        return [f"fingerprints of unknown algorithm {record.get('algorithm')!r} (this vitjax writes "
                f"{FINGERPRINT_ALGORITHM!r})"]
    saved = record["leaves"]
    restored = fingerprints(state)
    problems = [f"{path}: fingerprint {restored[path]}, saved {saved[path]['fingerprint']}"
                for path in restored if path in saved and restored[path] != saved[path]["fingerprint"]]
    problems += [f"{path}: restored but not in the fingerprints" for path in restored if path not in saved]
    problems += [f"{path}: in the fingerprints but not restored" for path in saved if path not in restored]
    if meta is not None and meta != record.get("meta"):
        problems.append(f"meta: restored {meta}, saved {record.get('meta')}")
    return problems


# =============================================================================================
# Steps on disk
# =============================================================================================
def remove_unfinished_steps(directory: str) -> Tuple[str, ...]:
    """Deletes the temporary directories of saves that never completed; returns their names.

    Runs on the primary host only and tolerates a directory vanishing underneath it. Call it
    before a CheckpointManager opens `directory` for writing.
    """
    path = epath.Path(directory)
    removed = []
    if jax.process_index() == 0 and path.exists():
        for child in path.iterdir():
            if _TMP_MARKER not in child.name:
                continue
            try:
                child.rmtree()
            except FileNotFoundError:
                pass
            removed.append(child.name)
            logging.warning("Checkpoint: removed the unfinished save %s", child)
    _sync_processes("vitjax_remove_unfinished_steps")
    return tuple(sorted(removed))


def complete_steps(directory: str) -> Tuple[int, ...]:
    """Returns the steps of all complete checkpoints under `directory`, oldest first (read only).

    Orbax writes a step under a temporary name and renames it when complete (on object stores, where a
    rename is not atomic, it writes `commit_success.txt` last), so a numeric directory is a complete step.
    """
    path = epath.Path(directory)
    if not path.exists():
        return ()
    object_store = str(directory).startswith(("gs://", "s3://"))
    steps = []
    for child in path.iterdir():
        if not child.name.isdigit() or not child.is_dir():
            continue
        if object_store and not (child / "commit_success.txt").exists():
            continue
        steps.append(int(child.name))
    return tuple(sorted(steps))


def read_fingerprints(directory: str, step: int) -> Optional[Dict[str, Any]]:
    """Returns the fingerprints record of a step, or None if the step has none (written before vitjax recorded them).

    Raises CheckpointDamagedError if the record exists but cannot be read.
    """
    item = epath.Path(directory) / str(step) / "fingerprints"
    if not item.exists():
        return None
    try:
        record = json.loads((item / "metadata").read_text())
        if not isinstance(record, dict) or not isinstance(record.get("leaves"), dict):
            raise ValueError("not a fingerprints record")
        return record
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise CheckpointDamagedError(step, epath.Path(directory) / str(step),
                                     [f"fingerprints/metadata unreadable ({type(error).__name__}: {error})"]) from None


def move_aside(directory: str, step: int, problems: Sequence[str]) -> str:
    """Renames a damaged step to `<step>.damaged-<unix time>` with a report inside; returns the new path.

    The primary host renames, every host waits for it. Nothing is deleted: a step damaged by a
    transient read error can be renamed back.
    """
    source = epath.Path(directory) / str(step)
    target = epath.Path(directory) / f"{step}{_DAMAGED_MARKER}{int(time.time())}"
    if jax.process_index() == 0:
        source.rename(target)
        (target / _DAMAGE_REPORT).write_text(
            f"vitjax moved checkpoint step {step} here on {time.strftime('%Y-%m-%d %H:%M:%S')}: it is damaged.\n"
            + "".join(f"  {problem}\n" for problem in problems)
            + f"Rename it back to {source.name} to make it a step again.\n")
    _sync_processes(f"vitjax_move_aside_{step}")
    return str(target)


def damaged_steps(directory: str) -> Tuple[str, ...]:
    """Returns the names of the steps moved aside as damaged under `directory`."""
    path = epath.Path(directory)
    return tuple(sorted(child.name for child in path.iterdir() if _DAMAGED_MARKER in child.name)) \
        if path.exists() else ()


def _sync_processes(name: str) -> None:
    """Waits until every process reaches `name` (nothing to wait for in a one-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _all_processes(ok: bool) -> bool:
    """Returns whether `ok` holds on every process (one process's failed read fails the step everywhere)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.array([ok]))))


def _first_line(error: BaseException) -> str:
    """Returns "ErrorType: first line of the message", without tensorstore's spec (its errors run to kilobytes)."""
    lines = str(error).strip().splitlines()
    text = (lines[0] if lines else "").split(" [tensorstore_spec=")[0]
    return f"{type(error).__name__}: {text}"[:400]


class _AbortedReadNoise(logging_std.Filter):
    """Drops the 'Future exception was never retrieved' records of reads orbax abandoned after a failed one."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        return "Future exception was never retrieved" not in record.getMessage()


def _quiet_aborted_reads() -> None:
    """Silences the echoes of a failed restore: the other reads in flight fail into a closed event loop.

    Each prints a traceback ("Event loop is closed", or orbax's "Encountered error while reading array
    index") from a tensorstore thread, dozens per damaged step, burying the one line that names the
    damage. Only those are dropped; installed once.
    """
    if getattr(sys.unraisablehook, "_vitjax_quiet", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        message = str(unraisable.exc_value)
        if not ("Event loop is closed" in message or "Encountered error while reading array index" in message):
            previous(unraisable)

    hook._vitjax_quiet = True
    sys.unraisablehook = hook
    logging_std.getLogger("asyncio").addFilter(_AbortedReadNoise())


@dataclasses.dataclass
class Verification:
    """The outcome of reading one step back: status "verified", "damaged", "unverifiable" (no fingerprints) or "unverified" (not checked)."""
    step: int
    path: str
    status: str
    problems: Tuple[str, ...] = ()
    seconds: float = 0.0
    non_finite: Tuple[str, ...] = ()  # leaves holding NaN or inf (filled in only when asked for)


def _non_finite_leaves(state: Any) -> Tuple[str, ...]:
    """Returns the paths of the floating-point leaves of `state` that hold a NaN or an infinity."""
    bad = []
    for path, leaf in param_paths(state).items():
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            count = jnp.sum(~jnp.isfinite(leaf))
            count = count.addressable_data(0) if not count.is_fully_addressable else count
            if int(np.asarray(count)):
                bad.append(path)
    return tuple(bad)


class Checkpointer:
    """Saves train states with fingerprints and restores them verified, under one directory (an orbax CheckpointManager)."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = directory
        remove_unfinished_steps(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=False,  # done above, synchronously
        )
        self.manager = ocp.CheckpointManager(directory, options=options,
                                             item_names=("state", "meta", "fingerprints"))
        self._saving: Optional[int] = None  # the step whose save may still be running in the background

    def latest_step(self) -> Optional[int]:
        """Returns the newest complete checkpoint step, or None if there is none."""
        return self.manager.latest_step()

    def all_steps(self) -> Tuple[int, ...]:
        """Returns the steps of all complete checkpoints, oldest first."""
        return tuple(sorted(self.manager.all_steps()))

    def step_path(self, step: int) -> str:
        """Returns the directory of checkpoint `step`."""
        return os.path.join(str(self.directory), str(step))

    # ---- Save ---------------------------------------------------------------------------------
    def save(self, step: int, state: Any, meta: Optional[Dict[str, Any]] = None) -> bool:
        """Returns whether a save of `state` at `step` was started (it completes in the background).

        The fingerprints are computed now, from the arrays being saved, on their devices. Raises
        CheckpointSaveError if this save, or the previous one still in flight, fails.
        """
        if step in self.manager.all_steps():
            return False
        meta = dict(meta or {}, step=int(step))
        record = fingerprint_record(state, meta)
        with self._naming_failures(step):
            saved = self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
                fingerprints=ocp.args.JsonSave(record)), force=True)
        if saved:
            self._saving = step
            logging.info("Checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def save_now(self, step: int, state: Any, meta: Optional[Dict[str, Any]] = None) -> float:
        """Returns the seconds taken to save `step` and finish every save in flight (synchronous, for preemption)."""
        start = time.time()
        self.save(step, state, meta)
        self.wait_until_finished()
        return time.time() - start

    def wait_until_finished(self) -> None:
        """Blocks until the background saves are written; raises CheckpointSaveError if one failed."""
        with self._naming_failures(self._saving):
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        self._saving = None

    def close(self) -> None:
        """Finishes pending saves and releases the manager."""
        try:
            self.wait_until_finished()
        finally:
            self.manager.close()

    @contextlib.contextmanager
    def _naming_failures(self, step: Optional[int]):
        """Returns a context that turns a failed write into CheckpointSaveError naming the step and what is left."""
        try:
            yield
        except CheckpointSaveError:
            raise
        except Exception as error:  # noqa: BLE001 - orbax re-raises the writer thread's error, whatever it was
            failed = self._saving if self._saving is not None else step
            self._saving = None
            raise CheckpointSaveError(
                f"Saving checkpoint step {failed} to {self.directory} failed: {_first_line(error)}. That step is "
                f"not complete (its temporary directory is removed on the next start); complete steps on disk: "
                f"{list(complete_steps(self.directory))}, a rerun resumes from the newest that verifies.") from error

    # ---- Restore ------------------------------------------------------------------------------
    def restore(self, step: int, abstract_state: Any, *, verify: bool = True) -> Tuple[Any, Dict[str, Any]]:
        """Returns (state, meta) of checkpoint `step`, laid out as the ShapeDtypeStructs of `abstract_state`.

        With `verify`, every array is checked against the fingerprint saved with it: raises
        CheckpointDamagedError naming the files' errors or the failing leaves, CheckpointMismatchError
        if the step holds another state than `abstract_state`. A step saved without fingerprints
        (by an older vitjax) is restored unverified, with a warning.
        """
        state, meta, _ = self._restore(step, abstract_state, verify)
        return state, meta

    def _restore(self, step: int, abstract_state: Any, verify: bool) -> Tuple[Any, Dict[str, Any], Verification]:
        """Returns (state, meta, verification) of `step`; raises as `restore` says."""
        start = time.time()
        path = self.step_path(step)
        record = read_fingerprints(self.directory, step) if verify else None
        if record is not None:
            check_fits(record, abstract_state, step)
        state, meta, error = None, None, None
        _quiet_aborted_reads()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
            state, meta = restored["state"], dict(restored["meta"] or {})
        except Exception as caught:  # noqa: BLE001 - any unreadable file makes the step damaged ...
            if any(marker in str(caught) for marker in _NOT_DAMAGE):  # ... but a full device is not the files' fault
                raise
            error = caught
        if not _all_processes(error is None):
            problem = f"unreadable: {_first_line(error)}" if error is not None else "unreadable on another process"
            raise CheckpointDamagedError(step, path, [problem])
        if not verify:
            return state, meta, Verification(step, path, "unverified", seconds=time.time() - start)
        if record is None:
            logging.warning("Checkpoint step %d at %s has no fingerprints (saved before vitjax recorded them): "
                            "restored without verification.", step, path)
            return state, meta, Verification(step, path, "unverifiable", seconds=time.time() - start)
        problems = compare_fingerprints(record, state, meta)
        if problems:
            raise CheckpointDamagedError(step, path, problems)
        logging.info("Checkpoint: restored and verified step %d from %s in %.2f s", step, path, time.time() - start)
        return state, meta, Verification(step, path, "verified", seconds=time.time() - start)

    def restore_newest_good(self, abstract_state: Any) -> Tuple[Any, Dict[str, Any], Verification, List[Verification]]:
        """Returns (state, meta, its verification, the damaged steps moved aside) of the newest step that verifies.

        Each damaged step, newest first, is logged with its path and failing leaves, moved aside
        (`move_aside`) and the previous one tried. Raises NoGoodCheckpointError when none is left
        (and FileNotFoundError when there was none to begin with).
        """
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"No complete checkpoint under {self.directory}")
        damaged: List[Verification] = []
        for index, step in enumerate(reversed(steps)):
            try:
                state, meta, verification = self._restore(step, abstract_state, verify=True)
            except CheckpointDamagedError as error:
                moved = move_aside(self.directory, step, error.problems)
                previous = steps[len(steps) - index - 2] if index + 1 < len(steps) else None
                logging.error("%s\nMoved it aside to %s; %s", error, moved,
                              f"falling back to step {previous}." if previous is not None else "no step left.")
                damaged.append(Verification(step, moved, "damaged", error.problems))
                continue
            if damaged:
                self.manager.reload()  # forget the steps moved aside
                logging.warning("Resuming from step %d, the newest step that verifies (damaged and moved aside: %s)",
                                step, ", ".join(f"step {v.step} -> {v.path}" for v in damaged))
            return state, meta, verification, damaged
        self.manager.reload()
        raise NoGoodCheckpointError(
            f"No checkpoint under {self.directory} can be restored: every complete step is damaged and was moved "
            "aside:\n  " + "\n  ".join(f"step {v.step} -> {v.path}: {'; '.join(v.problems)}" for v in damaged)
            + "\nStart the run in a new --workdir, or rename a step back (a file restored from a backup) to retry.")

    def verify(self, step: int, abstract_state: Any, *, check_finite: bool = False) -> Verification:
        """Returns the verification of `step` read back from disk (nothing moved); with `check_finite` also its non-finite leaves."""
        try:
            state, _, verification = self._restore(step, abstract_state, verify=True)
        except CheckpointDamagedError as error:
            return Verification(step, error.path, "damaged", error.problems)
        if check_finite:
            verification.non_finite = _non_finite_leaves(state)
        return verification

    def reached_preemption(self, step: int) -> bool:
        """Returns whether the cluster announced a preemption (all hosts agree on the step)."""
        return bool(self.manager.reached_preemption(step))


class PreemptionSignals:
    """SIGTERM and SIGINT during training, turned into a flag the loop reads at step boundaries (a context manager).

    A handler may run between any two bytecodes, in the middle of a jax call, so it only records the
    signal; the loop saves at the next step boundary, in the main thread. In a multi-process run
    JAX's preemption service (jax.distributed) owns SIGTERM: it tells every process, and `reached`
    turns true on all of them at the same step; SIGINT is re-sent as SIGTERM to go the same way.
    A second SIGINT interrupts at once (KeyboardInterrupt).
    """

    def __init__(self, checkpointer: "Checkpointer"):
        self.checkpointer = checkpointer
        self.signal_name: Optional[str] = None   # "SIGTERM" or "SIGINT" once one arrived
        self.received_at: Optional[float] = None
        self._previous: Dict[int, Any] = {}
        self._jax_service = jax.process_count() > 1 and bool(jax.config.jax_enable_preemption_service)

    def __enter__(self) -> "PreemptionSignals":
        self.install()
        return self

    def __exit__(self, *exc_info) -> None:
        self.uninstall()

    def install(self) -> None:
        """Installs the handlers (in the main thread; elsewhere the signals keep their default actions)."""
        if threading.current_thread() is not threading.main_thread():
            logging.warning("Training outside the main thread: SIGTERM and SIGINT keep their default actions "
                            "(only the main thread can handle signals).")
            return
        if jax.process_count() > 1 and not self._jax_service:
            logging.warning("jax_enable_preemption_service is off: without it the processes cannot agree on a "
                            "step to save, so SIGTERM and SIGINT keep their default actions.")
            return
        numbers = (signal.SIGINT,) if self._jax_service else (signal.SIGTERM, signal.SIGINT)
        for number in numbers:
            self._previous[number] = signal.signal(number, self._handle)

    def uninstall(self) -> None:
        """Puts back the handlers that were there before `install`."""
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number: int, frame: Any) -> None:
        if number == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt  # asked twice: stop now, without the save
        if self.signal_name is None:
            self.signal_name, self.received_at = signal.Signals(number).name, time.time()
            logging.warning("%s received: saving at the end of the current step, then stopping%s.",
                            self.signal_name, " (again to stop at once)" if number == signal.SIGINT else "")
        if self._jax_service:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption notifier listens for SIGTERM

    def reached(self, step: int) -> bool:
        """Returns whether to save `step` and stop: a signal arrived (in a multi-process run: every process agrees on `step`)."""
        if self._jax_service:
            if self.checkpointer.reached_preemption(step):
                self.signal_name = self.signal_name or "SIGTERM"
                return True
            return False
        return self.signal_name is not None or self.checkpointer.reached_preemption(step)


def abstract_like(tree: Any, shardings: Any) -> Any:
    """Returns ShapeDtypeStructs with the shapes and dtypes of `tree` and the given shardings."""
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                        tree, shardings)


def find_step(path: str, step: Optional[int] = None) -> Tuple[str, int]:
    """Returns (checkpoints directory, step) for a workdir, its `checkpoints/` or a `checkpoints/<step>` directory.

    The step is `step`, the one a step directory names, or the newest complete one; raises
    FileNotFoundError saying what was looked for.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No checkpoint directory at {path}")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    elif os.path.isdir(os.path.join(path, "state")) and os.path.basename(path).isdigit():
        named = int(os.path.basename(path))
        if step is not None and step != named:
            raise ValueError(f"{path} is step {named}, not step {step}")
        return os.path.dirname(path), named
    steps = complete_steps(path)
    if not steps:
        raise FileNotFoundError(f"No complete checkpoint under {path} (a vitjax workdir holds checkpoints/<step>/)")
    if step is None:
        return path, steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"No complete checkpoint of step {step} under {path}; steps: {list(steps)}")
    return path, int(step)


def _state_metadata(state_dir: str) -> Any:
    """Returns the saved tree of a state item: a nested dict of array metadata (no data read)."""
    metadata = ocp.PyTreeCheckpointer().metadata(state_dir)
    tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata
    return getattr(tree, "tree", tree)


def load_params(path: str, step: Optional[int] = None, *, parts: Tuple[str, ...] = ("params", "model_state")
                ) -> Dict[str, Any]:
    """Returns {part: nested dict of numpy arrays} of a saved train state, reading only `parts` (partial restore).

    `path` is a workdir, its checkpoints/ or one step's directory (see `find_step`). The optimizer
    state is never read, so loading a large run's weights costs their size only. Parts the state
    does not hold (e.g. `ema_params` of a run without EMA) come back as None.
    """
    directory, step = find_step(path, step)
    state_dir = os.path.join(directory, str(step), "state")
    tree = _state_metadata(state_dir)
    present = {part: tree[part] for part in parts if part in tree and tree[part] is not None}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), present)
    restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
        item=present, restore_args=restore_args, partial_restore=True))
    record = read_fingerprints(directory, step)
    if record is not None:  # verify the leaves read (a step without fingerprints predates them)
        saved = {path: leaf for path, leaf in record["leaves"].items() if path.split("/")[0] in present}
        problems = compare_fingerprints(dict(record, leaves=saved), restored, None)
        if problems:
            raise CheckpointDamagedError(step, os.path.join(directory, str(step)), problems)
    return {part: (restored.get(part) if part in present else None) for part in parts}


def load_state(checkpoint_dir: str, step: Optional[int] = None) -> Dict[str, Any]:
    """Returns the saved train state of `step` (default: the newest) as a dict of host arrays.

    {"params", "opt_state", "model_state", "step", "rng", "ema_params"}, without shardings: for
    inspection and tests. To initialise another run from its weights use `load_params`, which reads
    no optimizer state.
    """
    checkpoint_dir, step = find_step(checkpoint_dir, step)
    path = os.path.join(checkpoint_dir, str(step), "state")
    checkpointer = ocp.StandardCheckpointer()
    # Restore onto this process's first device whatever topology wrote it (a pod checkpoint on a laptop).
    metadata = checkpointer.metadata(path)
    metadata = getattr(metadata, "item_metadata", metadata)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), metadata)
    return checkpointer.restore(path, target)


def verify_step(directory: str, step: int) -> Verification:
    """Returns the verification of one step, read onto this process's first device (no run config needed)."""
    start = time.time()
    path = os.path.join(str(directory), str(step))
    try:
        record = read_fingerprints(directory, step)
    except CheckpointDamagedError as error:
        return Verification(step, path, "damaged", error.problems, time.time() - start)
    _quiet_aborted_reads()
    try:
        state = load_state(directory, step)
        meta = json.loads((epath.Path(path) / "meta" / "metadata").read_text())
    except Exception as error:  # noqa: BLE001 - any unreadable file makes the step damaged
        return Verification(step, path, "damaged", (f"unreadable: {_first_line(error)}",), time.time() - start)
    if record is None:
        return Verification(step, path, "unverifiable", ("no fingerprints (saved before vitjax recorded them)",),
                            time.time() - start)
    problems = compare_fingerprints(record, state, meta)
    return Verification(step, path, "damaged" if problems else "verified", tuple(problems), time.time() - start)


# =============================================================================================
# Command line: python -m vitjax.checkpoint verify WORKDIR
# =============================================================================================
COMMANDS = ("verify",)


def define_flags(flag_values) -> None:
    """Defines this command's flags in `flag_values` (the global FLAGS when run as a program)."""
    from absl import flags
    flags.DEFINE_integer("step", None, "Verify only this step (default: every complete step).",
                         flag_values=flag_values)


def verify_workdir(path: str, step: Optional[int] = None) -> Tuple[str, List[Verification], Optional[int]]:
    """Returns (checkpoints directory, the verification of each step newest first, the step a run would restore or None)."""
    path = os.path.abspath(os.fspath(path))
    directory = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"No checkpoint directory at {path} (a vitjax workdir holds checkpoints/<step>/)")
    steps = complete_steps(directory)
    if step is not None and step not in steps:
        raise FileNotFoundError(f"No complete checkpoint of step {step} under {directory}; steps: {list(steps)}")
    results = [verify_step(directory, s) for s in reversed(steps) if step is None or s == step]
    restored = next((v.step for v in results if v.status != "damaged"), None) if step is None else None
    return directory, results, restored


def run(flag_values, positional: Sequence[str]) -> int:
    """Runs `verify WORKDIR`: prints one line per step and which one a run restores; returns the exit status.

    0: every step verifies; 1: a step is damaged (a run falls back past it) or none can be restored.
    """
    if len(positional) != 2 or positional[0] not in COMMANDS:
        raise ValueError(f"Usage: python -m vitjax.checkpoint verify WORKDIR [--step=N]; commands: "
                         f"{list(COMMANDS)}, got {list(positional)}")
    directory, results, restored = verify_workdir(positional[1], flag_values.step)
    print(f"Checkpoints in {directory}:")
    print(f"{'step':>8}  {'status':<12} {'seconds':>7}  detail")
    for result in results:
        detail = "; ".join(result.problems[:3]) + (f"; ... {len(result.problems) - 3} more"
                                                   if len(result.problems) > 3 else "")
        print(f"{result.step:>8}  {result.status:<12} {result.seconds:>7.2f}  {detail}")
    for name in damaged_steps(directory):
        print(f"{name:>8}  {'moved aside':<12} {'':>7}  damaged earlier: see {name}/{_DAMAGE_REPORT}")
    for name in sorted(n for n in os.listdir(directory) if _TMP_MARKER in n):
        print(f"{name:>8}  {'unfinished':<12} {'':>7}  a save that never completed (removed when a run starts)")
    damaged = [v.step for v in results if v.status == "damaged"]
    if flag_values.step is not None:
        print(f"Step {flag_values.step}: {results[0].status}.")
    elif restored is None:
        print("No step can be restored: a run on this workdir stops with NoGoodCheckpointError." if results
              else "No complete step: a run on this workdir starts from scratch.")
    else:
        newer = [s for s in damaged if s > restored]
        print(f"A run restores step {restored}" + (f" (moving damaged step(s) {newer} aside first)." if newer else "."))
    return 1 if damaged or (results and restored is None and flag_values.step is None) else 0


def cli(args: Sequence[str]) -> int:
    """Returns the exit status of `python -m vitjax.checkpoint ARGS` (tests call this; flags parsed into fresh FlagValues)."""
    from absl import flags
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    try:
        positional = flag_values(["vitjax.checkpoint"] + list(args))
    except flags.Error as error:
        raise SystemExit(f"FATAL flags error: {error}")
    return run(flag_values, positional[1:])


def _main() -> None:
    """Runs the command line under absl.app (--help, --helpfull), printing FATAL: lines for bad input."""
    import sys
    from absl import app, flags
    from vitjax import cli as cli_lib
    define_flags(flags.FLAGS)

    def absl_main(argv: List[str]) -> None:
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)  # orbax's INFO lines would bury the table
            # Reading a step's `state` item on its own, orbax looks for a step-level file it does not need.
            logging.get_absl_handler().addFilter(
                lambda record: not record.getMessage().startswith("Metadata file does not exist"))
        sys.exit(cli_lib.exit_on_user_error(lambda: run(flags.FLAGS, argv[1:])))

    app.run(absl_main)


if __name__ == "__main__":
    from vitjax import checkpoint as _module  # the importable module, not this __main__ copy
    _module._main()
