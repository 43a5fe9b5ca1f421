"""Where a model is quantized, and what calibration data say about those places.

Any registered model is quantized from outside: flax's `nn.intercept_methods` sees the input of every
`nn.Dense` / `nn.DenseGeneral` / `nn.Conv` call (a *layer point*, named by the module's path), and
`layers.attention_weights_hook` the post-softmax weights of every `layers.multihead_attention` call (a
*softmax point*, named by the calling module's path and its call index, "blocks_0/attn/softmax_0"), and
`layers.attention_operands_hook` its q, k and v (an *operand point*, "blocks_0/attn/operands_0"). A layer
point is *post-GELU* when it is the `fc2` of a `layers.Mlp` whose activation is the erf or tanh GELU.
"""
import collections
import contextlib
import dataclasses
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import numpy as np

from vitjax.models import layers

LAYER_TYPES = (nn.Dense, nn.DenseGeneral, nn.Conv)
# Values kept per point and batch for the percentile and MSE rules (a random subset beyond this).
SAMPLE_SIZE = 1 << 16

InputFn = Callable[[nn.Module, str, jax.Array], jax.Array]
AttentionFn = Callable[[str, jax.Array, jax.Array], jax.Array]
OperandsFn = Callable[[str, jax.Array, jax.Array, jax.Array], Tuple[jax.Array, jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class LayerPoint:
    """A Dense / DenseGeneral / Conv call: its input is quantized, and its kernel per output channel."""
    name: str                  # the module path, "blocks_0/attn/qkv"
    kernel_path: Tuple[str, ...]
    output_axes: Tuple[int, ...]   # kernel axes of the output features (kept by per-channel quantization)
    post_gelu: bool
    has_bias: bool
    conv: bool = False
    patch: Tuple[int, ...] = ()    # a Conv whose strides equal its window, unpadded (a patch embedding): the window


def _patch(module: nn.Module) -> Tuple[int, ...]:
    if not isinstance(module, nn.Conv):
        return ()
    window = tuple(module.kernel_size)
    strides = module.strides if module.strides is not None else 1
    strides = (strides,) * len(window) if isinstance(strides, int) else tuple(strides)
    unpadded = module.padding == "VALID" or module.padding == 0 or (
        isinstance(module.padding, (tuple, list)) and all(tuple(p) == (0, 0) for p in module.padding
                                                          if isinstance(p, (tuple, list))))
    dilated = any(d != 1 for d in ((module.kernel_dilation,) if isinstance(module.kernel_dilation, int)
                                   else tuple(module.kernel_dilation or ())))
    return window if strides == window and unpadded and module.feature_group_count == 1 and not dilated else ()


def point_name(module: nn.Module) -> str:
    """Returns the "/"-joined path of a bound module (the name of its quantization point)."""
    return "/".join(str(part) for part in module.path)


def _output_axes(module: nn.Module, kernel_ndim: int) -> Tuple[int, ...]:
    features = getattr(module, "features", None)
    count = len(features) if isinstance(module, nn.DenseGeneral) and isinstance(features, (tuple, list)) else 1
    return tuple(range(kernel_ndim - count, kernel_ndim))


def _is_post_gelu(module: nn.Module) -> bool:
    parent = module.parent
    return (isinstance(parent, layers.Mlp) and module.name == "fc2"
            and getattr(parent, "activation", None) in (layers.gelu, layers.gelu_tanh))


@contextlib.contextmanager
def intercepted(on_input: Optional[InputFn], on_attention: Optional[AttentionFn],
                on_operands: Optional[OperandsFn] = None) -> Iterator[None]:
    """Yields with `on_input(module, name, x)` replacing each layer's input, `on_attention(name, weights,
    value)` the post-softmax weights of each attention and `on_operands(name, q, k, v)` its (q, k, v) (not
    hooked when None)."""
    stack: List[nn.Module] = []
    calls: Dict[str, int] = collections.Counter()
    operand_calls: Dict[str, int] = collections.Counter()

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if on_input is not None and context.method_name == "__call__" and isinstance(module, LAYER_TYPES):
            if args:
                args = (on_input(module, point_name(module), args[0]),) + tuple(args[1:])
            elif "inputs" in kwargs:
                kwargs = dict(kwargs, inputs=on_input(module, point_name(module), kwargs["inputs"]))
        stack.append(module)
        try:
            return next_fun(*args, **kwargs)
        finally:
            stack.pop()

    def hook(weights, value):
        owner = point_name(stack[-1]) if stack else ""
        index = calls[owner]
        calls[owner] += 1
        return on_attention(f"{owner}/softmax_{index}" if owner else f"softmax_{index}", weights, value)

    def operands_hook(query, key, value):
        owner = point_name(stack[-1]) if stack else ""
        index = operand_calls[owner]
        operand_calls[owner] += 1
        return on_operands(f"{owner}/operands_{index}" if owner else f"operands_{index}", query, key, value)

    with contextlib.ExitStack() as contexts:
        contexts.enter_context(nn.intercept_methods(interceptor))
        if on_attention is not None:
            contexts.enter_context(layers.attention_weights_hook(hook))
        if on_operands is not None:
            contexts.enter_context(layers.attention_operands_hook(operands_hook))
        yield


def discover(apply_fn: Callable[[], Any]) -> Tuple[List[LayerPoint], List[str], List[str]]:
    """Returns (layer points, softmax point names, operand point names) in call order, tracing `apply_fn` for
    shapes only (no compile)."""
    found: Dict[str, LayerPoint] = {}
    softmax: Dict[str, None] = {}
    operands: Dict[str, None] = {}

    def on_input(module, name, x):
        if name not in found:
            params = nn.meta.unbox(module.variables.get("params", {}))
            kernel_ndim = np.ndim(params["kernel"]) if "kernel" in params else 2
            found[name] = LayerPoint(name, tuple(module.path) + ("kernel",), _output_axes(module, kernel_ndim),
                                     _is_post_gelu(module), bool(getattr(module, "use_bias", False)),
                                     isinstance(module, nn.Conv), _patch(module))
        return x

    def on_attention(name, weights, value):
        softmax[name] = None
        return weights

    def on_operands(name, query, key, value):
        operands[name] = None
        return query, key, value

    with intercepted(on_input, on_attention, on_operands):
        jax.eval_shape(apply_fn)
    return list(found.values()), list(softmax), list(operands)


class Recorder:
    """Calibration statistics per point: running min / max, a value sample, and (where asked) every value."""

    def __init__(self, keep_all: Iterable[str] = (), seed: int = 0):
        self.keep_all = set(keep_all)
        self.low: Dict[str, float] = {}
        self.high: Dict[str, float] = {}
        self.samples: Dict[str, List[np.ndarray]] = collections.defaultdict(list)
        self.full: Dict[str, List[np.ndarray]] = collections.defaultdict(list)
        self.values: Dict[str, List[np.ndarray]] = collections.defaultdict(list)
        self.operands: Dict[str, List[Tuple[np.ndarray, ...]]] = collections.defaultdict(list)
        self.rng = np.random.default_rng(seed)

    def record(self, name: str, x: jax.Array, value: Optional[jax.Array] = None) -> None:
        """Adds the concrete array `x` (and the attention `value`) seen at point `name`."""
        array = np.asarray(x, np.float32)
        self.low[name] = min(self.low.get(name, np.inf), float(array.min()))
        self.high[name] = max(self.high.get(name, -np.inf), float(array.max()))
        flat = array.reshape(-1)
        if flat.size > SAMPLE_SIZE:
            flat = flat[self.rng.choice(flat.size, SAMPLE_SIZE, replace=False)]
        self.samples[name].append(flat)
        if name in self.keep_all:
            self.full[name].append(array)
            if value is not None:
                self.values[name].append(np.asarray(value, np.float32))

    def record_operands(self, name: str, query: jax.Array, key: jax.Array, value: jax.Array) -> None:
        """Adds the concrete attention operands (each (B, N, H, D)) seen at operand point `name`."""
        self.operands[name].append(tuple(np.asarray(array, np.float32) for array in (query, key, value)))

    def joined_operands(self, name: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns every recorded (query, key, value) of operand point `name`, joined on the batch axis."""
        return tuple(np.concatenate(arrays) for arrays in zip(*self.operands[name]))

    def sample(self, name: str) -> np.ndarray:
        """Returns the concatenated value sample of `name`."""
        return np.concatenate(self.samples[name])

    def concatenated(self, name: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """Returns (every recorded value of `name` joined on the batch axis, the attention values or None)."""
        values = np.concatenate(self.values[name]) if self.values.get(name) else None
        return np.concatenate(self.full[name]), values


def record(apply_fn: Callable[[Any], Any], batches: Iterable[Any], keep_all: Iterable[str] = ()) -> Recorder:
    """Returns the Recorder of running `apply_fn(images)` (full precision, jitted) over the calibration batches."""
    recorder = Recorder(keep_all)
    keep = recorder.keep_all

    def traced(images):
        # The tracers seen at each point leave the jitted function as its outputs.
        seen: Dict[str, List[Tuple[jax.Array, ...]]] = {}

        def on_input(module, name, x):
            seen.setdefault(name, []).append((x,))
            return x

        def on_attention(name, weights, value):
            seen.setdefault(name, []).append((weights, value))
            return weights

        def on_operands(name, query, key, value):
            if name in keep:
                seen.setdefault(name, []).append((query, key, value))
            return query, key, value

        with intercepted(on_input, on_attention, on_operands if keep else None):
            apply_fn(images)
        return seen

    run = jax.jit(traced)
    for images in batches:
        for name, calls in jax.device_get(run(images)).items():
            for arrays in calls:
                if len(arrays) == 3:
                    recorder.record_operands(name, *arrays)
                else:
                    recorder.record(name, *arrays)
    return recorder


def batch_images(batch: Any) -> Any:
    """Returns the images of a calibration batch: the array itself or a mapping's "image"."""
    if isinstance(batch, Mapping):
        if "image" not in batch:
            raise ValueError(f"A calibration batch given as a mapping needs an 'image' entry; it has {sorted(batch)}")
        return batch["image"]
    return batch


__all__ = ["LAYER_TYPES", "LayerPoint", "Recorder", "batch_images", "discover", "intercepted", "point_name",
           "record"]
