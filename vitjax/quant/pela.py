"""PELA (Guo et al., "PELA: Learning Parameter-Efficient Models with Low-Rank Approximation", CVPR 2024).

    lowrank, variables = pela.compress(module, variables, images, rank=0.5)     # SVD-initialised factors
    logits, _ = lowrank.apply(variables, images)                                # the low-rank model
    loss, metrics = pela.recovery_loss(lowrank, variables, teacher, images, labels)   # recovery training

Each chosen linear layer (`nn.Dense`, or an `nn.DenseGeneral` contracting its input's trailing axes: the
attention's qkv and proj) with kernel W (in x out, flattened) becomes x @ L @ R + b, where L = U_r sqrt(S_r)
and R = sqrt(S_r) V_r^T come from the truncated SVD of W (the paper splits the singular values evenly). The
model is untouched: `nn.intercept_methods` computes a chosen layer from the factors instead of calling it.
Its kernel and bias leave "params"; the factors and bias live in a "low_rank" collection (trainable).
Default layers: as the paper's DeiT/Swin runs, every linear layer but the patch embedding, the head(s),
the norms and Swin's downsampling.

Recovery (the paper's section 3.3 and its DeiT code): cross-entropy on the labels plus
- feature distillation: the mean squared error between the low-rank model's and the original model's
  output tokens of every transformer block (all tokens), averaged over blocks, weight `feature_weight`
  (the paper: 1); an optional logit MSE, weight `logit_weight` (the paper's default 0);
- weight-perturbation regularisation: per compressed layer (max_ij |(L R - W)_ij| - eps)^2, the squared gap
  between the largest entry-wise change of the rebuilt kernel and a margin eps (1e-3), averaged over layers,
  weight `perturbation_weight`. The paper bounds the perturbation's infinity norm; its code takes torch's
  norm(p=inf) of the whole matrix, which is the largest absolute entry, and we do the same. The released
  DeiT script leaves this weight at 0; we default to 1 (our choice, stated in the README).
"""
import dataclasses
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitjax.quant import calibrate

Rank = Union[int, float]
# The paper's omitted names (DeiT / Swin main.py: norm, head, patch_embed, downsample).
DEFAULT_EXCLUDE = r"(^|/)(head\w*|patch_embed|downsample|\w*norm\w*)(/|$)"
DEFAULT_FEATURES = r"(^|/)blocks_\d+$"
PERTURBATION_EPS = 1e-3


@dataclasses.dataclass(frozen=True)
class LowRankLayer:
    """One replaced linear layer: its path, flattened kernel shape and rank."""
    name: str
    in_features: int
    out_features: int
    rank: int
    input_axes: int                      # trailing input axes contracted (1 for Dense)
    features: Tuple[int, ...]            # the output's trailing shape

    @property
    def full_rank(self) -> int:
        """Returns min(in_features, out_features)."""
        return min(self.in_features, self.out_features)


@dataclasses.dataclass(frozen=True)
class Linear:
    """A linear layer found in the model (a candidate for replacement)."""
    name: str
    in_features: int
    out_features: int
    input_axes: int
    features: Tuple[int, ...]


def _features_of(module: nn.Module) -> Tuple[int, ...]:
    features = module.features
    return tuple(features) if isinstance(features, (tuple, list)) else (int(features),)


def _trailing_axes(module: nn.Module, ndim: int) -> Optional[int]:
    """Returns how many trailing input axes the layer contracts, or None when they are not trailing."""
    if isinstance(module, nn.Dense):
        return 1
    if getattr(module, "batch_dims", ()):
        return None
    axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
    axes = sorted(a % ndim for a in axis)
    return len(axes) if axes == list(range(ndim - len(axes), ndim)) else None


def find_linear(apply_fn) -> Dict[str, Linear]:
    """Returns the replaceable linear layers of `apply_fn()` by path, tracing for shapes only (no compile)."""
    found: Dict[str, Linear] = {}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.DenseGeneral)):
            name = calibrate.point_name(module)
            x = args[0] if args else kwargs["inputs"]
            axes = _trailing_axes(module, x.ndim)
            if name not in found and axes is not None:
                features = _features_of(module)
                found[name] = Linear(name, int(np.prod(x.shape[x.ndim - axes:])), int(np.prod(features)), axes,
                                     features)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        jax.eval_shape(apply_fn)
    return found


def _lookup(tree: Any, path: Sequence[str]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _kernel_ndim(params: Any, name: str) -> Optional[int]:
    try:
        return np.ndim(_lookup(params, name.split("/") + ["kernel"]))
    except (KeyError, TypeError):
        return None


def _resolve_rank(layer: Linear, rank: Rank) -> int:
    full = min(layer.in_features, layer.out_features)
    if isinstance(rank, bool) or not isinstance(rank, (int, float, np.integer, np.floating)):
        raise ValueError(f"rank of {layer.name} must be an int in 1..{full} or a fraction in (0, 1], got {rank!r}")
    if isinstance(rank, (float, np.floating)):
        if not 0.0 < rank <= 1.0:
            raise ValueError(f"rank fraction of {layer.name} must be in (0, 1], got {rank}")
        return max(1, int(round(rank * full)))
    if not 1 <= rank <= full:
        raise ValueError(f"rank of {layer.name} ({layer.in_features} x {layer.out_features}) must be in "
                         f"1..{full} (min(in, out)), got {rank}")
    return int(rank)


def svd_factors(kernel: np.ndarray, rank: int) -> Tuple[np.ndarray, np.ndarray]:
    """Returns (L, R), kernel (in x out) ~ L @ R from the truncated SVD, sqrt of the singular values on each side."""
    u, s, vt = np.linalg.svd(np.asarray(kernel, np.float64), full_matrices=False)
    root = np.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank]


@dataclasses.dataclass(frozen=True)
class LowRankModel:
    """A model whose chosen linear layers run as two low-rank factors; `apply` runs it as module.apply."""
    module: Any
    layers: Tuple[LowRankLayer, ...]

    def apply(self, variables: Mapping[str, Any], *args, features: Optional[str] = None, **kwargs) -> Any:
        """Returns module.apply on `variables` (with their "low_rank" factors); with `features` (a path
        regex), returns (output, [outputs of the modules matching it, in call order])."""
        variables = dict(flax.linen.meta.unbox(dict(variables)))
        factors = variables.pop("low_rank")
        return _apply_with(self.module, variables, factors, {layer.name: layer for layer in self.layers},
                           features, args, kwargs)

    def summary(self) -> str:
        """Returns one line per replaced layer: path, shape and rank."""
        return "\n".join(f"{layer.name}: {layer.in_features} x {layer.out_features} -> rank {layer.rank}"
                         f" of {layer.full_rank}" for layer in self.layers)


def _apply_with(module, variables, factors, layers, features, args, kwargs):
    captured = []
    pattern = re.compile(features) if features is not None else None

    def interceptor(next_fun, call_args, call_kwargs, context):
        target = context.module
        if context.method_name != "__call__":
            return next_fun(*call_args, **call_kwargs)
        name = calibrate.point_name(target)
        if name in layers and isinstance(target, (nn.Dense, nn.DenseGeneral)):
            layer, weights = layers[name], factors[name]
            x = call_args[0] if call_args else call_kwargs["inputs"]
            dtype = target.dtype or jnp.result_type(x, weights["left"])
            flat = jnp.asarray(x, dtype).reshape(x.shape[:x.ndim - layer.input_axes] + (layer.in_features,))
            y = (flat @ jnp.asarray(weights["left"], dtype)) @ jnp.asarray(weights["right"], dtype)
            if "bias" in weights:
                y = y + jnp.asarray(weights["bias"], dtype).reshape(-1)
            return y.reshape(y.shape[:-1] + layer.features)
        out = next_fun(*call_args, **call_kwargs)
        if pattern is not None and pattern.search(name):
            captured.append(out[0] if isinstance(out, tuple) else out)
        return out

    with nn.intercept_methods(interceptor):
        out = module.apply(variables, *args, **kwargs)
    return (out, captured) if pattern is not None else out


def compress(module: Any, variables: Mapping[str, Any], images: Any,
             rank: Union[Rank, Mapping[str, Rank]] = 0.5, *, targets: str = r".*",
             exclude: Optional[str] = DEFAULT_EXCLUDE,
             apply_kwargs: Optional[Mapping[str, Any]] = None) -> Tuple[LowRankModel, Dict[str, Any]]:
    """Returns (low-rank model, its variables: params without the replaced layers plus "low_rank" factors).

    rank: an int, a fraction of min(in, out) in (0, 1], or {layer path: int | fraction} (then exactly
    those layers). targets / exclude: path regexes choosing the layers when rank is not a mapping.
    `images` (an array or its ShapeDtypeStruct) is only traced for shapes. Bad input raises ValueError
    before anything compiles, naming the valid layer paths or rank range.
    """
    apply_kwargs = dict(apply_kwargs or {})
    variables = dict(flax.linen.meta.unbox(dict(variables)))
    variables.pop("low_rank", None)
    linear = find_linear(lambda: module.apply(variables, images, **apply_kwargs))
    params = flax.core.unfreeze(variables["params"])
    # Layers inside nn.scan hold stacked kernels (one more axis) and are not replaceable here.
    valid = [name for name, layer in linear.items()
             if _kernel_ndim(params, name) == layer.input_axes + len(layer.features)]
    if isinstance(rank, Mapping):
        unknown = [name for name in rank if name not in valid]
        if unknown or not rank:
            raise ValueError(f"rank names {unknown or '(none)'} are not linear layers of {type(module).__name__}; "
                             f"valid paths: {valid}")
        chosen = {name: rank[name] for name in valid if name in rank}
    else:
        chosen = {name: rank for name in valid if re.search(targets, name)
                  and not (exclude and re.search(exclude, name))}
        if not chosen:
            raise ValueError(f"targets={targets!r} (exclude={exclude!r}) match no linear layer of "
                             f"{type(module).__name__}; valid paths: {valid}")
    resolved = [(linear[name], _resolve_rank(linear[name], value)) for name, value in chosen.items()]

    factors, layers = {}, []
    for layer, layer_rank in resolved:
        path = layer.name.split("/")
        parent = _lookup(params, path[:-1])
        weights = parent.pop(path[-1])
        kernel = np.asarray(weights["kernel"], np.float32).reshape(layer.in_features, layer.out_features)
        left, right = svd_factors(kernel, layer_rank)
        dtype = weights["kernel"].dtype
        factors[layer.name] = {"left": jnp.asarray(left, dtype), "right": jnp.asarray(right, dtype)}
        if "bias" in weights:
            factors[layer.name]["bias"] = jnp.asarray(weights["bias"])
        layers.append(LowRankLayer(layer.name, layer.in_features, layer.out_features, layer_rank,
                                   layer.input_axes, layer.features))
    return LowRankModel(module, tuple(layers)), {**variables, "params": params, "low_rank": factors}


def perturbation_penalty(model: LowRankModel, factors: Mapping[str, Any], teacher_params: Any,
                         eps: float = PERTURBATION_EPS) -> jax.Array:
    """Returns the mean over layers of (max |L R - W| - eps)^2, W the original (flattened) kernel."""
    terms = []
    teacher_params = flax.linen.meta.unbox(teacher_params)
    for layer in model.layers:
        original = _lookup(teacher_params, layer.name.split("/") + ["kernel"])
        original = jnp.reshape(original, (layer.in_features, layer.out_features))
        rebuilt = factors[layer.name]["left"] @ factors[layer.name]["right"]
        terms.append((jnp.max(jnp.abs(rebuilt - original)) - eps) ** 2)
    return jnp.mean(jnp.stack(terms))


def recovery_loss(model: LowRankModel, variables: Mapping[str, Any], teacher_variables: Mapping[str, Any],
                  images: jax.Array, labels: Optional[jax.Array] = None, *, feature_weight: float = 1.0,
                  logit_weight: float = 0.0, perturbation_weight: float = 1.0, eps: float = PERTURBATION_EPS,
                  features: str = DEFAULT_FEATURES, label_smoothing: float = 0.0,
                  apply_kwargs: Optional[Mapping[str, Any]] = None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """Returns (loss, its terms) of PELA's recovery training: cross-entropy (when labels are given), block
    feature MSE against the original model, logit MSE and the weight-perturbation penalty."""
    apply_kwargs = dict(apply_kwargs or {})
    (logits, _), student = model.apply(variables, images, features=features, **apply_kwargs)
    teacher_variables = flax.linen.meta.unbox(dict(teacher_variables))
    (teacher_logits, _), teacher = _apply_with(model.module, teacher_variables, {}, {}, features, (images,),
                                               apply_kwargs)
    if not student or len(student) != len(teacher):
        raise ValueError(f"features={features!r} matches {len(student)} modules of the low-rank model and "
                         f"{len(teacher)} of the original; give a path regex of the blocks to distill")
    teacher = [jax.lax.stop_gradient(t) for t in teacher]
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    terms = {"features": jnp.mean(jnp.stack([jnp.mean((s - t) ** 2) for s, t in zip(student, teacher)])),
             "logits": jnp.mean((logits - teacher_logits) ** 2),
             "perturbation": perturbation_penalty(model, variables["low_rank"],
                                                  jax.lax.stop_gradient(teacher_variables["params"]), eps)}
    loss = feature_weight * terms["features"] + logit_weight * terms["logits"] + \
        perturbation_weight * terms["perturbation"]
    if labels is not None:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
        terms["cross_entropy"] = optax.softmax_cross_entropy(logits, targets).mean()
        loss = loss + terms["cross_entropy"]
    return loss, terms


def count_params(variables: Mapping[str, Any]) -> int:
    """Returns the number of parameters in "params" and "low_rank"."""
    variables = flax.linen.meta.unbox(dict(variables))
    return int(sum(np.size(leaf) for key in ("params", "low_rank") if key in variables
                   for leaf in jax.tree.leaves(variables[key])))


def gmacs(apply_fn, variables: Mapping[str, Any], image_shape: Sequence[int]) -> float:
    """Returns XLA's multiply-accumulates (flops / 2, in G) of `apply_fn(variables, image)` for one image."""
    images = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
    shapes = jax.eval_shape(lambda: variables)
    cost = jax.jit(apply_fn).lower(shapes, images).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) / 2e9


__all__ = ["DEFAULT_EXCLUDE", "DEFAULT_FEATURES", "Linear", "LowRankLayer", "LowRankModel", "compress",
           "count_params", "find_linear", "gmacs", "perturbation_penalty", "recovery_loss", "svd_factors"]
