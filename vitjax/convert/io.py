"""Saving and loading converted variables: a `.msgpack` file or an orbax checkpoint directory."""
import os
from typing import Any, Dict

import jax
import numpy as np


def save_variables(path: str, variables: Dict[str, Any]) -> str:
    """Writes `variables` to `path` (`.msgpack` -> one file, else an orbax directory); returns the path."""
    variables = jax.tree.map(np.asarray, variables)
    path = os.path.abspath(os.fspath(path))
    if path.endswith(".msgpack"):
        from flax import serialization
        tmp = path + ".tmp"
        with open(tmp, "wb") as file:
            file.write(serialization.msgpack_serialize(variables))
        os.replace(tmp, path)  # atomic: a reader never sees half a file
        return path
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, variables)
    return path


def load_variables(path: str) -> Dict[str, Any]:
    """Returns the variables stored at `path` by `save_variables` (numpy leaves)."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"No variables at {path}")
    if path.endswith(".msgpack"):
        from flax import serialization
        with open(path, "rb") as file:
            return serialization.msgpack_restore(file.read())
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as checkpointer:
        return jax.tree.map(np.asarray, checkpointer.restore(path))
