"""Preprocessing ops, composed by a big_vision-like pp string: "op1(args)|op2(args)|...".

Parsing and argument checks are pure Python (`parse_pp`, `build_preprocess`), so a config is
validated without importing TensorFlow; the ops themselves are TF functions that run per
example inside `tf.data`. Arguments are Python literals, positional or by keyword, and an op
without arguments may drop its parentheses ("flip_lr").

Every op maps an example dict to an example dict: `op(example, seed) -> example`. An example
starts as {"image": image, "label": int32 label} (the dataset's `input.image_key` and
`input.label_key`, renamed; no "label" when `input.label_key` is None), plus {"text": tf.string}
when `input.text_key` names a caption feature (one caption of a list, picked per element from a
stateless seed); whatever fields the pp leaves in it become the fields of the
batch (uint8 fields as float32, int64 as int32; each field needs one shape across examples).
`seed` is a stateless TF seed (int64, shape [2]) derived from (run seed, global element index,
op position), so the random ops give the same augmentation for the same element after a
resume. An op that reads a field the example lacks fails when the pipeline is built, naming
the fields there are.

Image ops read the field `key` and write the field `outkey` (default: `key`, in place), as in
big_vision: `inception_crop(224, key="image", outkey="image_1")` writes a crop of "image" to
"image_1" and keeps "image".

Image ops (each also takes `key="image"`, `outkey=None`; other arguments as in Python, defaults
shown):

- `decode(channels=3)`: encoded JPEG/PNG/GIF/BMP bytes -> uint8 (H, W, channels); an image that
  is already decoded (in-memory datasets) passes through unchanged.
- `decode_jpeg_and_inception_crop(size, scale=(0.08, 1.0), ratio=(3/4, 4/3), method="bilinear",
  antialias=False)`: `inception_crop` fused with JPEG decoding, which decodes only the crop.
- `inception_crop(size, scale=(0.08, 1.0), ratio=(3/4, 4/3), method="bilinear",
  antialias=False)`: random-resized crop, a box of `scale` x the area with aspect ratio in
  `ratio` (100 tries, else the whole image), resized to `size`.
- `resize(size, method="bilinear", antialias=False)`: to `size`, an int or (height, width).
- `resize_small(size, method="bilinear", antialias=False)`: the shorter side to `size`,
  keeping the aspect ratio.
- `central_crop(size)`: the central `size` crop (the image must be at least that large).
- `random_crop(size, padding=0)`: zero-pad each side by `padding`, then a random `size` crop.
- `flip_lr(probability=0.5)`: mirror left-right.
- `gray_to_rgb()`: 1 channel -> 3 channels; 3-channel images pass through.
- `randaug(num_layers=2, magnitude=9, magnitude_std=0.0, increasing=True, probability=0.5,
  fill=(124, 116, 104))`: timm's RandAugment on uint8 images, see `vitjax.data.augment`.
  timm's "rand-m9-mstd0.5-inc1" (DeiT, MAE) is `randaug(2, 9, magnitude_std=0.5)`; note the
  default increasing=True, where timm's string parser defaults to inc0.
- `value_range(vmin=-1, vmax=1, in_min=0, in_max=255, clip_values=False)`: float32, mapping
  [in_min, in_max] linearly onto [vmin, vmax].
- `normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)`: float32 (image / 255 - mean) / std.
- `random_erasing(probability=0.25, mode="pixel", min_area=0.02, max_area=1/3,
  min_aspect=0.3)`: timm's RandomErasing on a normalised float image; mode "pixel", "rand" or
  "const".

Self-supervised corruption (the float image, after `value_range` / `normalize`):

- `gmml_corrupt(mask_ratio=0.75, corruption="noise", align=1, max_block_fraction=0.3)`: GMML's
  per-example corruption (`vitjax.masking.corrupt_example`, the rule the GMML / SiT objectives draw
  on the device): adds "image_corrupted" (groups covering U(min(0.5, r), r) of the image filled
  with N(0, 1) noise or zeros) and "corruption_mask" (H, W), keeping "image" clean. Inside `views`
  each view gets its own (`image_corrupted_0`, `corruption_mask_0`, ...). The replacement by another
  image's pixels needs the batch: `input.gmml_replace` runs it on the device.

Multi-view op:

- `views(num_views, pp, [num_views, pp, ...], key="image", outkey=None)`: replaces the field
  `key` by views `{outkey}_0`, `{outkey}_1`, ... (outkey defaults to `key`): `num_views` views
  through the sub-pipeline `pp`, then the next group's views, and so on. Every view draws its
  own seeds (from this op's seed and the view index), so the views of one image differ and each
  replays exactly. The sub-pipeline sees the example with the input image as "image"; its
  "image" becomes the view, and every field it adds gets the view's suffix too (a sub-pipeline
  `...|copy("image", "small")` gives `small_0`, `small_1`, ...); its changes to other fields are
  dropped. Decode ops cannot be in a view: decode before `views`.
  Two views (SimCLR, SiT): `decode|views(2, "inception_crop(224)|flip_lr|value_range(-1, 1)")`
  gives image_0 and image_1. DINO's crops: `views(2, "inception_crop(224, scale=(0.4, 1))|...",
  6, "inception_crop(96, scale=(0.05, 0.4))|...")` gives image_0, image_1 at 224 and image_2 ...
  image_7 at 96. Keep the full image beside the views with `copy("image", "full")` before.

Field ops (deterministic):

- `copy(inkey, outkey)`: the field `outkey` becomes a copy of `inkey`.
- `rename(old, new)`: the field `old` is renamed `new`.
- `keep(*keys)`: keeps only these fields.
- `drop(*keys)`: removes these fields.

Label ops (each takes `key="label"`, `outkey=None`):

- `label_map(mapping, default=None)`: replaces an int label by `mapping[label]`; `mapping` is a
  dict {old: new} or a sequence indexed by the old label (e.g. CIFAR-100's 100 fine classes to
  its 20 coarse ones). A label outside the mapping gets `default`, or stops the pipeline with an
  error where `default` is None. Ops cannot drop examples, so a subset of classes is a relabel
  (e.g. the others to a `default` class), not a filter.
- `onehot(num_classes, smoothing=0.0)`: float32 (num_classes,) with timm's label smoothing
  (1 - smoothing + smoothing / num_classes on the class, smoothing / num_classes elsewhere).
  Training needs no such op: the device-side transform (`vitjax.data.make_batch_transform`)
  one-hots and smooths int labels; it takes already-float labels as they are.

Decode ops must come first: only their failures (bad encodings) are forgiven by the pipeline.

Resize methods: bilinear, bicubic, nearest, area, lanczos3, lanczos5, gaussian, mitchellcubic
(`tf.image.resize`). Resizing keeps the dtype: a uint8 image stays uint8 (rounded, clipped) so
RandAugment can follow a crop, as in timm where it runs on PIL images.

Your own ops: register a builder, which checks its arguments in Python and returns the op, with
`vitjax.data.register_op(name, kind)`; kind "random" for an op that uses its seed, "decode"
for one that reads encoded bytes (it must come first; its failures are forgiven), else
"deterministic". `vitjax.data.image_op` turns a builder of `apply(image, seed) -> image` into
one of a dict op with the `key` / `outkey` arguments. List the module in `input.pp_modules` so
that it is imported before the pp strings are parsed. Import TensorFlow inside the op
(`vitjax.data.ops.import_tensorflow()`) to keep config validation free of it.

    @vitjax.data.register_op("solarize_half", kind="random")
    @vitjax.data.image_op
    def solarize_half(threshold=128):  # The op's arguments, checked here.
        def apply(image, seed):
            tf = import_tensorflow()
            solarized = tf.where(image >= threshold, 255 - image, image)
            return tf.where(tf.random.stateless_uniform([], seed) < 0.5, solarized, image)
        return apply
"""
import ast
import collections.abc
import dataclasses
import functools
import importlib
import inspect
import math
from typing import Any, Callable, Iterable

from vitjax.data._tf import import_tensorflow

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_METHODS = ("bilinear", "bicubic", "nearest", "area", "lanczos3", "lanczos5", "gaussian",
                  "mitchellcubic")
ERASING_MODES = ("pixel", "rand", "const")

# Op kinds: a "decode" op reads encoded bytes (its failures are the bad encodings that get
# skipped); a "random" op consumes its seed.
DECODE, RANDOM, DETERMINISTIC = "decode", "random", "deterministic"
KINDS = (DETERMINISTIC, RANDOM, DECODE)


@dataclasses.dataclass(frozen=True)
class _OpSpec:
    builder: Callable[..., Callable]
    kind: str


_OPS: dict[str, _OpSpec] = {}


def register_op(name: str, kind: str = DETERMINISTIC) -> Callable:
    """Returns a decorator registering an op builder under `name` for pp strings.

    The builder takes the op's arguments, checks them (ValueError) and returns
    `op(example: dict, seed) -> dict`. Registering a taken name raises, unless it is the same
    function again (a reloaded module).
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"An op name must be a Python identifier, got {name!r}.")
    if kind not in KINDS:
        raise ValueError(f"Op kind must be one of {', '.join(KINDS)}; got {kind!r}.")

    def decorator(builder):
        if name in _OPS and _qualified_name(_OPS[name].builder) != _qualified_name(builder):
            raise ValueError(f"Op {name!r} is already registered by "
                             f"{_qualified_name(_OPS[name].builder)}; pick another name.")
        _OPS[name] = _OpSpec(builder, kind)
        return builder
    return decorator


def _qualified_name(function) -> str:
    return f"{function.__module__}.{function.__qualname__}"


def valid_ops() -> list[str]:
    """Returns the sorted names of all preprocessing ops."""
    return sorted(_OPS)


def import_pp_modules(modules: Iterable[str], role: str = "input.pp_modules"):
    """Imports the modules that register ops; raises ValueError naming one that fails."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:  # pylint: disable=broad-except  # Anything a module raises.
            raise ValueError(f"{role}: importing module {module!r} failed: "
                             f"{type(error).__name__}: {error}") from error


def image_op(builder: Callable) -> Callable:
    """Returns `builder` (of `apply(image, seed) -> image`) as a builder of a dict op.

    The returned builder takes the same arguments plus keyword-only `key="image"` (the field
    read) and `outkey=None` (the field written; default `key`).
    """
    signature = inspect.signature(builder)
    parameters = list(signature.parameters.values())
    if {"key", "outkey"} & {parameter.name for parameter in parameters}:
        raise TypeError(f"{builder.__name__} already has a key or outkey argument.")
    extra = [inspect.Parameter("key", inspect.Parameter.KEYWORD_ONLY, default="image"),
             inspect.Parameter("outkey", inspect.Parameter.KEYWORD_ONLY, default=None)]
    has_var_keyword = parameters and parameters[-1].kind == inspect.Parameter.VAR_KEYWORD
    parameters = (parameters[:-1] + extra + parameters[-1:] if has_var_keyword
                  else parameters + extra)

    @functools.wraps(builder)
    def build(*args, key="image", outkey=None, **kwargs):
        key, outkey = _field(key, "key"), _field(key if outkey is None else outkey, "outkey")
        apply_to_image = builder(*args, **kwargs)

        def apply(example, seed):
            return {**example, outkey: apply_to_image(example[key], seed)}
        return apply

    build.__signature__ = signature.replace(parameters=parameters)
    return build


# ---------------------------------------------------------------------------------------------
# Parsing (pure Python).
# ---------------------------------------------------------------------------------------------

def _split_top_level(pp: str) -> list[str]:
    """Returns `pp` split on the "|" that are outside brackets and quotes."""
    parts, depth, quote, start = [], 0, None, 0
    for position, char in enumerate(pp):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "|" and depth == 0:
            parts.append(pp[start:position])
            start = position + 1
    parts.append(pp[start:])
    return parts


def parse_pp(pp: str) -> list[tuple[str, tuple, dict]]:
    """Returns the ops of a pp string as (name, args, kwargs); raises ValueError if malformed."""
    if not isinstance(pp, str) or not pp.strip():
        raise ValueError(f"A pp string must be a non-empty string like 'decode|flip_lr', "
                         f"got {pp!r}.")
    parsed = []
    for text in _split_top_level(pp):
        text = text.strip()
        if not text:
            raise ValueError(f"Empty op in pp string {pp!r} (two '|' in a row, or one at an "
                             "end).")
        try:
            node = ast.parse(text, mode="eval").body
        except SyntaxError as error:
            raise ValueError(f"Cannot parse op {text!r} in pp string {pp!r}: "
                             f"{error.msg}.") from None
        if isinstance(node, ast.Name):
            name, args, kwargs = node.id, (), {}
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            name = node.func.id
            try:
                args = tuple(ast.literal_eval(arg) for arg in node.args)
                kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
            except ValueError:
                raise ValueError(f"Op {text!r} in pp string {pp!r}: arguments must be Python "
                                 "literals (numbers, strings, tuples).") from None
            if any(kw.arg is None for kw in node.keywords):
                raise ValueError(f"Op {text!r} in pp string {pp!r}: '**' arguments are not "
                                 "allowed.")
        else:
            raise ValueError(f"Cannot parse op {text!r} in pp string {pp!r}: expected 'name' or "
                             "'name(args)'.")
        if name not in _OPS:
            raise ValueError(f"Unknown op {name!r} in pp string {pp!r}; valid ops: "
                             f"{', '.join(valid_ops())} (register more with "
                             "vitjax.data.register_op and input.pp_modules).")
        parsed.append((name, args, kwargs))
    return parsed


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """A parsed pp string: callable as `preprocess(example, seed) -> example` inside tf.data."""

    pp: str
    names: tuple[str, ...]
    kinds: tuple[str, ...]
    functions: tuple[Callable, ...]

    @property
    def num_decode_ops(self) -> int:
        """Returns how many leading ops (up to and including the last decode op) read bytes."""
        decode_positions = [i for i, kind in enumerate(self.kinds) if kind == DECODE]
        return decode_positions[-1] + 1 if decode_positions else 0

    def stage(self, start: int, stop: int | None = None) -> Callable:
        """Returns a function applying ops [start, stop), with the seeds the full chain uses."""
        stop = len(self.functions) if stop is None else stop

        def apply(example, seed):
            tf = import_tensorflow()
            for position in range(start, stop):
                op_seed = tf.random.experimental.stateless_fold_in(seed, position)
                fields = ", ".join(example) or "none"
                try:
                    example = self.functions[position](example, op_seed)
                except KeyError as error:  # Raised while tracing, so the fields are known.
                    raise ValueError(f"Op {self.names[position]!r} (op {position} of pp string "
                                     f"{self.pp!r}) reads the field {error.args[0]!r}, which the "
                                     f"example does not have; its fields: {fields}.") from None
                if not isinstance(example, collections.abc.Mapping):
                    raise TypeError(f"Op {self.names[position]!r} in pp string {self.pp!r} "
                                    f"returned a {type(example).__name__}; an op returns the "
                                    "example dict (wrap an image function with "
                                    "vitjax.data.image_op).")
                example = dict(example)
            return example
        return apply

    def __call__(self, example, seed):
        if not isinstance(example, collections.abc.Mapping):
            raise TypeError(f"A Preprocess takes an example dict such as {{'image': image}}, got "
                            f"a {type(example).__name__}.")
        return self.stage(0)(dict(example), seed)


def build_preprocess(pp: str) -> Preprocess:
    """Returns the `Preprocess` of a pp string; raises ValueError naming a bad op or argument."""
    names, kinds, functions = [], [], []
    for name, args, kwargs in parse_pp(pp):
        spec = _OPS[name]
        signature = inspect.signature(spec.builder)
        try:
            signature.bind(*args, **kwargs)
        except TypeError as error:
            raise ValueError(f"Bad arguments for op {name!r} in pp string {pp!r}: {error}. "
                             f"Signature: {name}{signature}.") from None
        try:
            function = spec.builder(*args, **kwargs)
        except (TypeError, ValueError) as error:
            raise ValueError(f"Bad arguments for op {name!r} in pp string {pp!r}: {error}. "
                             f"Signature: {name}{signature}.") from None
        if spec.kind == DECODE and kinds and kinds[-1] != DECODE:
            raise ValueError(f"Op {name!r} decodes bytes, so it must come first in pp string "
                             f"{pp!r}, before {names[-1]!r}.")
        names.append(name)
        kinds.append(spec.kind)
        functions.append(function)
    return Preprocess(pp, tuple(names), tuple(kinds), tuple(functions))


# ---------------------------------------------------------------------------------------------
# Argument checks (pure Python, run when the pp string is built).
# ---------------------------------------------------------------------------------------------

def _field(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a field name (a non-empty string), got {value!r}")
    return value


def _size(value: Any, name: str = "size") -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else value
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair)):
        raise ValueError(f"{name} must be a positive int or (height, width), got {value!r}")
    return int(pair[0]), int(pair[1])


def _interval(value: Any, name: str, low: float, high: float) -> tuple[float, float]:
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, (int, float)) for v in value)
            or not low <= value[0] <= value[1] <= high):
        raise ValueError(f"{name} must be (min, max) with {low} <= min <= max <= {high}, "
                         f"got {value!r}")
    return float(value[0]), float(value[1])


def _probability(value: Any, name: str = "probability") -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _choice(value: Any, choices: tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _per_channel(value: Any, name: str) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not value or not all(
            isinstance(v, (int, float)) for v in value):
        raise ValueError(f"{name} must be a number or a tuple of numbers, got {value!r}")
    return tuple(float(v) for v in value)


def _check_channels(image, values: tuple, name: str, op: str):
    """Raises at trace time if per-channel `values` cannot match the image's channels."""
    channels = image.shape[-1]
    if channels is not None and len(values) not in (1, channels):
        raise ValueError(f"{op}: {name} has {len(values)} values but the image has {channels} "
                         "channels (add gray_to_rgb before it for 1-channel images)")


def _cast_like(image, dtype):
    """Returns float `image` cast to `dtype`, rounded and clipped for uint8."""
    tf = import_tensorflow()
    if image.dtype == dtype:  # 'nearest' keeps the input dtype
        return image
    if dtype == tf.uint8:
        return tf.cast(tf.clip_by_value(tf.round(tf.cast(image, tf.float32)), 0.0, 255.0), tf.uint8)
    return tf.cast(image, dtype)


def _resize(image, height, width, method, antialias):
    tf = import_tensorflow()
    resized = tf.image.resize(image, (height, width), method=method, antialias=antialias)
    return _cast_like(resized, image.dtype)


def _crop_box(image_shape, seed, scale, ratio):
    """Returns (begin, size) of a random inception-style crop box for an image of that shape."""
    tf = import_tensorflow()
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape, bounding_boxes=tf.zeros([0, 0, 4], tf.float32), seed=seed,
        min_object_covered=0.0, aspect_ratio_range=ratio, area_range=scale, max_attempts=100,
        use_image_if_no_bounding_boxes=True)
    return begin, size


# ---------------------------------------------------------------------------------------------
# Image ops. Each builder checks its arguments in Python and returns `apply(image, seed)`;
# `image_op` makes it an op on the example's field `key`.
# ---------------------------------------------------------------------------------------------

def _inception_crop_image(size, scale, ratio, method, antialias):
    height, width = _size(size)
    scale = _interval(scale, "scale", 0.0, 1.0)
    ratio = _interval(ratio, "ratio", 0.0, math.inf)
    _choice(method, RESIZE_METHODS, "method")

    def apply(image, seed):
        tf = import_tensorflow()
        begin, crop_size = _crop_box(tf.shape(image), seed, scale, ratio)
        image = tf.slice(image, begin, crop_size)
        return _resize(image, height, width, method, antialias)
    return apply


@register_op("decode", DECODE)
@image_op
def decode(channels=3):
    """Returns an op decoding JPEG/PNG/GIF/BMP bytes to uint8 (H, W, channels)."""
    _choice(channels, (1, 3), "channels")

    def apply(image, seed):
        del seed
        tf = import_tensorflow()
        if image.dtype != tf.string:
            return image  # Already decoded (in-memory datasets hold decoded arrays).
        return tf.io.decode_image(image, channels=channels, dtype=tf.uint8, expand_animations=False)
    return apply


@register_op("decode_jpeg_and_inception_crop", DECODE)
@image_op
def decode_jpeg_and_inception_crop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                                   method="bilinear", antialias=False):
    """Returns an op decoding only a random inception crop of a JPEG, resized to `size`."""
    height, width = _size(size)
    crop = _inception_crop_image(size, scale, ratio, method, antialias)
    scale = _interval(scale, "scale", 0.0, 1.0)
    ratio = _interval(ratio, "ratio", 0.0, math.inf)

    def apply(image, seed):
        tf = import_tensorflow()
        if image.dtype != tf.string:
            return crop(image, seed)
        shape = tf.image.extract_jpeg_shape(image)
        begin, crop_size = _crop_box(shape, seed, scale, ratio)
        window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
        image = tf.io.decode_and_crop_jpeg(image, window, channels=3)
        return _resize(image, height, width, method, antialias)
    return apply


@register_op("inception_crop", RANDOM)
@image_op
def inception_crop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), method="bilinear",
                   antialias=False):
    """Returns an op taking a random-resized (inception) crop resized to `size`."""
    return _inception_crop_image(size, scale, ratio, method, antialias)


@register_op("resize", DETERMINISTIC)
@image_op
def resize(size, method="bilinear", antialias=False):
    """Returns an op resizing to `size` (int or (height, width)), keeping the dtype."""
    height, width = _size(size)
    _choice(method, RESIZE_METHODS, "method")

    def apply(image, seed):
        del seed
        return _resize(image, height, width, method, antialias)
    return apply


@register_op("resize_small", DETERMINISTIC)
@image_op
def resize_small(size, method="bilinear", antialias=False):
    """Returns an op resizing so that the shorter side is `size`, keeping the aspect ratio."""
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    _choice(method, RESIZE_METHODS, "method")

    def apply(image, seed):
        del seed
        tf = import_tensorflow()
        shape = tf.shape(image)
        height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
        short_side = tf.minimum(height, width)
        new_height = tf.cast(tf.round(height * size / short_side), tf.int32)
        new_width = tf.cast(tf.round(width * size / short_side), tf.int32)
        resized = tf.image.resize(image, tf.stack([new_height, new_width]), method=method,
                                  antialias=antialias)
        return _cast_like(resized, image.dtype)
    return apply


@register_op("central_crop", DETERMINISTIC)
@image_op
def central_crop(size):
    """Returns an op taking the central crop of `size` (int or (height, width))."""
    height, width = _size(size)

    def apply(image, seed):
        del seed
        tf = import_tensorflow()
        shape = tf.shape(image)
        top, left = (shape[0] - height) // 2, (shape[1] - width) // 2
        image = tf.slice(image, tf.stack([top, left, 0]), tf.stack([height, width, -1]))
        return tf.ensure_shape(image, [height, width, None])
    return apply


@register_op("random_crop", RANDOM)
@image_op
def random_crop(size, padding=0):
    """Returns an op zero-padding by `padding` then cropping a random `size` window."""
    height, width = _size(size)
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative int, got {padding!r}")

    def apply(image, seed):
        tf = import_tensorflow()
        if padding:
            image = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
        channels = tf.shape(image)[2]
        cropped = tf.image.stateless_random_crop(image, tf.stack([height, width, channels]), seed)
        return tf.ensure_shape(cropped, [height, width, image.shape[-1]])
    return apply


@register_op("flip_lr", RANDOM)
@image_op
def flip_lr(probability=0.5):
    """Returns an op mirroring the image left-right with `probability`."""
    probability = _probability(probability)

    def apply(image, seed):
        tf = import_tensorflow()
        flip = tf.random.stateless_uniform([], seed) < probability
        return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
    return apply


@register_op("gray_to_rgb", DETERMINISTIC)
@image_op
def gray_to_rgb():
    """Returns an op repeating a single channel three times (3-channel images pass through)."""

    def apply(image, seed):
        del seed
        tf = import_tensorflow()
        channels = image.shape[-1]
        if channels == 3:
            return image
        if channels == 1:
            return tf.tile(image, [1, 1, 3])
        if channels is None:
            rgb = tf.cond(tf.shape(image)[-1] == 1, lambda: tf.tile(image, [1, 1, 3]),
                          lambda: image)
            return tf.ensure_shape(rgb, [None, None, 3])
        raise ValueError(f"gray_to_rgb expects 1 or 3 channels, got {channels}")
    return apply


@register_op("randaug", RANDOM)
@image_op
def randaug(num_layers=2, magnitude=9, magnitude_std=0.0, increasing=True, probability=0.5,
            fill=(124, 116, 104)):
    """Returns an op applying timm's RandAugment (see `vitjax.data.augment`) to a uint8 image."""
    if not isinstance(num_layers, int) or num_layers < 0:
        raise ValueError(f"num_layers must be a non-negative int, got {num_layers!r}")
    if not isinstance(magnitude, (int, float)) or not 0 <= magnitude <= 10:
        raise ValueError(f"magnitude must be in [0, 10] (timm's scale), got {magnitude!r}")
    if not isinstance(magnitude_std, (int, float)) or magnitude_std < 0:
        raise ValueError(f"magnitude_std must be >= 0 (inf: uniform in [0, magnitude]), "
                         f"got {magnitude_std!r}")
    if not isinstance(increasing, bool):
        raise ValueError(f"increasing must be True or False, got {increasing!r}")
    probability = _probability(probability)
    fill = _per_channel(fill, "fill")

    def apply(image, seed):
        from vitjax.data import augment  # pylint: disable=g-import-not-at-top
        return augment.rand_augment(image, seed, num_layers=num_layers, magnitude=magnitude,
                                    magnitude_std=magnitude_std, increasing=increasing,
                                    probability=probability, fill=fill)
    return apply


@register_op("value_range", DETERMINISTIC)
@image_op
def value_range(vmin=-1.0, vmax=1.0, in_min=0.0, in_max=255.0, clip_values=False):
    """Returns an op mapping [in_min, in_max] linearly to [vmin, vmax] as float32."""
    for name, value in (("vmin", vmin), ("vmax", vmax), ("in_min", in_min), ("in_max", in_max)):
        if not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
    if in_max <= in_min:
        raise ValueError(f"in_max must exceed in_min, got in_min={in_min}, in_max={in_max}")

    def apply(image, seed):
        del seed
        tf = import_tensorflow()
        image = tf.cast(image, tf.float32)
        if clip_values:
            image = tf.clip_by_value(image, in_min, in_max)
        return (image - in_min) / (in_max - in_min) * (vmax - vmin) + vmin
    return apply


@register_op("normalize", DETERMINISTIC)
@image_op
def normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Returns an op computing float32 (image / 255 - mean) / std per channel."""
    mean, std = _per_channel(mean, "mean"), _per_channel(std, "std")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {std}")

    def apply(image, seed):
        del seed
        tf = import_tensorflow()
        _check_channels(image, mean, "mean", "normalize")
        _check_channels(image, std, "std", "normalize")
        image = tf.cast(image, tf.float32) / 255.0
        return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)
    return apply


@register_op("random_erasing", RANDOM)
@image_op
def random_erasing(probability=0.25, mode="pixel", min_area=0.02, max_area=1 / 3, min_aspect=0.3):
    """Returns an op applying timm's RandomErasing (one box) to a normalised float image."""
    probability = _probability(probability)
    _choice(mode, ERASING_MODES, "mode")
    _interval((min_area, max_area), "(min_area, max_area)", 0.0, 1.0)
    if not isinstance(min_aspect, (int, float)) or not 0 < min_aspect <= 1:
        raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect!r}")

    def apply(image, seed):
        from vitjax.data import augment  # pylint: disable=g-import-not-at-top
        return augment.random_erasing(image, seed, probability=probability, mode=mode,
                                      min_area=min_area, max_area=max_area, min_aspect=min_aspect)
    return apply


# ---------------------------------------------------------------------------------------------
# Photometric ops of the self-supervised views (DINO / SiT): on pixels in [0, 255], uint8 or float,
# before `normalize` / `value_range`; the output keeps the input's dtype.
# ---------------------------------------------------------------------------------------------

def _as_float(image):
    tf = import_tensorflow()
    return tf.cast(image, tf.float32)


def _like(result, image):
    tf = import_tensorflow()
    if image.dtype == tf.uint8:
        return tf.cast(tf.round(tf.clip_by_value(result, 0.0, 255.0)), tf.uint8)
    return tf.cast(tf.clip_by_value(result, 0.0, 255.0), image.dtype)


def _gray(image):
    """Returns the (H, W, 1) luma of an RGB image (ITU-R 601, as PIL's convert("L"))."""
    tf = import_tensorflow()
    return tf.reduce_sum(image * tf.constant([0.299, 0.587, 0.114], tf.float32), axis=-1, keepdims=True)


@register_op("color_jitter", RANDOM)
@image_op
def color_jitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, probability=0.8):
    """Returns an op that, with `probability`, scales brightness, contrast and saturation by factors drawn from
    [1 - x, 1 + x] and shifts the hue by [-hue, hue] of a turn (torchvision's ColorJitter, in this fixed order)."""
    for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"color_jitter: {name} must be a number >= 0, got {value!r}")
    if not isinstance(hue, (int, float)) or not 0.0 <= hue <= 0.5:
        raise ValueError(f"color_jitter: hue must be a number in [0, 0.5], got {hue!r}")
    probability = _probability(probability)

    def apply(image, seed):
        tf = import_tensorflow()
        if image.shape[-1] != 3:
            raise ValueError(f"color_jitter needs RGB images, got {image.shape[-1]} channel(s)")
        seeds = tf.random.experimental.stateless_split(seed, 5)
        factors = [tf.random.stateless_uniform([], seeds[i], 1.0 - value, 1.0 + value)
                   for i, value in enumerate((brightness, contrast, saturation))]
        x = _as_float(image)
        x = tf.clip_by_value(x * factors[0], 0.0, 255.0)
        x = tf.clip_by_value((x - tf.reduce_mean(_gray(x))) * factors[1] + tf.reduce_mean(_gray(x)), 0.0, 255.0)
        x = tf.clip_by_value((x - _gray(x)) * factors[2] + _gray(x), 0.0, 255.0)
        if hue > 0:
            shift = tf.random.stateless_uniform([], seeds[3], -hue, hue)
            hsv = tf.image.rgb_to_hsv(x / 255.0)
            hsv = tf.concat([tf.math.floormod(hsv[..., :1] + shift, 1.0), hsv[..., 1:]], axis=-1)
            x = tf.image.hsv_to_rgb(hsv) * 255.0
        apply_it = tf.random.stateless_uniform([], seeds[4]) < probability
        return tf.cond(apply_it, lambda: _like(x, image), lambda: image)
    return apply


@register_op("random_grayscale", RANDOM)
@image_op
def random_grayscale(probability=0.2):
    """Returns an op replacing, with `probability`, every channel of an RGB image by its luma."""
    probability = _probability(probability)

    def apply(image, seed):
        tf = import_tensorflow()
        gray = _like(tf.tile(_gray(_as_float(image)), [1, 1, 3]), image)
        return tf.cond(tf.random.stateless_uniform([], seed) < probability, lambda: gray, lambda: image)
    return apply


@register_op("gaussian_blur", RANDOM)
@image_op
def gaussian_blur(probability=0.5, sigma_min=0.1, sigma_max=2.0):
    """Returns an op blurring, with `probability`, by a Gaussian of sigma ~ U(sigma_min, sigma_max) pixels (DINO's
    PIL GaussianBlur radius), separable, reflected at the border, 2 x ceil(3 sigma_max) + 1 taps."""
    probability = _probability(probability)
    if not isinstance(sigma_min, (int, float)) or not 0 < sigma_min <= sigma_max:
        raise ValueError(f"gaussian_blur needs 0 < sigma_min <= sigma_max, got {sigma_min!r}, {sigma_max!r}")
    half = int(math.ceil(3 * sigma_max))

    def apply(image, seed):
        tf = import_tensorflow()
        sigma_seed, apply_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        sigma = tf.random.stateless_uniform([], sigma_seed, float(sigma_min), float(sigma_max))
        taps = tf.range(-half, half + 1, dtype=tf.float32)
        kernel = tf.exp(-0.5 * tf.square(taps / sigma))
        kernel = kernel / tf.reduce_sum(kernel)
        x = _as_float(image)[None]
        channels = x.shape[-1]
        x = tf.pad(x, [[0, 0], [half, half], [half, half], [0, 0]], mode="SYMMETRIC")
        rows = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
        cols = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, channels, 1])
        x = tf.nn.depthwise_conv2d(x, rows, [1, 1, 1, 1], "VALID")
        x = tf.nn.depthwise_conv2d(x, cols, [1, 1, 1, 1], "VALID")[0]
        return tf.cond(tf.random.stateless_uniform([], apply_seed) < probability, lambda: _like(x, image),
                       lambda: image)
    return apply


@register_op("solarize", RANDOM)
@image_op
def solarize(probability=0.2, threshold=128):
    """Returns an op inverting, with `probability`, the pixels >= `threshold` (PIL's ImageOps.solarize)."""
    probability = _probability(probability)
    if not isinstance(threshold, (int, float)) or not 0 <= threshold <= 256:
        raise ValueError(f"solarize: threshold must be a number in [0, 256], got {threshold!r}")

    def apply(image, seed):
        tf = import_tensorflow()
        x = _as_float(image)
        solarized = _like(tf.where(x >= threshold, 255.0 - x, x), image)
        return tf.cond(tf.random.stateless_uniform([], seed) < probability, lambda: solarized, lambda: image)
    return apply


def jax_key(seed):
    """Returns the JAX key of an op's seed (an int64 pair): what `gmml_corrupt` draws from."""
    import jax  # pylint: disable=g-import-not-at-top  # Built ops only: parsing pp strings needs no JAX.
    first, second = (int(value) & 0xFFFFFFFF for value in seed)
    return jax.random.fold_in(jax.random.key(first), second)


@register_op("gmml_corrupt", RANDOM)
def gmml_corrupt(mask_ratio=0.75, corruption="noise", align=1, max_block_fraction=0.3):
    """Returns an op adding GMML's per-example corruption of the float field "image": "image_corrupted" (groups
    filled with noise or zeros) and "corruption_mask" (H, W) float32, 1 = corrupted; "image" stays clean."""
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from vitjax import masking  # pylint: disable=g-import-not-at-top
    mask_ratio = masking.check_mask_ratio(mask_ratio, "gmml_corrupt: mask_ratio")
    masking.check_corruption(corruption, "gmml_corrupt: corruption")
    align = _int(align, "gmml_corrupt: align", 1)
    if isinstance(max_block_fraction, bool) or not isinstance(max_block_fraction, (int, float)) or not (
            0.0 < max_block_fraction <= 1.0):
        raise ValueError(f"gmml_corrupt: max_block_fraction must be a number in (0, 1], got {max_block_fraction!r}")
    # The rule is masking.corrupt_example, the one the objectives' on-device draw uses, run on the host's CPU.
    corrupt = jax.jit(functools.partial(masking.corrupt_example, mask_ratio=mask_ratio, corruption=corruption,
                                        align=align, max_block_fraction=float(max_block_fraction)))

    def on_host(image, seed):
        # Looked up at the first example, not when the pp string is checked: no backend starts before
        # jax.distributed.initialize.
        with jax.default_device(jax.devices("cpu")[0]):
            corrupted, mask = corrupt(jax_key(seed), image)
        return np.asarray(corrupted), np.asarray(mask, np.float32)

    def apply(example, seed):
        tf = import_tensorflow()
        image = example["image"]
        if not image.dtype.is_floating or image.shape.rank != 3 or not image.shape.is_fully_defined():
            raise ValueError(f"gmml_corrupt needs a float (height, width, channels) image of known size, after "
                             f"value_range or normalize; got {image.dtype.name} {image.shape}")
        height, width, _ = image.shape.as_list()
        masking.check_group_settings(height, width, align, float(max_block_fraction))
        corrupted, mask = tf.numpy_function(on_host, [image, seed], [image.dtype, tf.float32], stateful=False)
        corrupted.set_shape(image.shape)
        mask.set_shape(image.shape[:2])
        return {**example, "image_corrupted": corrupted, "corruption_mask": mask}
    return apply


# ---------------------------------------------------------------------------------------------
# The multi-view op.
# ---------------------------------------------------------------------------------------------

@register_op("views", RANDOM)
def views(*groups, key="image", outkey=None):
    """Returns an op replacing field `key` by views {outkey}_0, {outkey}_1, ... (see the doc)."""
    if not groups or len(groups) % 2:
        raise ValueError(f"views takes (num_views, pp) pairs, e.g. views(2, 'inception_crop(224)"
                         f"|flip_lr'), got {len(groups)} positional argument(s)")
    key = _field(key, "key")
    outkey = _field(key if outkey is None else outkey, "outkey")
    pipelines = []
    for num_views, pp in zip(groups[::2], groups[1::2]):
        _int(num_views, "num_views", 1)
        if not isinstance(pp, str):
            raise ValueError(f"a view's pp must be a string like 'inception_crop(224)|flip_lr', "
                             f"got {pp!r}")
        try:
            preprocess = build_preprocess(pp)
        except ValueError as error:
            raise ValueError(f"in a view's pp: {error}") from None
        if DECODE in preprocess.kinds:
            raise ValueError(f"a view's pp {pp!r} cannot decode: put the decode op before views")
        pipelines += [preprocess] * num_views

    def apply(example, seed):
        tf = import_tensorflow()
        source = example[key]
        rest = {name: value for name, value in example.items() if name != key}
        result = dict(rest)
        for index, preprocess in enumerate(pipelines):
            view_seed = tf.random.experimental.stateless_fold_in(seed, index)
            view = preprocess({**rest, "image": source}, view_seed)
            if "image" not in view:
                raise ValueError(f"views: the pp {preprocess.pp!r} removed the field 'image', "
                                 "which holds the view")
            result[f"{outkey}_{index}"] = view["image"]
            result.update({f"{name}_{index}": value for name, value in view.items()
                           if name != "image" and name not in rest})
        return result
    return apply


# ---------------------------------------------------------------------------------------------
# Field ops.
# ---------------------------------------------------------------------------------------------

def _fields(keys: tuple, op: str) -> tuple[str, ...]:
    if not keys:
        raise ValueError(f"{op} needs at least one field name, e.g. {op}('image')")
    return tuple(_field(key, "a field") for key in keys)


@register_op("copy", DETERMINISTIC)
def copy_field(inkey, outkey):
    """Returns an op setting field `outkey` to a copy of field `inkey`."""
    inkey, outkey = _field(inkey, "inkey"), _field(outkey, "outkey")

    def apply(example, seed):
        del seed
        return {**example, outkey: example[inkey]}
    return apply


@register_op("rename", DETERMINISTIC)
def rename_field(old, new):
    """Returns an op renaming field `old` to `new`."""
    old, new = _field(old, "old"), _field(new, "new")

    def apply(example, seed):
        del seed
        value = example[old]
        return {**{name: v for name, v in example.items() if name != old}, new: value}
    return apply


@register_op("keep", DETERMINISTIC)
def keep_fields(*keys):
    """Returns an op keeping only the fields `keys`."""
    keys = _fields(keys, "keep")

    def apply(example, seed):
        del seed
        return {key: example[key] for key in keys}
    return apply


@register_op("drop", DETERMINISTIC)
def drop_fields(*keys):
    """Returns an op removing the fields `keys`."""
    keys = _fields(keys, "drop")

    def apply(example, seed):
        del seed
        for key in keys:
            example[key]  # pylint: disable=pointless-statement  # A missing field is an error.
        return {name: value for name, value in example.items() if name not in keys}
    return apply


# ---------------------------------------------------------------------------------------------
# Label ops.
# ---------------------------------------------------------------------------------------------

def _label_table(mapping) -> dict[int, int]:
    if isinstance(mapping, dict):
        table = mapping
    elif isinstance(mapping, (tuple, list)):
        table = dict(enumerate(mapping))
    else:
        raise ValueError(f"mapping must be a dict {{old: new}} or a sequence of new labels, "
                         f"got {mapping!r}")
    for old, new in table.items():
        if isinstance(old, bool) or not isinstance(old, int) or old < 0:
            raise ValueError(f"mapping's old labels must be ints >= 0, got {old!r}")
        if isinstance(new, bool) or not isinstance(new, int):
            raise ValueError(f"mapping's new labels must be ints, got {new!r} for {old}")
    if not table:
        raise ValueError("mapping is empty")
    return table


@register_op("label_map", DETERMINISTIC)
def label_map(mapping, default=None, *, key="label", outkey=None):
    """Returns an op replacing int label l by mapping[l] (`default` outside it, or an error)."""
    table = _label_table(mapping)
    if default is not None and (isinstance(default, bool) or not isinstance(default, int)):
        raise ValueError(f"default must be an int or None, got {default!r}")
    key, outkey = _field(key, "key"), _field(key if outkey is None else outkey, "outkey")
    size = max(table) + 1
    values = [table.get(old, 0 if default is None else default) for old in range(size)]
    known = [old in table for old in range(size)]

    def apply(example, seed):
        del seed
        tf = import_tensorflow()
        label = example[key]
        as_int = tf.cast(label, tf.int32)
        inside = (as_int >= 0) & (as_int < size)
        index = tf.clip_by_value(as_int, 0, size - 1)
        mapped = tf.gather(tf.constant(values, tf.int32), index)
        known_label = inside & tf.gather(tf.constant(known), index)
        if default is None:
            check = tf.debugging.Assert(tf.reduce_all(known_label), [
                f"label_map: a label is not in the mapping (keys {sorted(table)}) and default is "
                "None; label:", label])
            with tf.control_dependencies([check]):
                mapped = tf.identity(mapped)
        else:
            mapped = tf.where(known_label, mapped, default)
        return {**example, outkey: tf.cast(mapped, label.dtype)}
    return apply


@register_op("onehot", DETERMINISTIC)
def onehot(num_classes, smoothing=0.0, *, key="label", outkey=None):
    """Returns an op making int label float32 (num_classes,) one-hot with timm's smoothing."""
    _int(num_classes, "num_classes", 1)
    if not isinstance(smoothing, (int, float)) or not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
    key, outkey = _field(key, "key"), _field(key if outkey is None else outkey, "outkey")
    off_value = smoothing / num_classes

    def apply(example, seed):
        del seed
        tf = import_tensorflow()
        labels = tf.one_hot(tf.cast(example[key], tf.int32), num_classes,
                            on_value=1.0 - smoothing + off_value, off_value=off_value,
                            dtype=tf.float32)
        return {**example, outkey: labels}
    return apply


# ---------------------------------------------------------------------------------------------
# Multi-spectral bands (SatMAE++, `vitjax.objectives.satmae`).
# ---------------------------------------------------------------------------------------------

# fMoW-Sentinel's per-band statistics of the 13 Sentinel-2 bands B1..B12, B8A (techmn/satmae_pp util/datasets.py);
# TFDS eurosat/all stores its 13 bands in the same order.
SENTINEL2_MEAN = (1370.19151926, 1184.3824625, 1120.77120066, 1136.26026392, 1263.73947144, 1645.40315151,
                  1846.87040806, 1762.59530783, 1972.62420416, 582.72633433, 14.77112979, 1732.16362238,
                  1247.91870117)
SENTINEL2_STD = (633.15169573, 650.2842772, 712.12507725, 965.23119807, 948.9819932, 1108.06650639, 1258.36394548,
                 1233.1492281, 1364.38688993, 472.37967789, 14.3114637, 1310.36996126, 1087.6020813)
MAX_SYNTHETIC_BANDS = 8


@register_op("select_bands", DETERMINISTIC)
@image_op
def select_bands(keep=None, drop=None):
    """Returns an op keeping the bands `keep` (in that order), or all but `drop` (SatMAE's --dropped_bands)."""
    if (keep is None) == (drop is None):
        raise ValueError(f"select_bands takes exactly one of keep= or drop= (band indices), got keep={keep!r}, "
                         f"drop={drop!r}")
    given = keep if keep is not None else drop
    if not isinstance(given, (tuple, list)) or not all(isinstance(b, int) and b >= 0 for b in given):
        raise ValueError(f"select_bands: band indices must be a tuple of ints >= 0, got {given!r}")

    def apply(image, seed):
        del seed
        tf = import_tensorflow()
        channels = image.shape[-1]
        if channels is None or max(given, default=-1) >= channels:
            raise ValueError(f"select_bands: indices {tuple(given)} need a known band count above "
                             f"{max(given, default=-1)}; the image has {channels}")
        indices = list(keep) if keep is not None else [b for b in range(channels) if b not in set(drop)]
        return tf.gather(image, indices, axis=-1)
    return apply


@register_op("sentinel_normalize", DETERMINISTIC)
@image_op
def sentinel_normalize(mean=SENTINEL2_MEAN, std=SENTINEL2_STD):
    """Returns an op mapping [mean - 2 std, mean + 2 std] per band onto [0, 1], quantised to 256 levels.

    SatMAE's SentinelNormalize followed by ToTensor: clip((x - mean + 2 std) / (4 std) x 255, 0, 255) as uint8
    (truncated), then / 255.
    """
    mean, std = _per_channel(mean, "mean"), _per_channel(std, "std")
    if len(mean) != len(std) or any(s <= 0 for s in std):
        raise ValueError(f"mean and std need one value per band, std positive; got {len(mean)} and {std}")

    def apply(image, seed):
        del seed
        tf = import_tensorflow()
        _check_channels(image, mean, "mean", "sentinel_normalize")
        low = tf.constant(mean, tf.float32) - 2.0 * tf.constant(std, tf.float32)
        scaled = (tf.cast(image, tf.float32) - low) / (4.0 * tf.constant(std, tf.float32)) * 255.0
        return tf.floor(tf.clip_by_value(scaled, 0.0, 255.0)) / 255.0
    return apply


@register_op("synthetic_bands", DETERMINISTIC)
@image_op
def synthetic_bands(num_bands):
    """Returns an op turning a 1-channel [0, 255] image into `num_bands` float32 bands derived from it.

    The bands, in order: the image, shifted right by a pixel, shifted down, a 3x3 box blur, |d/dx|, |d/dy|, the
    inverse 255 - x, x^2 / 255: an offline stand-in for multi-spectral data (bands correlated, none a copy).
    """
    if isinstance(num_bands, bool) or not isinstance(num_bands, int) or not 1 <= num_bands <= MAX_SYNTHETIC_BANDS:
        raise ValueError(f"synthetic_bands: num_bands must be an int in [1, {MAX_SYNTHETIC_BANDS}], got {num_bands!r}")

    def apply(image, seed):
        del seed
        tf = import_tensorflow()
        if image.shape[-1] != 1:
            raise ValueError(f"synthetic_bands expects a 1-channel image, got shape {image.shape}")
        x = tf.cast(image, tf.float32)
        padded = tf.pad(x, [[1, 1], [1, 1], [0, 0]])
        blurred = tf.nn.avg_pool2d(padded[None], 3, 1, "VALID")[0]
        bands = [x, padded[1:-1, :-2], padded[:-2, 1:-1], blurred,
                 tf.abs(padded[1:-1, 2:] - padded[1:-1, :-2]) / 2.0, tf.abs(padded[2:, 1:-1] - padded[:-2, 1:-1]) / 2.0,
                 255.0 - x, tf.square(x) / 255.0]
        return tf.concat(bands[:num_bands], axis=-1)
    return apply
