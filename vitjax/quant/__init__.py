"""Post-training quantization of any registered model (fake quantization, straight-through gradients).

    qmodule, qvariables = vitjax.quant.quantize(module, variables, calibration, method="adalog", w_bits=4, a_bits=4)
    logits, _ = qmodule.apply(qvariables, images)      # the quantized model; gradients flow (STE) for QAT

`calibration` is an iterable of image batches (arrays, or mappings with "image"). What is quantized
(`calibrate`): every Dense / DenseGeneral / Conv input (activations; the first layer's, the images, at 8
bits as AdaLog's configs) and kernel (per output channel, or per tensor), and the post-softmax attention
weights of every `layers.multihead_attention`. The other operands of the attention matmuls (q, k, v) stay
in full precision. Methods (quantizer per kind of point):

| method | kernels | activations | post-GELU (fc2 input) | post-softmax |
|---|---|---|---|---|
| minmax | min-max | min-max | min-max | min-max |
| percentile | 0.01-99.99th pct | the same | the same | the same |
| mse | MSE-optimal | MSE-optimal | MSE-optimal | MSE-optimal |
| log2 | MSE-optimal | MSE-optimal | log2, shifted by GELU's min | log2, scale 1 |
| adalog | MSE-optimal | MSE-optimal | AdaLog (base and scale searched) | AdaLog (base searched) |

Uniform grids are asymmetric. `act_granularity="token"` quantizes the uniform activations per token with
the grid computed on the fly (dynamic); "tensor" (default) uses one static grid per point from calibration.
"""
import dataclasses
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.quant import calibrate, quantizers

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

        with calibrate.intercepted(on_input, on_attention if softmax else None):
            return self.module.apply(variables, *args, **kwargs)

    def summary(self) -> str:
        """Returns one line per quantizer: how many points use it, at which bit widths."""
        counts: Dict[str, int] = {}
        for kind, specs in (("activation", self.inputs), ("post-softmax", self.softmax)):
            for _, spec in specs:
                key = f"{kind} {spec.quantizer}" + (f" ({spec.rule})" if spec.quantizer in ("uniform", "dynamic")
                                                    else "") + f" {spec.bits}-bit"
                counts[key] = counts.get(key, 0) + 1
        lines = [f"{self.method} W{self.w_bits}A{self.a_bits}: {len(self.layers)} kernels at {self.w_bits} bits"]
        lines += [f"  {count} x {key}" for key, count in sorted(counts.items())]
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
             weight_granularity: str = "channel",
             apply_kwargs: Optional[Mapping[str, Any]] = None, backend: str = "fake") -> Tuple[Any, Dict[str, Any]]:
    """Returns (quantized model, its variables: the model's plus a "quant" collection of calibrated grids).

    backend "fake" (default) simulates the quantization in floating point; "qwix" runs the Dense /
    DenseGeneral matmuls really in int8 (`vitjax.quant.int8`; W8A8, method "minmax", act_granularity "token").
    Bad input (method, bit width outside 2..8, no calibration batch, a log method on a model without
    softmax attention, a backend that cannot take the settings) raises ValueError before anything is compiled.
    """
    check_arguments(method, w_bits, a_bits, act_granularity, weight_granularity)
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; valid choices: {BACKENDS}")
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

    def apply_fn(images):
        return module.apply(variables, images, **apply_kwargs)

    points, softmax_names = calibrate.discover(lambda: apply_fn(batches[0]))
    if not points:
        raise ValueError(f"{type(module).__name__} has no Dense / DenseGeneral / Conv layer to quantize")
    if method in LOG_METHODS and not softmax_names:
        raise ValueError(f"method={method!r} quantizes post-softmax attention weights, but "
                         f"{type(module).__name__} has no softmax attention (layers.multihead_attention); "
                         f"valid choices for it: {tuple(m for m in METHODS if m not in LOG_METHODS)}")

    rule = method if method in quantizers.UNIFORM_RULES else "mse"
    uniform_kind = "dynamic" if act_granularity == "token" else "uniform"

    def input_spec(point, first):
        bits = max(a_bits, FIRST_LAYER_BITS) if first else a_bits
        if point.post_gelu and method == "adalog":
            return InputSpec("adalog", bits, shift=quantizers.GELU_SHIFT)
        if point.post_gelu and method == "log2":
            return InputSpec("log2", bits, shift=quantizers.GELU_SHIFT)
        return InputSpec(uniform_kind, bits, rule=rule)

    input_specs = {point.name: input_spec(point, index == 0) for index, point in enumerate(points)}
    softmax_kind = {"adalog": "adalog", "log2": "log2"}.get(method, uniform_kind)
    softmax_specs = {name: InputSpec(softmax_kind, a_bits, rule=rule) for name in softmax_names}
    keep_all = [name for name, spec in {**input_specs, **softmax_specs}.items() if spec.quantizer == "adalog"]
    recorder = calibrate.record(apply_fn, batches, keep_all)

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
            return spec, {}
        if spec.quantizer == "log2":
            scale = 1.0 if is_softmax else recorder.high[name] + spec.shift
            return spec, {"scale": jnp.asarray(scale, jnp.float32)}
        if spec.quantizer == "adalog":
            data, values = recorder.concatenated(name)
            if is_softmax:
                q = quantizers.search_adalog_softmax(data, values, spec.bits)
                return dataclasses.replace(spec, q=q), {"scale": jnp.ones((), jnp.float32)}
            point = next(p for p in points if p.name == name)
            grid_w = kernel_grids[name]
            kernel = quantizers.uniform_quantize(jnp.asarray(_lookup(params, point.kernel_path), jnp.float32),
                                                 grid_w["scale"], grid_w["zero_point"], w_bits)
            bias = _lookup(params, point.kernel_path[:-1] + ("bias",)) if point.has_bias else None
            full = np.asarray(_lookup(params, point.kernel_path), np.float32).reshape(data.shape[-1], -1)
            scale, q = quantizers.search_adalog_gelu(data, full, bias, spec.bits, shift=spec.shift,
                                                     kernel_sim=kernel.reshape(data.shape[-1], -1))
            return dataclasses.replace(spec, q=q), {"scale": jnp.asarray(scale, jnp.float32)}
        if spec.rule == "minmax":
            low, high = recorder.low[name], recorder.high[name]
        else:
            low, high = quantizers.uniform_range(recorder.sample(name), spec.bits, spec.rule)
        scale, zero = quantizers.uniform_params(np.float32(low).reshape(()), np.float32(high).reshape(()), spec.bits)
        return spec, {"scale": jnp.asarray(scale, jnp.float32), "zero_point": jnp.asarray(zero, jnp.float32)}

    quant = {"kernels": kernel_grids, "inputs": {}, "softmax": {}}
    final_inputs, final_softmax = [], []
    for name, spec in input_specs.items():
        spec, quant["inputs"][name] = grid(name, spec, False)
        final_inputs.append((name, spec))
    for name, spec in softmax_specs.items():
        spec, quant["softmax"][name] = grid(name, spec, True)
        final_softmax.append((name, spec))
    model = QuantizedModel(module, method, w_bits, a_bits, tuple(points), tuple(final_inputs), tuple(final_softmax))
    return model, {**variables, "quant": quant}


__all__ = ["BACKENDS", "InputSpec", "LOG_METHODS", "METHODS", "QuantizedModel", "check_arguments", "quantize",
           "quantize_kernels"]
