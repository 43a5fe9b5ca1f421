r"""Token reduction compared on one model and budget: GMACs, images/s and top-1 for ToMe, EViT, ATS and MCTF.

    python experiments/bench_tokens.py                 # ~20-30 min on 2 CPU cores (digits training included)
    python experiments/bench_tokens.py --quick         # a smoke run: fewer steps, no ViT-B speed

1. GMACs (XLA cost analysis of the jitted forward, batch 1, multiply-accumulates = flops / 2, the papers'
   "GFLOPs") of DeiT-S and ViT-B/16 at 224 px for each method at three budgets, and images/s of a jitted
   forward (random weights, batch --batch) on the device at hand (the table says which: CPU or GPU).
   ATS keeps fixed shapes (padding masks), so its GMACs count the padded tokens: what XLA runs.
2. Top-1 on the bundled digits test split (360 images): the quickstart-sized ViT of experiments/tome_digits.py
   (width 64, depth 6, 64 patches + cls) trained without token reduction, then each method at three budgets
   off the shelf and after a short fine-tune with the method on (--finetune_steps, plain cross-entropy, the
   middle budget of each method).
3. One PNG: digits top-1 against digits GMACs, a curve per method (off the shelf and fine-tuned), and pictures
   of which tokens each method keeps / fuses / merges per stage over scikit-image's astronaut (DeiT-S size, random
   weights: the pattern, not a trained model's) and over a digit (the trained digits ViT).

Writes experiments/out/bench_tokens.{md,json} and bench_tokens.png, bench_tokens_astronaut.png,
bench_tokens_digit.png (--quick: bench_tokens_quick.*).
"""
import argparse
import os
import sys
import time
from typing import Any, Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from experiment_io import write_outputs  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import tome_digits  # noqa: E402
from vitjax import models  # noqa: E402
from vitjax.tokens import visualize  # noqa: E402

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
METHODS = ("tome", "evit", "ats", "mctf")
BIG_MODELS = {"DeiT-S": "deit_small_patch16_224", "ViT-B/16": "vit_base_patch16_224"}
# Three budgets per method on a 12-block, 197-token model: the papers' settings and their neighbours.
BIG_BUDGETS = {
    "tome": [dict(r=8), dict(r=13), dict(r=16)],
    "evit": [dict(base_keep_rate=k, drop_loc=(3, 6, 9), fuse_token=True) for k in (0.9, 0.7, 0.5)],
    "ats": [dict(ats_blocks=(3, 6, 9), num_tokens=k) for k in (0.9, 0.7, 0.5)],
    "mctf": [dict(r_eval=r, activate_layer=tuple(range(1, 12))) for r in (8, 12, 16)],
}
# The same shapes of budget on the 6-block, 65-token digits ViT.
DIGIT_BUDGETS = {
    "tome": [dict(r=2), dict(r=4), dict(r=8)],
    "evit": [dict(base_keep_rate=k, drop_loc=(1, 3, 5), fuse_token=True) for k in (0.9, 0.7, 0.5)],
    "ats": [dict(ats_blocks=(1, 3, 5), num_tokens=k) for k in (0.9, 0.7, 0.5)],
    "mctf": [dict(r_eval=r, activate_layer=tuple(range(1, 6))) for r in (2, 4, 8)],
}
# The papers' own ImageNet figures (official READMEs / papers), quoted, not measured here.
PAPERS = [
    ("EViT", "DeiT-S, keep 0.9 / 0.8 / 0.7, fused, fine-tuned", "79.8 / 79.8 / 79.5 % at 4.0 / 3.5 / 3.0 GFLOPs",
     "github.com/youweiliang/evit README"),
    ("MCTF", "DeiT-S, r=16 on blocks 1-11, fine-tuned", "80.1 % at 2.60 GFLOPs (DeiT-S: 79.8 % at 4.61)",
     "github.com/mlvlab/MCTF README"),
    ("ToMe", "ViT-B/16 (AugReg), r=16, off the shelf", "about 2x images/s",
     "Bolya et al. 2023 (as quoted in issue 10)"),
    ("ATS", "DeiT-S", "not quoted: no figure in the official README", ""),
]


def label(method: str, settings: Dict[str, Any]) -> str:
    """Returns a short budget label: the setting that varies."""
    key = {"tome": "r", "evit": "base_keep_rate", "ats": "num_tokens", "mctf": "r_eval"}[method]
    return f"{key}={settings[key]}"


def gmacs(model, image_shape) -> float:
    """Returns the XLA cost-analysis multiply-accumulates (flops / 2, in G) of one image's forward."""
    images = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(images.shape)))
    cost = jax.jit(lambda v, x: model.apply(v, x)[0]).lower(shapes, images).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) / 2e9


def big_model_rows(speed_models: List[str], batch: int, repeats: int) -> List[Dict[str, Any]]:
    """Returns GMACs (and images/s for speed_models) of DeiT-S and ViT-B/16 for every method and budget."""
    rows = []
    for short, name in BIG_MODELS.items():
        timed = short in speed_models
        variables = images = None
        if timed:
            plain = models.create(name)
            variables = jax.jit(plain.init)(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
            images = jax.random.normal(jax.random.PRNGKey(1), (batch, 224, 224, 3))
        for method, settings in [("none", {})] + [(m, s) for m in METHODS for s in BIG_BUDGETS[m]]:
            spec = None if method == "none" else dict(method=method, **settings)
            model = models.create(name, token_reduction=spec)
            row = dict(model=short, method=method, budget=label(method, settings) if spec else "-",
                       gmacs=gmacs(model, (224, 224, 3)))
            if timed:
                apply = jax.jit(lambda v, x, m=model: m.apply(v, x)[0])
                row["images_per_sec"] = tome_digits.images_per_second(apply, variables, images, repeats)
            rows.append(row)
            print(row, flush=True)
    return rows


def train_digits(steps: int, seed: int):
    """Returns (params, config) of the digits ViT trained without token reduction (tome_digits' recipe)."""
    import shutil
    import tempfile
    from vitjax import checkpoint as checkpoint_lib
    from vitjax import train as trainer
    config = tome_digits.train_config(steps, seed)
    workdir = tempfile.mkdtemp(prefix="bench_tokens_")
    try:
        trainer.train_and_evaluate(config, workdir)
        params = checkpoint_lib.load_state(os.path.join(workdir, "checkpoints"))["params"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return jax.tree.map(jnp.asarray, params), config


def digit_arrays(config, split: str):
    """Returns (images, labels) of a digits split with the eval preprocessing."""
    import vitjax.data as data
    settings = dict(config.input)
    settings["eval_split"] = split
    images, labels = [], []
    for batch in data.make_eval_iterator(settings, global_batch_size=120):
        keep = np.asarray(batch["mask"]).astype(bool)
        images.append(np.asarray(batch["image"])[keep])
        labels.append(np.asarray(batch["label"])[keep])
    return np.concatenate(images).astype(np.float32), np.concatenate(labels)


def top1(model, params, images, labels) -> float:
    """Returns the top-1 accuracy of a model on arrays."""
    logits = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])(params, images)
    return float((np.asarray(logits).argmax(-1) == labels).mean())


def finetune(model, params, images, labels, steps: int, seed: int):
    """Returns params after `steps` AdamW steps (lr 3e-4, batch 128, cross-entropy) with the method on."""
    optimizer = optax.adamw(3e-4, weight_decay=0.05)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits, _ = model.apply({"params": p}, x, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        index = rng.choice(len(images), 128, replace=False)
        params, opt_state = step(params, opt_state, images[index], labels[index])
    return params


def digits_rows(params, config, finetune_steps: int) -> List[Dict[str, Any]]:
    """Returns top-1 (off the shelf and fine-tuned) and GMACs of every method and budget on the digits ViT."""
    test_images, test_labels = digit_arrays(config, "test")
    train_images, train_labels = digit_arrays(config, "train")
    image_shape = test_images.shape[1:]
    rows = []
    base = models.create("vit", **tome_digits.MODEL)
    rows.append(dict(method="none", budget="-", gmacs=gmacs(base, image_shape),
                     top1=top1(base, params, test_images, test_labels)))
    if finetune_steps:
        tuned = finetune(base, params, train_images, train_labels, finetune_steps, seed=0)
        rows[-1]["top1_finetuned"] = top1(base, tuned, test_images, test_labels)
    print(rows[-1], flush=True)
    for method in METHODS:
        for index, settings in enumerate(DIGIT_BUDGETS[method]):
            model = models.create("vit", **tome_digits.MODEL, token_reduction=dict(method=method, **settings))
            row = dict(method=method, budget=label(method, settings), gmacs=gmacs(model, image_shape),
                       top1=top1(model, params, test_images, test_labels))
            if finetune_steps and index == 1:
                tuned = finetune(model, params, train_images, train_labels, finetune_steps, seed=0)
                row["top1_finetuned"] = top1(model, tuned, test_images, test_labels)
            rows.append(row)
            print(row, flush=True)
    return rows


def source_pictures(model, params, image, method: str, settings, blocks: List[int]) -> List[np.ndarray]:
    """Returns, per block in `blocks`, the picture of which patches each token holds for one image."""
    spec = dict(method=method, **settings)
    if method in ("tome", "mctf"):
        spec["trace_source"] = True if method == "tome" else 1
    reduced = models.create(model["name"], token_reduction=spec, **model["settings"])
    _, intermediates = jax.jit(lambda p, x: reduced.apply({"params": p}, x))(params, image[None])
    num_tokens = reduced.num_prefix_tokens + reduced.grid_size[0] * reduced.grid_size[1]
    sources = visualize.token_sources(method, intermediates[method], num_tokens, reduced.num_prefix_tokens)
    return [visualize.render_merged_tokens(image, sources[block][0], reduced.grid_size, min_size=224, seed=block)
            for block in blocks]


def picture_grid(rows: List[List[np.ndarray]], path: str) -> None:
    """Writes rows of equally sized pictures (one row per method) as one PNG."""
    from PIL import Image
    gap = 4
    lines = []
    for row in rows:
        pieces = []
        for picture in row:
            pieces += [picture, np.full((picture.shape[0], gap, 3), 255, np.uint8)]
        lines += [np.concatenate(pieces[:-1], axis=1), np.full((gap, sum(p.shape[1] for p in pieces[:-1]), 3), 255,
                                                                 np.uint8)]
    Image.fromarray(np.concatenate(lines[:-1], axis=0)).save(path)


def pictures(digit_params, config, out_dir: str, stem: str) -> List[str]:
    """Writes the astronaut (DeiT-S, random weights) and digit (trained digits ViT) pictures; returns paths."""
    import skimage.data
    from PIL import Image
    astronaut = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((224, 224), Image.BICUBIC))
    astronaut = (astronaut.astype(np.float32) / 255.0 - 0.45) / 0.25
    deit = dict(name="deit_small_patch16_224", settings={})
    deit_params = jax.jit(models.create(deit["name"]).init)(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
    digit_model = dict(name="vit", settings=dict(tome_digits.MODEL))
    digit, _ = digit_arrays(config, "test")
    paths = []
    for name, model, params, image, budgets, blocks in (
            ("astronaut", deit, deit_params["params"], astronaut, BIG_BUDGETS, [3, 6, 9, 11]),
            ("digit", digit_model, digit_params, digit[0], DIGIT_BUDGETS, [1, 3, 5])):
        rows = [source_pictures(model, params, image, method, budgets[method][1], blocks) for method in METHODS]
        path = os.path.join(out_dir, f"{stem}_{name}.png")
        picture_grid(rows, path)
        paths.append(path)
    return paths


def plot(rows: List[Dict[str, Any]], path: str) -> None:
    """Writes top-1 against GMACs on digits, a curve per method (solid: off the shelf; markers: fine-tuned)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(6, 4.2))
    base = next(row for row in rows if row["method"] == "none")
    axis.scatter([base["gmacs"]], [100 * base["top1"]], color="black", label="no reduction", zorder=3)
    for method in METHODS:
        points = sorted((row["gmacs"], 100 * row["top1"]) for row in rows if row["method"] == method)
        line, = axis.plot(*zip(*points), marker="o", label=f"{method} (off the shelf)")
        tuned = [(row["gmacs"], 100 * row["top1_finetuned"]) for row in rows
                 if row["method"] == method and "top1_finetuned" in row]
        if tuned:
            axis.scatter(*zip(*tuned), marker="*", s=120, color=line.get_color(), label=f"{method} (fine-tuned)")
    axis.set_xlabel("GMACs per image (XLA cost analysis)")
    axis.set_ylabel("digits test top-1 (%)")
    axis.set_title("Token reduction on the digits ViT (64 patches + cls, depth 6)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def markdown(big: List[Dict[str, Any]], digits: List[Dict[str, Any]], device: str, batch: int, steps: int,
             finetune_steps: int, picture_paths: List[str], plot_path: str) -> str:
    """Returns the markdown report: the big-model table, the digits table, the papers' figures."""
    lines = [f"GMACs: XLA cost analysis of the jitted forward at batch 1 (flops / 2, the papers' \"GFLOPs\"). "
             f"Images/s: jitted forward, random weights, batch {batch}, on **{device}** (blank: not timed).", "",
             "| model | method | budget | GMACs | GMACs vs none | images/s " + f"({device}) |",
             "|---|---|---|---:|---:|---:|"]
    for row in big:
        base = next(r for r in big if r["model"] == row["model"] and r["method"] == "none")
        speed = f"{row['images_per_sec']:.1f}" if "images_per_sec" in row else ""
        lines.append(f"| {row['model']} | {row['method']} | {row['budget']} | {row['gmacs']:.2f} | "
                     f"{row['gmacs'] / base['gmacs']:.2f}x | {speed} |")
    lines += ["", f"Digits (360 test images): the digits ViT trained {steps} steps without reduction; top-1 off the "
              f"shelf at each budget, and after {finetune_steps} fine-tuning steps with the method on (middle "
              f"budget; plain cross-entropy, AdamW 3e-4, batch 128). Fine-tuned 'none' = the same steps without "
              f"reduction, for reference.", "",
              "| method | budget | GMACs | top-1 % off the shelf | top-1 % fine-tuned |", "|---|---|---:|---:|---:|"]
    for row in digits:
        tuned = f"{100 * row['top1_finetuned']:.2f}" if "top1_finetuned" in row else ""
        lines.append(f"| {row['method']} | {row['budget']} | {row['gmacs']:.4f} | {100 * row['top1']:.2f} | {tuned} |")
    lines += ["", "The papers' own ImageNet figures (quoted, not measured here):", "",
              "| method | setting | paper's result | source |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in PAPERS]
    lines += ["", f"Plot: {os.path.basename(plot_path)}. Pictures (rows: " + ", ".join(METHODS) +
              "; columns: after blocks 3, 6, 9, 11 for the astronaut on a randomly initialised DeiT-S; after blocks "
              "1, 3, 5 for the digit on the trained digits ViT; middle budgets; black: dropped or not sampled): "
              + ", ".join(os.path.basename(p) for p in picture_paths) + "."]
    return "\n".join(lines)


def main(argv=None) -> Dict[str, Any]:
    """Runs the three parts and writes the table, JSON, plot and pictures; returns the raw results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 training steps, 20 fine-tuning steps, DeiT-S speed")
    parser.add_argument("--steps", type=int, default=600, help="digits training steps of 128 images")
    parser.add_argument("--finetune_steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8, help="images per timed forward")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--speed_models", default=None, help="comma-separated of DeiT-S,ViT-B/16 (default: both on "
                                                           "an accelerator, DeiT-S on a CPU)")
    parser.add_argument("--skip_big", action="store_true", help="skip part 1 (DeiT-S / ViT-B/16 GMACs and speed)")
    parser.add_argument("--big_from", default="", help="a JSON with part 1's `big_models` rows to reuse (e.g. the "
                                                       "_partial.json an interrupted run left)")
    parser.add_argument("--params_cache", default="", help="a pickle of the trained digits params: read if it "
                                                            "exists, else written after training")
    parser.add_argument("--out_dir", default=OUT_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.finetune_steps = 100, 20
    device = "GPU" if jax.default_backend() == "gpu" else jax.default_backend().upper()
    speed_models = args.speed_models.split(",") if args.speed_models else (
        ["DeiT-S"] if device == "CPU" else list(BIG_MODELS))
    stem = "bench_tokens_quick" if args.quick else "bench_tokens"
    started = time.time()
    os.makedirs(args.out_dir, exist_ok=True)
    if args.big_from:
        import json
        with open(args.big_from) as f:
            big = json.load(f)["big_models"]
    else:
        big = [] if args.skip_big else big_model_rows(speed_models, args.batch, args.repeats)
    write_outputs(args.out_dir, stem + "_partial", "part 1 done", dict(big_models=big))
    if args.params_cache and os.path.exists(args.params_cache):
        import pickle
        with open(args.params_cache, "rb") as f:
            params = jax.tree.map(jnp.asarray, pickle.load(f))
        config = tome_digits.train_config(args.steps, 0)
    else:
        params, config = train_digits(args.steps, seed=0)
        if args.params_cache:
            import pickle
            with open(args.params_cache, "wb") as f:
                pickle.dump(jax.tree.map(np.asarray, params), f)
    digits = digits_rows(params, config, args.finetune_steps)
    write_outputs(args.out_dir, stem + "_partial", "parts 1-2 done", dict(big_models=big, digits=digits))
    plot_path = os.path.join(args.out_dir, f"{stem}.png")
    plot(digits, plot_path)
    picture_paths = pictures(params, config, args.out_dir, stem)
    table = markdown(big, digits, device, args.batch, args.steps, args.finetune_steps, picture_paths, plot_path)
    table += f"\n\nTotal {(time.time() - started) / 60:.1f} min ({jax.devices()[0].device_kind})."
    print(table)
    results = dict(big_models=big, digits=digits, device=device, device_kind=jax.devices()[0].device_kind,
                   steps=args.steps, finetune_steps=args.finetune_steps, batch=args.batch,
                   big_budgets=BIG_BUDGETS, digit_budgets=DIGIT_BUDGETS, seconds=time.time() - started)
    write_outputs(args.out_dir, stem, table, results)
    for suffix in (".md", ".json"):
        os.remove(os.path.join(args.out_dir, stem + "_partial" + suffix))
    return results


if __name__ == "__main__":
    main()
