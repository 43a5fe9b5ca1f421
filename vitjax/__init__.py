"""vitjax: Vision Transformers in JAX/Flax.

`import vitjax` is light: it imports neither TensorFlow (only `vitjax.data` needs it) nor PyTorch
(only `vitjax.convert` needs it). Its subpackages load on first use, so `vitjax.models.create(...)`
works right after `import vitjax`.
"""
import importlib
from typing import Any, List

__version__ = "0.1.0"

# Subpackages and modules reachable as attributes of `vitjax`, imported on first access.
_SUBMODULES = ("checkpoint", "config_utils", "convert", "data", "evaluate", "kernels", "models", "objectives",
               "optim", "parallel", "quant", "text", "tokens", "train", "weights")


def __getattr__(name: str) -> Any:
    """Returns the subpackage `name`, importing it on first access (PEP 562)."""
    if name in _SUBMODULES:
        module = importlib.import_module(f"vitjax.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'vitjax' has no attribute {name!r}; subpackages: {list(_SUBMODULES)}")


def __dir__() -> List[str]:
    """Returns the module's attributes, the lazily imported subpackages included."""
    return sorted(list(globals()) + list(_SUBMODULES))
