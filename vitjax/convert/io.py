"""Saving and loading converted variables: a `.msgpack` file or an orbax checkpoint directory.

Both may carry a small JSON `meta` (the model name and settings, its pretrained preprocessing, the
source file): in a `.msgpack` under the top-level key `__vitjax_meta__`, in a directory as `meta.json`.
"""
import json
import os
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np

META_KEY = "__vitjax_meta__"


def save_variables(path: str, variables: Dict[str, Any], meta: Optional[Dict[str, Any]] = None) -> str:
    """Writes `variables` (and `meta`) to `path` (`.msgpack` -> one file, else an orbax directory); returns the path."""
    variables = jax.tree.map(np.asarray, dict(variables))
    path = os.path.abspath(os.fspath(path))
    if path.endswith(".msgpack"):
        from flax import serialization
        payload = dict(variables)
        if meta:
            payload[META_KEY] = json.dumps(meta, default=str)
        tmp = path + ".tmp"
        with open(tmp, "wb") as file:
            file.write(serialization.msgpack_serialize(payload))
        os.replace(tmp, path)  # atomic: a reader never sees half a file
        return path
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, variables)
    if meta:
        with open(os.path.join(path, "meta.json"), "w") as file:
            json.dump(meta, file, indent=2, default=str)
    return path


def load_variables_and_meta(path: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Returns (variables with numpy leaves, meta) stored at `path` by `save_variables` (meta {} if none)."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"No variables at {path}")
    if path.endswith(".msgpack"):
        from flax import serialization
        with open(path, "rb") as file:
            payload = dict(serialization.msgpack_restore(file.read()))
        meta = payload.pop(META_KEY, None)
        return payload, (json.loads(meta) if meta else {})
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as checkpointer:
        variables = jax.tree.map(np.asarray, checkpointer.restore(path))
    meta_path = os.path.join(path, "meta.json")
    meta = {}
    if os.path.exists(meta_path):
        with open(meta_path) as file:
            meta = json.load(file)
    return variables, meta


def load_variables(path: str) -> Dict[str, Any]:
    """Returns the variables stored at `path` by `save_variables` (numpy leaves)."""
    return load_variables_and_meta(path)[0]
