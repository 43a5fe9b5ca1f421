"""Helpers shared by the model tests: re-randomised torch references and the parity run against them, relative
errors, random vitjax variables and parameter counts, converter / settings error checks, a training-step check.

torch (and timm, when installed) are imported inside the functions that need them: tests/conftest.py imports
torch before TensorFlow (the other order segfaults), and test modules that do not compare against torch
(test_mae, test_tome) use this module too. Nothing here imports TensorFlow.
"""
import json
import os
import re
from typing import TYPE_CHECKING, Any, Dict, Iterable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import convert, models

if TYPE_CHECKING:
    import torch

MODEL_TABLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "out",
                           "model_table.json")


def norm_types() -> tuple:
    """Returns the torch module types whose `weight` is a normalisation scale (1 at init).

    torch's LayerNorm, GroupNorm, RMSNorm and BatchNorm/InstanceNorm cover their subclasses (timm's
    LayerNorm2d, GroupNorm1, MetaFormer's *NoBias norms, BatchNormAct2d); timm's RMS and "simple" norms derive
    from nn.Module only, so they are added by name. GlobalResponseNorm is not included: its weight is a
    residual gain initialised to 0.
    """
    import torch
    types = [torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm, torch.nn.modules.batchnorm._NormBase]
    try:
        from timm.layers import norm as timm_norm
    except ImportError:
        pass
    else:
        types += [getattr(timm_norm, name) for name in ("RmsNorm", "RmsNorm2d", "SimpleNorm", "SimpleNorm2d")]
    return tuple(types)


def randomize_(module: "torch.nn.Module", seed: int = 0, std: float = 0.15, special=None) -> None:
    """Redraws every float tensor of a float32 torch module (parameters and persistent buffers) in place.

    Norm layers (by module type, see `norm_types`): scales 1 + N(0, 0.1), running variances U(0.5, 1.5),
    biases and running means N(0, std). Everything else, layer scales included, N(0, std).
    `special(key, noise)` may return the value for a family-specific tensor (`noise` is its N(0, 1) draw),
    or None for the default rule. The module's train/eval mode is left as it is.
    """
    import torch
    types = norm_types()
    scales, variances = set(), set()
    for name, sub in module.named_modules():
        if isinstance(sub, types):
            prefix = f"{name}." if name else ""
            scales.add(prefix + "weight")
            variances.add(prefix + "running_var")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if tensor.dtype != torch.float32:
                raise TypeError(f"{key} is {tensor.dtype}: parity references are randomised in float32")
            noise = torch.randn(tensor.shape, generator=generator)
            value = None if special is None else special(key, noise)
            if value is None:
                if key in variances:
                    value = 0.5 + torch.rand(tensor.shape, generator=generator)
                elif key in scales:
                    value = 1.0 + 0.1 * noise
                else:
                    value = std * noise
            tensor.copy_(value)


def fixture_entries(data, prefix: str) -> Dict[str, Any]:
    """Returns the arrays of an `.npz` fixture (or dict) stored under `prefix/`, keyed without it.

    The fixtures store each official state dict as "<case>/state/<torch key>": `fixture_entries(data, "v1/state")`.
    """
    start = prefix + "/"
    return {key[len(start):]: data[key] for key in data.keys() if key.startswith(start)}


def measured_param_counts(names: Iterable[str]) -> Dict[str, int]:
    """Returns {name: parameter count} from experiments/out/model_table.json's measured rows (which
    tests/test_registry.py checks against the models themselves)."""
    with open(MODEL_TABLE) as file:
        rows = json.load(file)["rows"]
    return {name: round(rows[name]["params_m"] * 1e6) for name in names}


def relative_error(ours, reference) -> float:
    """Returns max |ours - reference| / max |reference|."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def variable_shapes(model, image_shape=(224, 224, 3)):
    """Returns the (unboxed) shapes of a vitjax model's variables for one image of `image_shape` (height,
    width, channels), without compiling init: eval_shape only traces it."""
    images = jnp.zeros((1,) + tuple(image_shape))
    return flax.linen.meta.unbox(jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, images)))


def parameter_count(model, image_shape=(224, 224, 3)) -> int:
    """Returns the number of parameters of a vitjax model, from shapes only."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variable_shapes(model, image_shape)["params"]))


def random_variables(model, image_shape, seed: int = 0, std: float = 0.05):
    """Returns numpy variables of the model's shapes drawn from N(0, std) (BatchNorm variances 1), without
    compiling init; `image_shape` is one image's (height, width, channels)."""
    shapes = variable_shapes(model, image_shape)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: np.ones(s.shape, np.float32) if path[-1].key == "var"
        else rng.normal(0.0, std, s.shape).astype(s.dtype), shapes)


class Parity(NamedTuple):
    """What `run_parity` returns: reference logits, vitjax logits and intermediates, the converted model and
    variables, and the NHWC images both saw."""
    expected: np.ndarray
    ours: np.ndarray
    intermediates: Any
    model: Any
    variables: Any
    images: Any


def run_parity(reference: "torch.nn.Module", name: str, forward=None, **settings) -> Parity:
    """Converts `reference`'s state dict to vitjax model `name` and runs both on the same two N(0, 1) images
    (seed 1) of size `settings["img_size"]`; `settings` go to convert.from_timm and models.create alike.
    `forward(reference, images)` gives the reference logits (default: calling the reference)."""
    import torch
    size = settings["img_size"]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = (forward or (lambda module, x: module(x)))(reference, images).numpy()
    variables = convert.from_timm(reference.state_dict(), name, **settings)
    model = models.create(name, **settings)
    nhwc = jnp.asarray(images.numpy().transpose(0, 2, 3, 1))
    ours, intermediates = jax.jit(model.apply)(variables, nhwc)
    return Parity(expected, np.asarray(ours), intermediates, model, variables, nhwc)


def assert_converter_errors(state, name: str, settings: dict, missing=None, unexpected=None, misshapen=None):
    """Checks that convert.from_timm names the offending key: a KeyError for the `missing` key (removed from
    `state`) and for each `unexpected` {key: value} added; a ValueError naming the vitjax parameter path for
    each `misshapen` {key: (value, path)} swapped in. Each case changes one key of `state`."""
    if missing is not None:
        with pytest.raises(KeyError, match=re.escape(missing)):
            convert.from_timm({k: v for k, v in state.items() if k != missing}, name, **settings)
    for key, value in (unexpected or {}).items():
        with pytest.raises(KeyError, match=re.escape(key)):
            convert.from_timm({**state, key: value}, name, **settings)
    for key, (value, path) in (misshapen or {}).items():
        with pytest.raises(ValueError, match=path):
            convert.from_timm({**state, key: value}, name, **settings)


def assert_create_rejects(name: str, cases) -> None:
    """Checks that models.create(name, **settings) raises a ValueError matching `match` for each (settings,
    match) in `cases`."""
    for settings, match in cases:
        with pytest.raises(ValueError, match=match):
            models.create(name, **settings)


def train_gradients(model, params, images, labels=None):
    """Returns (loss, grads) of one train=True pass with dropout and drop-path rngs, checking that the loss and
    every gradient are finite. The loss is the cross-entropy against `labels`, or the mean squared logit."""
    rngs = {"dropout": jax.random.key(2), "drop_path": jax.random.key(3)}

    def loss_fn(params):
        logits, _ = model.apply({"params": params}, images, train=True, rngs=rngs)
        if labels is None:
            return jnp.mean(logits ** 2)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels])

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    assert np.isfinite(float(loss))
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(grads))
    return loss, grads
