"""One-hot labels with label smoothing, and batch-level mixup / cutmix, in TensorFlow.

Semantics of timm's `Mixup(mode="batch", correct_lam=True)`: per batch, with probability `prob`
a lambda is drawn from Beta(alpha, alpha); when both alphas are positive cutmix is chosen with
`switch_prob`, else mixup. Example i is mixed with example batch-1-i (the flipped batch).
Mixup: x = lam x + (1 - lam) x_flipped. Cutmix: a box of side sqrt(1 - lam) times the image
side, centred uniformly and clipped to the image, is pasted from x_flipped and lam becomes
1 - box area / image area. Targets: lam y + (1 - lam) y_flipped, with y one-hot smoothed to
(1 - smoothing + smoothing / C) on the class and smoothing / C elsewhere.

Here the random draws come from a stateless seed derived from (run seed, step), so every host
uses the same lambda and box for a step and a resumed run repeats them. Each host mixes within
its own slice of the global batch (timm's DDP does the same per GPU).
Imported lazily (it imports TensorFlow at module level).
"""
import tensorflow as tf


def one_hot(labels, num_classes: int, smoothing: float = 0.0):
    """Returns float32 (batch, num_classes) one-hot labels smoothed as timm does."""
    off_value = smoothing / num_classes
    return tf.one_hot(tf.cast(labels, tf.int32), num_classes, on_value=1.0 - smoothing + off_value,
                      off_value=off_value, dtype=tf.float32)


def _sample_beta(alpha: float, seeds):
    first = tf.random.stateless_gamma([], seeds[0], alpha)
    second = tf.random.stateless_gamma([], seeds[1], alpha)
    total = first + second
    # Both gammas can underflow to 0 for a tiny alpha; the limit is a fair coin between 0 and 1.
    return tf.where(total > 0, first / tf.maximum(total, 1e-30), 0.5)


def sample_mix_params(seed, height: int, width: int, *, mixup_alpha: float, cutmix_alpha: float,
                      prob: float, switch_prob: float):
    """Returns dict(lam, use_cutmix, box=(top, bottom, left, right)) for one batch."""
    seeds = tf.random.experimental.stateless_split(seed, 8)
    apply_mix = tf.random.stateless_uniform([], seeds[0]) < prob
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = tf.random.stateless_uniform([], seeds[1]) < switch_prob
        lam = tf.where(use_cutmix, _sample_beta(cutmix_alpha, seeds[2:4]),
                       _sample_beta(mixup_alpha, seeds[4:6]))
    elif cutmix_alpha > 0:
        use_cutmix = tf.constant(True)
        lam = _sample_beta(cutmix_alpha, seeds[2:4])
    else:
        use_cutmix = tf.constant(False)
        lam = _sample_beta(mixup_alpha, seeds[4:6])
    lam = tf.where(apply_mix, lam, 1.0)
    use_cutmix = use_cutmix & apply_mix

    # timm's rand_bbox: a box of side sqrt(1 - lam) x image side, clipped to the image.
    height, width = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
    ratio = tf.sqrt(1.0 - lam)
    cut_height = tf.cast(tf.floor(tf.cast(height, tf.float32) * ratio), tf.int32)
    cut_width = tf.cast(tf.floor(tf.cast(width, tf.float32) * ratio), tf.int32)
    center_y = tf.random.stateless_uniform([], seeds[6], 0, height, dtype=tf.int32)
    center_x = tf.random.stateless_uniform([], seeds[7], 0, width, dtype=tf.int32)
    top = tf.clip_by_value(center_y - cut_height // 2, 0, height)
    bottom = tf.clip_by_value(center_y + (cut_height + 1) // 2, 0, height)
    left = tf.clip_by_value(center_x - cut_width // 2, 0, width)
    right = tf.clip_by_value(center_x + (cut_width + 1) // 2, 0, width)
    box_area = tf.cast((bottom - top) * (right - left), tf.float32)
    lam = tf.where(use_cutmix, 1.0 - box_area / tf.cast(height * width, tf.float32), lam)
    return dict(lam=lam, use_cutmix=use_cutmix, box=tf.stack([top, bottom, left, right]))


def apply_mix(images, labels, params):
    """Returns (images, labels) of a batch mixed with its flipped self by `params`."""
    lam, box = params["lam"], params["box"]
    flipped = tf.reverse(images, axis=[0])

    def cutmix():
        rows = tf.range(tf.shape(images)[1])[:, None]
        columns = tf.range(tf.shape(images)[2])[None, :]
        inside = (rows >= box[0]) & (rows < box[1]) & (columns >= box[2]) & (columns < box[3])
        return tf.where(inside[None, :, :, None], flipped, images)

    def mixup():
        return images * tf.cast(lam, images.dtype) + flipped * tf.cast(1.0 - lam, images.dtype)

    images = tf.cond(params["use_cutmix"], cutmix, mixup)
    labels = labels * lam + tf.reverse(labels, axis=[0]) * (1.0 - lam)
    return images, labels
