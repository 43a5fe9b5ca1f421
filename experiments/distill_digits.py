r"""DeiT distillation on the bundled digits: a small DeiT student with no teacher, hard and soft distillation.

    python experiments/distill_digits.py                 # ~10 min on 2 CPU cores
    python experiments/distill_digits.py --seeds=1 --student_steps=200   # a quick look

1. Trains the teacher: the quickstart ViT (`configs/digits_vit.py`: width 64, depth 4, 800 steps).
2. Trains a smaller DeiT student (width 32, depth 2, class + distillation tokens) on the same input
   and schedule for --student_steps steps, three ways, each over --seeds seeds:
   - none: objective "supervised", both heads learn the labels (DeiT's no-teacher baseline);
   - hard: objective "distill", the distillation head learns the teacher's argmax (alpha 0.5);
   - soft: objective "distill", KL to the teacher at temperature 3 with alpha 0.1 (the paper's soft setting).
3. Reports the student's test top-1 (mean of its two heads) and its agreement with the teacher.

Writes experiments/out/distill_digits.{md,json}.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Dict

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from experiment_io import write_outputs  # noqa: E402

from vitjax import config_utils  # noqa: E402
from vitjax import train as trainer  # noqa: E402

OUT_DIR = os.path.join(REPO, "experiments", "out")
STUDENT = dict(variant="mu/4", num_classes=10, img_size=16, in_chans=1, embed_dim=32, depth=2, num_heads=2,
               mlp_dim=64, distilled=True)
METHODS = {
    "none": dict(objective="supervised", objective_kwargs={}),
    "hard": dict(objective="distill", objective_kwargs=dict(distillation_type="hard", alpha=0.5, tau=1.0)),
    "soft": dict(objective="distill", objective_kwargs=dict(distillation_type="soft", alpha=0.1, tau=3.0)),
}


def quickstart_config():
    """Returns configs/digits_vit.py's config with quiet logging and no intermediate checkpoints."""
    return config_utils.load_config("configs/digits_vit.py", dict(
        progress_bar=False, eval_every_steps=0, checkpoint_every_steps=0, checkpoint_async=False))


def student_config(method: str, seed: int, steps: int, teacher_dir: str, teacher_model: Dict[str, Any]):
    """Returns the student's config: the quickstart recipe with the small DeiT and `method`'s objective."""
    config = quickstart_config()
    config.seed = seed
    config.model = dict(STUDENT)
    config.total_steps = steps
    config.optim.warmup_steps = max(1, steps // 16)
    config.objective = METHODS[method]["objective"]
    kwargs = dict(METHODS[method]["objective_kwargs"])
    if config.objective == "distill":
        kwargs.update(teacher="vit", teacher_model=teacher_model, teacher_init=teacher_dir)
    config.objective_kwargs = kwargs
    return config


def main(argv=None) -> Dict[str, Any]:
    """Trains the teacher and every student; returns the raw results (also written to --out_dir)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--student_steps", type=int, default=400, help="student training steps of 128 images")
    parser.add_argument("--out_dir", default=OUT_DIR)
    args = parser.parse_args(argv)
    started = time.time()
    workdir = tempfile.mkdtemp(prefix="distill_digits_")
    results: Dict[str, Any] = dict(student=STUDENT, student_steps=args.student_steps, runs={})
    try:
        teacher_config = quickstart_config()
        teacher_dir = os.path.join(workdir, "teacher")
        teacher = trainer.train_and_evaluate(teacher_config, teacher_dir)
        results["teacher"] = dict(model=dict(teacher_config.model), steps=teacher_config.total_steps,
                                  top1=teacher["eval/top1"])
        print(f"teacher: top-1 {100 * teacher['eval/top1']:.2f}%", flush=True)
        for method in METHODS:
            runs = []
            for seed in range(args.seeds):
                config = student_config(method, seed, args.student_steps, teacher_dir, dict(teacher_config.model))
                run_start = time.time()
                final = trainer.train_and_evaluate(config, os.path.join(workdir, f"{method}_{seed}"))
                runs.append(dict(seed=seed, top1=final["eval/top1"], seconds=time.time() - run_start,
                                 teacher_agreement=final.get("eval/teacher_agreement")))
                print(f"{method} seed {seed}: top-1 {100 * final['eval/top1']:.2f}%", flush=True)
            results["runs"][method] = runs
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def mean_std(values):
        return f"{100 * np.mean(values):.2f} ± {100 * np.std(values):.2f}"

    lines = [
        f"DeiT distillation on digits: teacher = the quickstart ViT (width 64, depth 4, "
        f"{results['teacher']['steps']} steps), test top-1 {100 * results['teacher']['top1']:.2f}%; student = "
        f"DeiT width 32, depth 2 (class + distillation tokens), {args.student_steps} steps of 128, "
        f"{args.seeds} seeds (mean ± std); 360 test images.",
        "",
        "| student training | top-1 % | agreement with the teacher % |",
        "|---|---|---|",
    ]
    labels = {"none": "no teacher (both heads on labels)", "hard": "hard distillation (alpha 0.5)",
              "soft": "soft distillation (tau 3, alpha 0.1)"}
    for method, runs in results["runs"].items():
        agreement = [run["teacher_agreement"] for run in runs if run["teacher_agreement"] is not None]
        lines.append(f"| {labels[method]} | {mean_std([run['top1'] for run in runs])} | "
                     f"{mean_std(agreement) if agreement else '—'} |")
    results["seconds"] = time.time() - started
    lines += ["", f"Total {results['seconds'] / 60:.1f} min."]
    table = "\n".join(lines)
    print(table)
    write_outputs(args.out_dir, "distill_digits", table, results)
    return results


if __name__ == "__main__":
    main()
