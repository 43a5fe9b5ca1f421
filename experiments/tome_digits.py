r"""ToMe off the shelf on the bundled digits: accuracy and throughput of one trained ViT at several r.

    python experiments/tome_digits.py                  # train (~5-10 min on 2 CPU cores), then evaluate
    python experiments/tome_digits.py --steps=100      # a quick look (lower accuracy)

1. Trains a small ViT with the package's trainer (`vitjax.train.train_and_evaluate`, objective
   "supervised") on the 1,437 train digits, upsampled from 8x8 to 32x32 and cut into 4x4 patches:
   64 patch tokens + cls, width 64, depth 6. No ToMe during training.
2. Evaluates the same weights with `tome=dict(r=r)` for r in --rs (default 0, 2, 4, 6, 8) on the 360
   test images: top-1 and images/s (jitted forward, batch 360, jnp merge, this machine's CPU), plus
   the token count after the last block. With --check_pallas the Pallas merge (interpret mode on a
   CPU) is run too and must predict exactly the same labels.
3. Paints the merged groups (`vitjax.tokens.visualize`) at r = --vis_r: a grid of test images (columns)
   after blocks --vis_layers (rows), and one image at block --vis_layer alone.

Writes experiments/out/tome_digits.{md,json} and tome_digits_groups.png, tome_digits_layer{L}.png.
Images/s on a shared 2-core CPU is noisy: read the ratios, not the absolute numbers.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiment_io import write_outputs  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vitjax import checkpoint as checkpoint_lib  # noqa: E402
from vitjax import config_utils, models  # noqa: E402
from vitjax import train as trainer  # noqa: E402
from vitjax.tokens import tome, visualize  # noqa: E402

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
MODEL = dict(variant="mu/4", num_classes=10, img_size=32, in_chans=1, embed_dim=64, depth=6, num_heads=4,
             mlp_dim=256)
UPSAMPLE = "decode(channels=1)|resize(32)"


def train_config(steps: int, seed: int):
    """Returns the trainer config: supervised, AdamW, small random shifts (one 8x8 pixel = 4 input pixels)."""
    config = config_utils.default_config()
    config.seed = seed
    config.model = dict(MODEL)
    config.input = dict(dataset="digits", train_split="train", eval_split="test",
                        pp_train=UPSAMPLE + "|random_crop(32, padding=4)|value_range(-1, 1)",
                        pp_eval=UPSAMPLE + "|value_range(-1, 1)")
    config.batch_size = 128
    config.eval_batch_size = 120
    config.total_steps = steps
    config.optim.update(name="adamw", blr=2e-3, weight_decay=0.05, warmup_steps=max(1, steps // 10),
                        schedule="cosine", b2=0.99)
    config.log_every_steps = max(1, steps // 10)
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 0
    config.keep_checkpoints = 1
    config.checkpoint_async = False
    config.progress_bar = False
    return config_utils.validate_config(config)


def test_arrays(config):
    """Returns (images (360, 32, 32, 1) float32, labels (360,)) of the test split, preprocessed for eval."""
    import vitjax.data as data
    images, labels = [], []
    for batch in data.make_eval_iterator(config.input, global_batch_size=120):
        keep = np.asarray(batch["mask"]).astype(bool)
        images.append(np.asarray(batch["image"])[keep])
        labels.append(np.asarray(batch["label"])[keep])
    return np.concatenate(images).astype(np.float32), np.concatenate(labels)


def images_per_second(apply, variables, images, repeats: int) -> float:
    """Returns the best-of-`repeats` throughput of a compiled forward over `images` (one batch)."""
    jax.block_until_ready(apply(variables, images))  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(apply(variables, images))
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def evaluate_r(params, images, labels, r: int, merge_impl: str, repeats: int) -> Dict[str, Any]:
    """Returns top-1, images/s, predictions and the token count after the last block, for one r."""
    model = models.create("vit", **MODEL, tome=dict(r=r, merge_impl=merge_impl))
    apply = jax.jit(lambda variables, x: model.apply(variables, x)[0])
    variables = {"params": params}
    logits = np.asarray(apply(variables, images))
    predictions = logits.argmax(-1)
    num_tokens = 1 + (MODEL["img_size"] // 4) ** 2
    _, counts = tome.token_counts(num_tokens, tome.merge_schedule(r, MODEL["depth"]), 1)
    speed = images_per_second(apply, variables, images, repeats) if repeats else float("nan")
    return dict(r=r, merge_impl=merge_impl, top1=float((predictions == labels).mean()), images_per_sec=speed,
                final_tokens=counts[-1], token_counts=list(counts), predictions=predictions.tolist())


def paint(params, images, r: int, layers: List[int], single_layer: int, out_dir: str) -> List[str]:
    """Writes the merged-group pictures; returns their paths."""
    model = models.create("vit", **MODEL, tome=dict(r=r, trace_source=True))
    _, intermediates = jax.jit(model.apply)({"params": params}, images)
    sources = [np.asarray(intermediates["tome"]["sources"][layer]) for layer in layers]
    grid_path = os.path.join(out_dir, "tome_digits_groups.png")
    visualize.merged_tokens_grid_png(images, sources, model.grid_size, grid_path, min_size=96)
    single_path = os.path.join(out_dir, f"tome_digits_layer{single_layer}.png")
    source = np.asarray(intermediates["tome"]["sources"][single_layer][0])
    visualize.merged_tokens_png(images[0], source, model.grid_size, single_path)
    return [grid_path, single_path]


def main(argv=None) -> Dict[str, Any]:
    """Trains, evaluates every r, paints; returns the raw results (also written to --out_dir)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps of 128 images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rs", default="0,2,4,6,8", help="comma-separated r values to evaluate")
    parser.add_argument("--repeats", type=int, default=5, help="timed forward passes per r (best is kept)")
    parser.add_argument("--check_pallas", action="store_true", help="also run the Pallas merge (interpret on CPU)")
    parser.add_argument("--vis_r", type=int, default=8)
    parser.add_argument("--vis_layers", default="0,2,5", help="blocks whose merged groups the grid shows")
    parser.add_argument("--vis_layer", type=int, default=5, help="block of the single-image picture")
    parser.add_argument("--vis_images", type=int, default=6)
    parser.add_argument("--out_dir", default=OUT_DIR)
    args = parser.parse_args(argv)
    rs = [int(value) for value in args.rs.split(",")]
    started = time.time()

    config = train_config(args.steps, args.seed)
    workdir = tempfile.mkdtemp(prefix="tome_digits_")
    try:
        train_start = time.time()
        final = trainer.train_and_evaluate(config, workdir)
        train_seconds = time.time() - train_start
        params = checkpoint_lib.load_state(os.path.join(workdir, "checkpoints"))["params"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    params = jax.tree.map(jnp.asarray, params)
    print(f"trained {args.steps} steps in {train_seconds:.0f} s: {final}", flush=True)

    images, labels = test_arrays(config)
    runs = []
    for r in rs:
        run = evaluate_r(params, images, labels, r, "jnp", args.repeats)
        if args.check_pallas:
            pallas = evaluate_r(params, images, labels, r, "pallas", 0)
            run["pallas_top1"] = pallas["top1"]
            run["pallas_same_predictions"] = pallas["predictions"] == run["predictions"]
        runs.append(run)
        print(f"r={r}: top-1 {100 * run['top1']:.2f}%, {run['images_per_sec']:.0f} img/s, "
              f"{run['final_tokens']} tokens at the end", flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    pictures = paint(params, images[:args.vis_images], args.vis_r,
                     [int(layer) for layer in args.vis_layers.split(",")], args.vis_layer, args.out_dir)

    base = runs[0]
    lines = [
        f"ToMe off the shelf on digits: ViT width {MODEL['embed_dim']}, depth {MODEL['depth']}, 32x32 input in 4x4 "
        f"patches (64 tokens + cls), trained {args.steps} steps without ToMe; 360 test images; jnp merge, "
        f"images/s of a jitted forward at batch 360 on this machine's CPU ({jax.devices()[0].device_kind}).",
        "",
        "| r | tokens per block | top-1 % | Δ top-1 | images/s | speed-up |" + (
            " Pallas top-1 % | same predictions |" if args.check_pallas else ""),
        "|---|---|---|---|---|---|" + ("---|---|" if args.check_pallas else ""),
    ]
    for run in runs:
        row = (f"| {run['r']} | {' → '.join(str(c) for c in [65] + run['token_counts'])} | {100 * run['top1']:.2f} | "
               f"{100 * (run['top1'] - base['top1']):+.2f} | {run['images_per_sec']:.0f} | "
               f"{run['images_per_sec'] / base['images_per_sec']:.2f}x |")
        if args.check_pallas:
            row += f" {100 * run['pallas_top1']:.2f} | {'yes' if run['pallas_same_predictions'] else 'no'} |"
        lines.append(row)
    lines += ["", f"Merged groups at r={args.vis_r}: {', '.join(os.path.basename(p) for p in pictures)} "
              f"(grid rows: after blocks {args.vis_layers}). Total {(time.time() - started) / 60:.1f} min."]
    table = "\n".join(lines)
    print(table)
    for run in runs:
        run.pop("predictions")
    results = dict(model=MODEL, steps=args.steps, seed=args.seed, train_seconds=train_seconds,
                   train_final_metrics=final, runs=runs, pictures=pictures, platform=jax.default_backend(),
                   device_kind=jax.devices()[0].device_kind, seconds=time.time() - started)
    write_outputs(args.out_dir, "tome_digits", table, results)
    return results


if __name__ == "__main__":
    main()
