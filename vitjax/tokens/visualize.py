"""Pictures of token reduction: each token's patches painted in one colour over the input image (patches no
token holds, dropped or not sampled, nearly black); `token_sources` gives the maps of every method.

    _, intermediates = model.apply(variables, images)        # model created with tome=dict(r=..., trace_source=True)
    source = intermediates["tome"]["sources"][layer][0]      # (N_out, N_in) for image 0 after block `layer`
    merged_tokens_png(images[0], source, model.grid_size, "merge.png", num_prefix_tokens=model.num_prefix_tokens)
"""
import colorsys
from typing import Optional, Tuple

import numpy as np

COLOR_MODES = ("random", "mean")


def patch_groups(source, grid: Tuple[int, int], num_prefix_tokens: int = 1) -> np.ndarray:
    """Returns a (grid_h, grid_w) int map: the output token holding each input patch.

    source: (N_out, N_in) 0/1, N_in = num_prefix_tokens + grid_h * grid_w (ToMe's traced source).
    """
    source = np.asarray(source)
    grid_h, grid_w = grid
    if source.ndim != 2 or source.shape[1] != num_prefix_tokens + grid_h * grid_w:
        raise ValueError(f"source must be (N_out, {num_prefix_tokens} + {grid_h} * {grid_w}), got {source.shape}")
    patches = source[:, num_prefix_tokens:]
    held = patches.sum(axis=0)
    if not np.all(np.isclose(held, 1.0) | np.isclose(held, 0.0)):
        raise ValueError("every input patch must belong to at most one output token (is this a source map?)")
    # A patch no token holds (dropped by EViT without fusion, not sampled by ATS) is -1.
    return np.where(np.isclose(held, 0.0), -1, np.argmax(patches, axis=0)).reshape(grid_h, grid_w)


def _distinct_colors(count: int, seed: int) -> np.ndarray:
    """Returns (count, 3) RGB in [0, 1]: hues spread by the golden ratio, so neighbours differ."""
    rng = np.random.default_rng(seed)
    start = rng.random()
    colors = []
    for index in range(count):
        hue = (start + index * 0.618033988749895) % 1.0
        saturation = 0.55 + 0.35 * rng.random()
        value = 0.75 + 0.25 * rng.random()
        colors.append(colorsys.hsv_to_rgb(hue, saturation, value))
    return np.asarray(colors)


def _as_rgb(image) -> np.ndarray:
    """Returns the image as float RGB (H, W, 3) in [0, 1] (uint8, [0, 1] or any float range accepted)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"image must be (H, W), (H, W, 1) or (H, W, 3), got {image.shape}")
    if np.issubdtype(image.dtype, np.integer):
        image = image.astype(np.float64) / 255.0
    else:
        image = image.astype(np.float64)
        low, high = image.min(), image.max()
        if low < 0.0 or high > 1.0:  # a normalised network input: stretch it back to [0, 1]
            image = (image - low) / max(high - low, 1e-12)
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def render_merged_tokens(image, source, grid: Tuple[int, int], *, num_prefix_tokens: int = 1,
                         colors: str = "random", alpha: float = 0.55, min_size: int = 256,
                         seed: int = 0) -> np.ndarray:
    """Returns a uint8 RGB picture: each group of merged patches in one colour, blended over the image.

    colors "random": distinct random colours per group; "mean": the group's mean image colour (the image
    as ToMe "sees" it). Group borders are drawn in black. Small images are enlarged (nearest) to at least
    `min_size` pixels a side so the borders stay visible.
    """
    if colors not in COLOR_MODES:
        raise ValueError(f"Unknown colors {colors!r}; valid choices: {COLOR_MODES}")
    rgb = _as_rgb(image)
    groups = patch_groups(source, grid, num_prefix_tokens)
    height, width = rgb.shape[:2]
    grid_h, grid_w = grid
    if height % grid_h or width % grid_w:
        raise ValueError(f"image {height}x{width} is not a whole number of {grid_h}x{grid_w} patches")
    zoom = max(1, -(-min_size // min(height, width)))
    rgb = np.repeat(np.repeat(rgb, zoom, axis=0), zoom, axis=1)
    height, width = rgb.shape[:2]
    pixel_groups = np.repeat(np.repeat(groups, height // grid_h, axis=0), width // grid_w, axis=1)
    labels, pixel_index = np.unique(pixel_groups, return_inverse=True)
    pixel_index = pixel_index.reshape(height, width)
    if colors == "random":
        palette = _distinct_colors(len(labels), seed)
    else:
        palette = np.stack([rgb[pixel_index == index].mean(axis=0) for index in range(len(labels))])
    painted = palette[pixel_index]
    blended = painted if colors == "mean" else (1.0 - alpha) * rgb + alpha * painted
    blended[pixel_groups < 0] = 0.15 * rgb[pixel_groups < 0]  # dropped patches: nearly black
    border = np.zeros((height, width), bool)
    border[:, :-1] |= pixel_index[:, :-1] != pixel_index[:, 1:]
    border[:-1, :] |= pixel_index[:-1, :] != pixel_index[1:, :]
    blended[border] = 0.0
    return np.clip(np.round(blended * 255.0), 0, 255).astype(np.uint8)


def merged_tokens_png(image, source, grid: Tuple[int, int], path: str, *, num_prefix_tokens: int = 1,
                      colors: str = "random", alpha: float = 0.55, min_size: int = 256, seed: int = 0,
                      with_original: bool = True) -> np.ndarray:
    """Writes the merged-groups picture to `path` (PNG) and returns it as a uint8 array.

    with_original puts the plain (enlarged) image on the left, for comparison.
    """
    from PIL import Image  # pylint: disable=g-import-not-at-top
    picture = render_merged_tokens(image, source, grid, num_prefix_tokens=num_prefix_tokens, colors=colors,
                                   alpha=alpha, min_size=min_size, seed=seed)
    if with_original:
        original = _as_rgb(image)
        zoom = picture.shape[0] // original.shape[0]
        original = np.repeat(np.repeat(original, zoom, axis=0), zoom, axis=1)
        gap = np.full((picture.shape[0], max(4, picture.shape[1] // 32), 3), 255, np.uint8)
        picture = np.concatenate([np.round(original * 255).astype(np.uint8), gap, picture], axis=1)
    Image.fromarray(picture).save(path)
    return picture


def merged_tokens_grid_png(images, sources, grid: Tuple[int, int], path: str, *, num_prefix_tokens: int = 1,
                           colors: str = "random", min_size: int = 128, seed: int = 0,
                           row_labels: Optional[list] = None) -> np.ndarray:
    """Writes a grid of pictures (rows: sources[i] for layer i; columns: images) and returns it (uint8)."""
    from PIL import Image  # pylint: disable=g-import-not-at-top
    del row_labels  # The caller's markdown names the rows; PIL's default font is too small to help.
    rows = []
    for layer_sources in sources:
        tiles = [render_merged_tokens(image, source, grid, num_prefix_tokens=num_prefix_tokens, colors=colors,
                                      min_size=min_size, seed=seed)
                 for image, source in zip(images, layer_sources)]
        gap = np.full((tiles[0].shape[0], 4, 3), 255, np.uint8)
        rows.append(np.concatenate([part for tile in tiles for part in (tile, gap)][:-1], axis=1))
    gap = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
    picture = np.concatenate([part for row in rows for part in (row, gap)][:-1], axis=0)
    Image.fromarray(picture).save(path)
    return picture


def token_sources(method: str, summary: dict, num_tokens: int, num_prefix_tokens: int = 1) -> list:
    """Returns per block the (B, N_l, N_in) 0/1 map of which input tokens each token holds, from a model's
    intermediates[method] (ToMe and MCTF need trace_source; EViT and ATS are rebuilt from their indices)."""
    if method in ("tome", "mctf"):
        if "sources" not in summary:
            raise ValueError(f"{method} needs trace_source=True (tome) / trace_source=1 (mctf) for its sources")
        return [np.asarray(source) for source in summary["sources"]]
    if method not in ("evit", "ats"):
        raise ValueError(f"Unknown method {method!r}; valid choices: ['ats', 'evit', 'mctf', 'tome']")
    indices = summary["kept_index" if method == "evit" else "sampled_index"]
    batch = np.asarray(next(iter(indices.values()))).shape[0] if indices else 1
    source = np.broadcast_to(np.eye(num_tokens), (batch, num_tokens, num_tokens))
    prefix = num_prefix_tokens
    sources = []
    for block, count in enumerate(summary["token_counts"]):
        if block in indices:
            index = np.asarray(indices[block])
            patches = source[:, prefix:]
            chosen = np.take_along_axis(patches, np.maximum(index, 0)[:, :, None], axis=1) * (index >= 0)[:, :, None]
            parts = [source[:, :prefix], chosen]
            if method == "evit" and count == prefix + index.shape[1] + 1:  # the fused token holds the rest
                parts.append(patches.sum(axis=1, keepdims=True) - chosen.sum(axis=1, keepdims=True))
            source = np.concatenate(parts, axis=1)
        sources.append(source)
    return sources


__all__ = ["COLOR_MODES", "merged_tokens_grid_png", "merged_tokens_png", "patch_groups", "render_merged_tokens",
           "token_sources"]
