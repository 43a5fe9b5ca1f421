"""Mask generators shared by the masked-modelling objectives (MAE, GMML, SiT, ...), jittable, one key per call.

  random_masking   MAE's per-sample random subset of patches (argsort of uniform noise): kept ids, restore
                   permutation and a (B, N) mask (1 = removed).
  group_masks      GMML's masks of connected groups: rectangles of random size at random places, drawn
                   until a random share of the image is covered (the official `GMML_drop_rand_patches`), on
                   a grid of `align`-pixel cells (1: any pixel, the patch size: whole patches). (B, H, W).
  downsample_mask  a (B, H, W) mask at a coarser scale (a cell counts as masked if any pixel of it is), for
                   objectives that read one mask at several resolutions.

Every generator checks its settings before tracing (`check_mask_ratio`), so a wrong ratio fails at
config time with the valid range.
"""
from typing import Dict

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


__all__ = ["check_group_settings", "check_mask_ratio", "downsample_mask", "group_mask", "group_masks", "patch_mask",
           "random_masking"]
