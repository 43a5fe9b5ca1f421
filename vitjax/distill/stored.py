"""Stored teacher predictions (TinyViT, Wu et al. 2022): written once, read by every student step.

A train batch in vitjax is a function of the run's recipe only (`vitjax.data.pipeline`: every random
op draws from a stateless seed of (seed, global element index); mixup / cutmix on the device from the
step's key). So the teacher can see, once, exactly the images a student with the same recipe will
see, and the student replays them from the same seeds: batch b of process p is the same image
tensor in both runs. The store keys everything by (process, batch index), and each entry carries the
element's fingerprint, so the replay is checked at every student step (`replay_mismatch`).

Layout of a store directory DIR:

    DIR/meta.json                       format, recipe (what decides the images), teacher, k, files
    DIR/process_00000/batches_00000000.npz   batches [0, 500) of process 0:
        values       (n, local_batch, k) float16 (or float32)  top-k teacher probabilities, largest first
        indices      (n, local_batch, k) int32                 their classes
        fingerprint  (n, local_batch)    uint32                `fingerprint` of the image the teacher saw
    DIR/process_00000/batches_00000500.npz   ...

Files are written whole and renamed into place, so a killed save leaves no partial file and resumes
at the first missing one. `open_store` checks, before a student compiles anything, that the recipe
equals the run's, that every file the run needs is there and whole (a truncated zip fails to open)
and has the shapes the meta promises; each failure names the file or the differing setting.

The reconstruction of the teacher's distribution is TinyViT's: the k stored probabilities at their
classes and the rest of the mass, 1 - sum(values), spread evenly over the other C - k classes.
"""
import hashlib
import json
import os
import zipfile
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = 1
META = "meta.json"
FIELDS = ("teacher_values", "teacher_indices", "teacher_fingerprint")
VALUE_DTYPES = ("float16", "float32")
# Input settings that change neither the images nor their order; a store stays valid across them.
_NOT_RECIPE = ("prefetch", "download", "data_dir", "cache", "eval_split", "pp_eval", "label_smoothing")


def fingerprint(images: jax.Array) -> jax.Array:
    """Returns (B,) uint32: a position-weighted sum of each image's float32 bit patterns, modulo 2^32.

    Equal images give equal fingerprints; any changed bit changes the sum (the weights are odd, so a
    single flipped bit cannot vanish modulo 2^32). Cheap enough to compute inside every train step.
    """
    bits = jax.lax.bitcast_convert_type(images.astype(jnp.float32), jnp.uint32).reshape(images.shape[0], -1)
    positions = jnp.arange(bits.shape[1], dtype=jnp.uint32)
    weights = positions * jnp.uint32(2654435761) | jnp.uint32(1)
    return jnp.sum(bits * weights, axis=1, dtype=jnp.uint32)


def top_k_probabilities(logits: jax.Array, k: int) -> Tuple[jax.Array, jax.Array]:
    """Returns (values, indices) of the k largest softmax probabilities of `logits` (B, C), largest first."""
    return jax.lax.top_k(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), k)


def dense_probabilities(values: jax.Array, indices: jax.Array, num_classes: int) -> jax.Array:
    """Returns (B, C) float32: `values` at `indices`, the remaining mass spread evenly over the other classes."""
    values = values.astype(jnp.float32)
    k = values.shape[-1]
    rest = (1.0 - values.sum(-1, keepdims=True)) / max(num_classes - k, 1)
    dense = jnp.broadcast_to(rest, values.shape[:-1] + (num_classes,)) * (num_classes > k)
    rows = jnp.arange(values.shape[0])[:, None]
    return dense.at[rows, indices].set(values)


def recipe(config) -> Dict[str, Any]:
    """Returns what decides a run's train images and their order: input settings, seed, global batch, hosts."""
    from vitjax.data import pipeline  # pylint: disable=g-import-not-at-top  # config checks only, no TF
    given = pipeline.validate_input_config(config.input)
    settings = {key: value for key, value in given.items() if key not in _NOT_RECIPE}
    settings = json.loads(json.dumps(settings, default=list))  # tuples as lists, as they come back from JSON
    return {"input": settings, "seed": int(config.seed), "batch_size": int(config.batch_size),
            "process_count": int(jax.process_count())}


def recipe_hash(settings: Mapping[str, Any]) -> str:
    """Returns a short stable hash of a recipe."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _differences(saved: Mapping[str, Any], wanted: Mapping[str, Any], prefix: str = "") -> list:
    names = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            names += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            names.append(f"{prefix}{key} (stored: {a!r}, this run: {b!r})")
    return names


def process_dir(directory: str, process_index: int) -> str:
    """Returns the directory of one process's files."""
    return os.path.join(directory, f"process_{process_index:05d}")


def file_path(directory: str, process_index: int, first_batch: int) -> str:
    """Returns the path of the file whose first batch is `first_batch`."""
    return os.path.join(process_dir(directory, process_index), f"batches_{first_batch:08d}.npz")


def file_starts(num_batches: int, batches_per_file: int) -> Sequence[int]:
    """Returns the first batch index of every file of a store of `num_batches` batches."""
    return range(0, num_batches, batches_per_file)


def read_meta(directory: str) -> Dict[str, Any]:
    """Returns DIR/meta.json; FileNotFoundError saying how to make the store when it is missing."""
    path = os.path.join(directory, META)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No stored teacher logits at {directory} ({path} is missing); write them with "
                                f"python -m vitjax.distill.save_logits --config=<this run's config>")
    with open(path) as f:
        return json.load(f)


def write_meta(directory: str, meta: Mapping[str, Any]) -> None:
    """Writes DIR/meta.json atomically."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, META)
    with open(path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def write_file(path: str, values: np.ndarray, indices: np.ndarray, fingerprints: np.ndarray) -> None:
    """Writes one file of batches whole, then renames it into place (a killed write leaves no file)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        np.savez(f, values=values, indices=indices.astype(np.int32), fingerprint=fingerprints.astype(np.uint32))
    os.replace(path + ".tmp", path)


def check_file(path: str, expected: Mapping[str, Tuple[Tuple[int, ...], str]]) -> Optional[str]:
    """Returns None if `path` is a whole file with the expected {array: (shape, dtype)}, else what is wrong."""
    if not os.path.exists(path):
        return "missing"
    try:
        with zipfile.ZipFile(path) as archive:
            for name, (shape, dtype) in expected.items():
                with archive.open(f"{name}.npy") as member:
                    major, _ = np.lib.format.read_magic(member)
                    read_header = (np.lib.format.read_array_header_1_0 if major == 1
                                   else np.lib.format.read_array_header_2_0)
                    header = read_header(member)
                    if tuple(header[0]) != tuple(shape) or np.dtype(header[2]) != np.dtype(dtype):
                        return (f"array {name!r} is {np.dtype(header[2]).name} {tuple(header[0])}, expected "
                                f"{np.dtype(dtype).name} {tuple(shape)}")
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as error:
        return f"unreadable (truncated or not a store file: {error})"
    return None


def expected_arrays(meta: Mapping[str, Any], first_batch: int) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """Returns {array: (shape, dtype)} of the file starting at `first_batch`."""
    n = min(meta["batches_per_file"], meta["num_batches"] - first_batch)
    local = meta["recipe"]["batch_size"] // meta["recipe"]["process_count"]
    k = meta["topk"]
    return {"values": ((n, local, k), meta["value_dtype"]), "indices": ((n, local, k), "int32"),
            "fingerprint": ((n, local), "uint32")}


class Store:
    """Reads one process's stored teacher probabilities: `fields(batch_index)` -> the batch's arrays."""

    def __init__(self, directory: str, meta: Mapping[str, Any], process_index: int):
        self.directory, self.meta, self.process_index = directory, dict(meta), process_index
        self._start, self._arrays = None, None

    def fields(self, batch_index: int) -> Dict[str, np.ndarray]:
        """Returns {"teacher_values", "teacher_indices", "teacher_fingerprint"} of batch `batch_index`."""
        per_file = self.meta["batches_per_file"]
        start = batch_index - batch_index % per_file
        if start != self._start:
            path = file_path(self.directory, self.process_index, start)
            with np.load(path) as loaded:
                self._arrays = {name: np.asarray(loaded[name]) for name in ("values", "indices", "fingerprint")}
            self._start = start
        row = batch_index - start
        return {"teacher_values": self._arrays["values"][row].astype(np.float32),
                "teacher_indices": self._arrays["indices"][row],
                "teacher_fingerprint": self._arrays["fingerprint"][row]}


def example_fields(topk: int) -> Dict[str, np.ndarray]:
    """Returns one zero row of each field `Store.fields` gives for a top-`topk` store, with its dtype."""
    return {"teacher_values": np.zeros((1, topk), np.float32), "teacher_indices": np.zeros((1, topk), np.int32),
            "teacher_fingerprint": np.zeros((1,), np.uint32)}


def open_store(directory: str, config, *, num_classes: int, start_batch: int, num_batches: int,
               process_index: Optional[int] = None) -> Store:
    """Returns this process's `Store` after checking it serves batches [start_batch, num_batches) of `config`.

    Raises (before anything compiles) if the meta is missing, the store was written for another recipe
    (naming the differing settings), holds fewer batches, another class count, or if any needed file
    is missing, truncated or of the wrong shape (naming the file).
    """
    meta = read_meta(directory)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{os.path.join(directory, META)} has format {meta.get('format')!r}; this vitjax reads "
                         f"format {FORMAT}: write the store again")
    wanted = recipe(config)
    if meta["recipe_hash"] != recipe_hash(wanted):
        raise ValueError(f"The stored teacher logits in {directory} were written for another augmentation recipe; "
                         f"they differ in: {'; '.join(_differences(meta['recipe'], wanted)) or 'the recipe hash'}. "
                         "Write them again for this config (python -m vitjax.distill.save_logits) or restore "
                         "those settings")
    if meta["num_classes"] != num_classes:
        raise ValueError(f"The stored teacher logits in {directory} have {meta['num_classes']} classes; this run "
                         f"has {num_classes}")
    if meta["num_batches"] < num_batches:
        raise ValueError(f"The stored teacher logits in {directory} cover {meta['num_batches']} batches; this run "
                         f"needs {num_batches} (config.total_steps): save more steps")
    process_index = jax.process_index() if process_index is None else process_index
    per_file = meta["batches_per_file"]
    for first in file_starts(meta["num_batches"], per_file):
        if first + per_file <= start_batch or first >= num_batches:
            continue
        path = file_path(directory, process_index, first)
        problem = check_file(path, expected_arrays(meta, first))
        if problem:
            raise ValueError(f"Stored teacher logits file {path} is {problem}; run python -m "
                             "vitjax.distill.save_logits again with the same config to complete the store")
    return Store(directory, meta, process_index)
