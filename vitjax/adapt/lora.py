"""LoRA (Hu et al. 2021): a trainable low-rank update beside chosen Dense layers, as Hugging Face peft's `LoraConfig`.

    model = vitjax.models.create("vit_base_patch16_224", adapt=dict(method="lora", rank=8, alpha=16,
                                                                    targets=("qkv", "proj")))

Every `nn.Dense` / `nn.DenseGeneral` whose module path ("blocks_3/attn/qkv", "blocks_3/mlp/fc1", ...) matches
a regex of `targets` (re.search) computes y = W x + b + (alpha / rank) * B A dropout(x), with A (in, rank) and
B (rank, out) stored beside its kernel as `lora_a` / `lora_b` (peft's `lora_A.weight` and `lora_B.weight`,
transposed). A DenseGeneral's input and output axes are flattened in row-major order, which is the order of
the torch Linear it converts from (qkv: 3 x heads x head_dim; proj: heads x head_dim), so peft's A and B load
as they are. Initialisation as peft's default: A kaiming-uniform (a = sqrt(5): U(+-1/sqrt(in))), B zero,
so the adapted model starts equal to the base one. `rslora` scales by alpha / sqrt(rank) (peft's use_rslora).

The layers are wrapped with a flax method interceptor, so the model needs no LoRA-specific code; a pattern
that matches no Dense layer, or a rank above a layer's min(in, out), raises naming the valid layers, during the
first (abstract) trace of the model, before anything is compiled. `merge` folds the updates into the kernels.
"""
import contextlib
import dataclasses
from collections.abc import Mapping
import math
import re
from typing import Any, Dict, List, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.adapt.base import Method, register, torch_linear_uniform


def _dense_axes(module: nn.Module, x: jax.Array) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Returns (input dims, output dims) of a Dense / DenseGeneral call on `x`."""
    if isinstance(module, nn.Dense):
        return (x.shape[-1],), (int(module.features),)
    axes = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
    axes = tuple(sorted(axis % x.ndim for axis in axes))
    if module.batch_dims or axes != tuple(range(x.ndim - len(axes), x.ndim)):
        raise ValueError(f"LoRA needs a DenseGeneral contracting trailing axes without batch_dims; "
                         f"{'/'.join(module.path)} has axis={module.axis}, batch_dims={module.batch_dims}")
    features = module.features if isinstance(module.features, (tuple, list)) else (module.features,)
    return tuple(x.shape[axis] for axis in axes), tuple(int(f) for f in features)


@register
@dataclasses.dataclass(frozen=True)
class LoRA(Method):
    """Low-rank updates of the Dense layers whose path matches `targets` (peft's r, lora_alpha, lora_dropout)."""
    name = "lora"
    param_patterns = (r"(^|/)lora_[ab]$",)

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: Tuple[str, ...] = ("qkv",)
    rslora: bool = False

    def validate(self) -> None:
        if isinstance(self.targets, str):
            raise ValueError(f"adapt.targets must be a tuple of regexes, got the string {self.targets!r}")
        if not self.targets:
            raise ValueError("adapt.targets is empty: give regexes of Dense layer paths, e.g. ('qkv', 'proj')")
        for pattern in self.targets:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as error:
                raise ValueError(f"adapt.targets holds {pattern!r}, not a regex: {error}") from None
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"adapt.rank must be a positive int, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adapt.dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        """Returns the factor of the low-rank update: alpha / rank (alpha / sqrt(rank) with rslora)."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def intercept(self, train: bool):
        """Returns a context in which the matching Dense layers carry their LoRA branch."""
        return _lora_context(self, train)

    def matches(self, path: str) -> bool:
        """Returns whether a Dense module path is a target."""
        return any(re.search(pattern, path) for pattern in self.targets)


@contextlib.contextmanager
def _lora_context(method: LoRA, train: bool):
    seen: List[str] = []
    matched = {pattern: [] for pattern in method.targets}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.DenseGeneral)):
            return next_fun(*args, **kwargs)
        path = "/".join(module.path)
        seen.append(path)
        hits = [pattern for pattern in method.targets if re.search(pattern, path)]
        if not hits:
            return next_fun(*args, **kwargs)
        for pattern in hits:
            matched[pattern].append(path)
        x = args[0] if args else kwargs["inputs"]
        in_dims, out_dims = _dense_axes(module, x)
        fan_in, fan_out = int(np.prod(in_dims)), int(np.prod(out_dims))
        if method.rank > min(fan_in, fan_out):
            raise ValueError(f"adapt.rank={method.rank} exceeds min(in, out) = min({fan_in}, {fan_out}) of the Dense "
                             f"layer {path}; use a rank <= {min(fan_in, fan_out)} or another target")
        y = next_fun(*args, **kwargs)
        lora_a = module.param("lora_a", torch_linear_uniform, (fan_in, method.rank), module.param_dtype)
        lora_b = module.param("lora_b", nn.initializers.zeros, (method.rank, fan_out), module.param_dtype)
        dtype = module.dtype or x.dtype
        flat = x.reshape(x.shape[:x.ndim - len(in_dims)] + (fan_in,)).astype(dtype)
        if train and method.dropout > 0:
            flat = nn.Dropout(method.dropout)(flat, deterministic=False, rng=module.make_rng("dropout"))
        update = (flat @ lora_a.astype(dtype)) @ lora_b.astype(dtype) * method.scaling
        return y + update.reshape(update.shape[:-1] + out_dims).astype(y.dtype)

    with nn.intercept_methods(interceptor):
        yield
    missing = [pattern for pattern, paths in matched.items() if not paths]
    if missing and seen:
        raise ValueError(f"adapt.targets {missing} match no Dense layer of the model; its Dense layers: "
                         f"{sorted(set(seen))}")


def _merge_tree(tree: Dict[str, Any], scaling: float) -> Dict[str, Any]:
    """Returns `tree` with each LoRA pair folded into its sibling kernel and removed."""
    out = {}
    for key, value in tree.items():
        if key in ("lora_a", "lora_b"):
            continue
        out[key] = _merge_tree(value, scaling) if isinstance(value, Mapping) else value
    if "lora_a" in tree:
        kernel = jnp.asarray(tree["kernel"])
        update = jnp.einsum("...ir,...ro->...io", jnp.asarray(tree["lora_a"], jnp.float32),
                            jnp.asarray(tree["lora_b"], jnp.float32)) * scaling
        out["kernel"] = (kernel.astype(jnp.float32) + update.reshape(kernel.shape)).astype(kernel.dtype)
    return out


def merge(variables: Dict[str, Any], method: Any) -> Dict[str, Any]:
    """Returns `variables` with every LoRA update folded into its kernel: the weights of the un-adapted model.

    `method` is the LoRA (a `LoRA` or its settings dict); the result loads into the same model built with
    adapt=None and computes the same function (up to float rounding).
    """
    from vitjax.adapt.base import parse
    method = parse(method)
    if not isinstance(method, LoRA):
        raise ValueError(f"merge folds LoRA updates only; got adaptation {getattr(method, 'name', method)!r}")
    variables = dict(variables)
    if "params" in variables:
        variables["params"] = _merge_tree(variables["params"], method.scaling)
        return variables
    return _merge_tree(variables, method.scaling)
