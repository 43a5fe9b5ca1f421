"""Post-training quantization of any registered model (fake quantization, straight-through gradients).

    qmodule, qvariables = vitjax.quant.quantize(module, variables, calibration, method="adalog", w_bits=4, a_bits=4)
    logits, _ = qmodule.apply(qvariables, images)      # the quantized model; gradients flow (STE) for QAT

`calibration` is an iterable of image batches (arrays, or mappings with "image"). What is quantized
(`calibrate`): every Dense / DenseGeneral / Conv input (activations; the first layer's, the images, at 8
bits as AdaLog's configs) and kernel (per output channel, or per tensor), the post-softmax attention
weights of every `layers.multihead_attention` and (`quantize_operands`, default on) its q, k and v, per head
at a_bits. Methods (quantizer per kind of point):

| method | kernels | activations | post-GELU (fc2 input) | post-softmax | q, k, v (per head) |
|---|---|---|---|---|---|
| minmax | min-max | min-max | min-max | min-max | min-max |
| percentile | 0.01-99.99th pct | the same | the same | the same | the same |
| mse | MSE-optimal | MSE-optimal | MSE-optimal | MSE-optimal | MSE-optimal |
| log2 | MSE-optimal | MSE-optimal | log2, shifted by GELU's min | log2, scale 1 | MSE-optimal |
| adalog | FPCS (output) | FPCS (output); post-LN per channel, folded | AdaLog: base, scale | AdaLog: base | FPCS |

"adalog" is AdaLog's official pipeline (`vitjax.quant.adalog`, `vitjax.quant.search`, `vitjax.quant.reparam`).
Uniform grids are asymmetric. `act_granularity="token"` quantizes the uniform activations per token with
the grid computed on the fly (dynamic); "tensor" (default) uses one static grid per point from calibration.
"""
import dataclasses
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.quant import adalog, calibrate, quantizers
from vitjax.quant import reparam as reparam_lib

METHODS = ("minmax", "percentile", "mse", "log2", "adalog")
BACKENDS = ("fake", "qwix")
# Methods whose softmax quantizer needs softmax attention in the model.
LOG_METHODS = ("log2", "adalog")
FIRST_LAYER_BITS = 8


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """How one activation point is fake-quantized (the static part; scales live in the variables)."""
    quantizer: str          # uniform | dynamic | log2 | adalog
    bits: int
    rule: str = "minmax"    # range rule of uniform / dynamic grids
    shift: float = 0.0      # added before a log quantizer (post-GELU)
    q: int = 0              # AdaLog's base numerator

    def apply(self, x: jax.Array, params: Mapping[str, jax.Array]) -> jax.Array:
        """Returns x fake-quantized (in fp32, cast back to x's dtype)."""
        value = jnp.asarray(x, jnp.float32)
        if self.quantizer == "uniform":
            value = quantizers.uniform_quantize(value, params["scale"], params["zero_point"], self.bits)
        elif self.quantizer == "dynamic":
            value = quantizers.dynamic_uniform(value, self.bits, self.rule)
        elif self.quantizer == "log2":
            value = quantizers.log2_quantize(value, params["scale"], self.bits, self.shift)
        else:
            value = quantizers.adalog_quantize(value, params["scale"], self.q, self.bits, self.shift)
        return value.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class QuantizedModel:
    """A model with fake-quantized kernels and activations; `apply(qvariables, ...)` runs it as module.apply."""
    module: Any
    method: str
    w_bits: int
    a_bits: int
    layers: Tuple[calibrate.LayerPoint, ...]
    inputs: Tuple[Tuple[str, InputSpec], ...]
    softmax: Tuple[Tuple[str, InputSpec], ...]
    # q, k and v of each attention (per head: "uniform"; per token and head: "dynamic"); () leaves them as they are
    operands: Tuple[Tuple[str, InputSpec], ...] = ()
    reparameterized: Tuple[str, ...] = ()     # layers whose post-LayerNorm input was reparameterised

    def apply(self, variables: Mapping[str, Any], *args, **kwargs) -> Any:
        """Returns module.apply of the quantized model on `variables` (with their "quant" collection)."""
        variables = dict(flax.linen.meta.unbox(dict(variables)))
        quant = variables.pop("quant")
        variables["params"] = quantize_kernels(variables["params"], self.layers, quant["kernels"], self.w_bits)
        inputs, softmax = dict(self.inputs), dict(self.softmax)

        def on_input(module, name, x):
            return inputs[name].apply(x, quant["inputs"][name]) if name in inputs else x

        def on_attention(name, weights, value):
            return softmax[name].apply(weights, quant["softmax"][name]) if name in softmax else weights

        operands = dict(self.operands)

        def on_operands(name, query, key, value):
            if name not in operands:
                return query, key, value
            grids = quant["operands"][name]
            return tuple(operands[name].apply(array, grids.get(which, {}))
                         for which, array in (("query", query), ("key", key), ("value", value)))

        with calibrate.intercepted(on_input, on_attention if softmax else None,
                                   on_operands if operands else None):
            return self.module.apply(variables, *args, **kwargs)

    def summary(self) -> str:
        """Returns one line per quantizer: how many points use it, at which bit widths."""
        counts: Dict[str, int] = {}
        for kind, specs in (("activation", self.inputs), ("post-softmax", self.softmax),
                            ("attention q/k/v (per head)", self.operands)):
            for _, spec in specs:
                key = f"{kind} {spec.quantizer}" + (f" ({spec.rule})" if spec.quantizer in ("uniform", "dynamic")
                                                    else "") + f" {spec.bits}-bit"
                counts[key] = counts.get(key, 0) + 1
        lines = [f"{self.method} W{self.w_bits}A{self.a_bits}: {len(self.layers)} kernels at {self.w_bits} bits"]
        lines += [f"  {count} x {key}" for key, count in sorted(counts.items())]
        if self.reparameterized:
            lines.append(f"  {len(self.reparameterized)} post-LayerNorm inputs reparameterised (per-channel grids)")
        return "\n".join(lines)


def quantize_kernels(params: Any, points: Iterable[calibrate.LayerPoint], kernel_params: Mapping[str, Any],
                     bits: int) -> Any:
    """Returns `params` with each point's kernel fake-quantized (straight-through) by its stored grid."""
    params = flax.core.unfreeze(params) if isinstance(params, flax.core.FrozenDict) else params
    result = jax.tree_util.tree_map(lambda leaf: leaf, params)
    for point in points:
        parent = result
        for key in point.kernel_path[:-1]:
            parent = parent[key]
        grid = kernel_params[point.name]
        kernel = parent["kernel"]
        parent["kernel"] = quantizers.uniform_quantize(
            jnp.asarray(kernel, jnp.float32), grid["scale"], grid["zero_point"], bits).astype(kernel.dtype)
    return result


def check_arguments(method: str, w_bits: int, a_bits: int, act_granularity: str = "tensor",
                    weight_granularity: str = "channel") -> None:
    """Returns None when the method, bit widths and granularities are valid; raises ValueError naming the choices."""
    if method not in METHODS:
        raise ValueError(f"Unknown quantization method {method!r}; valid choices: {METHODS}")
    quantizers.check_bits(w_bits, "w_bits")
    quantizers.check_bits(a_bits, "a_bits")
    if act_granularity not in ("tensor", "token"):
        raise ValueError(f"Unknown act_granularity {act_granularity!r}; valid choices: ('tensor', 'token')")
    if weight_granularity not in ("tensor", "channel"):
        raise ValueError(f"Unknown weight_granularity {weight_granularity!r}; valid choices: ('tensor', 'channel')")


def _lookup(tree: Any, path: Tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def quantize(module: Any, variables: Mapping[str, Any], calibration: Iterable[Any], method: str = "adalog",
             w_bits: int = 8, a_bits: int = 8, *, act_granularity: str = "tensor",
             weight_granularity: str = "channel", reparam: Optional[bool] = None,
             quantize_operands: bool = True,
             apply_kwargs: Optional[Mapping[str, Any]] = None, backend: str = "fake") -> Tuple[Any, Dict[str, Any]]:
    """Returns (quantized model, its variables: the model's plus a "quant" collection of calibrated grids).

    backend "fake" (default) simulates the quantization in floating point; "qwix" runs the Dense /
    DenseGeneral matmuls really in int8 (`vitjax.quant.int8`; W8A8, method "minmax", act_granularity "token").
    method "adalog" runs AdaLog's official calibration pipeline (`vitjax.quant.adalog`); `reparam` (default:
    on for "adalog" when w_bits == a_bits, as the official code) reparameterises the post-LayerNorm inputs,
    so the returned params differ from the given ones (the same FP32 function). `quantize_operands` also
    fake-quantizes q, k and v of every attention at a_bits, per head.
    Bad input (method, bit width outside 2..8, no calibration batch, a log method on a model without
    softmax attention, reparam on a model without its LayerNorm -> layer pairs or with another method, a
    backend that cannot take the settings) raises ValueError before anything is compiled.
    """
    check_arguments(method, w_bits, a_bits, act_granularity, weight_granularity)
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; valid choices: {BACKENDS}")
    if reparam not in (None, True, False):
        raise ValueError(f"reparam must be None (the method's default), True or False, got {reparam!r}")
    if reparam and method != "adalog":
        raise ValueError(f"reparam=True is part of AdaLog's pipeline; valid choices: method='adalog', or "
                         f"reparam=None / False with method={method!r}")
    if backend == "qwix":
        from vitjax.quant import int8
        int8.check_backend(method, w_bits, a_bits, act_granularity)
    batches = [calibrate.batch_images(batch) for batch in calibration]
    if not batches:
        raise ValueError("The calibration set has no batches: give an iterable of at least one batch of images")
    if backend == "qwix":
        return int8.quantize_int8(module, variables, batches[0], apply_kwargs=apply_kwargs)
    apply_kwargs = dict(apply_kwargs or {})
    variables = dict(flax.linen.meta.unbox(dict(variables)))
    variables.pop("quant", None)

    def apply_fn(images, params=None):
        return module.apply({**variables, "params": variables["params"] if params is None else params}, images,
                            **apply_kwargs)

    points, softmax_names, operand_names = calibrate.discover(lambda: apply_fn(batches[0]))
    if not points:
        raise ValueError(f"{type(module).__name__} has no Dense / DenseGeneral / Conv layer to quantize")
    if method in LOG_METHODS and not softmax_names:
        raise ValueError(f"method={method!r} quantizes post-softmax attention weights, but "
                         f"{type(module).__name__} has no softmax attention (layers.multihead_attention); "
                         f"valid choices for it: {tuple(m for m in METHODS if m not in LOG_METHODS)}")
    pairs = reparam_lib.find_pairs(points, variables["params"]) if method == "adalog" else {}
    if reparam and not pairs:
        raise ValueError(f"reparam=True folds per-channel grids into a LayerNorm before a biased layer (qkv after "
                         f"norm1, fc1 after norm2, reduction after a patch merging's norm: ViT / DeiT / Swin "
                         f"blocks); {type(module).__name__} has none. Valid choices for it: reparam=None or False")
    if reparam is False or (reparam is None and w_bits != a_bits):
        pairs = {}
    if not quantize_operands:
        operand_names = []
    if method == "adalog":
        return _quantize_adalog(module, variables, batches, apply_fn, points, softmax_names, operand_names, pairs,
                                w_bits, a_bits, act_granularity)

    rule = method if method in quantizers.UNIFORM_RULES else "mse"
    uniform_kind = "dynamic" if act_granularity == "token" else "uniform"

    def input_spec(point, first):
        bits = max(a_bits, FIRST_LAYER_BITS) if first else a_bits
        if point.post_gelu and method == "log2":
            return InputSpec("log2", bits, shift=quantizers.GELU_SHIFT)
        return InputSpec(uniform_kind, bits, rule=rule)

    input_specs = {point.name: input_spec(point, index == 0) for index, point in enumerate(points)}
    softmax_kind = "log2" if method == "log2" else uniform_kind
    softmax_specs = {name: InputSpec(softmax_kind, a_bits, rule=rule) for name in softmax_names}
    operand_spec = InputSpec(uniform_kind, a_bits, rule=rule)
    recorder = calibrate.record(apply_fn, batches, operand_names if uniform_kind == "uniform" else ())

    params = variables["params"]
    kernel_grids = {}
    for point in points:
        kernel = np.asarray(_lookup(params, point.kernel_path), np.float32)
        keep = point.output_axes if weight_granularity == "channel" else ()
        scale, zero = quantizers.uniform_params(*quantizers.uniform_range(kernel, w_bits, rule, keep), w_bits)
        kernel_grids[point.name] = {"scale": jnp.asarray(scale, jnp.float32),
                                    "zero_point": jnp.asarray(zero, jnp.float32)}

    def grid(name, spec, is_softmax):
        if spec.quantizer == "dynamic":
            return {}
        if spec.quantizer == "log2":
            scale = 1.0 if is_softmax else recorder.high[name] + spec.shift
            return {"scale": jnp.asarray(scale, jnp.float32)}
        if spec.rule == "minmax":
            low, high = recorder.low[name], recorder.high[name]
        else:
            low, high = quantizers.uniform_range(recorder.sample(name), spec.bits, spec.rule)
        scale, zero = quantizers.uniform_params(np.float32(low).reshape(()), np.float32(high).reshape(()), spec.bits)
        return {"scale": jnp.asarray(scale, jnp.float32), "zero_point": jnp.asarray(zero, jnp.float32)}

    def head_grid(array):
        # per head (axis 2 of (B, N, H, D)), the method's range rule
        scale, zero = quantizers.uniform_params(*quantizers.uniform_range(array, a_bits, rule, (2,)), a_bits)
        return {"scale": jnp.asarray(scale, jnp.float32), "zero_point": jnp.asarray(zero, jnp.float32)}

    quant = {"kernels": kernel_grids, "inputs": {}, "softmax": {}, "operands": {}}
    for name, spec in input_specs.items():
        quant["inputs"][name] = grid(name, spec, False)
    for name, spec in softmax_specs.items():
        quant["softmax"][name] = grid(name, spec, True)
    for name in operand_names:
        arrays = recorder.joined_operands(name) if uniform_kind == "uniform" else None
        quant["operands"][name] = {} if arrays is None else {
            which: head_grid(array) for which, array in zip(("query", "key", "value"), arrays)}
    model = QuantizedModel(module, method, w_bits, a_bits, tuple(points), tuple(input_specs.items()),
                           tuple(softmax_specs.items()), tuple((name, operand_spec) for name in operand_names))
    return model, {**variables, "quant": quant}


# The reparameterised model must compute the original's function; beyond this relative error it does not.
REPARAM_TOLERANCE = 1e-4


def _quantize_adalog(module, variables, batches, apply_fn, points, softmax_names, operand_names, pairs, w_bits,
                     a_bits, act_granularity):
    keep_all = [point.name for point in points] + list(softmax_names) + list(operand_names)
    recorder = calibrate.record(apply_fn, batches, keep_all)
    found = adalog.calibrate(points, softmax_names, operand_names, recorder, variables["params"], w_bits, a_bits,
                             pairs)
    params = found["params"]
    if pairs:
        original = np.asarray(jax.tree_util.tree_leaves(apply_fn(batches[0]))[0], np.float32)
        folded = np.asarray(jax.tree_util.tree_leaves(apply_fn(batches[0], params))[0], np.float32)
        error = np.abs(folded - original).max() / max(np.abs(original).max(), 1e-12)
        if not error <= REPARAM_TOLERANCE:
            raise ValueError(f"The LayerNorm reparameterisation changed {type(module).__name__}'s FP32 output "
                             f"(relative error {error:.2e}): a folded LayerNorm feeds more than its layer here. "
                             f"Valid choice for this model: reparam=False")
    uniform_kind = "dynamic" if act_granularity == "token" else "uniform"
    # a static grid's rule is only a label; a dynamic one computes its MSE grid per token
    rule = "mse" if uniform_kind == "dynamic" else "fpcs"
    inputs = []
    for index, point in enumerate(points):
        bits = max(a_bits, FIRST_LAYER_BITS) if index == 0 else a_bits
        if point.name in found["gelu_q"]:
            inputs.append((point.name, InputSpec("adalog", bits, shift=quantizers.GELU_SHIFT,
                                                 q=found["gelu_q"][point.name])))
        else:
            inputs.append((point.name, InputSpec(uniform_kind, bits, rule=rule)))
    softmax = tuple((name, InputSpec("adalog", a_bits, q=found["softmax_q"][name])) for name in softmax_names)
    softmax_grids = {name: {"scale": jnp.ones((), jnp.float32)} for name in softmax_names}
    operand_spec = InputSpec(uniform_kind, a_bits, rule=rule)
    quant = {"kernels": found["kernels"], "inputs": found["inputs"], "softmax": softmax_grids,
             "operands": found["operands"]}
    model = QuantizedModel(module, "adalog", w_bits, a_bits, tuple(points), tuple(inputs), softmax,
                           tuple((name, operand_spec) for name in operand_names), tuple(pairs))
    return model, {**variables, "params": params, "quant": quant}


__all__ = ["BACKENDS", "REPARAM_TOLERANCE", "InputSpec", "LOG_METHODS", "METHODS", "QuantizedModel", "check_arguments",
           "quantize",
           "quantize_kernels"]
