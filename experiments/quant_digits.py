r"""Post-training quantization of digits-trained models: top-1 at FP32, W8A8, W6A6 and W4A4 for each quantizer.

    python experiments/quant_digits.py                                  # trains both models (~5-10 min, 2 CPUs)
    python experiments/quant_digits.py --vit_workdir=/tmp/vitjax_digits # reuse the quickstart's run

Trains the quickstart ViT (configs/digits_vit.py, 800 steps) and a small Swin on the same data and recipe
(16 px, patch 2, window 4, depths 2-2, width 32), each in a workdir, unless given. For each model and
method of `vitjax.quant.METHODS` at W8A8 / W6A6 / W4A4: calibrate on 4 batches of 32 training images
(the eval preprocessing) and evaluate on the 360 test images, as `python -m vitjax.quant` does.
Writes experiments/out/quant_digits.{md,json,png} (the plot: top-1 against bits).
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
BITS = (8, 6, 4)
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
    results: Dict[str, Any] = {"fp32": 100 * pretrained.evaluate_prepared(prepared, log=lambda _: None).metrics["top1"]}
    log(f"{label} FP32 top-1 {results['fp32']:.2f}")
    for method in quant.METHODS:
        results[method] = {}
        for bits in BITS:
            started = time.time()
            qmodel, qvariables = quant.quantize(prepared.objective.module, prepared.variables, calibration,
                                                method=method, w_bits=bits, a_bits=bits,
                                                apply_kwargs=dict(train=False))
            metrics = pretrained.evaluate_prepared(prepared, variables=jax.device_put(qvariables),
                                                   logits_fn=logits_fn(qmodel), log=lambda _: None).metrics
            results[method][bits] = 100 * metrics["top1"]
            log(f"{label} {method} W{bits}A{bits}: top-1 {results[method][bits]:.2f} ({time.time() - started:.0f} s)")
    return results


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


def main(argv=None) -> Dict[str, Any]:
    """Trains (unless given), quantizes and evaluates both models, writes the table and plot; returns the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vit_workdir", default=None, help="a finished quickstart run (default: train one)")
    parser.add_argument("--swin_workdir", default=None, help="a finished digits Swin run (default: train one)")
    parser.add_argument("--skip_swin", action="store_true", help="quantize the ViT only")
    parser.add_argument("--calib_batches", type=int, default=4, help="calibration batches of 32 training images")
    args = parser.parse_args(argv)
    started = time.time()
    scratch = tempfile.mkdtemp(prefix="quant_digits_")
    runs = {"ViT (quickstart)": (args.vit_workdir, False)}
    if not args.skip_swin:
        runs["Swin (digits)"] = (args.swin_workdir, True)
    results = {}
    from vitjax import quant
    for label, (workdir, swin) in runs.items():
        if workdir is None:
            workdir = os.path.join(scratch, "swin" if swin else "vit")
            train(workdir, swin)
        results[label] = evaluate_model(workdir, label, args.calib_batches, print)
    lines = ["Top-1 % on the 360 digits test images after post-training quantization (W = A bits), calibrated on "
             f"{args.calib_batches} x 32 training images; kernels per output channel, activations per tensor "
             "(static), the first layer's input (the image) at 8 bits.", "",
             "| model | method | FP32 | W8A8 | W6A6 | W4A4 |", "|---|---|---:|---:|---:|---:|"]
    for label, result in results.items():
        for method in quant.METHODS:
            cells = " | ".join(f"{result[method][bits]:.2f}" for bits in BITS)
            lines.append(f"| {label} | {method} | {result['fp32']:.2f} | {cells} |")
    lines += ["", f"Total time: {time.time() - started:.0f} s on {__import__('jax').default_backend().upper()}."]
    table = "\n".join(lines)
    print(table)
    path = write_outputs(OUT_DIR, "quant_digits", table, results)
    plot(results, path + ".png")
    return results


if __name__ == "__main__":
    main()
