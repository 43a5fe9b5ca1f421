"""Pretrained weights into a run: every source is read here, and fitted to the model by explicit rules.

    pretrained = weights.load("vit_tiny.pth", model_name="vit_tiny_patch16_224",
                              model_overrides=dict(img_size=64, num_classes=10))
    plan = weights.plan(abstract_variables, pretrained, weights.Rules(posemb_prefix=1))
    print(plan.table())                       # loaded / resampled / re-initialised / skipped, with counts
    variables = plan.apply(fresh_variables)   # numpy where loaded, the fresh values elsewhere

The trainer does this once for a new run with `config.init_from` (never on resume); objectives add
their own rules (`Objective.init_from_rules`), e.g. MAE fine-tuning fills learned position embeddings
from the encoder's fixed sin-cos table. Nothing here imports TensorFlow; PyTorch only to read `.pth`.

Sources (`init_from`, a path; `PATH@STEP` picks a step of a vitjax run):
  * a vitjax workdir, its `checkpoints/` or one `checkpoints/<step>` directory: the params (and other
    model collections, e.g. batch_stats) of that step, read by orbax partial restore: no optimizer
    state is read. A run that pretrained an encoder (MAE) offers its `encoder` subtree.
  * a `.msgpack` file or an orbax variables directory written by `python -m vitjax.convert`.
  * a timm / PyTorch checkpoint (`.pth`, `.pt`, `.bin`, `.safetensors`), converted on the fly for the
    run's model (`vitjax.convert.from_timm`, position embeddings resampled to the run's image size);
  * an official MAE checkpoint (`.pth` with MAE's keys: with decoder, encoder-only or fine-tuned).
  * an open_clip CLIP or transformers SigLIP checkpoint, converted to vitjax's CLIP (its architecture read
    from the shapes); a ViT classifier takes its image tower (the `visual` subtree) and re-initialises its
    head: `CLIP.classifier_settings(num_classes)` gives the matching `vit` settings.

Rules, for each target parameter, in this order:
  1. matches `skip`, or `keep` is given and it matches none of it  -> "skipped" (keeps its initial value)
  2. in the checkpoint with the same shape                           -> "loaded"
  3. a position embedding (`pos_embed`) of another length            -> "resampled" (bicubic, as timm)
  4. a classifier head (`head*`) of another class count, or absent   -> "re-initialised"
  5. absent, but the objective fills it (`fill`) or allows it (`optional`) -> "filled" / "re-initialised"
A target parameter that fits none of these is an error naming the keys and shapes; so is a checkpoint
parameter with no place in the target, unless it is a classifier the target lacks (a feature
extractor), matches `skip`, or the objective expects to drop it (`ignore`, e.g. MAE's final norm when
fine-tuning with global pooling). Non-param collections (batch_stats) are loaded where they fit.
"""
import dataclasses
import json
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import flax
import jax
import numpy as np

from vitjax import pytree
from vitjax.pytree import path_to_str

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
VARIABLES_SUFFIXES = (".msgpack",)
_CLASSIFIER = re.compile(r"^head(_dist|_\d+)?(/|$)")
_POSEMB = re.compile(r"(^|/)pos_embed(_\d+)?$")
_HEAD_KEYS = re.compile(r"^head(_dist)?(\.(fc|linear|l|\d+))?\.weight$")

ACTIONS = ("loaded", "resampled", "filled", "re-initialised", "skipped", "dropped")


# =============================================================================================
# Sources
# =============================================================================================
@dataclasses.dataclass
class Pretrained:
    """Weights read from a source: flax variables (numpy leaves) and what the source says about itself."""
    variables: Dict[str, Any]          # {"params": nested dict, maybe "batch_stats": ...}
    source: str                        # as given (with @step)
    kind: str                          # "vitjax" (a run), "variables" (vitjax.convert output), "timm", "mae"
    description: str                   # e.g. "vitjax run /ckpt/x, step 800"
    meta: Dict[str, Any] = dataclasses.field(default_factory=dict)  # model_name, model, pretrained_cfg, config


def split_step(source: str) -> Tuple[str, Optional[int]]:
    """Returns (path, step) of "PATH@STEP" (step None without a numeric @ suffix)."""
    path, sep, step = str(source).rpartition("@")
    if sep and step.isdigit():
        return path, int(step)
    return str(source), None


def describe_sources() -> str:
    """Returns the one-line list of valid init_from sources, for error messages."""
    return ("a vitjax workdir (or its checkpoints/ or checkpoints/<step> directory; PATH@STEP for a step), a "
            ".msgpack or orbax variables directory from `python -m vitjax.convert`, a timm / PyTorch checkpoint "
            f"({', '.join(TORCH_SUFFIXES)}), or an official MAE .pth")


def check_source(source: str) -> None:
    """Raises FileNotFoundError / ValueError if `source` cannot be an init_from source (no file is read)."""
    path, _ = split_step(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"init_from {source!r}: nothing at {os.path.abspath(path)}. Valid sources: "
                                f"{describe_sources()}")
    if os.path.isfile(path) and not path.endswith(TORCH_SUFFIXES + VARIABLES_SUFFIXES):
        raise ValueError(f"init_from {source!r}: unknown file type; valid sources: {describe_sources()}")


def _is_vitjax_run(path: str) -> bool:
    """Returns whether `path` is a vitjax workdir, its checkpoints/ or one step directory."""
    from vitjax import checkpoint
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return True
    if os.path.isdir(os.path.join(path, "state")) and os.path.basename(os.path.normpath(path)).isdigit():
        return True
    return bool(checkpoint.complete_steps(path))


def _run_config(checkpoints_dir: str) -> Dict[str, Any]:
    """Returns the config.json of the run that owns `checkpoints_dir` ({} if there is none)."""
    path = os.path.join(os.path.dirname(os.path.normpath(checkpoints_dir)), "config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as file:
        return json.load(file)


def checkpoint_classes(state_dict: Mapping[str, np.ndarray]) -> Optional[int]:
    """Returns the class count of a timm state dict's classifier (None if it has none)."""
    for key in sorted(state_dict):
        if _HEAD_KEYS.match(key) and np.ndim(state_dict[key]) == 2:
            return int(np.shape(state_dict[key])[0])
    return None


def load(source: str, *, model_name: Optional[str] = None, model_overrides: Optional[Mapping[str, Any]] = None
         ) -> Pretrained:
    """Returns the weights of `source` (see the module doc); a timm file is converted for `model_name`.

    `model_overrides` are the run's `config.model` (image size, class count, ...): a timm checkpoint is
    converted at that image size (position embeddings resampled), with its own classifier where the
    class counts agree and without it otherwise (the head is then re-initialised by `plan`).
    """
    check_source(source)
    path, step = split_step(source)
    path = os.path.abspath(path)
    if os.path.isdir(path) and _is_vitjax_run(path):
        from vitjax import checkpoint
        directory, step = checkpoint.find_step(path, step)
        parts = checkpoint.load_params(directory, step, parts=("params", "model_state"))
        variables = {"params": parts["params"], **dict(parts["model_state"] or {})}
        config = _run_config(directory)
        meta = {"config": config, "model_name": config.get("model_name"), "model": config.get("model", {})}
        description = f"vitjax run {directory}, step {step}"
        if (config.get("adapt") or {}).get("method"):
            variables, meta["model"], note = _rebuild_adapted(variables, config)
            description += f" ({note})"
        return Pretrained(variables, source, "vitjax", description, meta)
    if step is not None:
        raise ValueError(f"init_from {source!r}: @STEP applies to a vitjax run only")
    if os.path.isdir(path) or path.endswith(VARIABLES_SUFFIXES):
        from vitjax.convert import io
        variables, meta = io.load_variables_and_meta(path)
        return Pretrained(dict(variables), source, "variables", f"converted variables {path}", meta)
    from vitjax.convert import common
    from vitjax.convert import mae as mae_convert
    state_dict = common.load_state_dict(path)
    from vitjax.convert import clip as clip_convert
    if clip_convert.is_open_clip(state_dict) or clip_convert.is_transformers_siglip(state_dict):
        return _load_clip(state_dict, source, path)
    if mae_convert.is_official_mae(state_dict):
        return _load_mae(state_dict, source, path, model_name, model_overrides)
    if not model_name:
        raise ValueError(f"init_from {source!r} is a timm / PyTorch checkpoint: converting it needs the model name "
                         "(config.model_name, or --model)")
    try:
        variables = convert_timm(state_dict, model_name, model_overrides)
    except (KeyError, ValueError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        raise ValueError(f"init_from {source!r}: the timm checkpoint does not fit model {model_name!r} with settings "
                         f"{dict(model_overrides or {})}: {message}") from None
    return Pretrained(variables, source, "timm", f"timm checkpoint {path}",
                      {"model_name": model_name, "resampled": _resampled_by_converter(state_dict, variables),
                       "num_classes": checkpoint_classes(state_dict)})


def _rebuild_adapted(trained: Dict[str, Any], config: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any], str]:
    """Returns (full variables, model settings, a note) of an adapted run from its base weights and its checkpoint.

    An adapted run (`config.adapt`) checkpoints only its trained params; the rest is its `init_from`, fitted to
    the adapted model as the run did. LoRA is then merged into the kernels, so the weights load into the plain
    model; other methods keep their params and put `adapt` into the model settings.
    """
    from vitjax import adapt, models
    settings = {key: value for key, value in dict(config.get("adapt") or {}).items() if key != "train"}
    method = adapt.parse(settings)
    if not config.get("init_from"):
        raise ValueError("The adapted run's config names no init_from: its frozen weights cannot be rebuilt")
    model_settings = dict(config.get("model") or {})
    model = models.create(config["model_name"], **model_settings, adapt=method)
    size = getattr(model, "img_size", 224)
    size = size if isinstance(size, (tuple, list)) else (size, size)
    images = np.zeros((1, *size, getattr(model, "in_chans", 3)), np.float32)
    target = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images))
    base = load(config["init_from"], model_name=config["model_name"], model_overrides=model_settings)
    rules = Rules(skip=tuple(config.get("init_from_skip") or ()), keep=tuple(config.get("init_from_keep") or ()),
                  adaptation=tuple(method.param_patterns))
    fitted = plan(target, base, rules).values
    checkpoint_params = _flat(trained["params"])
    params = {}
    for path in _flat(target["params"]):
        if path in checkpoint_params:
            params[path] = np.asarray(checkpoint_params[path])
        elif path in fitted.get("params", {}):
            params[path] = np.asarray(fitted["params"][path])
        else:
            raise ValueError(f"Rebuilding the adapted run: {path} is neither in its checkpoint nor in its init_from "
                             f"{config['init_from']!r}")
    # The objective's own trained params (e.g. a metric-learning head) lie outside the model: kept as saved.
    params.update({path: np.asarray(leaf) for path, leaf in checkpoint_params.items() if path not in params})
    variables = {**{name: values for name, values in trained.items() if name != "params"},
                 "params": flax.traverse_util.unflatten_dict(params, sep="/")}
    for collection, values in fitted.items():
        if collection != "params" and collection not in variables:
            variables[collection] = flax.traverse_util.unflatten_dict(values, sep="/")
    if method.name == "lora":
        return adapt.merge(variables, method), model_settings, f"base {config['init_from']} + its LoRA, merged"
    return variables, {**model_settings, "adapt": settings}, f"base {config['init_from']} + its {method.name} params"


def _load_mae(state_dict, source: str, path: str, model_name: Optional[str],
              model_overrides: Optional[Mapping[str, Any]]) -> Pretrained:
    """Returns an official MAE checkpoint's weights, its heads taken from the run's model where it has them."""
    from vitjax.convert import mae as mae_convert
    num_heads = None
    if model_name:
        from vitjax import models
        settings = {key: value for key, value in dict(model_overrides or {}).items()
                    if key not in ("dtype", "param_dtype")}
        num_heads = getattr(models.create(model_name, **settings), "num_heads", None)
    kind = mae_convert.checkpoint_kind(state_dict)
    try:
        _, variables = mae_convert.load_official(state_dict, num_heads=num_heads)
    except ValueError as error:
        if kind != "pretrain" or "decoder_num_heads" not in str(error):
            raise
        # The decoder's heads are not in its shapes: a run that needs only the encoder takes it alone.
        encoder_keys = {key: value for key, value in state_dict.items()
                        if not key.startswith(("decoder", "mask_token"))}
        _, variables = mae_convert.load_official(encoder_keys, num_heads=num_heads)
        kind = "pretrain, encoder only"
    return Pretrained(dict(variables), source, "mae", f"official MAE checkpoint ({kind}) {path}", {})


def _load_clip(state_dict, source: str, path: str) -> Pretrained:
    """Returns an open_clip CLIP or transformers SigLIP checkpoint as vitjax CLIP variables."""
    from vitjax import models
    from vitjax.convert import clip as clip_convert
    siglip = clip_convert.is_transformers_siglip(state_dict)
    name = "siglip_base_patch16_224" if siglip else "clip_vit_b32"
    settings = clip_convert.settings_from_state_dict(state_dict)
    model = models.create(name, **settings)
    convert = clip_convert.convert_transformers if siglip else clip_convert.convert_open_clip
    kind = "transformers SigLIP" if siglip else "open_clip CLIP"
    return Pretrained(convert(state_dict, model), source, "clip", f"{kind} checkpoint {path}",
                      {"model_name": name, "model": settings})


def _resampled_by_converter(state_dict: Mapping[str, np.ndarray], variables: Mapping[str, Any]) -> Dict[str, str]:
    """Returns {param path: "N -> M rows"} for the position embeddings a converter resampled to the model's grid."""
    resampled = {}
    for path, value in _flat(variables.get("params", {})).items():
        key = path.replace("/", ".")
        if _POSEMB.search(path) and key in state_dict and np.ndim(state_dict[key]) == 3 \
                and np.shape(state_dict[key])[1] != np.shape(value)[1]:
            resampled[path] = f"{np.shape(state_dict[key])[1]} -> {np.shape(value)[1]} rows"
    return resampled


def convert_timm(state_dict: Mapping[str, np.ndarray], model_name: str,
                 model_overrides: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Returns `state_dict` converted for `model_name` with `model_overrides` (no head if the class counts differ)."""
    from vitjax import convert
    overrides = dict(model_overrides or {})
    # Compute settings do not change the weights; the converters build the model only to check shapes.
    for key in ("dtype", "attention_impl", "remat"):
        overrides.pop(key, None)
    wanted = overrides.get("num_classes")
    if wanted is None:
        from vitjax import models
        wanted = models.get_entry(model_name).defaults.get("num_classes", getattr(
            models.get_entry(model_name).module_class, "num_classes", None))
    found = checkpoint_classes(state_dict)
    if found is not None and wanted and found != wanted:
        overrides["num_classes"] = 0  # drop the checkpoint's classifier; `plan` re-initialises the head
    return convert.from_timm(dict(state_dict), model_name, **overrides)


# =============================================================================================
# Rules and the plan
# =============================================================================================
@dataclasses.dataclass(frozen=True)
class Rules:
    """How a checkpoint fits the target beyond exact matches (see the module doc)."""
    skip: Tuple[str, ...] = ()            # target paths kept at init (config.init_from_skip)
    keep: Tuple[str, ...] = ()            # if given, only matching target paths load (config.init_from_keep)
    optional: Tuple[str, ...] = ()        # target paths the checkpoint may lack (re-initialised)
    ignore: Tuple[str, ...] = ()          # checkpoint paths the target may lack (dropped)
    fill: Tuple[Tuple[str, Callable[[Tuple[int, ...]], np.ndarray]], ...] = ()  # absent target path -> value(shape)
    scope: str = ""                       # where the pretrained model's params sit in the target ("encoder")
    posemb_prefix: Optional[int] = None   # prefix rows (cls, dist) of pos_embed; None: inferred
    strict: bool = False                  # every target param must load as is (a distillation teacher)
    adaptation: Tuple[str, ...] = ()      # target paths of adaptation params (vitjax.adapt): absent, kept at init


def _matches(path: str, patterns: Sequence[str]) -> bool:
    return any(re.search(pattern, path) for pattern in patterns)


def _flat(tree: Any) -> Dict[str, Any]:
    """Returns {"a/b/c": leaf} of a nested dict (flax boxes unboxed)."""
    tree = pytree.unbox(tree)
    if not isinstance(tree, Mapping):
        return {}
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(dict(tree)), sep="/")


def _shape(leaf: Any) -> Tuple[int, ...]:
    return tuple(np.shape(leaf)) if not hasattr(leaf, "shape") else tuple(leaf.shape)


def _align_blocks(source: Dict[str, Any], target: Dict[str, Any]) -> Dict[str, Any]:
    """Returns `source` with scanned (`blocks/...`, layer axis first) and numbered (`blocks_i/...`) blocks
    converted to the target's layout where the two differ."""
    source = dict(source)
    converted = set()
    for path in target:
        if path in source:
            continue
        numbered = re.match(r"^((?:.*/)?)blocks_(\d+)/(.*)$", path)
        if numbered:
            stacked = f"{numbered.group(1)}blocks/{numbered.group(3)}"
            index = int(numbered.group(2))
            if stacked in source and index < np.shape(source[stacked])[0]:
                source[path] = np.asarray(source[stacked])[index]
                converted.add(stacked)
            continue
        stacked = re.match(r"^((?:.*/)?)blocks/(.*)$", path)
        if stacked:
            layers = []
            while f"{stacked.group(1)}blocks_{len(layers)}/{stacked.group(2)}" in source:
                name = f"{stacked.group(1)}blocks_{len(layers)}/{stacked.group(2)}"
                layers.append(np.asarray(source[name]))
                converted.add(name)
            if layers:
                source[path] = np.stack(layers)
    for name in converted:
        if name not in target:
            source.pop(name, None)
    return source


def _posemb_prefix(source_len: int, target_len: int, given: Optional[int]) -> int:
    """Returns the prefix rows of two position embeddings whose other rows are square grids."""
    candidates = [given] if given is not None else [0, 1, 2]
    for prefix in candidates:
        a, b = source_len - prefix, target_len - prefix
        if a > 0 and b > 0 and round(a ** 0.5) ** 2 == a and round(b ** 0.5) ** 2 == b:
            return prefix
    raise ValueError(f"Cannot resample a position embedding of {source_len} rows to {target_len}: no prefix of "
                     f"{candidates} leaves square grids on both")


@dataclasses.dataclass
class Plan:
    """What loading a checkpoint into the target does, per parameter; `apply` carries it out."""
    description: str
    actions: Dict[str, Tuple[str, str]]           # "collection/path" -> (action, detail)
    values: Dict[str, Dict[str, np.ndarray]]      # collection -> {path: value} for loaded/resampled/filled
    sizes: Dict[str, int]                         # "collection/path" -> element count

    def counts(self) -> Dict[str, int]:
        """Returns {action: number of tensors} for every action."""
        result = {action: 0 for action in ACTIONS}
        for action, _ in self.actions.values():
            result[action] += 1
        return result

    def table(self, examples: int = 4) -> str:
        """Returns the markdown table: action, tensors, parameters, example paths (with the reason)."""
        lines = [f"init_from: {self.description}",
                 "| action | tensors | parameters | examples |", "|---|---:|---:|---|"]
        for action in ACTIONS:
            paths = [path for path, (name, _) in self.actions.items() if name == action]
            if not paths:
                continue
            size = sum(self.sizes.get(path, 0) for path in paths)
            shown = ", ".join(f"{path}{' (' + self.actions[path][1] + ')' if self.actions[path][1] else ''}"
                              for path in paths[:examples])
            more = f", ... (+{len(paths) - examples})" if len(paths) > examples else ""
            lines.append(f"| {action} | {len(paths)} | {size:,} | {shown}{more} |")
        return "\n".join(lines)

    def apply(self, variables: Mapping[str, Any]) -> Dict[str, Any]:
        """Returns `variables` with the planned values in place (numpy, cast to each leaf's dtype)."""
        result = dict(variables)
        for collection, values in self.values.items():
            if collection not in result or not values:
                continue

            def replace(path, leaf, values=values):
                name = path_to_str(path)
                if name not in values:
                    return leaf
                dtype = getattr(leaf, "dtype", np.float32)
                return np.asarray(values[name], dtype=dtype)

            result[collection] = jax.tree_util.tree_map_with_path(replace, pytree.unbox(result[collection]))
        return result


def _select_source(source: Dict[str, Any], target: Dict[str, Any], scope: str) -> Tuple[Dict[str, Any], str]:
    """Returns (the source subtree that fits the target best, its name): the whole, its `scope` or its encoder."""
    candidates = [(source, "")]
    # An MAE run offers its `encoder`, a CLIP model its image tower (`visual`); one level further down, an objective
    # that wraps its MAE (SatMAE++'s `backbone/encoder`).
    names = tuple(dict.fromkeys(k for k in (scope, "encoder", "visual") if k))
    for outer, tree in [("", source)] + [(key, value) for key, value in source.items() if isinstance(value, Mapping)]:
        for key in names:
            if isinstance(tree.get(key), Mapping):
                candidates.append((tree[key], f"{outer}/{key}" if outer else key))
    target_flat = _flat(target)

    def fit(candidate):
        flat = _align_blocks(_flat(candidate), target_flat)
        return sum(1 for path, leaf in flat.items() if path in target_flat)

    return max(candidates, key=lambda item: fit(item[0]))


def plan(target: Mapping[str, Any], pretrained: Pretrained, rules: Rules = Rules()) -> Plan:
    """Returns the plan of loading `pretrained` into `target` variables (abstract or concrete); raises on a mismatch."""
    actions: Dict[str, Tuple[str, str]] = {}
    values: Dict[str, Dict[str, np.ndarray]] = {}
    sizes: Dict[str, int] = {}
    errors: List[str] = []
    source_variables = dict(pretrained.variables)

    target_params = pytree.unbox(target["params"])
    model_target = target_params[rules.scope] if rules.scope else target_params
    if rules.scope and not isinstance(model_target, Mapping):
        raise ValueError(f"The target params have no {rules.scope!r} subtree")
    source_params, taken = _select_source(dict(source_variables.get("params", {})), model_target, rules.scope)
    prefix = f"{rules.scope}/" if rules.scope else ""
    target_flat = _flat(model_target)
    source_flat = _align_blocks(_flat(source_params), target_flat)
    fills = dict(rules.fill)
    resampled_on_load = dict(pretrained.meta.get("resampled", {})) if taken == "" else {}

    for path, leaf in target_flat.items():
        key = f"params/{prefix}{path}"
        shape = _shape(leaf)
        sizes[key] = int(np.prod(shape))
        if _matches(path, rules.skip) or (rules.keep and not _matches(path, rules.keep)):
            actions[key] = ("skipped", "init_from_skip" if _matches(path, rules.skip) else "not in init_from_keep")
            continue
        if path in source_flat:
            value = np.asarray(source_flat[path])
            if value.shape == shape:
                # A timm checkpoint's position embeddings were resampled by its converter already.
                actions[key] = ("resampled", resampled_on_load[path]) if path in resampled_on_load else ("loaded", "")
                values.setdefault("params", {})[prefix + path] = value
            elif _POSEMB.search(path) and value.ndim == 3 and len(shape) == 3 and value.shape[2] == shape[2] \
                    and not rules.strict:
                from vitjax.models import layers
                rows = _posemb_prefix(value.shape[1], shape[1], rules.posemb_prefix)
                side = int(round((shape[1] - rows) ** 0.5))
                values.setdefault("params", {})[prefix + path] = layers.resample_posemb(value, (side, side), rows)
                actions[key] = ("resampled", f"{value.shape[1]} -> {shape[1]} rows")
            elif _CLASSIFIER.match(path) and not rules.strict:
                actions[key] = ("re-initialised", f"checkpoint {value.shape} != model {shape}")
            else:
                errors.append(f"{path}: checkpoint shape {value.shape}, model shape {shape}")
            continue
        if rules.strict:
            errors.append(f"{path}: not in the checkpoint (model shape {shape})")
        elif _matches(path, rules.adaptation):
            actions[key] = ("skipped", "adaptation parameter: starts at its initialisation")
        elif any(re.search(pattern, path) for pattern in fills):
            pattern = next(p for p in fills if re.search(p, path))
            values.setdefault("params", {})[prefix + path] = np.asarray(fills[pattern](shape))
            actions[key] = ("filled", "by the objective")
        elif _CLASSIFIER.match(path):
            classes = pretrained.meta.get("num_classes")
            actions[key] = ("re-initialised", f"the checkpoint has {classes} classes" if classes
                            else "not in the checkpoint")
        elif _matches(path, rules.optional):
            actions[key] = ("re-initialised", "not in the checkpoint (expected)")
        else:
            errors.append(f"{path}: not in the checkpoint (model shape {shape})")

    for path, value in source_flat.items():
        if path in target_flat:
            continue
        if _CLASSIFIER.match(path) or _matches(path, rules.ignore) or _matches(path, rules.skip):
            actions[f"checkpoint/{path}"] = ("dropped", "classifier" if _CLASSIFIER.match(path) else "")
            sizes[f"checkpoint/{path}"] = int(np.prod(np.shape(value)))
        else:
            errors.append(f"{path}: in the checkpoint {tuple(np.shape(value))}, not a parameter of the model")

    if rules.scope:
        for path, leaf in _flat(target_params).items():
            if not path.startswith(prefix):
                actions[f"params/{path}"] = ("re-initialised", f"outside {rules.scope!r}")
                sizes[f"params/{path}"] = int(np.prod(_shape(leaf)))

    if errors:
        shown = "\n  ".join(errors[:12]) + (f"\n  ... and {len(errors) - 12} more" if len(errors) > 12 else "")
        taken_note = f" (its {taken!r} subtree)" if taken else ""
        raise ValueError(f"init_from {pretrained.source!r}{taken_note} does not fit the model: {len(errors)} "
                         f"mismatched parameter(s):\n  {shown}\nIf the architecture is right, leave parameters "
                         "at their initialisation with config.init_from_skip (regexes) or load a subset with "
                         "config.init_from_keep.")
    if not any(action in ("loaded", "resampled") for action, _ in actions.values()):
        raise ValueError(f"init_from {pretrained.source!r} loads no parameter into the model")

    # Other collections (batch_stats, ...) load where they fit; the rest keep their initial values.
    for collection, tree in target.items():
        if collection == "params" or collection not in source_variables:
            continue
        source_tree = source_variables[collection]
        if rules.scope and isinstance(source_tree, Mapping) and rules.scope not in source_tree:
            source_tree = {rules.scope: source_tree}
        source_flat_c = _flat(source_tree)
        for path, leaf in _flat(tree).items():
            key = f"{collection}/{path}"
            sizes[key] = int(np.prod(_shape(leaf)))
            if path in source_flat_c and np.shape(source_flat_c[path]) == _shape(leaf) \
                    and not (_matches(path, rules.skip) or (rules.keep and not _matches(path, rules.keep))):
                values.setdefault(collection, {})[path] = np.asarray(source_flat_c[path])
                actions[key] = ("loaded", "")
            else:
                actions[key] = ("re-initialised", "not in the checkpoint")
    description = pretrained.description + (f", its {taken!r} subtree" if taken else "")
    return Plan(description, actions, values, sizes)


def load_exact(source: str, abstract_variables: Mapping[str, Any], model_name: str,
               model_overrides: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Returns the variables of `source` fitted to `abstract_variables` with nothing resampled or re-initialised."""
    pretrained = load(source, model_name=model_name, model_overrides=model_overrides)
    result = plan(abstract_variables, pretrained, Rules(strict=True))
    return result.apply(jax.tree.map(lambda leaf: np.zeros(_shape(leaf), getattr(leaf, "dtype", np.float32)),
                                     pytree.unbox(dict(abstract_variables))))


__all__ = ["ACTIONS", "Plan", "Pretrained", "Rules", "check_source", "checkpoint_classes", "convert_timm",
           "describe_sources", "load", "load_exact", "plan", "split_step"]
