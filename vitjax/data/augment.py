"""RandAugment and random erasing in TensorFlow, with timm's semantics and stateless seeds.

Imported lazily by the ops in `vitjax.data.ops` (it imports TensorFlow at module level).

RandAugment follows timm's `rand_augment_transform` ("rand-m9-n2-mstd0.5-inc1" is
`randaug(2, 9, magnitude_std=0.5, increasing=True)`): per image, `num_layers` ops are drawn
uniformly with replacement from the 15 below; each is applied with `probability` (timm: 0.5)
at magnitude M in [0, 10], jittered per op to N(M, magnitude_std) and clipped to [0, 10]
(magnitude_std=inf: uniform in [0, M]). Ops with a direction flip its sign with probability 1/2.

| timm op | argument at level L (0..10) |
|---------|-----------------------------|
| AutoContrast, Equalize, Invert | none (as PIL's ImageOps) |
| Rotate | +-30 L/10 degrees about the centre |
| Posterize / PosterizeIncreasing | keep int(4 L/10) / 4 - int(4 L/10) high bits |
| Solarize / SolarizeIncreasing | invert pixels >= int(256 L/10) / >= 256 - int(256 L/10) |
| SolarizeAdd | add int(110 L/10) to pixels < 128 |
| Color, Contrast, Brightness, Sharpness | factor 0.1 + 1.8 L/10; Increasing: 1 +- 0.9 L/10 |
| ShearX, ShearY | shear +-0.3 L/10 |
| TranslateXRel, TranslateYRel | shift +-0.45 L/10 of the width / height |

Differences from timm's PIL code: geometric ops always interpolate bilinearly (timm draws
bilinear or bicubic per call); Color is the identity on 1-channel images. Otherwise the ops
match PIL to within 1 grey level (tests/test_data.py checks each against timm).

Random erasing follows timm's `RandomErasing` with one box (`max_count=1`): with `probability`,
up to 10 tries of area U(min_area, max_area) x image area and log-uniform aspect ratio in
[min_aspect, 1 / min_aspect]; the first box that fits is filled with N(0, 1) noise per pixel
("pixel"), per channel ("rand") or zeros ("const").
"""
import functools
import math

import tensorflow as tf

_LEVEL_MAX = 10.0
_ERASING_ATTEMPTS = 10


# ---------------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------------

def _to_uint8(image):
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _blend(degenerate, image, factor):
    """Returns PIL ImageEnhance's degenerate + factor * (image - degenerate), truncated to uint8."""
    degenerate = tf.cast(degenerate, tf.float32)
    blended = degenerate + factor * (tf.cast(image, tf.float32) - degenerate)
    return tf.cast(tf.clip_by_value(tf.floor(blended), 0.0, 255.0), tf.uint8)


def _grayscale(image):
    """Returns the float32 (H, W, 1) luma of PIL's "L" conversion (the image if 1-channel)."""
    image = tf.cast(image, tf.float32)
    if image.shape[-1] == 1:
        return image
    return tf.round(tf.reduce_sum(image * tf.constant([0.299, 0.587, 0.114]), -1, keepdims=True))


def _affine(image, matrix, fill):
    """Returns `image` resampled at input = matrix (a, b, c, d, e, f) applied to output, as PIL."""
    a, b, c, d, e, f = tf.unstack(tf.cast(matrix, tf.float32))
    # PIL maps pixel centres (x + 1/2, y + 1/2) and TF pixel indices (x, y): shift by 1/2.
    transform = tf.stack([a, b, c + 0.5 * (a + b - 1.0), d, e, f + 0.5 * (d + e - 1.0), 0.0, 0.0])
    image_float = tf.cast(image, tf.float32)[None]
    output_shape = tf.shape(image)[:2]
    # As PIL: a pixel whose sample point falls outside the image takes the fill colour, and one
    # inside interpolates with the border pixels repeated.
    resampled = tf.raw_ops.ImageProjectiveTransformV3(
        images=image_float, transforms=transform[None], output_shape=output_shape,
        fill_value=0.0, interpolation="BILINEAR", fill_mode="NEAREST")[0]
    inside = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.ones_like(image_float[..., :1]), transforms=transform[None],
        output_shape=output_shape, fill_value=0.0, interpolation="NEAREST",
        fill_mode="CONSTANT")[0]
    return _to_uint8(tf.where(inside > 0.5, resampled, fill))


def _signed(value, negate):
    return tf.where(negate, -value, value)


def _enhance_factor(level, negate, increasing):
    if increasing:
        return tf.maximum(0.1, 1.0 + _signed(level / _LEVEL_MAX * 0.9, negate))
    return level / _LEVEL_MAX * 1.8 + 0.1


# ---------------------------------------------------------------------------------------------
# The RandAugment ops: op(image uint8 (H, W, C), level, negate, fill, increasing) -> uint8.
# ---------------------------------------------------------------------------------------------

def auto_contrast(image, level, negate, fill, increasing):
    """Returns each channel stretched linearly so its min is 0 and its max 255."""
    del level, negate, fill, increasing
    image = tf.cast(image, tf.float32)
    low = tf.reduce_min(image, axis=[0, 1])
    high = tf.reduce_max(image, axis=[0, 1])
    scale = 255.0 / tf.maximum(high - low, 1.0)
    # PIL truncates; the epsilon keeps the top value at 255 despite float error.
    stretched = tf.floor((image - low) * scale + 1e-3)
    return _to_uint8(tf.where(high > low, stretched, image))


def _equalize_channel(channel):
    values = tf.cast(tf.reshape(channel, [-1]), tf.int32)
    histogram = tf.math.bincount(values, minlength=256, maxlength=256, dtype=tf.int32)
    step = (tf.reduce_sum(histogram) - histogram[tf.reduce_max(values)]) // 255
    lookup = tf.minimum((tf.cumsum(histogram, exclusive=True) + step // 2) // tf.maximum(step, 1),
                        255)
    equalized = tf.reshape(tf.gather(lookup, values), tf.shape(channel))
    return tf.where(step > 0, equalized, tf.cast(channel, tf.int32))


def equalize(image, level, negate, fill, increasing):
    """Returns each channel histogram-equalised as PIL's ImageOps.equalize does."""
    del level, negate, fill, increasing
    channels = [_equalize_channel(channel) for channel in tf.unstack(image, axis=-1)]
    return tf.cast(tf.stack(channels, axis=-1), tf.uint8)


def invert(image, level, negate, fill, increasing):
    """Returns 255 - image."""
    del level, negate, fill, increasing
    return 255 - image


def rotate(image, level, negate, fill, increasing):
    """Returns the image rotated counter-clockwise by +-30 level/10 degrees about its centre."""
    del increasing
    angle = _signed(level / _LEVEL_MAX * 30.0, negate) * (math.pi / 180.0)
    shape = tf.cast(tf.shape(image), tf.float32)
    center_y, center_x = shape[0] / 2.0, shape[1] / 2.0  # PIL's centre, in its coordinates.
    cos, sin = tf.cos(angle), tf.sin(angle)
    matrix = tf.stack([cos, -sin, center_x - cos * center_x + sin * center_y,
                       sin, cos, center_y - sin * center_x - cos * center_y])
    return _affine(image, matrix, fill)


def posterize(image, level, negate, fill, increasing):
    """Returns the image keeping only its top bits (fewer bits at higher level if increasing)."""
    del negate, fill
    bits = tf.cast(tf.floor(level / _LEVEL_MAX * 4.0), tf.int32)
    if increasing:
        bits = 4 - bits
    divisor = tf.bitwise.left_shift(1, 8 - bits)
    return tf.cast(tf.cast(image, tf.int32) // divisor * divisor, tf.uint8)


def solarize(image, level, negate, fill, increasing):
    """Returns the image with pixels above a threshold inverted (lower threshold if increasing)."""
    del negate, fill
    threshold = tf.minimum(256, tf.cast(tf.floor(level / _LEVEL_MAX * 256.0), tf.int32))
    if increasing:
        threshold = 256 - threshold
    pixels = tf.cast(image, tf.int32)
    return tf.cast(tf.where(pixels >= threshold, 255 - pixels, pixels), tf.uint8)


def solarize_add(image, level, negate, fill, increasing):
    """Returns the image with int(110 level/10) added to pixels below 128."""
    del negate, fill, increasing
    add = tf.minimum(128, tf.cast(tf.floor(level / _LEVEL_MAX * 110.0), tf.int32))
    pixels = tf.cast(image, tf.int32)
    return tf.cast(tf.where(pixels < 128, tf.minimum(255, pixels + add), pixels), tf.uint8)


def color(image, level, negate, fill, increasing):
    """Returns the image blended with its grayscale version (saturation)."""
    del fill
    degenerate = tf.broadcast_to(_grayscale(image), tf.shape(image))
    return _blend(degenerate, image, _enhance_factor(level, negate, increasing))


def contrast(image, level, negate, fill, increasing):
    """Returns the image blended with its mean gray level."""
    del fill
    mean = tf.floor(tf.reduce_mean(_grayscale(image)) + 0.5)
    return _blend(tf.fill(tf.shape(image), mean), image, _enhance_factor(level, negate, increasing))


def brightness(image, level, negate, fill, increasing):
    """Returns the image blended with black."""
    del fill
    return _blend(tf.zeros(tf.shape(image)), image, _enhance_factor(level, negate, increasing))


def sharpness(image, level, negate, fill, increasing):
    """Returns the image blended with PIL's SMOOTH-filtered version (borders unfiltered)."""
    del fill
    image_float = tf.cast(image, tf.float32)
    channels = image.shape[-1]
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
    smoothed = tf.round(tf.nn.depthwise_conv2d(image_float[None], kernel, [1, 1, 1, 1], "VALID")[0])
    interior = tf.pad(tf.ones_like(smoothed, tf.bool), [[1, 1], [1, 1], [0, 0]])
    degenerate = tf.where(interior, tf.pad(smoothed, [[1, 1], [1, 1], [0, 0]]), image_float)
    return _blend(degenerate, image, _enhance_factor(level, negate, increasing))


def shear_x(image, level, negate, fill, increasing):
    """Returns the image sheared horizontally by +-0.3 level/10."""
    del increasing
    factor = _signed(level / _LEVEL_MAX * 0.3, negate)
    return _affine(image, tf.stack([1.0, factor, 0.0, 0.0, 1.0, 0.0]), fill)


def shear_y(image, level, negate, fill, increasing):
    """Returns the image sheared vertically by +-0.3 level/10."""
    del increasing
    factor = _signed(level / _LEVEL_MAX * 0.3, negate)
    return _affine(image, tf.stack([1.0, 0.0, 0.0, factor, 1.0, 0.0]), fill)


def translate_x(image, level, negate, fill, increasing):
    """Returns the image shifted horizontally by +-0.45 level/10 of its width."""
    del increasing
    pixels = _signed(level / _LEVEL_MAX * 0.45, negate) * tf.cast(tf.shape(image)[1], tf.float32)
    return _affine(image, tf.stack([1.0, 0.0, pixels, 0.0, 1.0, 0.0]), fill)


def translate_y(image, level, negate, fill, increasing):
    """Returns the image shifted vertically by +-0.45 level/10 of its height."""
    del increasing
    pixels = _signed(level / _LEVEL_MAX * 0.45, negate) * tf.cast(tf.shape(image)[0], tf.float32)
    return _affine(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, pixels]), fill)


# timm's _RAND_TRANSFORMS / _RAND_INCREASING_TRANSFORMS, in its order.
RAND_AUGMENT_OPS = {
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Invert": invert,
    "Rotate": rotate,
    "Posterize": posterize,
    "Solarize": solarize,
    "SolarizeAdd": solarize_add,
    "Color": color,
    "Contrast": contrast,
    "Brightness": brightness,
    "Sharpness": sharpness,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateXRel": translate_x,
    "TranslateYRel": translate_y,
}


def _fill_per_channel(fill, channels):
    if len(fill) == channels:
        return tf.constant(fill, tf.float32)
    if len(fill) == 1 or channels == 1:  # A gray image gets the mean of an RGB fill colour.
        return tf.fill([channels], sum(fill) / len(fill))
    raise ValueError(f"randaug: fill has {len(fill)} values but the image has {channels} channels")


def rand_augment(image, seed, *, num_layers, magnitude, magnitude_std, increasing, probability,
                 fill):
    """Returns the uint8 image after timm's RandAugment, random draws from `seed`."""
    if image.dtype != tf.uint8:
        raise ValueError(f"randaug expects a uint8 image, got {image.dtype.name}: place it before "
                         "value_range / normalize")
    channels = image.shape[-1]
    if channels is None:
        raise ValueError("randaug needs a known number of channels (decode with channels=3)")
    fill = _fill_per_channel(fill, channels)
    ops = list(RAND_AUGMENT_OPS.values())
    static_shape = image.shape
    for layer in range(num_layers):
        seeds = tf.random.experimental.stateless_split(
            tf.random.experimental.stateless_fold_in(seed, layer), 4)
        choice = tf.random.stateless_uniform([], seeds[0], 0, len(ops), dtype=tf.int32)
        apply_op = tf.random.stateless_uniform([], seeds[1]) < probability
        level = tf.constant(float(magnitude))
        if magnitude_std == float("inf"):
            level = tf.random.stateless_uniform([], seeds[2], 0.0, float(magnitude))
        elif magnitude_std > 0:
            level = level + magnitude_std * tf.random.stateless_normal([], seeds[2])
        level = tf.clip_by_value(level, 0.0, _LEVEL_MAX)
        negate = tf.random.stateless_uniform([], seeds[3]) > 0.5
        branches = [functools.partial(op, image, level, negate, fill, increasing) for op in ops]

        def augmented(branches=branches, choice=choice):
            return tf.ensure_shape(tf.switch_case(choice, branches), static_shape)

        image = tf.cond(apply_op, augmented, lambda image=image: image)
    return image


def random_erasing(image, seed, *, probability, mode, min_area, max_area, min_aspect):
    """Returns the float image with, at `probability`, one random box replaced by noise."""
    if not image.dtype.is_floating:
        raise ValueError(f"random_erasing expects a normalised float image, got "
                         f"{image.dtype.name}: place it after value_range / normalize")
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    seeds = tf.random.experimental.stateless_split(seed, 6)
    area = tf.cast(height * width, tf.float32)
    target_area = tf.random.stateless_uniform([_ERASING_ATTEMPTS], seeds[0], min_area,
                                              max_area) * area
    log_aspect = tf.random.stateless_uniform([_ERASING_ATTEMPTS], seeds[1], math.log(min_aspect),
                                             -math.log(min_aspect))
    box_height = tf.cast(tf.round(tf.sqrt(target_area * tf.exp(log_aspect))), tf.int32)
    box_width = tf.cast(tf.round(tf.sqrt(target_area / tf.exp(log_aspect))), tf.int32)
    fits = (box_height < height) & (box_width < width)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)  # timm keeps the first fit.
    box_height, box_width = box_height[first], box_width[first]
    top = tf.random.stateless_uniform([], seeds[2], 0, tf.maximum(height - box_height + 1, 1),
                                      dtype=tf.int32)
    left = tf.random.stateless_uniform([], seeds[3], 0, tf.maximum(width - box_width + 1, 1),
                                       dtype=tf.int32)
    rows = tf.range(height)[:, None, None]
    columns = tf.range(width)[None, :, None]
    inside = (rows >= top) & (rows < top + box_height) & (columns >= left) & (
        columns < left + box_width)
    if mode == "pixel":
        noise = tf.random.stateless_normal(shape, seeds[4], dtype=image.dtype)
    elif mode == "rand":
        noise = tf.random.stateless_normal([1, 1, shape[2]], seeds[4], dtype=image.dtype)
    else:
        noise = tf.zeros([1, 1, shape[2]], image.dtype)
    erase = (tf.random.stateless_uniform([], seeds[5]) < probability) & tf.reduce_any(fits)
    return tf.where(erase & inside, noise, image)
