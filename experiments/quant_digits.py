r"""Post-training quantization of digits-trained models: top-1 at FP32, W8A8, W6A6, W4A4 and W3A3 per quantizer.

    python experiments/quant_digits.py                                  # trains both models (~5-10 min, 2 CPUs)
    python experiments/quant_digits.py --vit_workdir=/tmp/vitjax_digits # reuse the quickstart's run

Trains the quickstart ViT (configs/digits_vit.py, 800 steps) and a small Swin on the same data and recipe
(16 px, patch 2, window 4, depths 2-2, width 32), each in a workdir, unless given. For each model and
method of `vitjax.quant.METHODS` at W8A8 / W6A6 / W4A4 / W3A3 (q, k, v of attention quantized too; AdaLog
with its full official pipeline, post-LayerNorm reparameterisation included): calibrate on 32 training
images (AdaLog's calib_size; the eval preprocessing) and evaluate on the 360 test images, as
`python -m vitjax.quant` does.
Writes experiments/out/quant_digits.{md,json,png} (the plot: top-1 against bits).

    python experiments/quant_digits.py --part=sparsity --vit_workdir=/tmp/vitjax_digits

Sparse then prune (`vitjax.quant.sparsity`) on the quickstart ViT: fine-tune with L1 on the kernels, prune
by global magnitude to 50 / 70 / 90 % of the kernels (not the head), fine-tune with the masks kept; top-1
after each stage. Writes experiments/out/quant_digits_sparsity.{md,json}.
"""
import argparse
import os
import sys
import tempfile
import time
from typing import Any, Dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from experiment_io import write_outputs  # noqa: E402

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
BITS = (8, 6, 4, 3)
SWIN = dict(img_size=16, patch_size=2, in_chans=1, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4,
            num_classes=10, drop_path_rate=0.1)


def train(workdir: str, swin: bool) -> None:
    """Trains configs/digits_vit.py (or its Swin variant) in `workdir` unless it holds a finished run."""
    from vitjax import config_utils, train as trainer
    config = config_utils.load_config("configs/digits_vit.py")
    config.progress_bar = False
    if swin:
        config.model_name = "swin_tiny_patch4_window7_224"
        config.model = dict(SWIN)
    trainer.train_and_evaluate(config, workdir)


def evaluate_model(workdir: str, label: str, calib_batches: int, log) -> Dict[str, Any]:
    """Returns {"fp32": top-1, method: {bits: top-1}} of the run in `workdir`, quantized every way."""
    import jax

    from vitjax import quant
    from vitjax.evaluate import pretrained
    from vitjax.quant.__main__ import calibration_images, logits_fn
    prepared = pretrained.prepare_pretrained(workdir, log=lambda _: None)
    _, calibration = calibration_images(prepared.input_config, None, calib_batches, 32)
    results: Dict[str, Any] = {"fp32": 100 * pretrained.evaluate_prepared(prepared, log=lambda _: None).metrics["top1"],
                               "seconds": {}}
    log(f"{label} FP32 top-1 {results['fp32']:.2f}")
    for method in quant.METHODS:
        results[method], results["seconds"][method] = {}, {}
        for bits in BITS:
            started = time.time()
            qmodel, qvariables = quant.quantize(prepared.objective.module, prepared.variables, calibration,
                                                method=method, w_bits=bits, a_bits=bits,
                                                apply_kwargs=dict(train=False))
            metrics = pretrained.evaluate_prepared(prepared, variables=jax.device_put(qvariables),
                                                   logits_fn=logits_fn(qmodel), log=lambda _: None).metrics
            results[method][bits] = 100 * metrics["top1"]
            results["seconds"][method][bits] = time.time() - started
            log(f"{label} {method} W{bits}A{bits}: top-1 {results[method][bits]:.2f} ({time.time() - started:.0f} s)")
    return results


def train_arrays(prepared, split: str):
    """Returns (images, labels) of a digits split with the eval preprocessing, real examples only."""
    import numpy as np

    import vitjax.data as data
    config = {key: value for key, value in prepared.input_config.items() if key != "train_split"}
    images, labels = [], []
    for batch in data.make_eval_iterator(dict(config, eval_split=split), global_batch_size=120):
        keep = np.asarray(batch["mask"]).astype(bool)
        images.append(np.asarray(batch["image"])[keep])
        labels.append(np.asarray(batch["label"])[keep])
    return np.concatenate(images), np.concatenate(labels)


def sparse_then_prune(workdir: str, steps: int, l1: float, log) -> Dict[str, Any]:
    """Returns top-1 of the run in `workdir` after L1 fine-tuning, pruning and masked fine-tuning per sparsity."""
    import jax
    import numpy as np
    import optax

    from vitjax.evaluate import pretrained
    from vitjax.quant import sparsity
    prepared = pretrained.prepare_pretrained(workdir, log=lambda _: None)
    objective, module = prepared.objective, prepared.objective.module
    images, labels = train_arrays(prepared, prepared.input_config.get("train_split", "train"))
    test_images, test_labels = train_arrays(prepared, prepared.input_config["eval_split"])
    rng = np.random.default_rng(0)

    def top1(params):
        logits = jax.jit(lambda p, x: objective.eval_logits({"params": p}, x))(params, test_images)
        return 100 * float((np.asarray(logits).argmax(-1) == test_labels).mean())

    def finetune(params, optimizer):
        state = optimizer.init(params)

        @jax.jit
        def step(params, state, x, y):
            def loss(p):
                logits, _ = module.apply({"params": p}, x, train=False)
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            grads = jax.grad(loss)(params)
            updates, state = optimizer.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        for _ in range(steps):
            index = rng.choice(len(images), 128, replace=False)
            params, state = step(params, state, images[index], labels[index])
        return params

    params = prepared.variables["params"]
    rows = [dict(stage="trained (dense)", sparsity=0.0, top1=top1(params))]
    sparse = finetune(params, optax.chain(sparsity.l1_regularization(l1), optax.adamw(3e-4, weight_decay=0.0)))
    rows.append(dict(stage=f"L1 {l1:g}, {steps} steps", sparsity=sparsity.sparsity_of(sparse), top1=top1(sparse)))
    log(rows[-1])
    for source, start in (("L1 then pruned", sparse), ("pruned without L1", params)):
        for target in (0.5, 0.7, 0.9):
            masks = sparsity.magnitude_masks(start, target)
            pruned = sparsity.apply_masks(start, masks)
            pruned_top1 = top1(pruned)
            tuned = finetune(pruned, optax.chain(optax.adamw(3e-4, weight_decay=0.0), sparsity.keep_masked(masks)))
            rows.append(dict(stage=source, sparsity=sparsity.sparsity_of(tuned), top1_pruned=pruned_top1,
                             top1=top1(tuned)))
            log(rows[-1])
    lines = [f"Sparse then prune on the quickstart ViT (digits): L1 on the kernels (not the head) for {steps} "
             f"steps of 128 training images (AdamW 3e-4), global magnitude pruning, then {steps} steps with the "
             "masks kept; beside it the same pruning and fine-tuning of the dense weights (no L1). Sparsity: the "
             "fraction of zero kernel weights outside the head.", "",
             "| stage | sparsity % | top-1 % just pruned | top-1 % |", "|---|---:|---:|---:|"]
    for row in rows:
        pruned_cell = f"{row['top1_pruned']:.2f}" if "top1_pruned" in row else "-"
        lines.append(f"| {row['stage']} | {100 * row['sparsity']:.1f} | {pruned_cell} | {row['top1']:.2f} |")
    table = "\n".join(lines)
    print(table)
    write_outputs(OUT_DIR, "quant_digits_sparsity", table, dict(steps=steps, l1=l1, rows=rows))
    return dict(rows=rows)


def plot(results: Dict[str, Dict[str, Any]], path: str) -> None:
    """Writes the top-1 against bits plot, one panel per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from vitjax import quant
    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for axis, (label, result) in zip(axes[0], results.items()):
        for method in quant.METHODS:
            axis.plot(BITS, [result[method][bits] for bits in BITS], marker="o", label=method)
        axis.axhline(result["fp32"], color="black", linestyle="--", label="FP32")
        axis.set_title(label)
        axis.set_xlabel("bits (W = A)")
        axis.set_ylabel("top-1 % (360 test digits)")
        axis.set_xticks(BITS)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def write_table(results: Dict[str, Any], calib_batches: int, started: float) -> None:
    """Prints and writes the markdown table, JSON and plot of `results`."""
    from vitjax import quant
    lines = ["Top-1 % on the 360 digits test images after post-training quantization (W = A bits), calibrated on "
             f"{calib_batches} x 32 training images; kernels per output channel, activations per tensor "
             "(static), q / k / v per head, the first layer's input (the image) at 8 bits.", "",
             "| model | method | FP32 | " + " | ".join(f"W{b}A{b}" for b in BITS) + " | s (calibrate + eval) |",
             "|---|---|---:|" + "---:|" * (len(BITS) + 1)]
    for label, result in results.items():
        for method in quant.METHODS:
            cells = " | ".join(f"{result[method][bits]:.2f}" for bits in BITS)
            seconds = "/".join(f"{result['seconds'][method][bits]:.0f}" for bits in BITS)
            lines.append(f"| {label} | {method} | {result['fp32']:.2f} | {cells} | {seconds} |")
    lines += ["", f"Total time: {time.time() - started:.0f} s on {__import__('jax').default_backend().upper()}."]
    table = "\n".join(lines)
    print(table)
    path = write_outputs(OUT_DIR, "quant_digits", table, results)
    plot(results, path + ".png")


def main(argv=None) -> Dict[str, Any]:
    """Trains (unless given), quantizes and evaluates both models, writes the table and plot; returns the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vit_workdir", default=None, help="a finished quickstart run (default: train one)")
    parser.add_argument("--swin_workdir", default=None, help="a finished digits Swin run (default: train one)")
    parser.add_argument("--skip_swin", action="store_true", help="quantize the ViT only")
    # 1 x 32 images: AdaLog's calib_size (configs/{3,4,6}bit.py); its searches cost time linear in it
    parser.add_argument("--calib_batches", type=int, default=1, help="calibration batches of 32 training images")
    parser.add_argument("--part", default="quant", choices=("quant", "sparsity"), help="which table to make")
    parser.add_argument("--sparse_steps", type=int, default=200, help="steps of each sparse-then-prune stage")
    parser.add_argument("--l1", type=float, default=2e-4, help="L1 strength of the sparse stage")
    args = parser.parse_args(argv)
    started = time.time()
    scratch = tempfile.mkdtemp(prefix="quant_digits_")
    if args.part == "sparsity":
        workdir = args.vit_workdir or os.path.join(scratch, "vit")
        if args.vit_workdir is None:
            train(workdir, False)
        return sparse_then_prune(workdir, args.sparse_steps, args.l1, print)
    runs = {"ViT (quickstart)": (args.vit_workdir, False)}
    if not args.skip_swin:
        runs["Swin (digits)"] = (args.swin_workdir, True)
    results = {}
    for label, (workdir, swin) in runs.items():
        if workdir is None:
            workdir = os.path.join(scratch, "swin" if swin else "vit")
            train(workdir, swin)
        results[label] = evaluate_model(workdir, label, args.calib_batches, print)
        # written after each model, so a long run leaves the finished rows behind
        write_table(results, args.calib_batches, started)
    return results


if __name__ == "__main__":
    main()
