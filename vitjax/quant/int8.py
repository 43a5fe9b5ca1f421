"""Real int8 execution through Google's qwix: Dense / DenseGeneral matmuls as int8 x int8 -> int32 dot_generals.

    qmodel, qvariables = vitjax.quant.quantize(module, variables, calibration, method="minmax", backend="qwix")
    logits, _ = qmodel.apply(qvariables, images)

What runs in int8 (qwix's post-training quantization, `qwix.PtqProvider`): every `lax.dot_general` whose
one operand is a parameter, i.e. every nn.Dense / nn.DenseGeneral (qkv, attention output projection, MLP,
head). Kernels are stored as int8 with one absmax (symmetric) scale per output channel; activations are
quantized on the fly to int8, one absmax scale per token (qwix's dynamic-range default under XLA); the
dot accumulates in int32 and is rescaled to fp32. `fake=True` runs the same quantization simulated in
floating point (`qwix.QtProvider`), the reference the int8 output is tested against.

Where qwix does not serve here, and why:
- the attention matmuls (q k^T and softmax(.) v): both operands are activations, and qwix's PTQ
  quantizes an op only when one operand is a weight; they also go through `jnp.einsum` / the fused
  kernels of `vitjax.kernels`, which qwix does not intercept. They stay in the model's dtype.
- convolutions (the patch embedding, conv stems): qwix has an int8 conv_general_dilated, but its s8
  lowering has not been checked on a GPU here, so convs are off by default (`include_convs=True` turns
  them on); in a ViT the one conv, the patch embedding, is about 1% of the FLOPs.
- the static activation grids of `vitjax.quant.quantize` (calibrated min-max, AdaLog, log2): qwix's
  XLA path uses dynamic per-token absmax scales; `calibration` here only fixes the shapes.
"""
import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp

QWIX_OPS = ("dot_general",)
INT8_BITS = 8


def _qwix():
    try:
        import qwix
    except ImportError as error:  # an optional dependency: only this backend needs it
        raise ImportError("backend='qwix' needs the qwix package: pip install qwix (vitjax's test extra has it)"
                          ) from error
    return qwix


def rules(include_convs: bool = False, module_path: str = ".*") -> list:
    """Returns the qwix rules: int8 weights and activations for every dot_general (and conv) under `module_path`."""
    qwix = _qwix()
    ops = QWIX_OPS + (("conv_general_dilated",) if include_convs else ())
    return [qwix.QuantizationRule(module_path=module_path, weight_qtype=jnp.int8, act_qtype=jnp.int8,
                                  op_names=ops)]


@dataclasses.dataclass(frozen=True)
class Int8Model:
    """A qwix-quantized model; `apply(qvariables, ...)` runs it as module.apply (int8 dots, or simulated if fake)."""
    module: Any
    fake: bool

    def apply(self, variables: Mapping[str, Any], *args, **kwargs) -> Any:
        """Returns the quantized module's apply on `variables` (the int8 params from `quantize_int8`)."""
        return self.module.apply(dict(variables), *args, **kwargs)

    def summary(self) -> str:
        """Returns one line saying what runs in int8."""
        kind = "simulated (qwix QtProvider)" if self.fake else "int8 x int8 -> int32 (qwix PtqProvider)"
        return f"qwix W8A8: Dense/DenseGeneral matmuls {kind}; attention matmuls and convs in the model's dtype"


def quantize_int8(module: Any, variables: Mapping[str, Any], example: jax.Array, *, fake: bool = False,
                  include_convs: bool = False, apply_kwargs: Optional[Mapping[str, Any]] = None
                  ) -> Tuple[Int8Model, Dict[str, Any]]:
    """Returns (Int8Model, its variables): kernels as int8 qwix arrays (or as they are when `fake`)."""
    qwix = _qwix()
    apply_kwargs = dict(apply_kwargs or {})
    variables = dict(flax.linen.meta.unbox(dict(variables)))
    variables.pop("quant", None)
    provider = qwix.QtProvider(rules(include_convs)) if fake else qwix.PtqProvider(rules(include_convs))
    qmodule = qwix.quantize_model(module, provider)
    if fake:
        return Int8Model(qmodule, True), variables
    abstract = jax.eval_shape(lambda: qmodule.init(jax.random.key(0), example, **apply_kwargs))
    abstract = flax.linen.meta.unbox(abstract)
    qparams = qwix.quantize_params(variables["params"], abstract["params"])
    return Int8Model(qmodule, False), {**variables, "params": qparams}


def _sub_jaxprs(eqn) -> List[Any]:
    found = []
    for value in eqn.params.values():
        for item in (value if isinstance(value, (tuple, list)) else (value,)):
            if hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                found.append(item.jaxpr)
            elif hasattr(item, "eqns"):
                found.append(item)
    return found


def dot_dtypes(fn, *args) -> List[Tuple[str, str, str]]:
    """Returns (lhs, rhs, result) dtype names of every dot_general `fn(*args)` traces to, nested jaxprs included."""
    result = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                lhs, rhs = (str(var.aval.dtype) for var in eqn.invars[:2])
                result.append((lhs, rhs, str(eqn.outvars[0].aval.dtype)))
            for sub in _sub_jaxprs(eqn):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return result


def check_backend(method: str, w_bits: int, a_bits: int, act_granularity: str) -> None:
    """Raises ValueError (before any compile) when backend='qwix' cannot run these settings, naming what it can."""
    if (w_bits, a_bits) != (INT8_BITS, INT8_BITS):
        raise ValueError(f"backend='qwix' runs W8A8 only (int8 matmuls), got w_bits={w_bits}, a_bits={a_bits}; "
                         "valid: w_bits=8, a_bits=8, or backend='fake' for 2..8 bits")
    if method != "minmax":
        raise ValueError(f"backend='qwix' quantizes with absmax grids (uniform, symmetric), not method={method!r}; "
                         "valid: method='minmax', or backend='fake' for the other methods")
    if act_granularity != "token":
        raise ValueError("backend='qwix' quantizes activations per token (dynamic), so act_granularity must be "
                         f"'token', got {act_granularity!r}")


__all__ = ["INT8_BITS", "Int8Model", "QWIX_OPS", "check_backend", "dot_dtypes", "quantize_int8", "rules"]
