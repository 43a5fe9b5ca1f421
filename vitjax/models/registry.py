"""The model registry: every architecture variant registered by name, built with `create`."""
import dataclasses
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple


class ModelEntry(NamedTuple):
    """How to build one registered model."""
    builder: Callable[..., Any]      # a linen Module class, or a function returning a Module
    module_class: type              # the Module class built (its fields are the valid overrides)
    family: str                     # the file in vitjax/models/ (and vitjax/convert/) it belongs to
    defaults: Dict[str, Any]        # the registered settings
    extra_args: Tuple[str, ...]     # builder arguments that are not Module fields (e.g. "variant")


_REGISTRY: Dict[str, ModelEntry] = {}


def register_model(name: str, builder: Callable[..., Any], *, family: str, module_class: Optional[type] = None,
                   extra_args: Tuple[str, ...] = (), **defaults) -> None:
    """Registers `name`; `defaults` are passed to `builder` and may be overridden in `create`."""
    if name in _REGISTRY:
        raise ValueError(f"Model {name!r} is registered twice")
    module_class = module_class or builder
    _REGISTRY[name] = ModelEntry(builder, module_class, family, dict(defaults), tuple(extra_args))


def module_fields(module_class: type) -> Tuple[str, ...]:
    """Returns the constructor fields of a linen Module class (its valid overrides)."""
    return tuple(f.name for f in dataclasses.fields(module_class) if f.name not in ("parent", "name") and f.init)


def registry() -> Dict[str, ModelEntry]:
    """Returns the registry dict (name -> ModelEntry)."""
    return _REGISTRY
