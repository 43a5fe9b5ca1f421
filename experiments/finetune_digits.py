r"""Fine-tuning from pretrained weights on the bundled digits, through `python -m vitjax.main` and `config.init_from`.

    python experiments/finetune_digits.py                   # about 25 minutes on 2 CPU cores
    python experiments/finetune_digits.py --quickstart_workdir=/tmp/vitjax_digits   # reuse a quickstart run

Part A, an earlier vitjax run as init_from:
  1. the quickstart (`configs/digits_vit.py`, 800 steps), or the workdir given;
  2. 20 steps of the same recipe from its workdir (`--config.init_from=<workdir>`), evaluated after
     every step, against the same 20 steps from scratch.
Part B, a timm checkpoint through `configs/finetune.py`:
  1. a timm `vit_tiny_patch16_224` (PyTorch, 32 px, 5 classes) trained on the train images of the
     digits 0-4 only, saved as a `.pth`: a stand-in for downloaded weights (this machine is offline);
  2. `configs/finetune.py:model=vit_tiny_patch16_224` fine-tunes it on all ten digits at 64 px
     (position embeddings resampled 5 -> 17 rows, the 5-class head re-initialised for 10 classes),
     against the same recipe from a randomly initialised timm checkpoint. The digits 0-4 are a poor
     stand-in for ImageNet: a ViT trained on five classes of 720 images collapses its features onto them,
     and starts the ten-class task behind a random initialisation (the table says by how much).
Writes experiments/out/finetune_digits.{md,json}: top-1 on the 360 test images and wall-clock minutes.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, Optional

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "experiments"))
# torch (and timm, which imports torchvision) before TensorFlow: the other order segfaults here.
import timm  # noqa: E402
import torch  # noqa: E402
from experiment_io import write_outputs  # noqa: E402

from vitjax import config_utils, models  # noqa: E402
from vitjax import train as trainer  # noqa: E402

OUT_DIR = os.path.join(REPO, "experiments", "out")
TIMM_MODEL = "vit_tiny_patch16_224"
QUIET = dict(progress_bar=False, checkpoint_async=False)


def read_metrics(workdir: str):
    """Returns the records of WORKDIR/metrics.jsonl."""
    import json
    with open(os.path.join(workdir, "metrics.jsonl")) as file:
        return [json.loads(line) for line in file]


def quickstart_arm(workdir: str, steps: int, init_from: Optional[str]) -> Dict[str, Any]:
    """Returns the eval top-1 after each of `steps` steps of the quickstart recipe (from `init_from` or scratch)."""
    overrides = dict(QUIET, total_steps=steps, eval_every_steps=1, log_every_steps=1, checkpoint_every_steps=0)
    overrides["optim.warmup_steps"] = 2
    if init_from:
        overrides["init_from"] = init_from
    start = time.time()
    trainer.train_and_evaluate(config_utils.load_config("configs/digits_vit.py", overrides), workdir)
    curve = [record["eval/top1"] for record in read_metrics(workdir) if "eval/top1" in record]
    return dict(top1_curve=curve, first=curve[0], last=curve[-1], seconds=time.time() - start)


def digits_subset(classes, size: int, mean, std):
    """Returns (NCHW float32 images at `size` px, RGB, normalised; labels) of the digits train split in `classes`."""
    from vitjax.data import digits
    images, labels = digits.load_arrays()
    train, _ = digits.split_indices()
    keep = train[np.isin(labels[train], classes)]
    x = torch.from_numpy(images[keep]).permute(0, 3, 1, 2).float().div(255.0).repeat(1, 3, 1, 1)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return x, torch.from_numpy(labels[keep])


def timm_checkpoint(path: str, steps: int, size: int, seed: int = 0) -> Dict[str, Any]:
    """Writes a timm ViT-Ti/16 (`size` px, 5 classes) to `path`: trained on digits 0-4 for `steps` (0: random init)."""
    torch.manual_seed(seed)
    model = timm.create_model(TIMM_MODEL, pretrained=False, img_size=size, num_classes=5)
    result: Dict[str, Any] = dict(steps=steps)
    if steps:
        cfg = models.pretrained_cfg(TIMM_MODEL)
        images, labels = digits_subset(range(5), size, cfg["mean"], cfg["std"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        generator = torch.Generator().manual_seed(seed)
        start = time.time()
        model.train()
        for _ in range(steps):
            index = torch.randint(0, len(labels), (64,), generator=generator)
            loss = torch.nn.functional.cross_entropy(model(images[index]), labels[index], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(images).argmax(-1) == labels).float().mean().item()
        result.update(train_top1_digits_0_to_4=accuracy, final_loss=loss.item(), seconds=time.time() - start)
    torch.save(model.state_dict(), path)
    return result


def finetune_arm(workdir: str, init_from: str, steps: int, size: int, layer_decay: float) -> Dict[str, Any]:
    """Returns top-1 and minutes of configs/finetune.py on the digits from `init_from`, and the init_from table."""
    config = config_utils.load_config(
        f"configs/finetune.py:model={TIMM_MODEL},steps={steps},image_size={size},layer_decay={layer_decay}",
        dict(QUIET, init_from=init_from))
    start = time.time()
    final = trainer.train_and_evaluate(config, workdir)
    objective = trainer.objectives_lib.create(config.objective, config_utils.validate_config(config))
    setup_batch = {"image": np.zeros((1, config.model.img_size, config.model.img_size, 3), np.float32)}
    import jax
    abstract = jax.eval_shape(lambda r: objective.init_variables(r, setup_batch), jax.random.key(0))
    plan = trainer.plan_init_from(config_utils.validate_config(config), objective, abstract)
    return dict(top1=final["eval/top1"], minutes=(time.time() - start) / 60, init_from_table=plan.table(),
                counts=plan.counts())


def main(argv=None) -> Dict[str, Any]:
    """Runs both parts; returns the raw results (also written to --out_dir)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quickstart_workdir", default="", help="reuse a finished quickstart run")
    parser.add_argument("--finetune_steps", type=int, default=20, help="part A: steps from the quickstart")
    parser.add_argument("--timm_steps", type=int, default=600, help="part B: torch steps on the digits 0-4")
    parser.add_argument("--digits_steps", type=int, default=300, help="part B: fine-tuning steps")
    parser.add_argument("--timm_size", type=int, default=32, help="part B: image size of the PyTorch training")
    parser.add_argument("--digits_size", type=int, default=64, help="part B: image size of the fine-tuning")
    parser.add_argument("--layer_decay", type=float, default=0.75, help="part B: configs/finetune.py's layer_decay")
    parser.add_argument("--skip_part_a", action="store_true")
    parser.add_argument("--out_dir", default=OUT_DIR)
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="finetune_digits_")
    results: Dict[str, Any] = dict(settings=vars(args))
    started = time.time()
    try:
        quickstart = args.quickstart_workdir or os.path.join(root, "quickstart")
        if args.skip_part_a:
            pass
        elif not args.quickstart_workdir:
            start = time.time()
            final = trainer.train_and_evaluate(config_utils.load_config("configs/digits_vit.py", QUIET), quickstart)
            results["quickstart"] = dict(top1=final["eval/top1"], minutes=(time.time() - start) / 60)
        else:
            results["quickstart"] = dict(top1=read_metrics(quickstart)[-1].get("eval/top1"), minutes=None)
        if not args.skip_part_a:
            results["from_quickstart"] = quickstart_arm(os.path.join(root, "a_init"), args.finetune_steps,
                                                        quickstart)
            results["from_scratch"] = quickstart_arm(os.path.join(root, "a_scratch"), args.finetune_steps, None)
            print(results, flush=True)

        pretrained, random = os.path.join(root, "digits04.pth"), os.path.join(root, "random.pth")
        results["timm_pretraining"] = timm_checkpoint(pretrained, args.timm_steps, args.timm_size)
        print(results["timm_pretraining"], flush=True)
        timm_checkpoint(random, 0, args.timm_size)
        arm = dict(steps=args.digits_steps, size=args.digits_size, layer_decay=args.layer_decay)
        results["timm_pretrained"] = finetune_arm(os.path.join(root, "b_pretrained"), pretrained, **arm)
        print(results["timm_pretrained"], flush=True)
        results["timm_random"] = finetune_arm(os.path.join(root, "b_random"), random, **arm)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["minutes"] = (time.time() - started) / 60

    pre = results["timm_pretraining"]
    lines = ["Fine-tuning from pretrained weights on the bundled digits (top-1 % on the 360 test images, "
             "2 CPU cores).", ""]
    if "from_quickstart" in results:
        a, b = results["from_quickstart"], results["from_scratch"]
        lines += [
            f"A. From the quickstart's workdir (its own top-1 {100 * results['quickstart']['top1']:.2f}%), "
            f"{args.finetune_steps} steps of its recipe, evaluated after every step:",
            "",
            "| init | top-1 after step 1 | lowest | after the last step | minutes |",
            "|---|---:|---:|---:|---:|",
            f"| `--config.init_from=<quickstart workdir>` | {100 * a['first']:.2f} | "
            f"{100 * min(a['top1_curve']):.2f} | "
            f"{100 * a['last']:.2f} | {a['seconds'] / 60:.1f} |",
            f"| from scratch | {100 * b['first']:.2f} | {100 * min(b['top1_curve']):.2f} | {100 * b['last']:.2f} | "
            f"{b['seconds'] / 60:.1f} |",
            ""]
    lines += [
        f"B. `configs/finetune.py:model={TIMM_MODEL},image_size={args.digits_size},layer_decay={args.layer_decay}` "
        f"({args.digits_steps} steps of 64) from a timm `.pth`; the pretrained one saw only the digits 0-4 "
        f"({args.timm_steps} PyTorch steps at {args.timm_size} px, {100 * pre['train_top1_digits_0_to_4']:.1f}% on "
        "them):",
        "",
        "| init_from | top-1 | minutes |",
        "|---|---:|---:|",
        f"| timm ViT-Ti/16 trained on digits 0-4 | {100 * results['timm_pretrained']['top1']:.2f} | "
        f"{results['timm_pretrained']['minutes']:.1f} |",
        f"| timm ViT-Ti/16, random init | {100 * results['timm_random']['top1']:.2f} | "
        f"{results['timm_random']['minutes']:.1f} |",
        "",
        "The init_from table of the pretrained arm, as the run logs it:",
        "",
        results["timm_pretrained"]["init_from_table"],
        "",
        f"Total {results['minutes']:.1f} min.",
    ]
    table = "\n".join(lines)
    print(table)
    write_outputs(args.out_dir, "finetune_digits", table, results)
    return results


if __name__ == "__main__":
    main()
