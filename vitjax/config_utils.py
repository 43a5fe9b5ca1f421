"""Run configs: the `file.py:ARGS` argument parser, the defaults of every key, and the validator.

A config file is `get_config(arg=None)` returning an `ml_collections.ConfigDict`. It starts from
`default_config()` so that every key exists (and can be overridden with `--config.KEY=VALUE`),
then sets what its recipe needs. `validate_config` rejects unknown keys and bad values with a
message that lists the valid choices; `vitjax.main` runs it before anything is built.

Layout (the keys `default_config()` defines; see configs/digits_vit.py for a worked example):

  seed                    int; the one seed of the run (params init, dropout, data order).
  model_name              a name of `vitjax.models.list_models()`.
  model                   overrides passed to `vitjax.models.create(model_name, **model)`;
                          `dtype: "bfloat16"` computes in bf16 while params stay fp32.
  objective               a name of `vitjax.objectives.list_objectives()`.
  objective_kwargs        the objective's own settings (each objective validates them).
  input                   the data-pipeline config (validated by `vitjax.data.validate_input_config`).
  batch_size              global train batch size (all hosts, all devices).
  eval_batch_size         global eval batch size; None -> batch_size.
  total_steps | total_epochs   exactly one; epochs count `num_train_examples / batch_size` steps.
  optim.*                 see `vitjax.optim.make_optimizer`. `optim.no_decay`: None (default) leaves
                          the model's `no_weight_decay()` regexes undecayed; a tuple of regexes replaces
                          them (e.g. `()` to decay tokens too, as MAE pretraining). 1-D params and biases
                          are never decayed. `optim.layer_decay` numbers params by the model's `layer_ids`.
  mesh.{data,fsdp,model}  device-mesh axis sizes; one may be -1 (fills the remaining devices).
  sharding_rules          (logical axis name, mesh axes) pairs, in priority order.
  ema_decay               0 (off) or d in (0, 1): keep ema = d * ema + (1 - d) * params after every
                          step (timm's ModelEma; e.g. 0.99996); evaluations then also report <name>_ema/*.
  init_from               pretrained weights for a new run (never re-applied on resume): a vitjax
                          workdir (`PATH@STEP` for a step), a `.msgpack` from `vitjax.convert`, a timm /
                          torch `.pth` / `.bin` / `.safetensors`, or an official MAE `.pth`; see
                          `vitjax.weights`. init_from_skip / init_from_keep: regexes of param paths to
                          leave at their initialisation / to load exclusively.
  adapt                   parameter-efficient adaptation (`vitjax.adapt`): method None (default: train as the
                          objective says) or "lora" | "vpt" | "adapter" | "hst" | "dvpt", and every method's
                          settings (rank, alpha, dropout, targets; num_tokens, deep, prompt_dropout; bottleneck,
                          scale, adapter_dropout; side_*, meta_tokens; meta_dim: `vitjax.adapt.SECTION_DEFAULTS`);
                          only the method's params and `adapt.train` regexes (the head)
                          are trained, and checkpoints hold only those (the rest comes from init_from).
  evals                   {name: evaluator settings}; empty: one classification evaluator "eval" on
                          input.eval_split with input.pp_eval. See `vitjax.evaluate.evaluators`.
  log_every_steps, eval_every_steps, checkpoint_every_steps (0 -> only at the end), keep_checkpoints,
  checkpoint_async, progress_bar.

`get_config` is pure: it reads no file and raises nothing about data; a dataset that is not prepared
is reported when the run starts. `load_config("configs/FILE.py:ARGS")` loads a config file the way
`vitjax.main` does (tests, experiments and notebooks use it too).

Pieces the configs share: `imagenet_input` (the DeiT-style ImageNet input: inception crop, flip,
RandAugment, mixup / cutmix, ...), `digits_input` and `runlocal_schedule` (the short CPU run on the
bundled digits that every ImageNet config offers as `runlocal`).
"""
import ast
import importlib.util
import json
import math
import os
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional

import ml_collections
from ml_collections import config_dict

OPTIMIZERS = ("adamw", "sgd", "lars", "lamb", "sam")
SCHEDULES = ("cosine", "linear", "constant")
MESH_AXES = ("data", "fsdp", "model")

# Logical axis names used by the models -> mesh axes. Earlier rules win, and a mesh axis is used
# once per array (flax resolves conflicts, e.g. an activation `(batch, length, embed)` keeps fsdp
# for `batch` and leaves `embed` unsharded).
DEFAULT_SHARDING_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("vocab", "model"),
    ("kv", None),
    ("classes", None),
    ("length", None),
    ("layers", None),
)

# Sub-dicts whose keys are owned by someone else (model registry, objective, data pipeline):
# the validator checks only that they are dicts, their owners check their keys.
_OPEN_SECTIONS = ("model", "objective_kwargs", "input", "evals")

# Keys a resumed run may change without being a different run: its length and its cadences.
RUN_LENGTH_KEYS = ("total_steps", "total_epochs", "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                   "keep_checkpoints", "checkpoint_async", "progress_bar")


def default_config() -> ml_collections.ConfigDict:
    """Returns a ConfigDict holding every key of a run config at its default value."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model_name = "vit"
    config.model = ml_collections.ConfigDict()
    config.objective = "supervised"
    config.objective_kwargs = ml_collections.ConfigDict()
    config.input = ml_collections.ConfigDict()
    config.batch_size = 256
    config.eval_batch_size = config_dict.placeholder(int)
    config.total_steps = config_dict.placeholder(int)
    config.total_epochs = config_dict.placeholder(float)

    optim = ml_collections.ConfigDict()
    optim.name = "adamw"
    optim.lr = config_dict.placeholder(float)    # absolute peak learning rate, or ...
    optim.blr = config_dict.placeholder(float)   # ... base lr: lr = blr * batch_size / 256
    optim.min_lr = 0.0                            # end value of cosine / linear decay
    optim.warmup_init_lr = 0.0
    optim.schedule = "cosine"
    optim.warmup_steps = config_dict.placeholder(int)
    optim.warmup_epochs = config_dict.placeholder(float)
    optim.weight_decay = 0.0
    optim.b1 = 0.9
    optim.b2 = 0.999
    optim.eps = 1e-8
    optim.momentum = 0.9                          # sgd, lars
    optim.nesterov = False
    optim.trust_coefficient = 0.001               # lars (lamb uses 1.0, as its paper)
    optim.mu_dtype = config_dict.placeholder(str)  # e.g. "bfloat16" to halve adam's first moment
    optim.clip_grad_norm = config_dict.placeholder(float)
    optim.layer_decay = config_dict.placeholder(float)  # e.g. 0.65 (MAE fine-tuning of ViT-B)
    optim.grad_accum_steps = 1
    optim.frozen = ()                             # regexes of param paths ("a/b/kernel") not trained
    optim.lr_mult = ()                            # ((regex, multiplier), ...): those params' lr times multiplier
    optim.no_decay = config_dict.placeholder(tuple)  # None: the model's no_weight_decay(); else these regexes
    optim.sam_base = "adamw"                      # sam: the optimizer it wraps (any other name)
    optim.sam_rho = 0.05                          # sam: radius of the ascent step
    optim.sam_adaptive = False                    # sam: ASAM's scale-invariant ascent
    optim.sam_eta = 0.01                          # sam (adaptive): the offset of |w| in ASAM's scaling
    optim.sam_same_batch = True                   # sam: both gradients on one batch per step (the paper);
                                                  # False: ascent and descent on consecutive batches, half the cost
    # Sparse then prune (vitjax.quant.sparsity): None, or dict(l1=2e-4, prune_step=N, target=0.7, scope="global").
    optim.sparsity = None
    config.optim = optim

    config.ema_decay = 0.0                # 0: no EMA of the params

    config.init_from = config_dict.placeholder(str)  # pretrained weights for a new run (vitjax.weights)
    config.init_from_skip = ()            # regexes of param paths kept at their initialisation
    config.init_from_keep = ()            # regexes: when given, only matching params are loaded
    config.evals = ml_collections.ConfigDict()  # {name: evaluator}; empty: classification on input.eval_split
    from vitjax.adapt.base import SECTION_DEFAULTS  # light: flax and jax only
    config.adapt = ml_collections.ConfigDict(dict(SECTION_DEFAULTS))
    config.adapt.method = config_dict.placeholder(str)

    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
    config.sharding_rules = DEFAULT_SHARDING_RULES

    config.log_every_steps = 50
    config.eval_every_steps = 0          # 0: evaluate only at the end
    config.checkpoint_every_steps = 1000  # 0: checkpoint only at the end
    config.keep_checkpoints = 3
    config.checkpoint_async = True
    config.progress_bar = True
    return config


_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve_config_path(path: str) -> str:
    """Returns `path` as given if it exists, else relative to the vitjax checkout (so "configs/x.py" works anywhere)."""
    if os.path.exists(path) or os.path.isabs(path):
        return path
    in_repo = os.path.join(_REPO_ROOT, path)
    return in_repo if os.path.exists(in_repo) else path


def load_config(spec: str, overrides: Optional[Mapping[str, Any]] = None) -> ml_collections.ConfigDict:
    """Returns get_config(ARGS) of a config file given as "path/to/file.py[:ARGS]", with dotted-key `overrides`.

    The same as `--config=path/to/file.py:ARGS --config.KEY=VALUE` on the command line: a relative path is
    taken from the working directory, else from the vitjax checkout. An override of a key the config does
    not have raises ValueError naming the valid keys.
    """
    path, _, arg = spec.partition(":")
    resolved = resolve_config_path(path)
    if not os.path.isfile(resolved):
        raise FileNotFoundError(f"No config file {path!r} (looked in {os.getcwd()} and {_REPO_ROOT}); "
                                f"configs: {sorted(os.listdir(os.path.join(_REPO_ROOT, 'configs')))}")
    module_spec = importlib.util.spec_from_file_location(
        "vitjax_config_" + os.path.splitext(os.path.basename(resolved))[0], resolved)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"Config file {resolved} defines no get_config(arg=None)")
    config = module.get_config(arg) if arg else module.get_config()
    for key, value in (overrides or {}).items():
        set_key(config, key, value)
    return config


def set_key(config: ml_collections.ConfigDict, dotted_key: str, value: Any) -> None:
    """Sets config[a][b][c] = value for "a.b.c"; raises ValueError naming the valid keys where one is missing."""
    node, walked = config, []
    *parents, leaf = dotted_key.split(".")
    for key in parents:
        if not hasattr(node, "keys") or key not in node:
            where = f"config.{'.'.join(walked)}" if walked else "config"
            raise ValueError(f"{where} has no key {key!r}; valid keys: "
                             f"{sorted(node.keys()) if hasattr(node, 'keys') else []}")
        node, walked = node[key], walked + [key]
    if leaf not in node and not (walked and walked[0] in _OPEN_SECTIONS):
        where = f"config.{'.'.join(walked)}" if walked else "config"
        raise ValueError(f"{where} has no key {leaf!r}; valid keys: {sorted(node.keys())}")
    node[leaf] = value


def config_as_json(config) -> Dict[str, Any]:
    """Returns the config as the plain JSON data `config.json` holds (tuples as lists)."""
    text = config.to_json_best_effort() if isinstance(config, ml_collections.ConfigDict) else json.dumps(
        config, default=str)
    return json.loads(text)


def config_diff(saved: Mapping[str, Any], new: Mapping[str, Any], ignore: Iterable[str] = RUN_LENGTH_KEYS
                ) -> List[str]:
    """Returns one line per key whose value differs ("key: saved -> new"), keys in `ignore` (and cadences) left out.

    Both sides are JSON data (`config_as_json`); an evaluator's `every_steps` counts as cadence.
    """
    ignore = set(ignore)
    lines: List[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for key in sorted(set(a) | set(b)):
                name = f"{prefix}{key}"
                if name in ignore or (prefix.startswith("evals.") and key == "every_steps"):
                    continue
                if key not in a:
                    lines.append(f"{name}: (absent) -> {json.dumps(b[key])}")
                elif key not in b:
                    lines.append(f"{name}: {json.dumps(a[key])} -> (absent)")
                else:
                    walk(a[key], b[key], f"{name}.")
        elif a != b:
            lines.append(f"{prefix[:-1]}: {json.dumps(a)} -> {json.dumps(b)}")

    walk(dict(saved), dict(new), "")
    return lines


def parse_arg(arg: Optional[str], *, choices: Optional[Mapping[str, Iterable]] = None,
              **spec) -> ml_collections.ConfigDict:
    """Returns the typed ConfigDict parsed from a `key=value,flag` string, with `spec` as defaults.

    As big_vision's `parse_arg`: `"variant=B/16,runlocal"` with `spec = dict(variant="S/16",
    runlocal=False)` gives `variant="B/16", runlocal=True`. Values take the type of their default;
    a bare name sets a bool to True. Unknown names and values outside `choices[name]` raise a
    ValueError listing the valid ones.
    """
    result = ml_collections.ConfigDict(dict(spec))
    choices = dict(choices or {})
    for name in choices:
        if name not in spec:
            raise ValueError(f"choices given for {name!r}, which is not an argument of {sorted(spec)}")
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, has_value, text = item.partition("=")
        name = name.strip()
        if name not in spec:
            raise ValueError(f"Unknown config argument {name!r} in {arg!r}; valid arguments: "
                             f"{', '.join(f'{k}={v!r}' for k, v in spec.items())}")
        default = spec[name]
        if not has_value:
            if not isinstance(default, bool):
                raise ValueError(f"Config argument {name!r} needs a value ({name}=...); "
                                 f"only booleans may be given bare.")
            value = True
        else:
            value = _convert(name, text.strip(), default)
        if name in choices and value not in tuple(choices[name]):
            raise ValueError(f"Config argument {name}={value!r} is not valid; valid choices: "
                             f"{list(choices[name])}")
        result[name] = value
    for name, valid in choices.items():
        if result[name] not in tuple(valid):
            raise ValueError(f"Default {name}={result[name]!r} not in its choices {list(valid)}")
    return result


def _convert(name: str, text: str, default: Any) -> Any:
    """Returns `text` converted to the type of `default`."""
    if isinstance(default, bool):
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"Config argument {name}={text!r}: expected a boolean (true/false)")
    if isinstance(default, (int, float)):
        try:
            return type(default)(text) if isinstance(default, float) else int(text)
        except ValueError:
            raise ValueError(f"Config argument {name}={text!r}: expected {type(default).__name__}") from None
    if default is None:
        try:  # an untyped argument: a Python literal if it parses as one, else the string
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    return text


def _to_dict(config) -> Dict[str, Any]:
    """Returns a plain nested dict of a ConfigDict (or mapping)."""
    if isinstance(config, ml_collections.ConfigDict):
        return config.to_dict()
    return dict(config)


def validate_config(config) -> ml_collections.ConfigDict:
    """Returns the config merged onto `default_config()`; raises ValueError on an unknown key or bad value.

    Checks only what is knowable without building anything: keys, enumerations, signs and the
    consistency of sizes that do not depend on the device count (see `train.py` for those).
    """
    user = _to_dict(config)
    defaults = default_config()
    _check_keys(user, defaults.to_dict(), prefix="")

    merged = defaults.to_dict()
    for key, value in user.items():
        if isinstance(merged.get(key), dict) and key not in _OPEN_SECTIONS:
            if not isinstance(value, Mapping):
                raise ValueError(f"config.{key} must be a dict with keys {sorted(merged[key])}, got {value!r}")
            merged[key].update(value)
        else:
            merged[key] = value
    for key in _OPEN_SECTIONS:
        if merged[key] is None:
            merged[key] = {}
        if not isinstance(merged[key], Mapping):
            raise ValueError(f"config.{key} must be a dict, got {merged[key]!r}")

    optim = merged["optim"]
    _check_choice("optim.name", optim["name"], OPTIMIZERS)
    _check_choice("optim.schedule", optim["schedule"], SCHEDULES)
    if optim["name"] == "sam":
        _check_choice("optim.sam_base", optim["sam_base"], tuple(name for name in OPTIMIZERS if name != "sam"))
        if not optim["sam_rho"] > 0:
            raise ValueError(f"config.optim.sam_rho must be positive, got {optim['sam_rho']}")
        if not isinstance(optim.get("sam_same_batch", True), bool):
            raise ValueError(f"config.optim.sam_same_batch must be True or False, got {optim['sam_same_batch']!r}")
    if (optim["lr"] is None) == (optim["blr"] is None):
        raise ValueError("Set exactly one of config.optim.lr (absolute) and config.optim.blr "
                         f"(lr = blr * batch_size / 256); got lr={optim['lr']}, blr={optim['blr']}")
    if optim["warmup_steps"] is not None and optim["warmup_epochs"] is not None:
        raise ValueError("Set at most one of config.optim.warmup_steps and config.optim.warmup_epochs")
    if optim["layer_decay"] is not None and not 0.0 < optim["layer_decay"] <= 1.0:
        raise ValueError(f"config.optim.layer_decay must be in (0, 1], got {optim['layer_decay']}")
    if int(optim["grad_accum_steps"]) < 1:
        raise ValueError(f"config.optim.grad_accum_steps must be >= 1, got {optim['grad_accum_steps']}")
    if optim["mu_dtype"] is not None:
        _check_choice("optim.mu_dtype", optim["mu_dtype"], ("float32", "bfloat16", "float16"))
    for key in ("frozen", "no_decay"):
        if isinstance(optim[key], str):
            raise ValueError(f"config.optim.{key} must be a list of regexes, got the string {optim[key]!r}")
    if optim["no_decay"] is not None:
        for pattern in optim["no_decay"]:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as error:
                raise ValueError(f"config.optim.no_decay holds {pattern!r}, not a regex: {error}; give a tuple of "
                                 "regexes, or None for the model's no_weight_decay()") from None

    if (merged["total_steps"] is None) == (merged["total_epochs"] is None):
        raise ValueError("Set exactly one of config.total_steps and config.total_epochs; got "
                         f"total_steps={merged['total_steps']}, total_epochs={merged['total_epochs']}")
    for key in ("batch_size", "total_steps", "total_epochs", "eval_batch_size"):
        if merged[key] is not None and merged[key] <= 0:
            raise ValueError(f"config.{key} must be positive, got {merged[key]}")
    if merged["batch_size"] % int(optim["grad_accum_steps"]):
        raise ValueError(f"config.batch_size={merged['batch_size']} is not divisible by "
                         f"config.optim.grad_accum_steps={optim['grad_accum_steps']}")
    for key in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
        if merged[key] < 0:
            raise ValueError(f"config.{key} must be >= 0, got {merged[key]}")
    if merged["log_every_steps"] == 0:
        raise ValueError("config.log_every_steps must be >= 1")
    ema_decay = merged["ema_decay"]
    if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) or not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"config.ema_decay must be 0 (off) or in (0, 1), e.g. 0.99996; got {ema_decay!r}")
    if merged["init_from"] is not None and (not isinstance(merged["init_from"], str) or not merged["init_from"]):
        raise ValueError(f"config.init_from must be a path (or None), got {merged['init_from']!r}")
    for key in ("init_from_skip", "init_from_keep"):
        if isinstance(merged[key], str):
            raise ValueError(f"config.{key} must be a list of regexes, got the string {merged[key]!r}")
    if merged["keep_checkpoints"] < 1:
        raise ValueError(f"config.keep_checkpoints must be >= 1, got {merged['keep_checkpoints']}")

    mesh = merged["mesh"]
    sizes = [int(mesh[axis]) for axis in MESH_AXES]
    if sizes.count(-1) > 1 or any(size == 0 or size < -1 for size in sizes):
        raise ValueError(f"config.mesh sizes must be positive, with at most one -1; got {dict(mesh)}")
    rules = merged["sharding_rules"]
    for rule in rules:
        if len(rule) != 2:
            raise ValueError(f"config.sharding_rules entries are (logical_name, mesh_axes) pairs; got {rule!r}")
        mesh_axes = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
        for axis in mesh_axes:
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(f"config.sharding_rules maps {rule[0]!r} to unknown mesh axis {axis!r}; "
                                 f"valid mesh axes: {list(MESH_AXES)}")

    import vitjax.objectives as objectives  # light: the objective modules load lazily
    _check_choice("objective", merged["objective"], objectives.list_objectives())
    _check_adapt(merged)

    result = ml_collections.ConfigDict(merged)
    return result


def _check_adapt(merged: Dict[str, Any]) -> None:
    """Raises ValueError when config.adapt names an unknown method or bad settings (see vitjax.adapt)."""
    from vitjax import adapt
    section = merged["adapt"]
    if section.get("method") is not None:
        _check_choice("adapt.method", section["method"], adapt.list_methods())
    train = section.get("train")
    if isinstance(train, str) or not isinstance(train, (tuple, list)):
        raise ValueError(f"config.adapt.train must be a tuple of regexes, got {train!r}")
    for pattern in train:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as error:
            raise ValueError(f"config.adapt.train holds {pattern!r}, not a regex: {error}") from None
    method = adapt.parse(section)
    if method is not None and not merged.get("init_from"):
        raise ValueError(f"config.adapt.method={method.name!r} trains a few params of a pretrained model and "
                         "checkpoints only those: set config.init_from to the base weights")


def _check_keys(user: Mapping, defaults: Mapping, prefix: str) -> None:
    """Raises ValueError naming the first key of `user` absent from `defaults`."""
    for key, value in user.items():
        name = f"{prefix}{key}"
        if key not in defaults:
            raise ValueError(f"Unknown config key {name!r}; valid keys"
                             f"{' under ' + repr(prefix[:-1]) if prefix else ''}: {sorted(defaults)}")
        if isinstance(defaults[key], dict) and key not in _OPEN_SECTIONS and isinstance(value, Mapping):
            _check_keys(value, defaults[key], prefix=f"{name}.")


def _check_choice(name: str, value: Any, valid: Iterable) -> None:
    """Raises ValueError if `value` is not one of `valid`."""
    valid = list(valid)
    if value not in valid:
        raise ValueError(f"config.{name}={value!r} is not valid; valid choices: {valid}")


# ----------------------------------------------------------------------------------------------
# Pieces shared by the configs in configs/ (no TensorFlow here: `import vitjax` stays light).

# The encoder of configs/mae_b16.py:runlocal (digits 8x8 gray, 2x2 patches); configs/mae_finetune_b16.py
# and configs/mae_linprobe_b16.py build the same one so that their runlocal can load its checkpoint.
MAE_RUNLOCAL_ENCODER = dict(variant="mu/2", img_size=8, in_chans=1, embed_dim=64, depth=2, num_heads=4,
                            mlp_dim=128)


def imagenet_input(data_dir: Optional[str], *, image_size: int = 224, crop_pct: float = 0.875,
                   crop_scale: Optional[tuple] = None, interpolation: Optional[str] = "bicubic",
                   randaug: Optional[str] = None, normalize: str = "normalize()",
                   label_smoothing: Optional[float] = None, mixup: Optional[float] = None, cutmix: float = 0.0,
                   random_erasing: Optional[float] = None, repeated_augmentation: int = 1) -> Dict[str, Any]:
    """Returns the `config.input` dict of an ImageNet-1k (TFDS imagenet2012) run, timm / DeiT style.

    `data_dir` None: $TFDS_DATA_DIR or ~/tensorflow_datasets, resolved when the run starts.

    Train: random-resized (inception) crop to `image_size` (area in `crop_scale`, default the op's
    (0.08, 1)) | flip | the `randaug` op if given (e.g. "randaug(2, 9, magnitude_std=0.5, increasing=True)",
    timm's "rand-m9-mstd0.5-inc1") | `normalize` (the op mapping uint8 pixels to the model's inputs).
    Eval: resize the shorter side to floor(image_size / crop_pct) | centre crop `image_size` | `normalize`.
    Both resize with `interpolation` (antialiased), or the ops' default where None.
    `label_smoothing`, `mixup` (alpha; with `cutmix`, the cutmix alpha: timm's Mixup with prob 1 and
    switch_prob 0.5 where both are on) and `random_erasing` (probability) are left out where None.
    `repeated_augmentation` > 1: each image that many times in a row, differently augmented (DeiT's RA).
    """
    method = f"method='{interpolation}', antialias=True" if interpolation else ""
    crop_args = ", ".join(arg for arg in (str(image_size), crop_scale and f"scale={crop_scale}", method) if arg)
    resize_args = ", ".join(arg for arg in (str(math.floor(image_size / crop_pct)), method) if arg)
    augment = f"|{randaug}" if randaug else ""
    config = dict(
        dataset="imagenet2012",
        data_dir=data_dir,
        train_split="train",
        eval_split="validation",
        pp_train=f"decode_jpeg_and_inception_crop({crop_args})|flip_lr{augment}|{normalize}",
        pp_eval=f"decode|resize_small({resize_args})|central_crop({image_size})|{normalize}",
    )
    if label_smoothing is not None:
        config["label_smoothing"] = label_smoothing
    if mixup is not None:
        switch_prob = 0.5 if mixup > 0 and cutmix > 0 else 0.0  # used only where both are on
        config["mixup"] = dict(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=1.0, switch_prob=switch_prob)
    if random_erasing is not None:
        config["random_erasing"] = random_erasing
    if repeated_augmentation != 1:
        config["repeated_augmentation"] = repeated_augmentation
    return config


def digits_input(image_size: int = 8, *, padding: int = 0,
                 label_smoothing: Optional[float] = None) -> Dict[str, Any]:
    """Returns the `config.input` dict of a run on the bundled 8x8 gray digits (train / test, CPU).

    Images are resized to `image_size` (where not 8), randomly shifted in training by up to
    `padding` pixels (random_crop with zero padding; 0: no shifts), and mapped to [-1, 1].
    `label_smoothing` is left out where None.
    """
    resize = f"|resize({image_size})" if image_size != 8 else ""
    shift = f"|random_crop({image_size}, padding={padding})" if padding else ""
    config = dict(dataset="digits", train_split="train", eval_split="test",
                  pp_train=f"decode(channels=1){resize}{shift}|value_range(-1, 1)",
                  pp_eval=f"decode(channels=1){resize}|value_range(-1, 1)")
    if label_smoothing is not None:
        config["label_smoothing"] = label_smoothing
    return config


def runlocal_schedule(config: ml_collections.ConfigDict, *, batch_size: int = 64, total_steps: int = 100,
                      warmup_steps: int = 10, log_every_steps: int = 10) -> None:
    """Shrinks `config`'s run to `total_steps` steps on a CPU (a config's `runlocal`), in place.

    Sets the batch size, the step count with `warmup_steps` of warmup (no epochs), eval batches of 120
    (the digits' 360 test images in 3), evaluation and checkpointing only at the end, one checkpoint kept.
    The model, input and learning rate are the config's to shrink.
    """
    config.batch_size = batch_size
    config.eval_batch_size = 120
    config.total_epochs = None
    config.total_steps = total_steps
    config.optim.warmup_epochs = None
    config.optim.warmup_steps = warmup_steps
    config.log_every_steps = log_every_steps
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 0
    config.keep_checkpoints = 1
