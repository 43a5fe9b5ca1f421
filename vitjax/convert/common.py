"""Shared machinery for weight conversion: loading PyTorch state dicts and checked key tables."""
import os
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple, Union

import flax
import jax
import numpy as np

StateDictSource = Union[str, os.PathLike, Mapping[str, Any]]


def to_numpy(value: Any) -> np.ndarray:
    """Returns a torch tensor or array-like as a float32/int numpy array (no torch import needed for numpy)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    array = np.asarray(value)
    return array.astype(np.float32) if array.dtype.kind == "f" else array


def load_state_dict(source: StateDictSource) -> Dict[str, np.ndarray]:
    """Returns a flat {key: numpy array} state dict from a dict or a `.pth`/`.pt`/`.bin`/`.safetensors` file.

    PyTorch pickles are read with `weights_only=True`, so a file from the internet cannot run code.
    Wrappers used by released checkpoints (`model`, `state_dict`, `module.` prefixes) are unwrapped.
    """
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"No checkpoint at {path}")
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file
            state = dict(load_file(path))
        elif path.endswith((".pth", ".pt", ".bin", ".ckpt")):
            import torch  # Conversion is the only part of vitjax that needs torch.
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"Unknown checkpoint format {path!r}; valid suffixes: "
                             "['.safetensors', '.pth', '.pt', '.bin', '.ckpt']")
    for wrapper in ("model", "state_dict", "model_ema"):
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = dict(state[wrapper])
            break
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return {key: to_numpy(value) for key, value in state.items() if not key.endswith("num_batches_tracked")}


class KeyTable:
    """Reads a state dict key by key; `finish()` raises on keys that were never read.

    Every conversion goes through it so a missing or unexpected key is named, never silently dropped.
    """

    def __init__(self, state_dict: Mapping[str, np.ndarray], ignore: Iterable[str] = ()):
        self.state = dict(state_dict)
        self.used = set()
        self.ignore = tuple(ignore)

    def __contains__(self, key: str) -> bool:
        return key in self.state

    def get(self, key: str, transform: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> np.ndarray:
        """Returns the array at `key` (transformed), marking it read; raises KeyError naming a missing key."""
        if key not in self.state:
            raise KeyError(f"Missing key in state dict: {key!r}")
        self.used.add(key)
        value = self.state[key]
        return transform(value) if transform else value

    def finish(self) -> None:
        """Raises KeyError naming every key that was not converted (unexpected keys)."""
        unexpected = sorted(k for k in self.state if k not in self.used and not k.startswith(self.ignore))
        if unexpected:
            raise KeyError(f"Unexpected key(s) in state dict: {unexpected}")


# Layout changes from PyTorch to Flax.
def linear(weight: np.ndarray) -> np.ndarray:
    """Returns a torch Linear weight (out, in) as a Flax Dense kernel (in, out)."""
    return weight.T


def conv(weight: np.ndarray) -> np.ndarray:
    """Returns a torch Conv weight (O, I, kh, kw) as a Flax Conv kernel (kh, kw, I, O)."""
    return np.transpose(weight, (2, 3, 1, 0))


def check_shapes(converted: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Raises ValueError naming every path whose converted shape differs from the model's, or is missing/extra."""
    flat_conv = flax.traverse_util.flatten_dict(flax.core.unfreeze(converted), sep="/")
    flat_exp = flax.traverse_util.flatten_dict(flax.core.unfreeze(expected), sep="/")
    problems = []
    for path in sorted(set(flat_conv) | set(flat_exp)):
        if path not in flat_exp:
            problems.append(f"{path}: not a parameter of the model")
        elif path not in flat_conv:
            problems.append(f"{path}: not produced by the conversion")
        elif tuple(np.shape(flat_conv[path])) != tuple(flat_exp[path].shape):
            problems.append(f"{path}: converted shape {tuple(np.shape(flat_conv[path]))} != model shape "
                            f"{tuple(flat_exp[path].shape)}")
    if problems:
        raise ValueError("Converted weights do not fit the model:\n  " + "\n  ".join(problems))


def expected_variables(model, image_shape: Tuple[int, int, int]) -> Dict[str, Any]:
    """Returns the model's variable shapes (no computation), unboxed, for an NHWC image of `image_shape`."""
    import jax.numpy as jnp
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)},
                                               jnp.zeros((1,) + tuple(image_shape), jnp.float32)))
    return flax.linen.meta.unbox(shapes)


def checked(params: Dict[str, Any], model) -> Dict[str, Any]:
    """Returns {"params": params} once every shape equals what `model` builds at its img_size (else raises)."""
    img = (model.img_size, model.img_size) if isinstance(model.img_size, int) else tuple(model.img_size)
    check_shapes(params, expected_variables(model, (img[0], img[1], model.in_chans))["params"])
    return {"params": params}


def unflatten(flat: Mapping[str, Any]) -> Dict[str, Any]:
    """Returns a nested dict from a flat {"a/b/c": value} dict."""
    return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
