"""One-hot labels with label smoothing, and batch-level mixup / cutmix, in jax.numpy (on device).

Semantics of timm's `Mixup(mode="batch", correct_lam=True)`: per batch, with probability `prob`
a lambda is drawn from Beta(alpha, alpha); when both alphas are positive cutmix is chosen with
`switch_prob`, else mixup. Example i is mixed with example batch-1-i (the flipped batch).
Mixup: x = lam x + (1 - lam) x_flipped. Cutmix: a box of side sqrt(1 - lam) times the image
side (timm's `rand_bbox`), centred uniformly and clipped to the image, is pasted from x_flipped
and lam becomes 1 - box area / image area. Targets: lam y + (1 - lam) y_flipped, with y one-hot
smoothed to (1 - smoothing + smoothing / C) on the class and smoothing / C elsewhere.

`make_batch_transform(input_config, num_classes)` gives the function the trainer calls inside
its jitted train step, on the global batch, with the step's key: every draw (lambda, box) comes
from that key, so a resumed run repeats them, and example i is paired with example B-1-i of the
global batch (timm under DDP, and the former host-side version, pair within each worker's
slice). Box sizes are computed in float32 where timm uses float64.

With `input.gmml_replace` set, the transform first runs GMML's batch step on the fields of the pp op
`gmml_corrupt`: with probability `prob` per image, groups of another image of the batch replace its
corruption (`vitjax.masking.replace_groups`, the rule the objectives' on-device draw runs too).

Importing this module imports neither TensorFlow nor torch.
"""
from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp

from vitjax import masking

# Folded into the key the transform gets, so its draws differ from those of other users of the
# same key (the model's dropout, the micro-batch keys fold_in(key, i) for small i).
_SALT = 0x6D6978
# The key of GMML's batch step: fold_in(step key, GMML_SALT).
GMML_SALT = 0x676D6D6C


def gmml_replace(batch: Dict[str, Any], rng: jax.Array, *, ratio: float, prob: float, align: int = 1,
                 max_block_fraction: float = 0.3) -> Dict[str, Any]:
    """Returns the batch with GMML's replacement applied to the fields of `gmml_corrupt` (all views as one batch).

    The draws are those of `vitjax.objectives.gmml.corrupt(rng, ...)`'s replacement: keys 2-4 of
    jax.random.split(rng, 5); views are concatenated in index order first, as SiT's on-device path does.
    """
    triples = [masking.corruption_fields()]
    if triples[0][1] not in batch:
        triples = [masking.corruption_fields(index) for index in range(len(batch))
                   if masking.corruption_fields(index)[1] in batch]
    missing = [name for triple in triples for name in triple if name not in batch]
    if not triples or missing:
        raise ValueError(f"input.gmml_replace needs the fields of the pp op gmml_corrupt (image, image_corrupted, "
                         f"corruption_mask, or their view suffixes _0, _1, ...); the batch has: "
                         f"{', '.join(sorted(batch))}.")
    images, corrupted, mask = (jnp.concatenate([jnp.asarray(batch[triple[i]]) for triple in triples])
                               for i in range(3))
    corrupted, mask = masking.replace_groups(jax.random.split(rng, 5)[2:], images, corrupted, mask,
                                             replace_ratio=ratio, replace_prob=prob, align=align,
                                             max_block_fraction=max_block_fraction)
    corrupted, mask = jnp.split(corrupted, len(triples)), jnp.split(mask, len(triples))
    out = dict(batch)
    for index, (_, corrupted_key, mask_key) in enumerate(triples):
        out[corrupted_key], out[mask_key] = corrupted[index], mask[index]
    return out


def one_hot(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """Returns float32 (..., num_classes) one-hot labels smoothed as timm does."""
    off_value = smoothing / num_classes
    hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_)
    # Python-float on/off values, as timm's, so the labels match timm's bit for bit.
    return jnp.where(hot, 1.0 - smoothing + off_value, off_value).astype(jnp.float32)


def sample_mix_params(rng: jax.Array, height: int, width: int, *, mixup_alpha: float,
                      cutmix_alpha: float, prob: float, switch_prob: float) -> Dict[str, jax.Array]:
    """Returns dict(lam, use_cutmix, box=int32 [top, bottom, left, right]) for one batch."""
    if not (mixup_alpha > 0 or cutmix_alpha > 0):
        raise ValueError(f"Mixing needs mixup_alpha > 0 or cutmix_alpha > 0, got {mixup_alpha} "
                         f"and {cutmix_alpha}.")
    keys = jax.random.split(rng, 6)
    apply = jax.random.uniform(keys[0]) < prob
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(keys[1]) < switch_prob
        lam = jnp.where(use_cutmix, jax.random.beta(keys[2], cutmix_alpha, cutmix_alpha),
                        jax.random.beta(keys[3], mixup_alpha, mixup_alpha))
    elif cutmix_alpha > 0:
        use_cutmix = jnp.array(True)
        lam = jax.random.beta(keys[2], cutmix_alpha, cutmix_alpha)
    else:
        use_cutmix = jnp.array(False)
        lam = jax.random.beta(keys[3], mixup_alpha, mixup_alpha)
    lam = jnp.where(apply, lam, 1.0).astype(jnp.float32)
    use_cutmix = use_cutmix & apply

    center_y = jax.random.randint(keys[4], (), 0, height, dtype=jnp.int32)
    center_x = jax.random.randint(keys[5], (), 0, width, dtype=jnp.int32)
    box, cut_lam = cutmix_box(lam, center_y, center_x, height, width)
    return dict(lam=jnp.where(use_cutmix, cut_lam, lam), use_cutmix=use_cutmix, box=box)


def cutmix_box(lam: jax.Array, center_y: jax.Array, center_x: jax.Array, height: int,
               width: int) -> tuple[jax.Array, jax.Array]:
    """Returns (int32 [top, bottom, left, right], lam corrected to the box) as timm's cutmix."""
    # timm's rand_bbox: a box of side int(sqrt(1 - lam) x image side), clipped to the image.
    ratio = jnp.sqrt(1.0 - lam)
    cut_height = jnp.floor(height * ratio).astype(jnp.int32)
    cut_width = jnp.floor(width * ratio).astype(jnp.int32)
    top = jnp.clip(center_y - cut_height // 2, 0, height)
    bottom = jnp.clip(center_y + (cut_height + 1) // 2, 0, height)
    left = jnp.clip(center_x - cut_width // 2, 0, width)
    right = jnp.clip(center_x + (cut_width + 1) // 2, 0, width)
    box_area = ((bottom - top) * (right - left)).astype(jnp.float32)
    return jnp.stack([top, bottom, left, right]), 1.0 - box_area / (height * width)


def apply_mix(images: jax.Array, labels: jax.Array, params: Dict[str, jax.Array]
              ) -> tuple[jax.Array, jax.Array]:
    """Returns (images, labels) of a batch (B, H, W, C) mixed with its flipped self by `params`."""
    lam, box = params["lam"], params["box"]
    flipped = images[::-1]
    rows = jnp.arange(images.shape[1])[:, None]
    columns = jnp.arange(images.shape[2])[None, :]
    inside = (rows >= box[0]) & (rows < box[1]) & (columns >= box[2]) & (columns < box[3])
    cut = jnp.where(inside[None, :, :, None], flipped, images)
    mixed = images * lam.astype(images.dtype) + flipped * (1.0 - lam).astype(images.dtype)
    images = jnp.where(params["use_cutmix"], cut, mixed)
    labels = labels * lam + labels[::-1] * (1.0 - lam)
    return images, labels


def make_batch_transform(input_config, num_classes: int
                         ) -> Callable[[Dict[str, Any], jax.Array], Dict[str, Any]]:
    """Returns transform(batch, rng) -> batch: labels one-hot and smoothed, then mixed if asked.

    For the jitted train step, on the global batch, with the step's key. Int `label` (B,)
    becomes float32 (B, num_classes) one-hot with `input.label_smoothing`; a float `label`
    (B, num_classes), e.g. from the `onehot` op, is taken as it is. Then, where `input.mixup`
    asks, the field `image` (B, H, W, C) and the labels are mixed (mixup or cutmix); other fields
    pass unchanged (the config refuses mixup with `views`). A batch without `label` passes
    unchanged when nothing is mixed.

    With `input.mixup.stop_step` set, the batches of train steps >= stop_step are neither mixed nor
    smoothed (DeiT-LT's --no-mixup-drw: timm's Mixup, which also smooths, is then not applied), so the
    transform needs the step: transform(batch, rng, step).
    """
    from vitjax.data import pipeline  # pylint: disable=g-import-not-at-top  # No TF: config checks.
    config = pipeline.validate_input_config(input_config)
    mixing = pipeline.mixing(config)
    # A dataset without labels (input.label_key=None, e.g. image-text pairs) has no class count.
    unlabelled = num_classes is None and config["label_key"] is None and not mixing
    if not unlabelled and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                           or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    smoothing = float(config["label_smoothing"])
    mixup = dict(config["mixup"])

    stop_step = mixup.pop("stop_step", None)
    replace = config.get("gmml_replace")

    def transform(batch: Dict[str, Any], rng: jax.Array, step: Any = None) -> Dict[str, Any]:
        if replace is not None:
            batch = gmml_replace(batch, jax.random.fold_in(rng, GMML_SALT), **replace)
        fields = ", ".join(sorted(batch))
        if stop_step is not None and step is None:
            raise ValueError("input.mixup.stop_step switches mixup off at a train step: call the batch "
                             "transform with the step, transform(batch, rng, step).")
        if "label" not in batch:
            if mixing:
                raise ValueError(f"input.mixup mixes the fields 'image' and 'label', but the batch "
                                 f"has only: {fields}.")
            return batch
        if unlabelled:
            raise ValueError(f"input.label_key is None, yet the batch has a 'label' field "
                             f"(fields: {fields}) and no class count to one-hot it.")
        labels = jnp.asarray(batch["label"])
        if jnp.issubdtype(labels.dtype, jnp.integer):
            if labels.ndim != 1:
                raise ValueError(f"Int labels must be class ids of shape (batch,), got shape "
                                 f"{labels.shape}.")
            labels = one_hot(labels, num_classes, smoothing)
            if stop_step is not None and smoothing:
                labels = jnp.where(step < stop_step, labels, one_hot(jnp.asarray(batch["label"]), num_classes))
        else:
            if labels.shape[1:] != (num_classes,):
                raise ValueError(f"Float labels must have shape (batch, {num_classes}), got "
                                 f"{labels.shape}.")
            if smoothing:
                raise ValueError("input.label_smoothing smooths int labels, but the batch's labels "
                                 "are already float (an onehot op?): smooth them there, "
                                 "onehot(num_classes, smoothing).")
            labels = labels.astype(jnp.float32)
        batch = dict(batch, label=labels)
        if not mixing:
            return batch
        if "image" not in batch:
            raise ValueError(f"input.mixup mixes the field 'image', but the batch has only: "
                             f"{fields}.")
        images = jnp.asarray(batch["image"])
        if images.ndim != 4 or images.shape[0] % 2:
            raise ValueError(f"Mixup / cutmix need images (batch, height, width, channels) with an "
                             f"even batch, got shape {images.shape}.")
        if not jnp.issubdtype(images.dtype, jnp.floating):
            images = images.astype(jnp.float32)
        params = sample_mix_params(jax.random.fold_in(rng, _SALT), images.shape[1],
                                   images.shape[2], **mixup)
        if stop_step is not None:  # lam 1 and no cutmix box: the batch passes unmixed
            params = dict(params, lam=jnp.where(step < stop_step, params["lam"], 1.0),
                          use_cutmix=params["use_cutmix"] & (step < stop_step))
        images, labels = apply_mix(images, labels, params)
        return dict(batch, image=images, label=labels)

    return transform
