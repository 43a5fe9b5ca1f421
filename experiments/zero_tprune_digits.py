r"""Zero-TPrune off the shelf on the digits ViT, beside EViT at the same keep budgets.

    python experiments/zero_tprune_digits.py                 # trains the digits ViT (~5-10 min on 2 CPU cores)
    python experiments/zero_tprune_digits.py --steps=100     # a quick look (lower accuracy)

Trains the digits ViT of experiments/bench_tokens.py (same recipe and seed, no reduction), then evaluates
the same weights on the 360 test digits with Zero-TPrune at keep 0.9 / 0.7 / 0.5 at blocks 1, 3, 5 (and
with the I-stage alone, similarity_fraction=0), EViT (fused) at the same keep rates for reference:
top-1 and GMACs (XLA cost analysis). Writes experiments/out/zero_tprune_digits.{md,json}.
"""
import argparse
import os
import sys
import time
from typing import Any, Dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_tokens  # noqa: E402
import tome_digits  # noqa: E402
from experiment_io import write_outputs  # noqa: E402

from vitjax import models  # noqa: E402

KEEP_RATES = (0.9, 0.7, 0.5)
LOCATIONS = (1, 3, 5)


def budgets():
    """Returns (method label, settings) of every evaluated configuration, unreduced first."""
    rows = [("none", None)]
    for keep in KEEP_RATES:
        rows.append(("zero_tprune", dict(method="zero_tprune", keep_rate=keep, prune_loc=LOCATIONS)))
        rows.append(("zero_tprune I-stage only", dict(method="zero_tprune", keep_rate=keep, prune_loc=LOCATIONS,
                                                      similarity_fraction=0.0)))
        rows.append(("evit (fused)", dict(method="evit", base_keep_rate=keep, drop_loc=LOCATIONS, fuse_token=True)))
    return rows


def main(argv=None) -> Dict[str, Any]:
    """Trains, evaluates every budget and writes the table; returns the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="digits training steps of 128 images")
    args = parser.parse_args(argv)
    started = time.time()
    params, config = bench_tokens.train_digits(args.steps, seed=0)
    images, labels = bench_tokens.digit_arrays(config, "test")
    rows = []
    for method, settings in budgets():
        model = models.create("vit", **tome_digits.MODEL, token_reduction=settings)
        keep = "-" if settings is None else settings.get("keep_rate", settings.get("base_keep_rate"))
        row = dict(method=method, keep=keep, gmacs=bench_tokens.gmacs(model, images.shape[1:]),
                   top1=100 * bench_tokens.top1(model, params, images, labels))
        rows.append(row)
        print(row, flush=True)
    lines = [f"Digits ViT (64 patches + cls, depth 6) trained {args.steps} steps without reduction, evaluated off "
             f"the shelf on the 360 test digits; reduction at blocks {list(LOCATIONS)}. Zero-TPrune: 30 WPR "
             f"iterations, half the pruned tokens by similarity unless 'I-stage only'.", "",
             "| method | keep rate | GMACs | top-1 % |", "|---|---:|---:|---:|"]
    lines += [f"| {row['method']} | {row['keep']} | {row['gmacs']:.4f} | {row['top1']:.2f} |" for row in rows]
    lines += ["", f"Total time: {time.time() - started:.0f} s on {bench_tokens.jax.default_backend().upper()}."]
    table = "\n".join(lines)
    print(table)
    write_outputs(bench_tokens.OUT_DIR, "zero_tprune_digits", table, dict(steps=args.steps, rows=rows))
    return dict(rows=rows)


if __name__ == "__main__":
    main()
