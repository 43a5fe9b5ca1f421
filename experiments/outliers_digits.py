r"""Outlier-free attention on digits: vanilla vs clipped softmax vs gated attention, FP32 and W8A8.

    python experiments/outliers_digits.py                  # 3 variants x 3 seeds of the quickstart ViT
    python experiments/outliers_digits.py --seeds=0 --steps=200   # a quicker look

Each variant trains the quickstart recipe (configs/digits_vit.py: width 64, depth 4, 17 tokens, 800 steps)
with the same seed and steps; only the attention differs: `softmax_kind="clipped"` (gamma -0.025, zeta 1:
the official BERT script's setting; the paper's ViT alpha=12 over 197 tokens would, over 17 tokens, zero every
weight below 0.7) or `attn_gate="linear"` (gate bias logit(0.25)). Then, on the 360 test images: FP32 top-1,
the paper's outlier metrics (`vitjax.evaluate.outliers`: max infinity norm of the block outputs, average
kurtosis over block and FFN outputs), and W8A8 top-1 with `vitjax.quant` (minmax, per-tensor static
activations, so an outlier stretches its tensor's grid; calibrated on 4 x 32 training images).
Writes experiments/out/outliers_digits.{md,json}.
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
VARIANTS = {
    "vanilla": dict(),
    "clipped softmax": dict(softmax_kind="clipped", clip_gamma=-0.025, clip_zeta=1.0),
    "gated attention": dict(attn_gate="linear", attn_gate_init=0.25),
}


def train(workdir: str, settings: Dict[str, Any], seed: int, steps: int) -> None:
    """Trains configs/digits_vit.py with the attention `settings` in `workdir`."""
    from vitjax import config_utils, train as trainer
    config = config_utils.load_config("configs/digits_vit.py")
    config.progress_bar = False
    config.seed = seed
    if steps != config.total_steps:
        config.total_steps = steps
        config.eval_every_steps = config.checkpoint_every_steps = steps
        config.optim.warmup_steps = min(config.optim.warmup_steps, steps // 4)
    config.model = dict(config.model, **settings)
    trainer.train_and_evaluate(config, workdir)


def measure(workdir: str, calib_batches: int) -> Dict[str, float]:
    """Returns FP32 top-1, the outlier metrics and W8A8 top-1 of the run in `workdir`."""
    import jax
    import numpy as np

    import vitjax.data as data
    from vitjax import quant
    from vitjax.evaluate import outliers, pretrained
    from vitjax.quant.__main__ import calibration_images, logits_fn
    prepared = pretrained.prepare_pretrained(workdir, log=lambda _: None)
    result = {"fp32": 100 * pretrained.evaluate_prepared(prepared, log=lambda _: None).metrics["top1"]}
    batches = ({"image": np.asarray(b["image"]), "mask": np.asarray(b["mask"])}
               for b in data.make_eval_iterator(prepared.input_config, global_batch_size=120))
    metrics = outliers.outlier_metrics(prepared.objective.module, prepared.variables, batches)
    result.update({key: metrics[key] for key in ("max_inf_norm", "max_ffn_inf_norm", "avg_kurtosis", "max_kurtosis")})
    _, calibration = calibration_images(prepared.input_config, None, calib_batches, 32)
    qmodel, qvariables = quant.quantize(prepared.objective.module, prepared.variables, calibration, method="minmax",
                                        w_bits=8, a_bits=8, apply_kwargs=dict(train=False))
    result["w8a8"] = 100 * pretrained.evaluate_prepared(prepared, variables=jax.device_put(qvariables),
                                                        logits_fn=logits_fn(qmodel), log=lambda _: None).metrics["top1"]
    return result


def main(argv=None) -> Dict[str, Any]:
    """Trains and measures every variant and seed; prints and writes the table; returns the results."""
    import numpy as np
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--steps", type=int, default=800, help="training steps of each run")
    parser.add_argument("--calib_batches", type=int, default=4)
    parser.add_argument("--previous", default=None,
                        help="an earlier outliers_digits.json (same --steps) whose runs join this one's in the table")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    scratch = tempfile.mkdtemp(prefix="outliers_digits_")
    started = time.time()
    runs: Dict[str, list] = {}
    if args.previous:
        import json
        with open(args.previous) as f:
            previous = json.load(f)
        if previous["steps"] != args.steps:
            raise ValueError(f"--previous has {previous['steps']} steps, this run {args.steps}")
        runs = {label: [row for row in rows if row["seed"] not in seeds] for label, rows in previous["runs"].items()}
    for label, settings in VARIANTS.items():
        for seed in seeds:
            runs.setdefault(label, [])
            workdir = os.path.join(scratch, f"{label.split()[0]}_{seed}")
            train(workdir, settings, seed, args.steps)
            runs.setdefault(label, []).append(dict(seed=seed, **measure(workdir, args.calib_batches)))
            print(label, runs[label][-1], f"({time.time() - started:.0f} s)", flush=True)
    columns = (("fp32", "FP32 top-1 %", ".2f"), ("max_inf_norm", "max inf-norm", ".2f"),
               ("max_ffn_inf_norm", "max FFN inf-norm", ".2f"), ("avg_kurtosis", "avg kurtosis", ".2f"),
               ("max_kurtosis", "max kurtosis", ".2f"), ("w8a8", "W8A8 top-1 %", ".2f"))
    all_seeds = sorted({row["seed"] for rows in runs.values() for row in rows})
    lines = [f"Quickstart ViT on digits ({args.steps} steps, seeds {all_seeds}; mean +- std over seeds), 360 test "
             "images. Outlier metrics as Bondarenko et al. (2023): per example, the infinity norm / kurtosis of a "
             "layer's output, averaged over examples; max inf-norm over the block outputs (residual stream), avg "
             "kurtosis over block and FFN outputs. W8A8: vitjax.quant minmax, per-tensor static activations, "
             f"per-channel weights, {args.calib_batches} x 32 calibration images.", "",
             "| attention | " + " | ".join(title for _, title, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    summary = {}
    for label, rows in runs.items():
        cells, summary[label] = [], {}
        for key, _, fmt in columns:
            values = np.array([row[key] for row in rows], np.float64)
            summary[label][key] = dict(mean=float(values.mean()), std=float(values.std()))
            cells.append(f"{values.mean():{fmt}} +- {values.std():{fmt}}" if len(values) > 1 else f"{values[0]:{fmt}}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Total time {time.time() - started:.0f} s on this machine.")
    table = "\n".join(lines)
    print(table)
    write_outputs(OUT_DIR, "outliers_digits", table, dict(steps=args.steps, seeds=all_seeds, runs=runs,
                                                          summary=summary))
    return dict(runs=runs, summary=summary)


if __name__ == "__main__":
    main()
