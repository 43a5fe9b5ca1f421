"""Checkpoints with orbax: periodic, asynchronous, the last N kept, atomic, resumable.

Layout: `WORKDIR/checkpoints/<step>/{state,meta}`. `state` is the whole train state (params,
optimizer state, other model collections, step, rng), saved sharded from every host; `meta` is a
small JSON (step, data position, config). Orbax writes a step into a temporary directory and
renames it when complete, so a run killed while writing leaves the previous step as the newest
complete one; `latest_step()` only ever sees complete steps, and leftover temporary directories
are removed on start.

Since a batch depends only on (seed, step) and per-step rngs are `fold_in(rng, step)`, the step
is the whole data and rng position: resuming from step s replays exactly the run's steps s+1, ...
"""
import os
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

# Orbax writes step s into "s.orbax-checkpoint-tmp[-<timestamp>]" and renames it when complete.
_TMP_MARKER = ".orbax-checkpoint-tmp"


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
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("vitjax_remove_unfinished_steps")
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


class Checkpointer:
    """Saves and restores train states under one directory; wraps an orbax CheckpointManager."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = directory
        remove_unfinished_steps(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=False,  # done above, synchronously
        )
        self.manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> Optional[int]:
        """Returns the newest complete checkpoint step, or None if there is none."""
        return self.manager.latest_step()

    def all_steps(self) -> Tuple[int, ...]:
        """Returns the steps of all complete checkpoints, oldest first."""
        return tuple(sorted(self.manager.all_steps()))

    def save(self, step: int, state: Any, meta: Optional[Dict[str, Any]] = None) -> bool:
        """Returns whether a save of `state` at `step` was started (it completes in the background)."""
        if step in self.manager.all_steps():
            return False
        meta = dict(meta or {}, step=int(step))
        saved = self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                meta=ocp.args.JsonSave(meta)), force=True)
        if saved:
            logging.info("Checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore(self, step: int, abstract_state: Any) -> Tuple[Any, Dict[str, Any]]:
        """Returns (state, meta) of checkpoint `step`, laid out as the ShapeDtypeStructs of `abstract_state`."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        logging.info("Checkpoint: restored step %d from %s", step, self.directory)
        return restored["state"], dict(restored["meta"] or {})

    def reached_preemption(self, step: int) -> bool:
        """Returns whether the cluster announced a preemption (all hosts agree on the step)."""
        return bool(self.manager.reached_preemption(step))

    def wait_until_finished(self) -> None:
        """Blocks until the background saves are written."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


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
