r"""A tiny CLIP on digits captions: CLIP's softmax loss and SigLIP's sigmoid loss on the same run, side by side.

    python experiments/clip_digits.py                  # ~10 min on 2 CPU cores
    python experiments/clip_digits.py --steps=200      # a quick look

Trains `configs/clip_digits.py` (clip_vit_tiny_digits with 4x4 patches, batch 128, AdamW 1e-3, cosine)
once per loss, from the same seed, data order and captions; the sigmoid run starts with SigLIP's logit
scale log 10 and bias -10. Reports, on the 360 test digits: zero-shot top-1 / top-5 from the prompt
ensemble of the 8 digits templates, image->text and text->image recall@1/5/10 (the test captions use
one template, so the texts are the 10 classes' captions), the last logged train loss and the minutes.

Writes experiments/out/clip_digits.{md,json}.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from experiment_io import write_outputs  # noqa: E402

from vitjax import config_utils  # noqa: E402
from vitjax import train as trainer  # noqa: E402

OUT_DIR = os.path.join(REPO, "experiments", "out")
LOSSES = {"softmax": "CLIP softmax", "sigmoid": "SigLIP sigmoid"}


def last_train_loss(workdir: str) -> float:
    """Returns the last logged train/loss of a run."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["train/loss"] for line in f if '"train/loss"' in line]
    return float(losses[-1])


def main(argv=None) -> Dict[str, Any]:
    """Trains one run per loss; returns the raw results (also written to --out_dir)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="train steps (default: the config's)")
    parser.add_argument("--out_dir", default=OUT_DIR)
    args = parser.parse_args(argv)
    started = time.time()
    workdir = tempfile.mkdtemp(prefix="clip_digits_")
    results: Dict[str, Any] = dict(runs={})
    overrides = dict(progress_bar=False, eval_every_steps=0, checkpoint_every_steps=0, checkpoint_async=False)
    if args.steps:
        overrides["total_steps"] = args.steps
    try:
        for loss in LOSSES:
            config = config_utils.load_config(f"configs/clip_digits.py:loss={loss}", overrides)
            run_start = time.time()
            final = trainer.train_and_evaluate(config, os.path.join(workdir, loss))
            run = {key: value for key, value in final.items() if key.startswith(("zeroshot/", "retrieval/"))}
            run.update(steps=config.total_steps, batch_size=config.batch_size, minutes=(time.time() - run_start) / 60,
                       final_train_loss=last_train_loss(os.path.join(workdir, loss)))
            results["runs"][loss] = run
            print(f"{loss}: zero-shot top-1 {100 * run['zeroshot/top1']:.2f}%, "
                  f"i->t R@1 {100 * run['retrieval/image_to_text_recall@1']:.2f}%", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    first = next(iter(results["runs"].values()))
    lines = [
        f"Tiny CLIP (`configs/clip_digits.py`: clip_vit_tiny_digits, 4x4 patches) on digits captions, "
        f"{first['steps']} steps of {first['batch_size']}; 360 test digits, zero-shot from the 8-template "
        "prompt ensemble; retrieval over the 360 test pairs (10 distinct captions, one template). "
        "Chance: top-1 10%, image->text R@1 10%. One CPU device, so the losses take their full-matrix form "
        "(the sharded forms equal them: tests/test_clip_loss.py).",
        "",
        "| loss | zero-shot top-1 % | top-5 % | image->text R@1 / R@5 % | text->image R@1 / R@5 / R@10 % "
        "| last train loss | minutes |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for loss, run in results["runs"].items():
        lines.append(
            f"| {LOSSES[loss]} | {100 * run['zeroshot/top1']:.2f} | {100 * run['zeroshot/top5']:.2f} | "
            f"{100 * run['retrieval/image_to_text_recall@1']:.2f} / {100 * run['retrieval/image_to_text_recall@5']:.2f} | "
            f"{100 * run['retrieval/text_to_image_recall@1']:.0f} / {100 * run['retrieval/text_to_image_recall@5']:.0f}"
            f" / {100 * run['retrieval/text_to_image_recall@10']:.0f} | {run['final_train_loss']:.4f} | "
            f"{run['minutes']:.1f} |")
    results["seconds"] = time.time() - started
    lines += ["", f"Total {results['seconds'] / 60:.1f} min on {os.cpu_count()} CPU cores (shared machine)."]
    table = "\n".join(lines)
    print(table)
    write_outputs(args.out_dir, "clip_digits", table, results)
    return results


if __name__ == "__main__":
    main()
