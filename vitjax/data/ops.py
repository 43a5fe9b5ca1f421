"""Preprocessing ops, composed by a big_vision-like pp string: "op1(args)|op2(args)|...".

Parsing and argument checks are pure Python (`parse_pp`, `build_preprocess`), so a config is
validated without importing TensorFlow; the ops themselves are TF functions that run per
example inside `tf.data`. Arguments are Python literals, positional or by keyword, and an op
without arguments may drop its parentheses ("flip_lr").

Every op maps one image to one image: `op(image, seed) -> image`, where `seed` is a stateless
TF seed (int64, shape [2]) derived from (run seed, global element index, op position), so the
random ops give the same augmentation for the same element after a resume.

Ops (arguments as in Python; defaults shown):

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

Decode ops must come first: only their failures (bad encodings) are forgiven by the pipeline.

Resize methods: bilinear, bicubic, nearest, area, lanczos3, lanczos5, gaussian, mitchellcubic
(`tf.image.resize`). Resizing keeps the dtype: a uint8 image stays uint8 (rounded, clipped) so
RandAugment can follow a crop, as in timm where it runs on PIL images.
"""
import ast
import dataclasses
import inspect
import math
from typing import Any, Callable

from vitjax.data._tf import import_tensorflow

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_METHODS = ("bilinear", "bicubic", "nearest", "area", "lanczos3", "lanczos5", "gaussian",
                  "mitchellcubic")
ERASING_MODES = ("pixel", "rand", "const")

# Op kinds: a "decode" op reads encoded bytes (its failures are the bad encodings that get
# skipped); a "random" op consumes its seed.
_DECODE, _RANDOM, _DETERMINISTIC = "decode", "random", "deterministic"


@dataclasses.dataclass(frozen=True)
class _OpSpec:
    builder: Callable[..., Callable]
    kind: str


_OPS: dict[str, _OpSpec] = {}


def _register(name: str, kind: str):
    def decorator(builder):
        _OPS[name] = _OpSpec(builder, kind)
        return builder
    return decorator


def valid_ops() -> list[str]:
    """Returns the sorted names of all preprocessing ops."""
    return sorted(_OPS)


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
                             f"{', '.join(valid_ops())}.")
        parsed.append((name, args, kwargs))
    return parsed


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """A parsed pp string: callable as `preprocess(image, seed) -> image` inside tf.data."""

    pp: str
    names: tuple[str, ...]
    kinds: tuple[str, ...]
    functions: tuple[Callable, ...]

    @property
    def num_decode_ops(self) -> int:
        """Returns how many leading ops (up to and including the last decode op) read bytes."""
        decode_positions = [i for i, kind in enumerate(self.kinds) if kind == _DECODE]
        return decode_positions[-1] + 1 if decode_positions else 0

    def stage(self, start: int, stop: int | None = None) -> Callable:
        """Returns a function applying ops [start, stop), with the seeds the full chain uses."""
        stop = len(self.functions) if stop is None else stop

        def apply(image, seed):
            tf = import_tensorflow()
            for position in range(start, stop):
                op_seed = tf.random.experimental.stateless_fold_in(seed, position)
                image = self.functions[position](image, op_seed)
            return image
        return apply

    def __call__(self, image, seed):
        return self.stage(0)(image, seed)


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
        if spec.kind == _DECODE and kinds and kinds[-1] != _DECODE:
            raise ValueError(f"Op {name!r} decodes bytes, so it must come first in pp string "
                             f"{pp!r}, before {names[-1]!r}.")
        names.append(name)
        kinds.append(spec.kind)
        functions.append(function)
    return Preprocess(pp, tuple(names), tuple(kinds), tuple(functions))


# ---------------------------------------------------------------------------------------------
# Argument checks (pure Python, run when the pp string is built).
# ---------------------------------------------------------------------------------------------

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
# The ops. Each builder checks its arguments in Python and returns `apply(image, seed)`.
# ---------------------------------------------------------------------------------------------

@_register("decode", _DECODE)
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


@_register("decode_jpeg_and_inception_crop", _DECODE)
def decode_jpeg_and_inception_crop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                                   method="bilinear", antialias=False):
    """Returns an op decoding only a random inception crop of a JPEG, resized to `size`."""
    height, width = _size(size)
    scale = _interval(scale, "scale", 0.0, 1.0)
    ratio = _interval(ratio, "ratio", 0.0, math.inf)
    _choice(method, RESIZE_METHODS, "method")
    crop = inception_crop(size, scale, ratio, method, antialias)

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


@_register("inception_crop", _RANDOM)
def inception_crop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), method="bilinear",
                   antialias=False):
    """Returns an op taking a random-resized (inception) crop resized to `size`."""
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


@_register("resize", _DETERMINISTIC)
def resize(size, method="bilinear", antialias=False):
    """Returns an op resizing to `size` (int or (height, width)), keeping the dtype."""
    height, width = _size(size)
    _choice(method, RESIZE_METHODS, "method")

    def apply(image, seed):
        del seed
        return _resize(image, height, width, method, antialias)
    return apply


@_register("resize_small", _DETERMINISTIC)
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


@_register("central_crop", _DETERMINISTIC)
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


@_register("random_crop", _RANDOM)
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


@_register("flip_lr", _RANDOM)
def flip_lr(probability=0.5):
    """Returns an op mirroring the image left-right with `probability`."""
    probability = _probability(probability)

    def apply(image, seed):
        tf = import_tensorflow()
        flip = tf.random.stateless_uniform([], seed) < probability
        return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
    return apply


@_register("gray_to_rgb", _DETERMINISTIC)
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


@_register("randaug", _RANDOM)
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


@_register("value_range", _DETERMINISTIC)
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


@_register("normalize", _DETERMINISTIC)
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


@_register("random_erasing", _RANDOM)
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
