"""MAE reconstruction pictures: original | masked | reconstruction | reconstruction with visible patches.

    python -m vitjax.evaluate.mae_viz --checkpoint=/tmp/mae_digits --output_dir=/tmp/viz
    python -m vitjax.evaluate.mae_viz --checkpoint=mae_visualize_vit_large.pth --images=a.jpg,b.png \
        --output_dir=/tmp/viz

Flags (absl): --checkpoint, --output_dir (required), --images, --num_images (8), --mask_ratio,
--seed (0), --norm_pix_loss (auto | on | off), --pixel_norm (auto | imagenet | minus_one_one |
zero_one), --upscale (0: auto).

`--checkpoint` is a vitjax workdir of an `mae` run (its config.json says how to build the model and
read the data; pictures of the first eval images) or an official MAE `.pth` with its decoder
(`mae_visualize_vit_large.pth`; pictures of `--images`, centre-cropped, ImageNet-normalised). One
PNG per image is written. In code:

    paths = save_reconstructions(module, variables, images, "/tmp/viz", rng=jax.random.key(0))

A model trained with `norm_pix_loss` predicts each patch normalised by its own mean and variance;
its pictures undo that with the true patch's statistics (as is usual for such models), which
shows the structure it predicted but borrows each removed patch's mean colour and contrast.
"""
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from vitjax import cli as cli_lib
from vitjax.models import mae as mae_model

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
PIXEL_NORMS = ("imagenet", "minus_one_one", "zero_one")
_GAP = 2  # pixels between panels (before upscaling)


def to_display(images: np.ndarray, pixel_norm: str) -> np.ndarray:
    """Returns model-space NHWC images as float [0, 1] RGB (or gray) for display."""
    images = np.asarray(images, np.float32)
    if pixel_norm == "imagenet":
        channels = images.shape[-1]
        mean = IMAGENET_MEAN if channels == 3 else IMAGENET_MEAN.mean(keepdims=True)
        std = IMAGENET_STD if channels == 3 else IMAGENET_STD.mean(keepdims=True)
        images = images * std + mean
    elif pixel_norm == "minus_one_one":
        images = (images + 1.0) / 2.0
    elif pixel_norm != "zero_one":
        raise ValueError(f"Unknown pixel_norm {pixel_norm!r}; valid choices: {list(PIXEL_NORMS)}")
    return np.clip(images, 0.0, 1.0)


def reconstruct(module, variables: Dict[str, Any], images: jax.Array, *, rng: Optional[jax.Array] = None,
                noise: Optional[jax.Array] = None, norm_pix_loss: bool = False) -> Dict[str, np.ndarray]:
    """Returns {"masked", "reconstruction", "pasted"} NHWC images in model space and the (B, N) `mask`.

    "masked" zeroes the removed patches (the dataset mean after normalisation); "pasted" is the
    reconstruction with the visible patches replaced by the input's.
    """
    if noise is None and rng is None:
        rng = jax.random.key(0)
    images = jnp.asarray(images, jnp.float32)
    outputs = _reconstruct_jit(module, variables, images, rng, noise, bool(norm_pix_loss))
    return jax.tree.map(np.asarray, outputs)


def _reconstruct(module, variables, images, rng, noise, norm_pix_loss):
    """Returns the dict of `reconstruct` as jax arrays (traceable)."""
    rngs = None if noise is not None else {"masking": rng}
    pred, aux = module.apply(variables, images, train=False, noise=noise, rngs=rngs)
    patch = module.patch_size
    grid = module.encoder.grid_size
    pred = pred.astype(jnp.float32)
    if norm_pix_loss:
        target = mae_model.patchify(images, patch)
        mean = target.mean(axis=-1, keepdims=True)
        std = jnp.sqrt(target.var(axis=-1, keepdims=True, ddof=1) + 1e-6)
        pred = pred * std + mean
    channels = images.shape[-1]
    mask_pixels = mae_model.unpatchify(jnp.broadcast_to(aux["mask"][:, :, None], pred.shape), patch, grid, channels)
    reconstruction = mae_model.unpatchify(pred, patch, grid, channels)
    return {
        "masked": images * (1.0 - mask_pixels),
        "reconstruction": reconstruction,
        "pasted": images * (1.0 - mask_pixels) + reconstruction * mask_pixels,
        "mask": aux["mask"],
    }


_reconstruct_jit = jax.jit(_reconstruct, static_argnums=(0, 5))


def panels(images: np.ndarray, outputs: Dict[str, np.ndarray], pixel_norm: str, upscale: int = 1) -> np.ndarray:
    """Returns uint8 (B, H*u, (4W + 3 gap)*u, C) strips: original | masked | reconstruction | pasted."""
    columns = [images, outputs["masked"], outputs["reconstruction"], outputs["pasted"]]
    columns = [to_display(column, pixel_norm) for column in columns]
    batch, height, _, channels = columns[0].shape
    gap = np.ones((batch, height, _GAP, channels), np.float32)
    strip = np.concatenate([columns[0], gap, columns[1], gap, columns[2], gap, columns[3]], axis=2)
    if upscale > 1:
        strip = strip.repeat(upscale, axis=1).repeat(upscale, axis=2)
    return np.round(strip * 255.0).astype(np.uint8)


def save_reconstructions(module, variables: Dict[str, Any], images, output_dir: str, *,
                         rng: Optional[jax.Array] = None, noise: Optional[jax.Array] = None,
                         norm_pix_loss: bool = False, pixel_norm: str = "imagenet", upscale: int = 0,
                         prefix: str = "mae_reconstruction") -> List[str]:
    """Returns the paths of the PNGs written, one per image: original | masked | reconstruction | pasted.

    `images` are NHWC in model space (as the model was trained on); `upscale` 0 picks the smallest
    integer factor that makes the picture at least 128 pixels high (nearest neighbour).
    """
    from PIL import Image
    if pixel_norm not in PIXEL_NORMS:
        raise ValueError(f"Unknown pixel_norm {pixel_norm!r}; valid choices: {list(PIXEL_NORMS)}")
    images = np.asarray(images, np.float32)
    outputs = reconstruct(module, variables, images, rng=rng, noise=noise, norm_pix_loss=norm_pix_loss)
    upscale = upscale or max(1, -(-128 // images.shape[1]))
    strips = panels(images, outputs, pixel_norm, upscale)
    os.makedirs(output_dir, exist_ok=True)
    paths = []
    for index, strip in enumerate(strips):
        path = os.path.join(output_dir, f"{prefix}_{index:03d}.png")
        Image.fromarray(strip[..., 0] if strip.shape[-1] == 1 else strip).save(path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# Loading a model and images for the command line
# ---------------------------------------------------------------------------------------------
def pixel_norm_of(pp: str) -> str:
    """Returns the display normalisation a big_vision-like pp string ends in (imagenet by default)."""
    pp = (pp or "").replace(" ", "")
    if "value_range(-1,1" in pp or "value_range(vmin=-1" in pp:
        return "minus_one_one"
    if "value_range(0,1" in pp:
        return "zero_one"
    return "imagenet"


def load_workdir(workdir: str) -> Tuple[Any, Dict[str, Any], Any]:
    """Returns (module, variables, config) of the newest checkpoint of an `mae` run in `workdir`."""
    import ml_collections

    from vitjax import checkpoint, objectives
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: is {workdir} a vitjax workdir?")
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    if config.objective != "mae":
        raise ValueError(f"{workdir} is a {config.objective!r} run; pictures need an 'mae' run")
    objective = objectives.create("mae", config)
    params = checkpoint.load_params(workdir, parts=("params",))["params"]
    return objective.module, {"params": params}, config


def load_images(paths: Sequence[str], size: int, channels: int = 3) -> np.ndarray:
    """Returns image files resized (shorter side, bicubic), centre-cropped to `size` and ImageNet-normalised."""
    from PIL import Image
    images = []
    for path in paths:
        image = Image.open(path).convert("RGB" if channels == 3 else "L")
        scale = size / min(image.size)
        image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                             Image.BICUBIC)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        array = np.asarray(image.crop((left, top, left + size, top + size)), np.float32) / 255.0
        array = array.reshape(size, size, channels)
        mean = IMAGENET_MEAN if channels == 3 else IMAGENET_MEAN.mean(keepdims=True)
        std = IMAGENET_STD if channels == 3 else IMAGENET_STD.mean(keepdims=True)
        images.append((array - mean) / std)
    return np.stack(images)


def define_flags(flag_values: flags.FlagValues) -> None:
    """Defines this command's flags in `flag_values` (the global FLAGS when run as a program)."""
    flags.DEFINE_string("checkpoint", None, "A vitjax workdir of an 'mae' run, or an official MAE .pth with its "
                        "decoder.", flag_values=flag_values)
    flags.DEFINE_string("output_dir", None, "Where the PNGs go.", flag_values=flag_values)
    flags.DEFINE_list("images", [], "Comma-separated image files (needed for a .pth).", flag_values=flag_values)
    flags.DEFINE_integer("num_images", 8, "Eval images to show (workdir).", lower_bound=1, flag_values=flag_values)
    flags.DEFINE_float("mask_ratio", None, "Fraction of patches removed (default: the model's).",
                       lower_bound=0.0, upper_bound=1.0, flag_values=flag_values)
    flags.DEFINE_integer("seed", 0, "Seed of the random masks.", flag_values=flag_values)
    flags.DEFINE_enum("norm_pix_loss", "auto", ["auto", "on", "off"], "Whether the model predicts per-patch "
                      "normalised pixels (auto: from the run's config; off for .pth files).", flag_values=flag_values)
    flags.DEFINE_enum("pixel_norm", "auto", ["auto", *PIXEL_NORMS], "How model inputs map to pixels for display "
                      "(auto: from the run's pp_eval; imagenet for .pth files).", flag_values=flag_values)
    flags.DEFINE_integer("upscale", 0, "Integer upscale factor of the pictures; 0: auto.", lower_bound=0,
                         flag_values=flag_values)
    flags.mark_flags_as_required(["checkpoint", "output_dir"], flag_values=flag_values)


def run(flag_values: flags.FlagValues) -> List[str]:
    """Returns the paths of the PNGs written for the parsed `flag_values`; exits with one line on bad input."""
    return cli_lib.exit_on_user_error(lambda: _write_pictures(flag_values))


def _write_pictures(args: flags.FlagValues) -> List[str]:
    """Returns the paths of the PNGs written for the flags `args`."""
    if args.checkpoint.endswith((".pth", ".pt", ".bin", ".safetensors")):
        from vitjax.convert import mae as mae_convert
        module, variables = mae_convert.load_official(args.checkpoint)
        if not hasattr(module, "decoder_depth"):
            raise ValueError(f"{args.checkpoint} has no decoder (an encoder-only or fine-tuned checkpoint); "
                             "pictures need a pretrain checkpoint with decoder, e.g. mae_visualize_vit_large.pth")
        if not args.images:
            raise ValueError("An official checkpoint needs --images=file1,file2,...")
        size = module.encoder.img_size
        images = load_images(args.images, size if isinstance(size, int) else size[0], module.encoder.in_chans)
        norm_pix, pixel_norm = False, "imagenet"
    else:
        module, variables, config = load_workdir(args.checkpoint)
        import vitjax.data as data
        batches = data.make_eval_iterator(config.input, global_batch_size=args.num_images,
                                          process_index=0, process_count=1)
        batch = next(iter(batches))
        images = np.asarray(batch["image"])[np.asarray(batch["mask"], bool)]
        norm_pix = bool(config.objective_kwargs.get("norm_pix_loss", True))
        pixel_norm = pixel_norm_of(config.input.get("pp_eval", ""))
    if args.norm_pix_loss != "auto":
        norm_pix = args.norm_pix_loss == "on"
    if args.pixel_norm != "auto":
        pixel_norm = args.pixel_norm
    if args.mask_ratio is not None:
        module = module.clone(mask_ratio=args.mask_ratio)
    paths = save_reconstructions(module, variables, images, args.output_dir, rng=jax.random.key(args.seed),
                                 norm_pix_loss=norm_pix, pixel_norm=pixel_norm, upscale=args.upscale)
    print(f"Wrote {len(paths)} pictures (original | masked | reconstruction | reconstruction + visible) "
          f"to {args.output_dir}")
    return paths


def cli(args: List[str]) -> List[str]:
    """Returns the PNG paths written by the command with `args` (flags, without the program name), in this process."""
    return cli_lib.cli("vitjax.evaluate.mae_viz", define_flags, run, args)


if __name__ == "__main__":
    cli_lib.main(define_flags, run)
