"""The input pipeline: validate an input config, describe its dataset, iterate over batches.

A train batch at step s is a function of (seed, s) only (with source "stream": and of the
process count): a run restarted with `start_step=s` gets exactly batches s, s+1, ... of an
uninterrupted run, augmentations included, because every random op draws from a stateless seed
derived from (seed, global element index).

Per step, each host takes its raw examples (see `vitjax.data.sources`), each an example dict
{"image", "label", "text"} (the dataset's features `input.image_key`, `input.label_key` and
`input.text_key`; a None key leaves its field out: `label_key=None` for a dataset without labels,
`text_key="captions/text"` for captions, a tf.string the pp tokenizes, e.g. with
`vitjax.text.ops`' tokenize; of several captions per example one is picked from a stateless seed
of (seed, element index), so a resume sees the same ones), decodes them (an image that fails to decode is dropped and counted; its slot
in the batch is filled by repeating a good example of the same batch, all its fields, so the
batch keeps its size and stays a function of the step), and runs the rest of the pp ops. A batch
holds every field the pp leaves in the examples (image, image_0, image_1, label, ...), uint8
fields as float32 and int64 fields as int32; train labels stay int32 class ids: one-hot, label
smoothing and mixup / cutmix run on the device (`vitjax.data.make_batch_transform`). Eval
batches are padded to the fixed batch size with mask False (the padding repeats an example), and
a bad image in eval becomes a masked-out slot whose fields are all zero. The bookkeeping (element
index, step) never enters a batch.

`input.pp_modules` names modules that register more ops (`vitjax.data.register_op`); they are
imported before the pp strings are parsed.
"""
import collections.abc
import logging
import math
import os
import re
import threading
from typing import Any

import numpy as np

from vitjax.data import classes as class_split
from vitjax.data import ops
from vitjax.data import sources
from vitjax.data._tf import import_tensorflow

_DEFAULTS = dict(
    dataset=None,
    data_dir=None,  # None -> $TFDS_DATA_DIR, else ~/tensorflow_datasets.
    train_split="train",
    eval_split="test",
    pp_train=None,
    pp_eval=None,
    label_smoothing=0.0,
    mixup=None,
    random_erasing=0.0,  # Probability; appended to pp_train as random_erasing(p, mode="pixel").
    repeated_augmentation=1,  # R > 1: each example R times in a row, differently augmented (DeiT's RA).
    shuffle_buffer=10_000,  # Only used by the "stream" source.
    prefetch=2,  # Batches tf.data prepares ahead.
    cache=False,  # Hold the split in host memory even when it is large.
    train_fraction=1.0,  # Keep the first fraction of the train split (TFDS order: a fixed subset).
    long_tail=None,  # dict(imbalance, seed): the exponentially long-tailed subset of the train split (CIFAR-LT).
    image_key="image",
    label_key="label",  # None: no label field (e.g. an image-text dataset).
    text_key=None,  # A string feature (path such as "captions/text") carried as the field "text".
    source="auto",  # "auto", "memory", "random_access" or "stream": see vitjax.data.sources.
    download=True,  # Let TFDS download and prepare datasets that need no manual step.
    pp_modules=(),  # Modules imported before parsing the pp strings: they register more ops.
    train_classes=None,  # A tuple of class ids: train on those only, relabelled 0..n-1 (vitjax.data.classes).
    eval_classes=None,  # The same for the eval split (deep metric learning: classes unseen in training).
    gmml_replace=None,  # dict(ratio, prob, align, max_block_fraction): GMML's replacement, on the device (below).
)
_MIXUP_DEFAULTS = dict(mixup_alpha=0.0, cutmix_alpha=0.0, prob=1.0, switch_prob=0.5)
_MIXUP_OPTIONAL = ("stop_step",)  # kept out of the validated dict where unset: stored-logits recipes stay as they were
_LONG_TAIL_DEFAULTS = dict(imbalance=100.0, seed=0)
# GMML's batch step after the pp op gmml_corrupt (the official defaults): with probability `prob` per image,
# groups covering about `ratio` of it copied from another image of the batch (vitjax.masking.replace_groups).
_GMML_REPLACE_DEFAULTS = dict(ratio=0.3, prob=0.5, align=1, max_block_fraction=0.3)
_DATASET_NAME = re.compile(r"^[a-z][a-z0-9_]*(/[A-Za-z0-9_.\-]+)?(:[0-9]+(\.[0-9*]+){0,2})?$")
_SPLIT = re.compile(r"^[A-Za-z0-9_\-]+(\[[^\[\]]*\])?(\([^()]*\))?"
                    r"(\+[A-Za-z0-9_\-]+(\[[^\[\]]*\])?(\([^()]*\))?)*$")
_STEPS_IN_FLIGHT = min(4, os.cpu_count() or 1)
_LOG = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Config checks (pure Python: no TensorFlow).
# ---------------------------------------------------------------------------------------------

def _to_dict(value: Any, name: str) -> dict:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, collections.abc.Mapping):
        return dict(value)
    raise ValueError(f"{name} must be a dict or ConfigDict, got {type(value).__name__}.")


def _number(config: dict, name: str, low: float, high: float, *, low_open=False, high_open=False):
    value = config[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"input.{name} must be a number, got {value!r}.")
    if value < low or value > high or (low_open and value == low) or (high_open and value == high):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"input.{name} must be in {interval}, got {value!r}.")


def _integer(config: dict, name: str, low: int):
    value = config[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"input.{name} must be an int >= {low}, got {value!r}.")


def validate_input_config(input_config) -> dict:
    """Returns the input config as a dict with defaults; raises ValueError naming valid choices."""
    given = _to_dict(input_config, "input")
    unknown = sorted(set(given) - set(_DEFAULTS))
    if unknown:
        raise ValueError(f"Unknown input config key(s) {', '.join(unknown)}; valid keys: "
                         f"{', '.join(sorted(_DEFAULTS))}.")
    config = dict(_DEFAULTS, **given)

    dataset = config["dataset"]
    if not isinstance(dataset, str) or not _DATASET_NAME.match(dataset):
        raise ValueError(f"input.dataset must be 'digits' (bundled, offline) or a TFDS name like "
                         f"'cifar10' or 'imagenet2012:5.1.0', got {dataset!r}.")
    if config["data_dir"] is not None and not isinstance(config["data_dir"], str):
        raise ValueError(f"input.data_dir must be a path or None, got {config['data_dir']!r}.")
    for name in ("train_split", "eval_split"):
        split = config[name]
        if not isinstance(split, str) or not _SPLIT.match(split.replace(" ", "")):
            raise ValueError(f"input.{name} must be a TFDS split such as 'train', 'test', "
                             f"'validation' or 'train[:90%]', got {split!r}.")
    for name in ("image_key", "label_key", "text_key"):
        if name == "image_key" or config[name] is not None:
            if not isinstance(config[name], str) or not config[name]:
                raise ValueError(f"input.{name} must be a feature name"
                                 f"{'' if name == 'image_key' else ' or None'}, got {config[name]!r}.")
    if config["source"] not in sources.SOURCES:
        raise ValueError(f"input.source must be one of {', '.join(sources.SOURCES)}; "
                         f"got {config['source']!r}.")
    for name in ("cache", "download"):
        if not isinstance(config[name], bool):
            raise ValueError(f"input.{name} must be True or False, got {config[name]!r}.")
    _number(config, "label_smoothing", 0.0, 1.0, high_open=True)
    _number(config, "random_erasing", 0.0, 1.0)
    _number(config, "train_fraction", 0.0, 1.0, low_open=True)
    _integer(config, "shuffle_buffer", 0)
    _integer(config, "repeated_augmentation", 1)
    _integer(config, "prefetch", 0)
    for name in ("train_classes", "eval_classes"):  # left out where unset: stored-logits recipes stay as they were
        config[name] = class_split.check_classes(config[name], name)
        if config[name] is None:
            del config[name]

    modules = config["pp_modules"]
    if isinstance(modules, str) or not isinstance(modules, (tuple, list)) or not all(
            isinstance(module, str) and module for module in modules):
        raise ValueError(f"input.pp_modules must be a tuple of module names such as "
                         f"('my_package.my_ops',), got {modules!r}.")
    config["pp_modules"] = tuple(modules)
    ops.import_pp_modules(config["pp_modules"])

    mixup = dict(_MIXUP_DEFAULTS)
    if config["mixup"] is not None:
        given_mixup = _to_dict(config["mixup"], "input.mixup")
        unknown = sorted(set(given_mixup) - set(_MIXUP_DEFAULTS) - set(_MIXUP_OPTIONAL))
        if unknown:
            raise ValueError(f"Unknown input.mixup key(s) {', '.join(unknown)}; valid keys: "
                             f"{', '.join((*_MIXUP_DEFAULTS, *_MIXUP_OPTIONAL))}.")
        mixup.update(given_mixup)
    for name, high in (("mixup_alpha", math.inf), ("cutmix_alpha", math.inf), ("prob", 1.0),
                       ("switch_prob", 1.0)):
        value = mixup[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= high:
            raise ValueError(f"input.mixup.{name} must be a number in [0, {high}], got {value!r}.")
    stop_step = mixup.pop("stop_step", None)
    if stop_step is not None and (isinstance(stop_step, bool) or not isinstance(stop_step, int) or stop_step < 0):
        raise ValueError(f"input.mixup.stop_step must be None or an int >= 0 (the train step from which "
                         f"nothing is mixed or smoothed), got {stop_step!r}.")
    if stop_step is not None:
        mixup["stop_step"] = stop_step
    config["mixup"] = mixup

    if config["long_tail"] is None:  # left out where unset, so stored-logits recipes stay as they were
        del config["long_tail"]
    else:
        long_tail = _with_defaults(config["long_tail"], "input.long_tail", _LONG_TAIL_DEFAULTS)
        imbalance, seed = long_tail["imbalance"], long_tail["seed"]
        if isinstance(imbalance, bool) or not isinstance(imbalance, (int, float)) or not imbalance >= 1:
            raise ValueError(f"input.long_tail.imbalance must be a number >= 1 (n_max / n_min, e.g. 100 for "
                             f"CIFAR-10-LT), got {imbalance!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"input.long_tail.seed must be an int >= 0, got {seed!r}.")
        if config["label_key"] is None:
            raise ValueError("input.long_tail subsamples by class and needs input.label_key.")
        if config["source"] in ("random_access", "stream"):
            raise ValueError(f"input.long_tail reads every label of the train split and needs it in memory: "
                             f"input.source 'auto' or 'memory' (with input.cache=True for a large dataset), "
                             f"got {config['source']!r}.")
        config["long_tail"] = dict(imbalance=float(imbalance), seed=seed)

    for name in ("pp_train", "pp_eval"):
        if config[name] is not None:
            try:
                preprocess = ops.build_preprocess(config[name])
            except ValueError as error:
                raise ValueError(f"input.{name}: {error}") from None
            if name != "pp_train":
                continue
            if config["random_erasing"] > 0 and "random_erasing" in preprocess.names:
                raise ValueError("Random erasing is asked twice: by input.random_erasing and in "
                                 "input.pp_train; keep one.")
            if config["random_erasing"] > 0 and "views" in preprocess.names:
                raise ValueError("input.random_erasing erases the field 'image', which views "
                                 "replaces; put random_erasing(p) in each view's pp instead.")
            if mixing(config) and "views" in preprocess.names:
                raise ValueError("input.mixup mixes the field 'image' and the labels, and "
                                 "input.pp_train makes views: mixup / cutmix with several views "
                                 "is not supported; set input.mixup=None.")
    if config["gmml_replace"] is None:  # left out where unset, as train_classes
        del config["gmml_replace"]
    else:
        config["gmml_replace"] = _gmml_replace(config)
    if config.get("long_tail") is not None and config.get("train_classes"):
        raise ValueError("input.long_tail and input.train_classes cannot be combined; set one of them.")
    return config


def _with_defaults(value, name: str, defaults: dict) -> dict:
    """Returns the sub-config `value` (a dict) over `defaults`; raises ValueError naming unknown keys."""
    given = _to_dict(value, name)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"Unknown {name} key(s) {', '.join(unknown)}; valid keys: {', '.join(defaults)}.")
    return dict(defaults, **given)


def _gmml_replace(config: dict) -> dict:
    from vitjax import masking  # pylint: disable=g-import-not-at-top  # jax only: no TF
    replace = _with_defaults(config["gmml_replace"], "input.gmml_replace", _GMML_REPLACE_DEFAULTS)
    masking.check_mask_ratio(replace["ratio"], "input.gmml_replace.ratio")
    masking.check_replace_settings(replace["ratio"], replace["prob"], "input.gmml_replace.")
    if "gmml_corrupt" not in (config["pp_train"] or ""):
        raise ValueError("input.gmml_replace replaces the corruption of the pp op gmml_corrupt, which "
                         "input.pp_train lacks; add gmml_corrupt(...) after value_range / normalize.")
    if mixing(config):
        raise ValueError("input.gmml_replace and input.mixup both mix images of the batch; set one of them.")
    return replace


def mixing(config: dict) -> bool:
    """Returns whether a validated input config asks for mixup or cutmix."""
    return config["mixup"]["mixup_alpha"] > 0 or config["mixup"]["cutmix_alpha"] > 0


def _train_pp(config: dict) -> str:
    if config["pp_train"] is None:
        raise ValueError("input.pp_train is needed for training, e.g. "
                         "'decode|inception_crop(224)|flip_lr|value_range(-1, 1)'.")
    pp = config["pp_train"]
    if config["random_erasing"] > 0:
        pp += f'|random_erasing({config["random_erasing"]!r}, mode="pixel")'
    return pp


# ---------------------------------------------------------------------------------------------
# Datasets and sources (cached: eval iterators are made again at every evaluation).
# ---------------------------------------------------------------------------------------------

_SOURCE_CACHE: dict[tuple, Any] = {}
_SOURCE_CACHE_SIZE = 4
_SOURCE_LOCK = threading.Lock()


def _builder(config: dict):
    return sources.get_builder(config["dataset"], sources.resolve_data_dir(config["data_dir"]),
                               download=config["download"])


def _num_classes(builder, label_key: str) -> int:
    feature = builder.info.features[label_key] if label_key in builder.info.features else None
    num_classes = getattr(feature, "num_classes", None)
    if not num_classes:
        raise ValueError(f"Feature {label_key!r} of dataset {builder.name!r} is not a class label "
                         f"(features: {', '.join(builder.info.features.keys())}); set "
                         "input.label_key.")
    return int(num_classes)


def _source(config: dict, builder, split: str, role: str, fraction: float = 1.0, classes=None):
    sources.check_split(builder, split, role)
    long_tail = config.get("long_tail") if role == "input.train_split" else None
    cache_key = (builder.name, str(builder.data_dir), split, config["source"], config["image_key"],
                 config["label_key"], config["text_key"], fraction, config["cache"],
                 config["shuffle_buffer"], None if long_tail is None else tuple(sorted(long_tail.items())), classes)
    with _SOURCE_LOCK:
        if cache_key not in _SOURCE_CACHE:
            if len(_SOURCE_CACHE) >= _SOURCE_CACHE_SIZE:
                _SOURCE_CACHE.pop(next(iter(_SOURCE_CACHE)))
            source = sources.open_source(
                builder, split, kind="memory" if classes else config["source"], image_key=config["image_key"],
                label_key=config["label_key"], fraction=fraction, cache=config["cache"],
                shuffle_buffer=config["shuffle_buffer"], text_key=config["text_key"])
            if long_tail is not None:
                source = _long_tail_source(source, builder, config)
            _SOURCE_CACHE[cache_key] = class_split.select_classes(source, classes) if classes else source
        return _SOURCE_CACHE[cache_key]


def _long_tail_source(source, builder, config: dict):
    labels = getattr(source, "fields", {}).get("label")
    if labels is None:
        raise ValueError(f"input.long_tail needs the train split in memory; it is read by a "
                         f"{type(source).__name__}: set input.cache=True.")
    num_classes = _num_classes(builder, config["label_key"])
    long_tail = config["long_tail"]
    indices = sources.long_tail_indices(labels, num_classes, long_tail["imbalance"], long_tail["seed"])
    subset = sources.SubsetSource(source, indices, labels)
    _LOG.info("Long-tailed %s %s (imbalance %g, seed %d): %d of %d examples, per class %s", config["dataset"],
              config["train_split"], long_tail["imbalance"], long_tail["seed"], len(indices), len(labels),
              class_counts_of(subset, num_classes).tolist())
    return subset


def class_counts_of(source, num_classes: int):
    """Returns the int64 (num_classes,) example count per class of a source holding its labels in memory."""
    labels = source.labels if isinstance(source, sources.SubsetSource) else source.fields["label"]
    return np.bincount(np.asarray(labels), minlength=num_classes)[:num_classes]


def train_class_counts(input_config):
    """Returns the int64 (num_classes,) example count per class of the train split the pipeline reads.

    The long-tailed subset where `input.long_tail` asks; reads the split into memory (it must fit).
    """
    config = validate_input_config(input_config)
    if config["label_key"] is None:
        raise ValueError("Class counts need labels: input.label_key is None.")
    builder = _builder(config)
    source = _source(config, builder, config["train_split"], "input.train_split",
                     fraction=config["train_fraction"])
    if not hasattr(source, "labels") and not hasattr(source, "fields"):
        raise ValueError(f"Counting the classes of {config['dataset']} {config['train_split']} needs it in "
                         "memory: set input.cache=True.")
    return class_counts_of(source, _num_classes(builder, config["label_key"]))


def dataset_info(input_config) -> dict:
    """Returns dict(num_classes (None without a label key), num_train_examples, num_eval_examples)."""
    config = validate_input_config(input_config)
    builder = _builder(config)
    sources.check_keys(builder, config["image_key"], config["label_key"], config["text_key"])
    num_train = sources.check_split(builder, config["train_split"], "input.train_split")
    num_eval = sources.check_split(builder, config["eval_split"], "input.eval_split")
    label_key = config["label_key"]
    num_classes = None if label_key is None else _num_classes(builder, label_key)
    num_train = sources.fraction_count(num_train, config["train_fraction"])
    if config.get("long_tail") is not None:  # the subset's size sets the epochs' length
        num_train = _source(config, builder, config["train_split"], "input.train_split",
                            fraction=config["train_fraction"]).num_examples
    if config.get("train_classes"):  # counting the kept examples reads the split (the iterator reuses it)
        num_classes = len(config["train_classes"])
        num_train = _source(config, builder, config["train_split"], "input.train_split",
                            fraction=config["train_fraction"], classes=config.get("train_classes")).num_examples
    if config.get("eval_classes"):
        num_eval = _source(config, builder, config["eval_split"], "input.eval_split",
                           classes=config["eval_classes"]).num_examples
    return dict(num_classes=num_classes, num_train_examples=num_train, num_eval_examples=num_eval)


def _processes(process_index, process_count, global_batch_size):
    if process_index is None or process_count is None:
        import jax  # pylint: disable=g-import-not-at-top
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}.")
    if (isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int)
            or global_batch_size <= 0 or global_batch_size % process_count):
        raise ValueError(f"global_batch_size must be a positive multiple of the process count "
                         f"{process_count}, got {global_batch_size!r}.")
    return process_index, process_count


# ---------------------------------------------------------------------------------------------
# Per-step preprocessing.
# ---------------------------------------------------------------------------------------------

# The fields of a raw example that the pp sees; the rest of a raw batch is bookkeeping.
_EXAMPLE_FIELDS = ("image", "label", "text")
_STEP_FIELDS = ("step", "num_valid")


def _preprocess_steps(raw_batches, preprocess: ops.Preprocess, source, *, seed: int,
                      local_batch_size: int):
    """Returns per-step (fields, bookkeeping) batches of preprocessed examples, bad ones dropped."""
    tf = import_tensorflow()
    num_decode_ops = preprocess.num_decode_ops
    if getattr(source, "encoded", False) and not num_decode_ops:
        raise ValueError(f"pp string {preprocess.pp!r} must start with a decode op (decode or "
                         "decode_jpeg_and_inception_crop): this dataset's images are encoded.")
    decode_stage = preprocess.stage(0, num_decode_ops)
    rest_stage = preprocess.stage(num_decode_ops)
    element_key = sources.key(seed, sources.SALT_ELEMENT)
    caption_key = sources.key(seed, sources.SALT_CAPTION)

    def pick_caption(example, bookkeeping):
        captions = tf.strings.split(example["text"], sources.CAPTION_SEPARATOR)
        caption_seed = tf.random.experimental.stateless_fold_in(caption_key,
                                                                bookkeeping["element_id"])
        index = tf.random.stateless_uniform([], caption_seed, 0, tf.size(captions), tf.int32)
        return {**example, "text": captions[index]}

    def apply(stage, first: bool):
        @tf.autograph.experimental.do_not_convert
        def apply_stage(example, bookkeeping):
            if first and getattr(source, "caption_lists", False):
                example = pick_caption(example, bookkeeping)
            element_seed = tf.random.experimental.stateless_fold_in(element_key,
                                                                    bookkeeping["element_id"])
            return stage(example, element_seed), bookkeeping
        return apply_stage

    @tf.autograph.experimental.do_not_convert
    def per_step(raw):
        raw = dict(raw)
        scalars = {name: raw.pop(name) for name in _STEP_FIELDS if name in raw}
        example = {name: raw.pop(name) for name in _EXAMPLE_FIELDS if name in raw}
        # The bookkeeping travels beside the example, so no op can see, drop or overwrite it.
        elements = tf.data.Dataset.from_tensor_slices((example, raw))
        if num_decode_ops:
            elements = elements.map(apply(decode_stage, True), num_parallel_calls=tf.data.AUTOTUNE,
                                    deterministic=True)
            # Only decoding errors are forgiven: a bug in a later op still raises.
            elements = elements.ignore_errors()
        elements = elements.map(apply(rest_stage, not num_decode_ops), num_parallel_calls=tf.data.AUTOTUNE,
                                deterministic=True)
        if not elements.element_spec[0]:
            raise ValueError(f"pp string {preprocess.pp!r} leaves no field in the examples.")
        # An empty step (every image bad) yields no batch; the iterator reports it.
        return elements.batch(local_batch_size).map(
            lambda fields, bookkeeping: (fields, dict(bookkeeping, **scalars)))

    return raw_batches.interleave(per_step, cycle_length=_STEPS_IN_FLIGHT,
                                  num_parallel_calls=_STEPS_IN_FLIGHT, deterministic=True)


def _batch_field(value, local_batch_size: int):
    """Returns a batched field with its static batch size, uint8 as float32, int64 as int32."""
    tf = import_tensorflow()
    value = tf.ensure_shape(value, [local_batch_size] + value.shape[1:].as_list())
    # Images were always float32 batches; JAX's default integer is int32.
    if value.dtype == tf.uint8:
        return tf.cast(value, tf.float32)
    if value.dtype == tf.int64:
        return tf.cast(value, tf.int32)
    return value


def _finish(dataset, prefetch: int):
    tf = import_tensorflow()
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_optimization.map_parallelization = True
    dataset = dataset.with_options(options)
    return dataset.prefetch(prefetch) if prefetch else dataset


class DataIterator:
    """Iterator over dicts of numpy arrays, one per step; counts images with a bad encoding.

    `num_bad_examples` counts the images skipped because they failed to decode so far (plus
    those dropped while loading a split into memory). `num_steps` is the length of a finite
    (eval) iterator, None for an infinite (train) one.
    """

    def __init__(self, dataset, *, first_step: int, num_steps: int | None, num_bad_examples: int,
                 description: str):
        self._dataset = dataset
        self._iterator = None
        self._first_step = first_step
        self._next_step = first_step
        self.num_steps = num_steps
        self.num_bad_examples = num_bad_examples
        self._description = description

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = self._dataset.as_numpy_iterator()
        try:
            batch, bookkeeping = next(self._iterator)
        except StopIteration:
            if self.num_steps is not None and self._next_step < self._first_step + self.num_steps:
                self._raise_lost_step()
            raise
        step = int(bookkeeping["step"])
        if step != self._next_step:
            self._raise_lost_step()
        self._next_step += 1
        num_bad = int(bookkeeping["num_bad"])
        if num_bad:
            self.num_bad_examples += num_bad
            _LOG.warning("%s: %d image(s) of step %d failed to decode and were skipped (%d so "
                         "far).", self._description, num_bad, step, self.num_bad_examples)
        return batch

    def _raise_lost_step(self):
        raise RuntimeError(f"{self._description}: every image of step {self._next_step} failed to "
                           "decode; the data is likely corrupt.")


def build_train_dataset(source, preprocess: ops.Preprocess, *, global_batch_size: int, seed: int,
                        start_step: int, process_index: int, process_count: int,
                        prefetch: int = 2, repeats: int = 1):
    """Returns the tf.data train pipeline over `source` (see make_train_iterator)."""
    tf = import_tensorflow()
    local_batch_size = global_batch_size // process_count
    raw = source.train_batches(seed=seed, start_step=start_step,
                               global_batch_size=global_batch_size, process_index=process_index,
                               process_count=process_count, repeats=repeats)
    batches = _preprocess_steps(raw, preprocess, source, seed=seed,
                                local_batch_size=local_batch_size)

    @tf.autograph.experimental.do_not_convert
    def finalize(fields, bookkeeping):
        count = tf.shape(bookkeeping["element_id"])[0]
        fill = tf.range(local_batch_size) % count  # Repeat good examples into bad ones' slots.
        fields = {name: _batch_field(tf.gather(value, fill), local_batch_size)
                  for name, value in fields.items()}
        return fields, dict(step=bookkeeping["step"], num_bad=local_batch_size - count)

    batches = batches.map(finalize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _finish(batches, prefetch)


def build_eval_dataset(source, preprocess: ops.Preprocess, *, global_batch_size: int,
                       process_index: int, process_count: int, prefetch: int = 2):
    """Returns (the tf.data eval pipeline over `source`, number of steps)."""
    tf = import_tensorflow()
    local_batch_size = global_batch_size // process_count
    raw, num_steps = source.eval_batches(global_batch_size=global_batch_size,
                                         process_index=process_index, process_count=process_count)
    batches = _preprocess_steps(raw, preprocess, source, seed=0, local_batch_size=local_batch_size)

    @tf.autograph.experimental.do_not_convert
    def finalize(fields, bookkeeping):
        if "mask" in fields:
            raise ValueError(f"pp string {preprocess.pp!r} makes a field 'mask', the name of the "
                             "eval batches' padding mask; rename it (rename('mask', ...)).")
        slots = bookkeeping["slot"]
        # position[j]: the kept example in slot j, or -1 where slot j lost its image.
        position = tf.scatter_nd(slots[:, None], tf.range(1, tf.shape(slots)[0] + 1),
                                 [local_batch_size]) - 1
        present = position >= 0
        index = tf.maximum(position, 0)

        def place(value):
            gathered = tf.gather(value, index)
            where = tf.reshape(present, [local_batch_size] + [1] * (len(value.shape) - 1))
            return _batch_field(tf.where(where, gathered, tf.zeros_like(gathered)),
                                local_batch_size)

        fields = {name: place(value) for name, value in fields.items()}
        valid = bookkeeping["valid"]
        fields["mask"] = tf.ensure_shape(tf.gather(valid, index) & present, [local_batch_size])
        return fields, dict(step=bookkeeping["step"],
                            num_bad=bookkeeping["num_valid"]
                            - tf.reduce_sum(tf.cast(valid, tf.int32)))

    batches = batches.map(finalize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _finish(batches, prefetch), num_steps


# ---------------------------------------------------------------------------------------------
# The public iterators.
# ---------------------------------------------------------------------------------------------

def make_train_iterator(input_config, *, global_batch_size: int, seed: int, start_step: int = 0,
                        process_index: int | None = None,
                        process_count: int | None = None) -> DataIterator:
    """Returns an infinite iterator of this host's train batches from `start_step` on.

    Each batch is a dict of the fields the pp leaves, with a leading axis local_batch: with
    the usual pp dict(image=float32 (local_batch, H, W, C), label=int32 (local_batch,)); uint8
    fields become float32, int64 fields int32. Labels stay class ids: the trainer one-hots,
    smooths and mixes them on the device with `vitjax.data.make_batch_transform`.
    """
    config = validate_input_config(input_config)
    process_index, process_count = _processes(process_index, process_count, global_batch_size)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}.")
    if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
        raise ValueError(f"start_step must be an int >= 0, got {start_step!r}.")
    if mixing(config) and global_batch_size % 2:
        raise ValueError(f"Mixup / cutmix pair example i with example batch-1-i and need an even "
                         f"global batch, got {global_batch_size}.")
    builder = _builder(config)
    source = _source(config, builder, config["train_split"], "input.train_split",
                     fraction=config["train_fraction"], classes=config.get("train_classes"))
    dataset = build_train_dataset(
        source, ops.build_preprocess(_train_pp(config)), global_batch_size=global_batch_size,
        seed=seed, start_step=start_step, process_index=process_index,
        process_count=process_count, prefetch=config["prefetch"],
        repeats=config["repeated_augmentation"])
    return DataIterator(dataset, first_step=start_step, num_steps=None,
                        num_bad_examples=source.num_bad_examples,
                        description=f"{config['dataset']} {config['train_split']}")


def make_eval_iterator(input_config, *, global_batch_size: int, process_index: int | None = None,
                       process_count: int | None = None) -> DataIterator:
    """Returns a finite iterator over the eval split: every example once over all hosts.

    Each batch holds the fields the pp leaves (as in make_train_iterator; usually image=float32
    (local_batch, H, W, C), label=int32 (local_batch,)) and mask=bool (local_batch,), False on
    the padding that fills the last batch and on images that failed to decode.
    """
    config = validate_input_config(input_config)
    process_index, process_count = _processes(process_index, process_count, global_batch_size)
    if config["pp_eval"] is None:
        raise ValueError("input.pp_eval is needed for evaluation, e.g. "
                         "'decode|resize_small(256)|central_crop(224)|value_range(-1, 1)'.")
    builder = _builder(config)
    source = _source(config, builder, config["eval_split"], "input.eval_split", classes=config.get("eval_classes"))
    dataset, num_steps = build_eval_dataset(
        source, ops.build_preprocess(config["pp_eval"]), global_batch_size=global_batch_size,
        process_index=process_index, process_count=process_count, prefetch=config["prefetch"])
    return DataIterator(dataset, first_step=0, num_steps=num_steps,
                        num_bad_examples=source.num_bad_examples,
                        description=f"{config['dataset']} {config['eval_split']}")
