r"""DeiT distillation on the bundled digits: a small DeiT student with no teacher, hard and soft distillation;
a convnet (ResNet) teacher; SAM vs AdamW for the quickstart ViT without augmentation.

    python experiments/distill_digits.py                 # ~10 min on 2 CPU cores (part "vit")
    python experiments/distill_digits.py --seeds=1 --student_steps=200   # a quick look
    python experiments/distill_digits.py --parts=resnet,sam   # -> experiments/out/distill_digits_resnet_sam.*

1. Trains the teacher: the quickstart ViT (`configs/digits_vit.py`: width 64, depth 4, 800 steps).
2. Trains a smaller DeiT student (width 32, depth 2, class + distillation tokens) on the same input
   and schedule for --student_steps steps, three ways, each over --seeds seeds:
   - none: objective "supervised", both heads learn the labels (DeiT's no-teacher baseline);
   - hard: objective "distill", the distillation head learns the teacher's argmax (alpha 0.5);
   - soft: objective "distill", KL to the teacher at temperature 3 with alpha 0.1 (the paper's soft setting).
3. Reports the student's test top-1 (mean of its two heads) and its agreement with the teacher.
Part "resnet": a ResNet-18-shaped teacher (widths 16 / 32 / 64 / 128, BatchNorm) trained on the same input for
800 steps, then the same student with hard distillation from it, --seeds seeds.
Part "sam": the quickstart ViT without augmentation (no random shift, no label smoothing, no drop-path), 800
steps with AdamW and with SAM around the same AdamW (rho 0.05): on one batch per update as the paper (800
updates, twice AdamW's gradient evaluations) and on consecutive batches (the same evaluations as AdamW, so 400
updates). Chen et al. 2022 claim SAM helps ViTs most without strong augmentation.

Part "stored": TinyViT's distillation (soft-target cross-entropy against the teacher's top-k probabilities,
alpha 1: no labels) of a plain ViT student (width 32, depth 2, one head) by the quickstart ViT, with the teacher
online and from probabilities stored once by `vitjax.distill.save_logits` (k = 10 = every class, and k = 3),
against the same student on the labels; the student's train throughput with and without the teacher in the
step, and the time to store. `python experiments/distill_digits.py --parts=stored`.

Part "deitlt" (DeiT-LT, Rangwani et al. 2024): the digits' train split made long-tailed (`input.long_tail`,
imbalance 10: 142 ... 14 images per class, 580 in all; the test split stays balanced), a ResNet teacher
trained on it with SAM (`configs/deit_lt.py:stage=teacher,runlocal`, --lt_teacher_steps steps of 64), then the
small DeiT student with DeiT's strong augmentation (random shift, mixup 0.8 / cutmix 1.0, smoothing 0.1; the
teacher never saw mixed images) for --student_steps steps, four ways, --seeds seeds each: plain CE (both heads
on the labels), DeiT hard distillation, hard distillation with mixup and smoothing stopped for the last quarter
(the DRW phase) but no class weights, and DeiT-LT (the same plus the class-balanced weights, beta 0.9999, on the
distillation head in the last quarter). Reports the overall test top-1 and the mean per-class accuracy of the
head (many-shot: classes 0-2), mid (3-6) and tail (few-shot: 7-9) classes, the split DeiT-LT's code uses for
CIFAR-10-LT. `python experiments/distill_digits.py --parts=deitlt`.

Part "g2sd" (G2SD, Huang et al. 2023): the MAE teacher `configs/mae_b16.py:runlocal` (width 64, depth 2, 8x8
digits in 2x2 patches) trained --g2sd_teacher_steps steps; then a small MAE student (width 32, depth 2, decoder
16 x 1) pretrained --g2sd_pretrain_steps steps either by plain MAE (pixel loss) or by G2SD's generic distillation
of the teacher's decoder features (`configs/g2sd_vit.py:runlocal`), and both fine-tuned identically
(`configs/mae_finetune_b16.py:runlocal` on the student's encoder with experiments/mae_digits.py's fine-tuning lr:
blr 4e-3, no layer decay; --g2sd_finetune_steps steps), --seeds seeds.
`python experiments/distill_digits.py --parts=g2sd`.

Writes experiments/out/distill_digits.{md,json} (all parts) or distill_digits_<parts>.{md,json}.
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


RESNET_TEACHER = dict(num_classes=10, img_size=16, in_chans=1, widths=(16, 32, 64, 128), depths=(2, 2, 2, 2))
PARTS = ("vit", "resnet", "sam", "stored", "deitlt", "g2sd")
G2SD_METHODS = ("mae", "g2sd")
LT_IMBALANCE = 10
LT_GROUPS = {"head": (0, 3), "mid": (3, 7), "tail": (7, 10)}  # DeiT-LT's CIFAR-10 categories [3, 7]
LT_METHODS = {  # label: (distill?, class weights?, mixup stops at the DRW step?)
    "lt_ce": (False, False, False),
    "lt_hard": (True, False, False),
    "lt_hard_drw_nomix": (True, False, True),
    "lt_deitlt": (True, True, True),
}
PLAIN_STUDENT = dict(STUDENT, distilled=False)
STORED_METHODS = {  # label: (objective_kwargs or None for labels only, stored?)
    "labels": (None, False),
    "online_k10": (dict(distillation_type="soft_target", alpha=1.0, topk=10), False),
    "stored_k10": (dict(distillation_type="soft_target", alpha=1.0, topk=10), True),
    "stored_k3": (dict(distillation_type="soft_target", alpha=1.0, topk=3), True),
}


def resnet_teacher_config():
    """Returns the quickstart recipe with a small ResNet-18-shaped model in place of the ViT."""
    config = quickstart_config()
    config.model_name = "resnet18"
    config.model = dict(RESNET_TEACHER)
    return config


def no_augmentation_config(optimizer: str, seed: int):
    """Returns the quickstart ViT config without augmentation, with AdamW, or SAM around AdamW on one batch per
    update ("sam", the paper) or on consecutive batches ("sam_alternating")."""
    config = quickstart_config()
    config.seed = seed
    config.input.pp_train = "decode(channels=1)|resize(16)|value_range(-1, 1)"
    del config.input["label_smoothing"]
    config.model = dict(config.model, drop_path_rate=0.0)
    if optimizer in ("sam", "sam_alternating"):
        config.optim.name = "sam"
        config.optim.sam_same_batch = optimizer == "sam"
        config.optim.sam_base = "adamw"
        config.optim.sam_rho = 0.05
    return config


def stored_student_config(method: str, seed: int, steps: int, teacher_dir: str, teacher_model: Dict[str, Any],
                          logits_dir: str):
    """Returns the plain ViT student's config for one of STORED_METHODS (TinyViT's loss, or the labels)."""
    config = student_config("none", seed, steps, teacher_dir, teacher_model)
    config.model = dict(PLAIN_STUDENT)
    kwargs, from_store = STORED_METHODS[method]
    if kwargs is not None:
        config.objective = "distill"
        config.objective_kwargs = dict(kwargs, teacher="vit", teacher_model=teacher_model, teacher_init=teacher_dir,
                                       teacher_logits=logits_dir if from_store else None)
    return config


def lt_teacher_config(steps: int):
    """Returns configs/deit_lt.py's SAM ResNet teacher on the long-tailed digits, `steps` steps of 64."""
    config = config_utils.load_config("configs/deit_lt.py:stage=teacher,runlocal,imbalance=%d" % LT_IMBALANCE, dict(
        progress_bar=False, total_steps=steps, checkpoint_async=False))
    return config


def lt_student_config(method: str, seed: int, steps: int, teacher_dir: str):
    """Returns configs/deit_lt.py's runlocal student (batch 128, `steps` steps, DRW for the last quarter) as `method`."""
    distilled, weighted, stop_mixup = LT_METHODS[method]
    config = config_utils.load_config(
        f"configs/deit_lt.py:runlocal,imbalance={LT_IMBALANCE},teacher_init={teacher_dir}",
        dict(progress_bar=False, checkpoint_async=False, batch_size=128, total_steps=steps, seed=seed))
    config.optim.warmup_steps = max(1, steps // 16)
    drw_step = steps * 3 // 4
    config.input.mixup.stop_step = drw_step if stop_mixup else None
    if not distilled:
        config.objective, config.objective_kwargs = "supervised", {}
        return config
    config.objective_kwargs.drw_step = drw_step if weighted else 0
    if not weighted:
        config.objective_kwargs.class_balance_beta = None
    return config


def g2sd_student_encoder() -> Dict[str, Any]:
    """Returns configs/g2sd_vit.py:runlocal's student encoder (the MAE teacher's, width 32)."""
    return dict(config_utils.load_config("configs/g2sd_vit.py:runlocal").model)


def g2sd_pretrain_config(method: str, seed: int, steps: int, teacher_dir: str):
    """Returns the student's pretraining config: plain MAE, or G2SD's generic distillation from the MAE teacher."""
    overrides = dict(progress_bar=False, checkpoint_async=False, total_steps=steps, seed=seed)
    if method == "g2sd":
        return config_utils.load_config(f"configs/g2sd_vit.py:runlocal,teacher_init={teacher_dir}", overrides)
    config = config_utils.load_config("configs/mae_b16.py:runlocal", overrides)
    generic = config_utils.load_config("configs/g2sd_vit.py:runlocal")
    config.model = g2sd_student_encoder()  # the same student, its decoder as G2SD's
    config.objective_kwargs.update({key: generic.objective_kwargs[key] for key in
                                    ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")})
    config.optim.blr = generic.optim.blr
    return config


def g2sd_finetune_config(seed: int, steps: int, pretrained_dir: str):
    """Returns configs/mae_finetune_b16.py:runlocal on the student's encoder, initialised from `pretrained_dir`."""
    config = config_utils.load_config(f"configs/mae_finetune_b16.py:runlocal,init_from={pretrained_dir}", dict(
        progress_bar=False, checkpoint_async=False, total_steps=steps, seed=seed))
    config.model = dict(config.model, **g2sd_student_encoder())
    # experiments/mae_digits.py's fine-tuning recipe: at 8x8 the runlocal one (blr 2e-3, layer decay 0.65, 100
    # steps) leaves a width-32 encoder near 20% after 200 steps, too low to compare pretrainings.
    config.optim.update(blr=4e-3, layer_decay=None, warmup_steps=steps // 10, min_lr=1e-6)
    return config


def per_class_top1(config, run_dir: str) -> np.ndarray:
    """Returns the (classes,) test accuracy per class of the run's final checkpoint (a DeiT: its heads' mean)."""
    import jax  # pylint: disable=g-import-not-at-top
    from vitjax import checkpoint, data, objectives  # pylint: disable=g-import-not-at-top
    from vitjax.objectives import distill  # pylint: disable=g-import-not-at-top
    objective = objectives.create(config.objective, config)
    saved = checkpoint.load_params(run_dir)
    variables = {"params": saved["params"],
                 **{name: value for name, value in (saved["model_state"] or {}).items() if name != distill.TEACHER}}
    logits_of = jax.jit(objective.eval_logits)
    correct, seen = np.zeros(objective.num_classes), np.zeros(objective.num_classes)
    for batch in data.make_eval_iterator(config.input, global_batch_size=config.eval_batch_size):
        predicted = np.argmax(np.asarray(logits_of(variables, batch["image"])), -1)
        labels, mask = np.asarray(batch["label"]), np.asarray(batch["mask"])
        np.add.at(seen, labels[mask], 1)
        np.add.at(correct, labels[mask], (predicted == labels)[mask])
    return correct / seen


def lt_summary(per_class: np.ndarray) -> Dict[str, float]:
    """Returns {head, mid, tail}: the mean per-class accuracy of each group of classes."""
    return {group: float(per_class[start:stop].mean()) for group, (start, stop) in LT_GROUPS.items()}


def _images_per_sec(run_dir: str) -> float:
    """Returns the mean train images/s a run logged (compilation excluded: the first logged interval dropped)."""
    import json  # pylint: disable=g-import-not-at-top
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rates = [record["images_per_sec"] for record in map(json.loads, f) if "images_per_sec" in record]
    return float(np.mean(rates[1:] if len(rates) > 1 else rates))


def train_runs(make_config, seeds: int, workdir: str, label: str) -> list:
    """Returns [{seed, top1, seconds, teacher_agreement, images_per_sec}] of make_config(seed) over `seeds` seeds."""
    runs = []
    for seed in range(seeds):
        run_start = time.time()
        run_dir = os.path.join(workdir, f"{label}_{seed}")
        final = trainer.train_and_evaluate(make_config(seed), run_dir)
        runs.append(dict(seed=seed, top1=final["eval/top1"], seconds=time.time() - run_start,
                         teacher_agreement=final.get("eval/teacher_agreement"),
                         images_per_sec=_images_per_sec(run_dir)))
        print(f"{label} seed {seed}: top-1 {100 * final['eval/top1']:.2f}%", flush=True)
    return runs


def main(argv=None) -> Dict[str, Any]:
    """Trains the teacher and every student; returns the raw results (also written to --out_dir)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--student_steps", type=int, default=400, help="student training steps of 128 images")
    parser.add_argument("--out_dir", default=OUT_DIR)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--lt_teacher_steps", type=int, default=400, help="part deitlt: teacher steps of 64")
    parser.add_argument("--g2sd_teacher_steps", type=int, default=800, help="part g2sd: MAE teacher steps of 64")
    parser.add_argument("--g2sd_pretrain_steps", type=int, default=400, help="part g2sd: student pretraining steps")
    parser.add_argument("--g2sd_finetune_steps", type=int, default=400, help="part g2sd: fine-tuning steps of 64")
    args = parser.parse_args(argv)
    parts = tuple(part for part in args.parts.split(",") if part)
    if not parts or set(parts) - set(PARTS):
        raise SystemExit(f"--parts must be a comma-separated subset of {PARTS}, got {args.parts!r}")
    started = time.time()
    workdir = tempfile.mkdtemp(prefix="distill_digits_")
    results: Dict[str, Any] = dict(student=STUDENT, student_steps=args.student_steps, parts=list(parts), runs={})
    try:
        teacher_config = quickstart_config()
        teacher_dir = os.path.join(workdir, "teacher")
        if "vit" in parts or "stored" in parts:
            teacher = trainer.train_and_evaluate(teacher_config, teacher_dir)
            results["teacher"] = dict(model=dict(teacher_config.model), steps=teacher_config.total_steps,
                                      top1=teacher["eval/top1"])
            print(f"teacher: top-1 {100 * teacher['eval/top1']:.2f}%", flush=True)
        if "vit" in parts:
            for method in METHODS:
                results["runs"][method] = train_runs(
                    lambda seed: student_config(method, seed, args.student_steps, teacher_dir,
                                                dict(teacher_config.model)), args.seeds, workdir, method)
        if "resnet" in parts:
            resnet_config = resnet_teacher_config()
            resnet_dir = os.path.join(workdir, "resnet_teacher")
            resnet = trainer.train_and_evaluate(resnet_config, resnet_dir)
            results["resnet_teacher"] = dict(model=dict(resnet_config.model), steps=resnet_config.total_steps,
                                             top1=resnet["eval/top1"])
            print(f"resnet teacher: top-1 {100 * resnet['eval/top1']:.2f}%", flush=True)

            def resnet_student(seed):
                config = student_config("hard", seed, args.student_steps, resnet_dir, dict(RESNET_TEACHER))
                config.objective_kwargs.teacher = "resnet18"
                return config
            results["runs"]["hard_resnet"] = train_runs(resnet_student, args.seeds, workdir, "hard_resnet")
        if "stored" in parts:
            from vitjax.distill import save_logits  # pylint: disable=g-import-not-at-top
            teacher_model = dict(teacher_config.model)
            results["store"] = {}
            for method, (kwargs, from_store) in STORED_METHODS.items():
                logits_dir = os.path.join(workdir, f"logits_{method}")
                runs = []
                for seed in range(args.seeds):
                    def make(seed_, method=method, logits_dir=logits_dir):
                        return stored_student_config(method, seed_, args.student_steps, teacher_dir, teacher_model,
                                                     f"{logits_dir}_{seed_}")
                    if from_store:  # the store belongs to one recipe: one per seed
                        summary = save_logits.save_logits(make(seed), show_progress=False)
                        results["store"].setdefault(method, []).append(dict(
                            seconds=summary["seconds"], images_per_sec=summary["images_per_sec"],
                            megabytes=sum(os.path.getsize(os.path.join(root, name)) for root, _, names in
                                          os.walk(f"{logits_dir}_{seed}") for name in names) / 2**20))
                    runs += train_runs(lambda _s, seed=seed: make(seed), 1, workdir, f"{method}_{seed}")
                    runs[-1]["seed"] = seed
                results["runs"][method] = runs
        if "deitlt" in parts:
            lt_teacher = lt_teacher_config(args.lt_teacher_steps)
            lt_teacher_dir = os.path.join(workdir, "lt_teacher")
            final = trainer.train_and_evaluate(lt_teacher, lt_teacher_dir)
            teacher_classes = per_class_top1(lt_teacher, lt_teacher_dir)
            results["lt_teacher"] = dict(model=dict(lt_teacher.model), steps=lt_teacher.total_steps,
                                         top1=final["eval/top1"], per_class=teacher_classes.tolist(),
                                         **lt_summary(teacher_classes))
            print(f"long-tail SAM ResNet teacher: top-1 {100 * final['eval/top1']:.2f}%, "
                  f"{lt_summary(teacher_classes)}", flush=True)
            for method in LT_METHODS:
                runs = []
                for seed in range(args.seeds):
                    config = lt_student_config(method, seed, args.student_steps, lt_teacher_dir)
                    runs += train_runs(lambda _s, config=config: config, 1, workdir, f"{method}_{seed}")
                    per_class = per_class_top1(config, os.path.join(workdir, f"{method}_{seed}_0"))
                    runs[-1].update(seed=seed, per_class=per_class.tolist(), **lt_summary(per_class))
                    print(f"{method} seed {seed}: {lt_summary(per_class)}", flush=True)
                results["runs"][method] = runs
        if "g2sd" in parts:
            mae_teacher = config_utils.load_config("configs/mae_b16.py:runlocal", dict(
                progress_bar=False, checkpoint_async=False, total_steps=args.g2sd_teacher_steps))
            mae_teacher_dir = os.path.join(workdir, "mae_teacher")
            final = trainer.train_and_evaluate(mae_teacher, mae_teacher_dir)
            results["mae_teacher"] = dict(model=dict(mae_teacher.model), steps=mae_teacher.total_steps,
                                          loss=final.get("train/loss"))
            for method in G2SD_METHODS:
                runs = []
                for seed in range(args.seeds):
                    pretrain_dir = os.path.join(workdir, f"pretrain_{method}_{seed}")
                    start = time.time()
                    pretrained = trainer.train_and_evaluate(
                        g2sd_pretrain_config(method, seed, args.g2sd_pretrain_steps, mae_teacher_dir), pretrain_dir)
                    pretrain_seconds = time.time() - start
                    runs += train_runs(lambda _s, seed=seed, pretrain_dir=pretrain_dir: g2sd_finetune_config(
                        seed, args.g2sd_finetune_steps, pretrain_dir), 1, workdir, f"finetune_{method}_{seed}")
                    runs[-1].update(seed=seed, pretrain_seconds=pretrain_seconds,
                                    pretrain_loss=pretrained.get("train/loss"))
                results["runs"][f"g2sd_{method}"] = runs
        if "sam" in parts:
            for optimizer in ("adamw", "sam", "sam_alternating"):
                results["runs"][f"noaug_{optimizer}"] = train_runs(
                    lambda seed: no_augmentation_config(optimizer, seed), args.seeds, workdir, f"noaug_{optimizer}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def mean_std(values):
        return f"{100 * np.mean(values):.2f} ± {100 * np.std(values):.2f}"

    header = [f"Digits, {args.seeds} seeds (mean ± std), 360 test images."]
    if set(parts) & {"vit", "resnet", "stored"}:
        header.append(f"Students trained {args.student_steps} steps of 128. Parts vit and resnet: a DeiT student of "
                      "width 32, depth 2 (class + distillation tokens); part stored: a plain ViT of the same size "
                      "(one head).")
    if "mae_teacher" in results:
        header.append(f"Part g2sd: 8x8 digits; MAE teacher = configs/mae_b16.py:runlocal ({results['mae_teacher']['steps']} "
                      f"steps of 64); students pretrained {args.g2sd_pretrain_steps} steps of 64, fine-tuned "
                      f"{args.g2sd_finetune_steps} steps of 64 (configs/mae_finetune_b16.py:runlocal, blr 4e-3, no layer decay).")
    if "teacher" in results:
        header.append(f"ViT teacher = the quickstart ViT (width 64, depth 4, {results['teacher']['steps']} steps), "
                      f"test top-1 {100 * results['teacher']['top1']:.2f}%.")
    if "resnet_teacher" in results:
        header.append(f"ResNet teacher = resnet18 with widths 16-128 ({results['resnet_teacher']['steps']} steps), "
                      f"test top-1 {100 * results['resnet_teacher']['top1']:.2f}%.")
    lines = []
    if set(results["runs"]) - set(LT_METHODS):
        lines = [" ".join(header), "", "| run | top-1 % | agreement with the teacher % | student train images/s |",
                 "|---|---|---|---:|"]
    labels = {"none": "student, no teacher (both heads on labels)",
              "hard": "student, hard distillation from the ViT (alpha 0.5)",
              "soft": "student, soft distillation from the ViT (tau 3, alpha 0.1)",
              "hard_resnet": "student, hard distillation from the ResNet (alpha 0.5)",
              "noaug_adamw": "quickstart ViT without augmentation, AdamW, 800 steps",
              "noaug_sam": "quickstart ViT without augmentation, SAM(AdamW, rho 0.05) on one batch per update, "
                           "800 updates (1,600 gradients)",
              "noaug_sam_alternating": "quickstart ViT without augmentation, SAM(AdamW, rho 0.05) on consecutive "
                                       "batches, 800 steps = 400 updates",
              "labels": "plain ViT student (width 32, depth 2), labels only",
              "online_k10": "plain ViT student, TinyViT loss, teacher online (top-10 = all 10 classes)",
              "stored_k10": "plain ViT student, TinyViT loss, stored top-10 (fp16)",
              "stored_k3": "plain ViT student, TinyViT loss, stored top-3 (fp16)",
              "g2sd_mae": "small MAE student (width 32, depth 2) pretrained by plain MAE, then fine-tuned",
              "g2sd_g2sd": "the same student pretrained by G2SD generic distillation from the MAE teacher (width 64), "
                           "then fine-tuned identically",
              "lt_ce": "long-tailed digits: DeiT student, plain CE (both heads on the labels)",
              "lt_hard": "long-tailed digits: DeiT hard distillation from the SAM ResNet (alpha 0.5)",
              "lt_hard_drw_nomix": "long-tailed digits: hard distillation, mixup off in the last quarter, no weights",
              "lt_deitlt": "long-tailed digits: DeiT-LT (hard distillation, class-balanced weights beta 0.9999 "
                           "and mixup off in the last quarter)"}
    lt_runs = {method: runs for method, runs in results["runs"].items() if method in LT_METHODS}
    for method, runs in results["runs"].items():
        if method in LT_METHODS:
            continue
        agreement = [run["teacher_agreement"] for run in runs if run["teacher_agreement"] is not None]
        lines.append(f"| {labels[method]} | {mean_std([run['top1'] for run in runs])} | "
                     f"{mean_std(agreement) if agreement else '—'} | "
                     f"{np.mean([run['images_per_sec'] for run in runs]):.0f} |")
    if "stored" in parts:
        online = np.mean([run["images_per_sec"] for run in results["runs"]["online_k10"]])
        from_store = np.mean([run["images_per_sec"] for run in results["runs"]["stored_k10"]])
        saves = results["store"]["stored_k10"]
        lines += ["", f"Student throughput from the store / with the teacher online: {from_store / online:.2f}x. "
                  f"Storing {args.student_steps} batches of 128 (top-10, fp16): "
                  f"{np.mean([save['seconds'] for save in saves]):.1f} s, "
                  f"{np.mean([save['megabytes'] for save in saves]):.2f} MB."]
    if lt_runs:
        teacher = results["lt_teacher"]
        lines += ["" if lines else f"Digits, {args.seeds} seeds (mean ± std)."] + [f"Long-tailed digits (imbalance {LT_IMBALANCE}: 142 ... 14 train images per class, 580 in all; "
                  "balanced test split, 35 to 37 images per class). Accuracy % per group of classes = mean per-class "
                  f"accuracy: head = classes 0-2 (142-86 images), mid = 3-6 (66-30), tail = 7-9 (23-14). Teacher: "
                  f"resnet18 widths 16-128 trained with SAM(AdamW, rho 0.05) on the long-tailed split for "
                  f"{teacher['steps']} steps of 64: top-1 {100 * teacher['top1']:.2f}%, head "
                  f"{100 * teacher['head']:.1f}, mid {100 * teacher['mid']:.1f}, tail {100 * teacher['tail']:.1f}. "
                  f"Students: {args.student_steps} steps of 128, DRW phase = the last quarter.", "",
                  "| student | top-1 % | head % | mid % | tail % | agreement with the teacher % |",
                  "|---|---|---|---|---|---|"]
        for method, runs in lt_runs.items():
            agreement = [run["teacher_agreement"] for run in runs if run["teacher_agreement"] is not None]
            lines.append(f"| {labels[method]} | {mean_std([run['top1'] for run in runs])} | "
                         + " | ".join(mean_std([run[group] for run in runs]) for group in LT_GROUPS)
                         + f" | {mean_std(agreement) if agreement else '—'} |")
    results["seconds"] = time.time() - started
    lines += ["", f"Total {results['seconds'] / 60:.1f} min."]
    table = "\n".join(lines)
    print(table)
    name = "distill_digits" if set(parts) == set(PARTS) else "distill_digits_" + "_".join(parts)
    write_outputs(args.out_dir, name, table, results)
    return results


if __name__ == "__main__":
    main()
