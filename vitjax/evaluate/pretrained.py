"""Evaluate weights without training: any `init_from` source on a classification split (`python -m vitjax.evaluate`).

    result = evaluate_pretrained("vit_b16.msgpack", dataset="imagenet2012", split="validation")
    result.metrics     # {"loss", "top1", "top5", "num_examples"}
    result.logits      # (num_examples, classes) float32 when asked for (return_logits=True)

What is evaluated, and how, comes from the source where it can (see `vitjax.weights` for the sources):
  * a vitjax workdir: its config.json gives the model, and, unless given, the dataset, split, data
    dir and eval preprocessing (`input.pp_eval`);
  * a `.msgpack` / orbax directory from `python -m vitjax.convert`: its meta gives the model name,
    the model options and the weights' preprocessing (`pretrained_cfg`);
  * a timm / PyTorch checkpoint: `model_name` (and `model_overrides`) say what it is, the registry
    its preprocessing (`vitjax.models.pretrained_cfg`).
Preprocessing that is not given as a pp string is `vitjax.data.pretrained_pp(cfg)` at the model's
input size. The model's class count defaults to the dataset's. The weights are fitted by
`vitjax.weights.plan` (position embeddings resampled to another image size); a parameter the
source cannot fill (a classifier of another class count) is an error: evaluating random weights
says nothing. The metrics are the trainer's (`Supervised.metrics_of`, `classification.evaluate`).
"""
import dataclasses
import os
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple

import numpy as np

# Files read with torch.load (safetensors needs no torch).
_TORCH_PICKLES = (".pth", ".pt", ".bin", ".ckpt")


@dataclasses.dataclass
class EvalResult:
    """What `evaluate_pretrained` found: metrics, what it evaluated, and the logits when asked for."""
    metrics: Dict[str, float]            # loss, top1, top5 (means over the real examples), num_examples
    model_name: str
    model_overrides: Dict[str, Any]
    input_config: Dict[str, Any]         # dataset, data_dir, eval_split, pp_eval, ...
    plan_table: str                      # how the weights were fitted (`weights.Plan.table()`)
    logits: Optional[np.ndarray] = None  # (num_examples, classes) float32, in the split's order


def _dataset_facts(input_config: Mapping[str, Any]) -> Tuple[int, Optional[int], Any]:
    """Returns (number of classes, image channels or None, the TFDS builder) of the configured dataset."""
    from vitjax.data import pipeline, sources
    config = pipeline.validate_input_config(dict(input_config))
    data_dir = sources.resolve_data_dir(config["data_dir"])
    try:
        builder = sources.get_builder(config["dataset"], data_dir, download=config["download"])
    except OSError as error:  # a failed download (no network): say what to do rather than show requests' traceback
        raise ValueError(f"Dataset {config['dataset']!r} is not prepared in {data_dir} and downloading it failed "
                         f"({type(error).__name__}: {error}). Prepare it with `tfds build {config['dataset']} "
                         f"--data_dir={data_dir}`, or give --data_dir where it is") from None
    features = builder.info.features
    shape = getattr(features[config["image_key"]], "shape", None) if config["image_key"] in features else None
    channels = int(shape[-1]) if shape and shape[-1] is not None else None
    num_classes = getattr(features[config["label_key"]], "num_classes", None) if config["label_key"] in features \
        else None
    if not num_classes:
        raise ValueError(f"Feature {config['label_key']!r} of dataset {config['dataset']!r} is not a class label; "
                         f"features: {list(features.keys())}")
    return int(num_classes), channels, builder


def _first_examples(batches: Iterator[Dict[str, Any]], limit: Optional[int]) -> Iterator[Dict[str, Any]]:
    """Yields `batches` with the mask cleared after the first `limit` real examples, stopping there."""
    seen = 0
    for batch in batches:
        if limit is not None:
            mask = np.asarray(batch["mask"], bool)
            keep = np.cumsum(mask) + seen <= limit
            batch = dict(batch, mask=mask & keep)
            seen += int(batch["mask"].sum())
        yield batch
        if limit is not None and seen >= limit:
            return


@dataclasses.dataclass
class Prepared:
    """Weights fitted to their model, with the data to evaluate them on (`prepare_pretrained`)."""
    objective: Any                       # the Supervised objective: module, eval_logits, metrics_of
    variables: Dict[str, Any]            # fitted, on the device
    model_name: str
    model_overrides: Dict[str, Any]
    input_config: Dict[str, Any]         # dataset, data_dir, eval_split, pp_eval, ... (and the run's train_split)
    plan_table: str


def evaluate_pretrained(init_from: str, *, model_name: Optional[str] = None,
                        model_overrides: Optional[Mapping[str, Any]] = None, dataset: Optional[str] = None,
                        split: Optional[str] = None, data_dir: Optional[str] = None, pp: Optional[str] = None,
                        image_size: Optional[int] = None, batch_size: int = 256,
                        num_examples: Optional[int] = None, return_logits: bool = False,
                        log: Callable[[str], None] = print) -> EvalResult:
    """Returns the classification metrics of the weights `init_from` on a dataset split (see the module doc).

    `model_overrides` are model options on top of the source's; `image_size` sets the preprocessing's size
    and the model's `img_size` where it has one; `num_examples` evaluates the first examples of the split only.
    """
    if batch_size < 1 or (num_examples is not None and num_examples < 1):
        raise ValueError(f"batch_size and num_examples must be >= 1, got {batch_size} and {num_examples}")
    prepared = prepare_pretrained(init_from, model_name=model_name, model_overrides=model_overrides,
                                  dataset=dataset, split=split, data_dir=data_dir, pp=pp, image_size=image_size,
                                  log=log)
    return evaluate_prepared(prepared, batch_size=batch_size, num_examples=num_examples,
                             return_logits=return_logits, log=log)


def prepare_pretrained(init_from: str, *, model_name: Optional[str] = None,
                       model_overrides: Optional[Mapping[str, Any]] = None, dataset: Optional[str] = None,
                       split: Optional[str] = None, data_dir: Optional[str] = None, pp: Optional[str] = None,
                       image_size: Optional[int] = None, log: Callable[[str], None] = print) -> Prepared:
    """Returns the weights `init_from` fitted to their model with the evaluation data (`evaluate_pretrained`'s args)."""
    from vitjax import models, weights
    from vitjax.models.registry import module_fields
    weights.check_source(init_from)
    path, _ = weights.split_step(init_from)
    is_torch_checkpoint = os.path.isfile(path) and path.endswith(weights.TORCH_SUFFIXES)
    if is_torch_checkpoint and path.endswith(_TORCH_PICKLES):
        # `import tensorflow` followed by torch(vision) segfaults (TF 2.21, torch 2.14); the data pipeline
        # imports TensorFlow before this checkpoint is read, so torch comes first.
        import torch  # noqa: F401
    if model_name is not None:
        models.get_entry(model_name)  # an unknown name fails here, listing the valid ones

    # ---- What the source says about itself (a timm file is read once its model is known, below) --------
    pretrained = None if is_torch_checkpoint else weights.load(init_from)
    meta = dict(pretrained.meta) if pretrained is not None else {}
    run_config = dict(meta.get("config") or {})
    model_name = model_name or meta.get("model_name")
    if not model_name:
        raise ValueError(f"{init_from!r} does not name its model: give --model (a name of "
                         "vitjax.models.list_models())")
    entry = models.get_entry(model_name)
    overrides = {**dict(meta.get("model") or {}), **dict(model_overrides or {})}

    # ---- The data: the run's own unless given -------------------------------------------------------
    run_input = dict(run_config.get("input") or {})
    same_data = bool(run_input) and dataset in (None, run_input.get("dataset"))
    if same_data:
        input_config = {key: run_input[key] for key in ("dataset", "data_dir", "eval_split", "pp_eval", "image_key",
                                                        "label_key", "source", "train_split") if key in run_input}
    else:
        if not dataset:
            raise ValueError(f"{init_from!r} names no dataset: give --dataset (a TFDS name such as imagenet2012, "
                             "or digits, the bundled one)")
        input_config = {"dataset": dataset}
    for key, value in (("data_dir", data_dir), ("eval_split", split)):
        if value is not None:
            input_config[key] = value
    num_classes, channels, builder = _dataset_facts({key: value for key, value in input_config.items()
                                                     if key not in ("eval_split", "pp_eval", "train_split")})
    if not input_config.get("eval_split"):
        input_config["eval_split"] = "validation" if "validation" in builder.info.splits else "test"
    from vitjax.data import sources
    sources.check_split(builder, input_config["eval_split"], "--split")

    # ---- The model: the class count of the dataset, the image size asked for ------------------------------
    fields = set(module_fields(entry.module_class)) | set(entry.extra_args)
    if overrides.setdefault("num_classes", num_classes) != num_classes:
        raise ValueError(f"The model has {overrides['num_classes']} classes but dataset {input_config['dataset']!r} "
                         f"has {num_classes}")
    if image_size is not None and "img_size" in fields:  # other models (ConvNeXt) take any size as they are
        overrides["img_size"] = image_size

    # ---- Preprocessing: --pp, else the run's, else the weights' pretrained cfg ------------------------------
    cfg = dict(meta.get("pretrained_cfg") or models.pretrained_cfg(model_name))
    size = image_size or overrides.get("img_size", entry.defaults.get("img_size"))
    if not isinstance(size, int):
        size = tuple(size) if size is not None else tuple(cfg["input_size"][1:])
    if pp:
        input_config["pp_eval"] = pp
    elif same_data and input_config.get("pp_eval"):
        if image_size is not None:
            raise ValueError(f"{init_from!r} is a vitjax run whose pp_eval ({input_config['pp_eval']!r}) sets its own "
                             "image size: with --image_size give --pp too")
    else:
        from vitjax.data import presets
        input_config["pp_eval"] = presets.pretrained_pp(cfg, image_size=size, channels=1 if channels == 1 else 3)

    # ---- The weights, fitted to the model ------------------------------------------------------------
    import jax
    import ml_collections

    from vitjax.objectives.supervised import Supervised
    if pretrained is None:
        pretrained = weights.load(init_from, model_name=model_name, model_overrides=overrides)
    objective = Supervised(ml_collections.ConfigDict(dict(model_name=model_name, model=overrides, objective_kwargs={})))
    module = objective.module
    in_chans = int(getattr(module, "in_chans", cfg["input_size"][0]))
    height, width = (size, size) if isinstance(size, int) else size
    example = {"image": np.zeros((1, height, width, in_chans), np.float32)}
    abstract = _unbox(jax.eval_shape(lambda: objective.init_variables(jax.random.key(0), example)))
    plan = weights.plan(abstract, pretrained, objective.init_from_rules())
    table = plan.table()
    log(table)
    unfilled = [f"{key} ({action}: {detail})" for key, (action, detail) in plan.actions.items()
                if action in ("re-initialised", "filled", "skipped")]
    if unfilled:
        raise ValueError(f"{init_from!r} leaves {len(unfilled)} tensor(s) of model {model_name!r} without weights, so "
                         f"the evaluation would be of random weights: {unfilled[:6]}. Check --model and the model "
                         "options (--set), e.g. the class count")
    variables = plan.apply(jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), abstract))
    variables = jax.device_put(variables)
    return Prepared(objective, variables, model_name, overrides, input_config, table)


def evaluate_prepared(prepared: Prepared, *, variables: Optional[Mapping[str, Any]] = None,
                      logits_fn: Optional[Callable[[Any, Any], Any]] = None, batch_size: int = 256,
                      num_examples: Optional[int] = None, return_logits: bool = False,
                      log: Callable[[str], None] = print) -> EvalResult:
    """Returns the metrics of `logits_fn(variables, images)` (default: the prepared model and weights) on its split."""
    import jax

    import vitjax.data as data
    from vitjax.evaluate import classification
    objective, input_config, model_name = prepared.objective, prepared.input_config, prepared.model_name
    variables = prepared.variables if variables is None else variables
    logits_fn = objective.eval_logits if logits_fn is None else logits_fn

    # ---- Evaluate: the trainer's metrics, summed over the real examples ---------------------------------
    @jax.jit
    def logits_and_sums(variables, batch):
        logits = logits_fn(variables, batch["image"])
        return logits, classification.masked_sums(objective.metrics_of(logits, batch["label"]), batch["mask"])

    collected = []

    def eval_step(variables, batch):
        logits, sums = logits_and_sums(variables, batch)
        if return_logits:
            collected.append((logits, batch["mask"]))
        return sums

    batch_size = min(batch_size, num_examples) if num_examples else batch_size
    log(f"Evaluating {model_name} on {input_config['dataset']} {input_config['eval_split']} "
        f"(pp: {input_config['pp_eval']})")
    eval_config = {key: value for key, value in input_config.items() if key != "train_split"}
    batches = data.make_eval_iterator(eval_config, global_batch_size=batch_size)
    batches = ({key: batch[key] for key in ("image", "label", "mask")} for batch in batches)
    metrics = classification.evaluate(eval_step, variables, _first_examples(batches, num_examples), prefix="")
    logits = None
    if return_logits:
        fetched = jax.device_get(collected)
        logits = np.concatenate([np.asarray(batch_logits)[np.asarray(mask, bool)] for batch_logits, mask in fetched])
    return EvalResult(metrics, model_name, prepared.model_overrides, eval_config, prepared.plan_table, logits)


def _unbox(tree: Any) -> Any:
    import flax
    return flax.linen.meta.unbox(tree)


def summary(result: EvalResult) -> str:
    """Returns the closing line: top-1, top-5, loss and the number of examples."""
    metrics = result.metrics
    return (f"{result.model_name} on {result.input_config['dataset']} {result.input_config['eval_split']}: "
            f"top-1 {100 * metrics['top1']:.2f}%, top-5 {100 * metrics['top5']:.2f}%, loss {metrics['loss']:.6f}, "
            f"{metrics['num_examples']} examples")
