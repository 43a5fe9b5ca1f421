r"""MAE on the bundled digits: does masked-autoencoder pretraining help when labels are few?

    python experiments/mae_digits.py                 # 3 seeds, under 20 minutes on 2 CPU cores
    python experiments/mae_digits.py --seeds=1 --scale=0.2   # a quick look

For each seed:
  1. pretrain a small ViT with the `mae` objective on all 1,437 train images, labels unused;
  2. fine-tune it (`mae_finetune`, init_from = that MAE run) on 10% of the train labels (144 images),
     against the same classifier trained from scratch on those labels with the same budget
     (same steps, optimizer, augmentation; `mae_finetune` without init_from);
  3. linear probes (`mae_linprobe`: frozen encoder -> BatchNorm without affine -> linear head, LARS)
     on the MAE encoder against the same probe on a frozen random encoder (MAE's initialisation),
     trained on all train labels (the probe measures the features, as in the paper).
Top-1 on the 360 test images, mean and std over the seeds: a markdown table printed and written to
experiments/out/mae_digits.md, beside the raw figures in experiments/out/mae_digits.json.

Every run goes through the package's own pieces (objectives, optimizer, the trainer's train and eval
steps, the data pipeline, checkpoints); the steps of one kind are compiled once and reused for
every seed and arm, which keeps the whole study within the CPU budget.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, Optional, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiment_io import write_outputs  # noqa: E402

import jax  # noqa: E402

from vitjax import checkpoint as checkpoint_lib  # noqa: E402
from vitjax import config_utils, parallel  # noqa: E402
from vitjax import objectives as objectives_lib  # noqa: E402
from vitjax import train as trainer  # noqa: E402
from vitjax.evaluate import evaluators  # noqa: E402

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")

# The encoder every arm shares: 8x8 gray digits in 2x2 patches (16 tokens + cls), width 64, depth 4.
ENCODER = dict(variant="mu/2", img_size=8, in_chans=1, embed_dim=64, depth=4, num_heads=4, mlp_dim=128)
SHIFT = "decode(channels=1)|random_crop(8, padding=1)|value_range(-1, 1)"
PLAIN = "decode(channels=1)|value_range(-1, 1)"
LABEL_FRACTION = 0.1


def pretrain_config(steps: int):
    """Returns the MAE pretraining config (all train images, labels unused)."""
    config = config_utils.default_config()
    config.model = dict(ENCODER)
    config.objective = "mae"
    config.objective_kwargs = dict(mask_ratio=0.75, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
                                   norm_pix_loss=False)
    config.input = dict(dataset="digits", train_split="train", eval_split="test", pp_train=SHIFT, pp_eval=PLAIN)
    config.batch_size = 128
    config.total_steps = steps
    config.optim.update(name="adamw", blr=3e-3, b1=0.9, b2=0.95, weight_decay=0.05, warmup_steps=steps // 20,
                        no_decay=())
    return config_utils.validate_config(config)


def finetune_config(steps: int, init_from: Optional[str] = None):
    """Returns the fine-tuning config on 10% of the train labels (init_from None: from scratch)."""
    config = config_utils.default_config()
    config.model = dict(ENCODER, num_classes=10, global_pool="avg", fc_norm=True, drop_path_rate=0.1)
    config.objective = "mae_finetune"
    config.objective_kwargs = dict(head_init_std=2e-5)
    config.init_from = init_from
    config.input = dict(dataset="digits", train_split="train", eval_split="test", pp_train=SHIFT, pp_eval=PLAIN,
                        train_fraction=LABEL_FRACTION, label_smoothing=0.1)
    config.batch_size = 64
    config.total_steps = steps
    # One recipe for both arms (no layer-wise lr decay, which would slow a from-scratch model's lower layers).
    config.optim.update(name="adamw", blr=4e-3, b1=0.9, b2=0.999, weight_decay=0.05, warmup_steps=steps // 10,
                        min_lr=1e-6)
    return config_utils.validate_config(config)


def probe_config(steps: int, init_from: Optional[str] = None):
    """Returns the linear-probe config (frozen encoder, all train labels; init_from None: random encoder)."""
    config = config_utils.default_config()
    config.model = dict(ENCODER, num_classes=10, global_pool="token")   # the cls token, as MAE's probe
    config.objective = "mae_linprobe"
    config.objective_kwargs = dict(head_init_std=0.01)
    config.init_from = init_from
    config.input = dict(dataset="digits", train_split="train", eval_split="test", pp_train=SHIFT, pp_eval=PLAIN)
    config.batch_size = 128
    config.total_steps = steps
    # LARS moves each weight by about lr x trust coefficient of its norm per step: the paper's peak lr
    # (0.1 x 16384 / 256 = 6.4) keeps that relative step at batch 128, where blr scaling would not.
    config.optim.update(name="lars", lr=6.4, momentum=0.9, weight_decay=0.0, warmup_steps=steps // 10,
                        frozen=("^encoder/",))
    return config_utils.validate_config(config)


class Arm:
    """One kind of run (pretrain, fine-tune or probe): the trainer's setup and steps, built and compiled once."""

    def __init__(self, config):
        import vitjax.data as data
        self.config = config
        self.data = data
        self.objective = objectives_lib.create(config.objective, config)
        info = data.dataset_info(config.input)
        self.steps = int(config.total_steps)
        self.keys = tuple(self.objective.batch_keys)
        self.mesh = parallel.create_mesh(dict(data=1, fsdp=1, model=1), devices=jax.devices()[:1])
        first = next(data.make_train_iterator(config.input, global_batch_size=config.batch_size, seed=0))
        self.setup = trainer.create_train_setup(
            config, self.objective, self.mesh, {key: first[key] for key in self.keys}, total_steps=self.steps,
            steps_per_epoch=info["num_train_examples"] / config.batch_size)
        with self._context():
            self.train_step = trainer.jit_train_step(self.setup, data.make_batch_transform(config.input,
                                                                                           info["num_classes"]))
            self.evaluator = evaluators.build_evaluators(config, evaluators.EvalContext(
                objective=self.objective, input_config=config.input, mesh=self.mesh,
                state_shardings=self.setup.state_shardings, batch_sharding=self.setup.batch_sharding,
                eval_batch_size=120, default_every_steps=0, data=data))[0]

    def _context(self):
        import contextlib

        import flax.linen as nn
        stack = contextlib.ExitStack()
        stack.enter_context(parallel.use_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.setup.rules))
        return stack

    def run(self, seed: int, init_from: Optional[str] = None, workdir: Optional[str] = None,
            init_from_skip: Tuple[str, ...] = (), frozen_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Returns {"eval": metrics, "seconds", "losses"}; loads `init_from` first, saves to `workdir` at the end.

        `init_from_skip`: regexes of params `init_from` leaves at their initialisation; `frozen_kwargs`: objective
        kwargs naming this run's frozen weights (a teacher: dict(teacher_init=WORKDIR)), loaded as the trainer does.
        """
        start = time.time()
        plan = frozen = None
        config = self.config.copy_and_resolve_references()
        if init_from is not None:
            config.init_from = init_from
            config.init_from_skip = tuple(init_from_skip)
            # The rules (skip) are the objective's config's: an objective of this run's config.
            objective = objectives_lib.create(config.objective, config) if init_from_skip else self.objective
            plan = trainer.plan_init_from(config, objective, self.setup.abstract_variables)
        if frozen_kwargs:
            config.objective_kwargs = dict(config.objective_kwargs, **frozen_kwargs)
            frozen = trainer.load_frozen_weights(objectives_lib.create(config.objective, config),
                                                 self.setup.abstract_variables)
        with self._context():
            state = trainer.initial_state(self.setup, jax.random.key(seed), plan, frozen)
            batches = self.data.make_train_iterator(self.config.input, global_batch_size=self.config.batch_size,
                                                    seed=seed)
            losses = []
            for _ in range(self.steps):
                batch = next(batches)
                state, metrics = self.train_step(state, parallel.global_batch(
                    {key: batch[key] for key in self.keys}, self.mesh))
                losses.append(metrics["train/loss"])
            losses = [float(x) for x in jax.device_get(losses)]
            if not np.all(np.isfinite(losses)):
                raise FloatingPointError(f"non-finite loss in {self.config.objective} seed {seed}")
            metrics = {f"eval/{key}": value for key, value in self.evaluator.evaluate(state).items()}
        if workdir is not None:
            checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1,
                                                       async_save=False)
            checkpointer.save(self.steps, state, {"seed": seed})
            checkpointer.close()
        return {"eval": metrics, "seconds": time.time() - start, "first_loss": float(np.mean(losses[:20])),
                "last_loss": float(np.mean(losses[-20:]))}


def summarize(values):
    """Returns (mean, std) of a list (std with ddof=0 for one value)."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1) if len(values) > 1 else 0.0)


def main(argv=None) -> Dict[str, Any]:
    """Runs the study and returns the raw results (also written to experiments/out/)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every run's number of steps")
    parser.add_argument("--pretrain_steps", type=int, default=1000)
    parser.add_argument("--finetune_steps", type=int, default=400)
    parser.add_argument("--probe_steps", type=int, default=600)
    parser.add_argument("--out_dir", default=OUT_DIR)
    args = parser.parse_args(argv)
    scaled = lambda steps: max(20, int(round(steps * args.scale)))  # noqa: E731
    started = time.time()
    pretrain = Arm(pretrain_config(scaled(args.pretrain_steps)))
    finetune = Arm(finetune_config(scaled(args.finetune_steps)))
    probe = Arm(probe_config(scaled(args.probe_steps)))
    workroot = tempfile.mkdtemp(prefix="mae_digits_")
    results: Dict[str, Any] = {"runs": [], "settings": {
        "encoder": ENCODER, "label_fraction": LABEL_FRACTION,
        "pretrain": pretrain.config.to_dict(), "finetune": finetune.config.to_dict(), "probe": probe.config.to_dict()}}
    try:
        for seed in range(args.seeds):
            workdir = os.path.join(workroot, f"mae_seed{seed}")
            runs = {"pretrain": pretrain.run(seed, workdir=workdir)}
            runs["finetune_mae"] = finetune.run(seed, init_from=workdir)
            runs["finetune_scratch"] = finetune.run(seed)
            runs["probe_mae"] = probe.run(seed, init_from=workdir)
            runs["probe_random"] = probe.run(seed)
            results["runs"].append({"seed": seed, **runs})
            print(f"seed {seed}: " + ", ".join(
                f"{name} {run['eval'].get('eval/top1', run['eval'].get('eval/loss')):.4f} ({run['seconds']:.0f} s)"
                for name, run in runs.items()), flush=True)
    finally:
        shutil.rmtree(workroot, ignore_errors=True)

    rows = []
    for label, mae_key, base_key, base_label in (
            (f"fine-tune, {int(LABEL_FRACTION * 100)}% labels", "finetune_mae", "finetune_scratch", "from scratch"),
            ("linear probe, frozen encoder", "probe_mae", "probe_random", "random encoder")):
        mae = summarize([100 * r[mae_key]["eval"]["eval/top1"] for r in results["runs"]])
        base = summarize([100 * r[base_key]["eval"]["eval/top1"] for r in results["runs"]])
        rows.append((label, mae, base, base_label))
        results[mae_key], results[base_key] = mae, base
    pre = summarize([r["pretrain"]["eval"]["eval/loss"] for r in results["runs"]])
    results["pretrain_eval_loss"] = pre
    results["seconds"] = time.time() - started
    lines = [
        f"MAE on digits (ViT width {ENCODER['embed_dim']}, depth {ENCODER['depth']}, 2x2 patches on 8x8), "
        f"top-1 % on the 360 test images, mean ± std over {args.seeds} seed(s)",
        "",
        "| protocol | MAE-pretrained | baseline | baseline is |",
        "|---|---|---|---|",
    ]
    for label, mae, base, base_label in rows:
        lines.append(f"| {label} | {mae[0]:.2f} ± {mae[1]:.2f} | {base[0]:.2f} ± {base[1]:.2f} | {base_label} |")
    lines += ["", f"MAE pretraining: {pretrain.steps} steps of 128 images (mask 0.75), test reconstruction loss "
              f"{pre[0]:.4f} ± {pre[1]:.4f}; fine-tuning: {finetune.steps} steps of 64 on "
              f"{int(LABEL_FRACTION * 100)}% of the labels; probes: {probe.steps} steps of 128 (LARS) on all labels. "
              f"Total {results['seconds'] / 60:.1f} min."]
    table = "\n".join(lines)
    print(table)
    write_outputs(args.out_dir, "mae_digits", table, results)
    return results


if __name__ == "__main__":
    main()
