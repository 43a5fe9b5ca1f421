"""The adaptation interface: a registry of methods, each a frozen dataclass the model calls at fixed points.

    model = vitjax.models.create("vit_base_patch16_224", adapt=dict(method="lora", rank=8, alpha=16))

A `Method` validates its settings (`parse`, before anything is built) and gives the model seven hooks, each
a no-op by default, so a model with the hook knows only this interface:

  intercept(train)                a context the model's whole forward runs in (LoRA wraps matching Dense layers);
  after_embed(x, info, train)     the token sequence after embedding (VPT inserts its prompts after the prefix)
                                  and a carry for the blocks (deep VPT's per-layer prompts);
  before_block(x, index, carry)   the tokens entering block `index` (deep VPT replaces the previous prompts);
  after_block(x, index, carry)    the tokens leaving block `index` and the carry (HST takes its meta tokens out);
  mlp_branch(x, train)            called by each block on its residual stream before the MLP: a parallel
                                  branch added to the MLP's output (AdaptFormer), or None;
  after_blocks(x, info)           the tokens after the last block (VPT removes its prompts before pooling);
  pooled(images, carry, info)     features replacing the pooled tokens before the head (HST's side network), or None.

Each method names its own parameters (`param_patterns`, regexes over "/"-joined param paths): with the
`train` regexes of the config (the classifier head by default) they are what the optimizer trains; every
other parameter is frozen and has no optimizer state (`trained_patterns`).
"""
import contextlib
import dataclasses
import math
from typing import Any, ClassVar, Dict, Mapping, NamedTuple, Optional, Tuple, Type

import jax
import jax.numpy as jnp

_METHODS: Dict[str, Type["Method"]] = {}

# Trained beside the adaptation parameters unless the config says otherwise: the classifier head(s).
DEFAULT_TRAIN = (r"^head(_dist)?/",)


def torch_linear_uniform(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """Returns U(+-1/sqrt(fan_in)) for an (in, out) matrix: torch's Linear default (kaiming-uniform, a = sqrt(5))."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def register(cls: Type["Method"]) -> Type["Method"]:
    """Returns `cls` after registering it under `cls.name` (a class decorator)."""
    if cls.name in _METHODS:
        raise ValueError(f"Adaptation method {cls.name!r} is registered twice")
    _METHODS[cls.name] = cls
    return cls


def list_methods() -> Tuple[str, ...]:
    """Returns the registered method names, sorted."""
    return tuple(sorted(_METHODS))


def method_options(name: str) -> Tuple[str, ...]:
    """Returns the settings (field names) of method `name`."""
    return tuple(field.name for field in dataclasses.fields(get_method(name)))


def get_method(name: str) -> Type["Method"]:
    """Returns the Method class registered as `name`; raises ValueError listing the valid names."""
    if name not in _METHODS:
        raise ValueError(f"Unknown adaptation method {name!r}; valid choices: {list(list_methods())} (or None)")
    return _METHODS[name]


@dataclasses.dataclass(frozen=True)
class Method:
    """Base of the adaptation methods: frozen (hashable, a static model field) and validated on creation."""
    name: ClassVar[str] = ""
    #: Regexes of this method's own parameter paths (trained).
    param_patterns: ClassVar[Tuple[str, ...]] = ()
    #: Whether the method runs under `nn.scan` of the blocks.
    scannable: ClassVar[bool] = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raises ValueError when a setting is out of range (subclasses check theirs)."""

    def check_model(self, depth: int, num_prefix_tokens: int, scan: bool, token_reduction: bool) -> None:
        """Raises ValueError when this method cannot adapt a model of this shape."""
        if scan and not self.scannable:
            raise ValueError(f"Adaptation {self.name!r} needs scan=False: its per-layer hooks index the blocks")

    def intercept(self, train: bool):
        """Returns the context the model's forward runs in (none here)."""
        return contextlib.nullcontext()

    def after_embed(self, x: jax.Array, info: "ModelInfo", train: bool) -> Tuple[jax.Array, Any]:
        """Returns (the embedded tokens as the blocks should see them, a carry handed to every `before_block`)."""
        return x, None

    def before_block(self, x: jax.Array, index: int, carry: Any, info: "ModelInfo", train: bool) -> jax.Array:
        """Returns the tokens entering block `index`."""
        return x

    def after_block(self, x: jax.Array, index: int, carry: Any, info: "ModelInfo",
                    train: bool) -> Tuple[jax.Array, Any]:
        """Returns (the tokens leaving block `index`, the carry handed to the next block)."""
        return x, carry

    def mlp_branch(self, x: jax.Array, train: bool) -> Optional[jax.Array]:
        """Returns a branch added beside a block's MLP (computed from the residual stream `x`), or None."""
        return None

    def after_blocks(self, x: jax.Array, info: "ModelInfo") -> jax.Array:
        """Returns the tokens after the last block as the pooling should see them."""
        return x

    def pooled(self, images: jax.Array, carry: Any, info: "ModelInfo", train: bool) -> Optional[jax.Array]:
        """Returns features (B, D) the head takes instead of the model's pooled tokens, or None (pool as usual)."""
        return None


class ModelInfo(NamedTuple):
    """What a hook may need to know of the model: prefix tokens (cls, dist), depth, values per patch (C * p * p),
    the patch grid (h, w)."""
    num_prefix: int
    depth: int
    patch_dim: int
    grid: Tuple[int, int] = (0, 0)


def parse(settings: Any) -> Optional[Method]:
    """Returns the Method of `settings` (a Method, a dict with "method", or None / method None: no adaptation).

    Keys the method does not take are rejected, except the config section's shared keys set to their
    defaults (the run config holds every method's settings so each can be given on the command line).
    """
    if settings is None or isinstance(settings, Method):
        return settings
    if hasattr(settings, "to_dict"):  # an ml_collections ConfigDict (the run config's section)
        settings = settings.to_dict()
    if not isinstance(settings, Mapping):
        raise ValueError(f"adapt must be a dict with a 'method' key, a vitjax.adapt.Method or None; got {settings!r}")
    settings = dict(settings)
    name = settings.pop("method", None)
    if name is None:
        return None
    cls = get_method(name)
    own = set(method_options(name))
    extra = sorted(key for key in settings if key not in own and key not in SECTION_DEFAULTS)
    if extra:
        raise ValueError(f"Unknown adapt settings {extra} for method {name!r}; valid keys: {sorted(own)}")
    changed_foreign = sorted(key for key in settings if key not in own and key != "train"
                             and _as_plain(settings[key]) != _as_plain(SECTION_DEFAULTS[key]))
    if changed_foreign:
        raise ValueError(f"adapt.{changed_foreign[0]} does not apply to method {name!r} (its settings: "
                         f"{sorted(own)}); leave it at its default {SECTION_DEFAULTS[changed_foreign[0]]!r}")
    kwargs = {key: (tuple(value) if isinstance(value, list) else value)
              for key, value in settings.items() if key in own}
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ValueError(f"Bad settings for adaptation {name!r}: {error}; valid keys: {sorted(own)}") from None


def _as_plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


# The run config's `adapt` section: every method's settings, at these defaults (`config_utils.default_config`).
SECTION_DEFAULTS: Dict[str, Any] = dict(
    method=None,            # None (no adaptation) or a name of list_methods()
    rank=8,                 # lora: rank r of A (in, r) and B (r, out)
    alpha=8.0,              # lora: the update is (alpha / r) B A x, as peft's lora_alpha
    dropout=0.0,            # lora: dropout on the LoRA branch's input (peft's lora_dropout)
    targets=("qkv",),       # lora: regexes over Dense module paths, e.g. "blocks_0/attn/qkv"
    num_tokens=10,          # vpt: prompt tokens per layer
    deep=False,             # vpt: fresh prompts before every block (VPT-deep), else only at the input
    prompt_dropout=0.0,     # vpt: dropout on the prompts
    bottleneck=64,          # adapter: hidden width of the down / up projection
    scale=0.1,              # adapter: its output is multiplied by this (AdaptFormer's s)
    adapter_dropout=0.1,    # adapter: dropout after the ReLU
    side_dims=(32, 48, 64, 72),   # hst: widths of the 4 side stages
    side_heads=(2, 4, 8, 12),     # hst: attention heads of the side stages
    side_depths=(),               # hst: backbone layers per side stage (sum = depth); (): an even split
    meta_tokens=1,                # hst: meta tokens per layer
    side_mlp_ratio=4.0,           # hst: side MLP width / stage width (the official code: the backbone's ratio)
    meta_dim=16,                  # dvpt: the Meta-Net's bottleneck width (its prompts: num_tokens, deep)
    train=DEFAULT_TRAIN,    # regexes of other params trained beside the method's own (the head)
)


def trained_patterns(method: Optional[Method], train: Tuple[str, ...] = DEFAULT_TRAIN) -> Tuple[str, ...]:
    """Returns the regexes of the trained params of an adapted model (the method's own and `train`), () without."""
    if method is None:
        return ()
    return tuple(method.param_patterns) + tuple(train)
