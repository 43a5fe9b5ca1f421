"""Mask generators shared by the masked-modelling objectives (MAE, GMML, SiT, ...), jittable, one key per call.

  random_masking   MAE's per-sample random subset of patches (argsort of uniform noise): kept ids, restore
                   permutation and a (B, N) mask (1 = removed).
  group_masks      GMML's masks of connected groups: rectangles of random size at random places, drawn
                   until a random share of the image is covered (the official `GMML_drop_rand_patches`), on
                   a grid of `align`-pixel cells (1: any pixel, the patch size: whole patches). (B, H, W).
  downsample_mask  a (B, H, W) mask at a coarser scale (a cell counts as masked if any pixel of it is), for
                   objectives that read one mask at several resolutions.

GMML's corruption rules, written once for both places they run: the on-device draw inside the objectives
(`vitjax.objectives.gmml.corrupt`) and the input pipeline (the pp op `gmml_corrupt`, which runs
`corrupt_example` on the host, and the device-side batch step `replace_groups` of
`vitjax.data.make_batch_transform`, which needs the other images of the batch):

  corruption_fill  what fills a group: N(0, 1) noise or zeros.
  fill_groups      the corrupted image: the fill where the mask is 1, the image elsewhere.
  corrupt_example  one image's group mask and fill from one key (the per-example part).
  replace_groups   with probability p per image, groups of another image of the batch instead (the batch part).

Every generator checks its settings before tracing (`check_mask_ratio`), so a wrong ratio fails at
config time with the valid range.
"""
from typing import Dict, Tuple

import jax
import jax.numpy as jnp

from vitjax.models import mae as mae_model


def check_mask_ratio(value, name: str = "mask_ratio") -> float:
    """Returns `value` as a float; raises ValueError unless 0 < value < 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be a number in the open interval (0, 1), got {value!r}")
    return float(value)


def random_masking(rng: jax.Array, batch: int, num_patches: int, mask_ratio: float) -> Dict[str, jax.Array]:
    """Returns MAE's random masking of `batch` x `num_patches` patches: {"ids_keep", "ids_restore", "mask"}."""
    mask_ratio = check_mask_ratio(mask_ratio)
    noise = jax.random.uniform(rng, (batch, num_patches))
    return mae_model.random_masking(noise, mask_ratio)


def check_group_settings(height: int, width: int, align: int, max_block_fraction: float) -> None:
    """Raises ValueError unless GMML groups fit an image of height x width on an `align` grid."""
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise ValueError(f"align must be an int >= 1 (1: pixels, the patch size: whole patches), got {align!r}")
    if height % align or width % align:
        raise ValueError(f"Image size {(height, width)} is not divisible by align={align}")
    for size in (height, width):
        if int(size * max_block_fraction) <= align:
            raise ValueError(f"max_block_fraction={max_block_fraction} of {size} pixels leaves no block larger than "
                             f"align={align}; raise it or lower align")


def group_mask(rng: jax.Array, height: int, width: int, mask_ratio: float, *, align: int = 1,
               max_block_fraction: float = 0.3, max_iterations: int = 10_000) -> jax.Array:
    """Returns one (height, width) float mask of GMML's groups: 1 = corrupted.

    As the official code: the target share is U(min(0.5, r), r) of the pixels; each round draws a top-left
    corner on the `align` grid and a height and width in [align, max_block_fraction x size) rounded to the
    grid (clipped at the border), until the masked pixels reach the target.
    """
    mask_ratio = check_mask_ratio(mask_ratio)
    check_group_settings(height, width, align, max_block_fraction)
    cells_h, cells_w = height // align, width // align
    max_h, max_w = int(height * max_block_fraction), int(width * max_block_fraction)
    target_key, loop_key = jax.random.split(rng)
    target = jax.random.uniform(target_key, (), minval=min(0.5, mask_ratio), maxval=mask_ratio) * height * width
    rows = jnp.arange(cells_h)[:, None]
    cols = jnp.arange(cells_w)[None, :]

    def draw(key):
        row_key, col_key, h_key, w_key = jax.random.split(key, 4)
        # Pixel draws as the reference makes them, then expressed in cells of `align` pixels.
        top = jax.random.randint(row_key, (), 0, max(height - align, 1)) // align
        left = jax.random.randint(col_key, (), 0, max(width - align, 1)) // align
        block_h = jnp.minimum(jax.random.randint(h_key, (), align, max_h), height - top * align)
        block_w = jnp.minimum(jax.random.randint(w_key, (), align, max_w), width - left * align)
        # Python's round() halves to even, as jnp.round does.
        block_h = jnp.round(block_h / align).astype(jnp.int32)
        block_w = jnp.round(block_w / align).astype(jnp.int32)
        return (rows >= top) & (rows < top + block_h) & (cols >= left) & (cols < left + block_w)

    def cond(carry):
        mask, _, iteration = carry
        return (jnp.sum(mask) * align * align < target) & (iteration < max_iterations)

    def body(carry):
        mask, key, iteration = carry
        key, draw_key = jax.random.split(key)
        return mask | draw(draw_key), key, iteration + 1

    cells, _, _ = jax.lax.while_loop(cond, body, (jnp.zeros((cells_h, cells_w), bool), loop_key, 0))
    return jnp.repeat(jnp.repeat(cells, align, axis=0), align, axis=1).astype(jnp.float32)


def group_masks(rng: jax.Array, batch: int, height: int, width: int, mask_ratio: float, *, align: int = 1,
                max_block_fraction: float = 0.3) -> jax.Array:
    """Returns (batch, height, width) float GMML masks, one independent draw per image (see `group_mask`)."""
    mask_ratio = check_mask_ratio(mask_ratio)
    check_group_settings(height, width, align, max_block_fraction)
    keys = jax.random.split(rng, batch)
    return jax.vmap(lambda key: group_mask(key, height, width, mask_ratio, align=align,
                                           max_block_fraction=max_block_fraction))(keys)


def downsample_mask(mask: jax.Array, factor: int) -> jax.Array:
    """Returns a (B, H / factor, W / factor) mask: 1 where any pixel of the factor x factor cell is masked."""
    batch, height, width = mask.shape
    if height % factor or width % factor:
        raise ValueError(f"Mask size {(height, width)} is not divisible by factor {factor}")
    cells = mask.reshape(batch, height // factor, factor, width // factor, factor)
    return cells.max(axis=(2, 4))


def patch_mask(mask: jax.Array, patch_size: int) -> jax.Array:
    """Returns the (B, N) share of each patch's pixels that a (B, H, W) pixel mask covers, patches row-major."""
    batch, height, width = mask.shape
    cells = mask.reshape(batch, height // patch_size, patch_size, width // patch_size, patch_size)
    return cells.mean(axis=(2, 4)).reshape(batch, -1)


# =============================================================================================
# GMML's corruption
# =============================================================================================
CORRUPTIONS = ("noise", "zeros")


def check_corruption(corruption: str, name: str = "corruption") -> str:
    """Returns `corruption`; raises ValueError unless it is one of CORRUPTIONS."""
    if corruption not in CORRUPTIONS:
        raise ValueError(f"{name}={corruption!r} is not valid; valid choices: {list(CORRUPTIONS)}")
    return corruption


def corruption_fill(rng: jax.Array, shape: Tuple[int, ...], dtype, corruption: str) -> jax.Array:
    """Returns the pixels that fill the corrupted groups: N(0, 1) noise ("noise") or zeros ("zeros")."""
    check_corruption(corruption)
    if corruption == "noise":
        return jax.random.normal(rng, shape, dtype)
    return jnp.zeros(shape, dtype)


def fill_groups(images: jax.Array, mask: jax.Array, fill: jax.Array) -> jax.Array:
    """Returns images (..., H, W, C) with `fill` where the (..., H, W) mask is 1 (GMML's corrupted image)."""
    return jnp.where(mask[..., None] > 0, fill, images)


def corrupt_example(rng: jax.Array, image: jax.Array, *, mask_ratio: float, corruption: str = "noise",
                    align: int = 1, max_block_fraction: float = 0.3) -> Tuple[jax.Array, jax.Array]:
    """Returns (corrupted image (H, W, C), mask (H, W) 1 = corrupted) of one image: its groups filled with noise or
    zeros (the per-example part of GMML's corruption; the pp op `gmml_corrupt` runs it)."""
    height, width, _ = image.shape
    mask_key, fill_key = jax.random.split(rng)
    mask = group_mask(mask_key, height, width, mask_ratio, align=align, max_block_fraction=max_block_fraction)
    fill = corruption_fill(fill_key, image.shape, image.dtype, corruption)
    return fill_groups(image, mask, fill), mask


def check_replace_settings(replace_ratio: float, replace_prob: float, prefix: str = "") -> None:
    """Raises ValueError unless replace_ratio is 0 (off) or in (0, 1) and replace_prob is in [0, 1]."""
    if replace_ratio:
        check_mask_ratio(replace_ratio, f"{prefix}replace_ratio (0 turns it off)")
    if isinstance(replace_prob, bool) or not isinstance(replace_prob, (int, float)) or not 0.0 <= replace_prob <= 1.0:
        raise ValueError(f"{prefix}replace_prob must be in [0, 1], got {replace_prob!r}")


def replace_groups(keys: jax.Array, images: jax.Array, corrupted: jax.Array, mask: jax.Array, *,
                   replace_ratio: float, replace_prob: float, align: int = 1, max_block_fraction: float = 0.3
                   ) -> Tuple[jax.Array, jax.Array]:
    """Returns (corrupted (B, H, W, C), mask (B, H, W)): with probability `replace_prob` per image, its corruption
    replaced by groups (covering about `replace_ratio`) copied from a random image of the batch, itself included.

    `keys` is a key array of 3 keys (mask, partner, choice); `images` are the clean images.
    """
    batch, height, width, _ = images.shape
    replace_key, partner_key, choice_key = keys[0], keys[1], keys[2]
    replace_mask = group_masks(replace_key, batch, height, width, replace_ratio, align=align,
                               max_block_fraction=max_block_fraction)
    # The official draw: any image of the batch, itself included.
    partner = images[jax.random.randint(partner_key, (batch,), 0, batch)]
    replaced = fill_groups(images, replace_mask, partner)
    chosen = jax.random.bernoulli(choice_key, replace_prob, (batch,))
    corrupted = jnp.where(chosen[:, None, None, None], replaced, corrupted)
    mask = jnp.where(chosen[:, None, None], replace_mask.astype(mask.dtype), mask)
    return corrupted, mask


def corruption_fields(index=None) -> Tuple[str, str, str]:
    """Returns the batch fields (clean, corrupted, mask) of the pp op `gmml_corrupt`: ("image", "image_corrupted",
    "corruption_mask"), or of view `index` ("image_0", "image_corrupted_0", "corruption_mask_0")."""
    suffix = "" if index is None else f"_{index}"
    return f"image{suffix}", f"image_corrupted{suffix}", f"corruption_mask{suffix}"


__all__ = ["CORRUPTIONS", "check_corruption", "check_group_settings", "check_mask_ratio", "check_replace_settings",
           "corrupt_example", "corruption_fields", "corruption_fill", "downsample_mask", "fill_groups", "group_mask",
           "group_masks", "patch_mask", "random_masking", "replace_groups"]
