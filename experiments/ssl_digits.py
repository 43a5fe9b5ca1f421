r"""Self-supervised objectives on the bundled digits on equal footing: same ViT, data, steps and evaluation.

    python experiments/ssl_digits.py                          # GMML, SiT, MAE, MP3, SDFT; 3 seeds (time: last line)
    python experiments/ssl_digits.py --seeds=1 --scale=0.25   # a quick look
    python experiments/ssl_digits.py --objectives=spark       # one objective (and its step-0 floor)
    python experiments/ssl_digits.py --objectives=satmae      # SatMAE++ (RGB variant) on the same ViT
    python experiments/ssl_digits.py --replot=ssl_digits      # redraw out/ssl_digits.png from its json

For each seed, GMML, SiT, MAE, MP3 and self-distillation further pretraining (SDFT) pretrain the same small ViT
(8x8 gray digits in 2x2 patches, width 64, depth 4) on the 1,437 train images without labels, for the same
number of steps with the same optimizer. The floors are the random encoders: each row's own model at its
initialisation ("<row> at step 0", its run for no step), read as the row reads its own; a student shares its
teacher's (the same model and initialisation). One random ViT is not enough: the objectives initialise the ViT
differently (MAE's xavier and sin-cos position embeddings, MP3's none) and read different tokens, and both move
the random figures by many points. Objective by objective:
  gmml, sit, mae  as before (settings in OBJECTIVES below);
  mp3   the ViT without position embeddings (MP3 removes them), mask ratio 0.5 (of 16 patches, 8 answer as
        context; 0.75 would leave 4), features: its mean patch token; fine-tuning adds learned position
        embeddings back (`init_from_skip=("^pos_embed$",)`: they start from the classifier's initialisation);
  sdft  round 2 of Lee et al.'s two rounds, transposed to digits: round 1 is the MAE row's run of the same seed
        (MAE from a random initialisation: there is no pretrained model to start from here), so round 2 starts
        where round 1 started, from a random initialisation (its own draw of the seed), and trains MAE with the
        same steps plus the distance of its class token to the frozen round-1 (MAE) encoder's; it costs a round-1
        run more than the other rows and needs `mae` among the objectives.
SparK needs a convnet and more than one 32 px patch: it pretrains a small ConvNeXt (dims 16-64, one block per
stage) on the digits resized to 64 px (2 of 4 patches kept), with the same seeds, steps and optimizer, against
its own floor (that ConvNeXt at step 0; features: the last stage averaged); it runs only when asked
(`--objectives=...,spark`): on 2 CPU cores it costs several times a ViT row.
SatMAE++ (`--objectives=satmae`, also only when asked) trains the same ViT by its RGB variant (MAE plus one 2x
up-sampling block; the band-group variant needs spectral bands the digits do not have) on the digits loaded at
16 px: the MAE input is their 2x2 mean (close to, not equal to, the 8 px image), the L1 target the 16 px image;
its fine-tune is the ViT rows' (8 px, init_from takes the run's `backbone/encoder`).
Each encoder is then evaluated frozen, on its objective's `features` (GMML and MP3: the mean patch token after
the final norm; SiT, MAE, SDFT and SatMAE++: the class token after the final norm), by the package's evaluators:
  knn          weighted kNN, k = 20, temperature 0.07 (DINO), the train split as the bank;
  linear_probe logistic regression on the cached features, lr chosen on 10% held-out train images;
  fewshot      big_vision's ridge regression on 10 shots per class (l2 chosen on 5 held-out per class);
  finetune     (`--finetune_steps`, 0 to skip) the encoder fine-tuned on 10% of the train labels by
               experiments/mae_digits.py's recipe (`mae_finetune`, init_from = the pretraining run; the random
               encoder's row is the same classifier trained from scratch); SparK's: a ConvNeXt classifier
               (`supervised`) with the same optimizer, steps and labels, init_from = the SparK run (its encoder
               loads whole, the head is new), the random ConvNeXt's from scratch.
Top-1 % on the 360 test images, mean ± std over the seeds: a markdown table printed and written to
experiments/out/ssl_digits.md, the raw figures to ssl_digits.json, a bar chart to ssl_digits.png.

A new objective is a row of OBJECTIVES: a `Row` with its name, a function setting the pretraining config's
model / objective / input, and its family ("vit": the ViT fine-tune; "convnext": SparK's).
"""
import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from experiment_io import write_outputs  # noqa: E402
from mae_digits import ENCODER, LABEL_FRACTION, PLAIN, SHIFT, Arm, finetune_config, summarize  # noqa: E402

from vitjax import config_utils  # noqa: E402
from vitjax.evaluate import evaluators  # noqa: E402

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
VIEWS = 'decode(channels=1)|views(2, "random_crop(8, padding=1)|value_range(-1, 1)")'
PROTOCOLS = (("knn", "knn/top1", "kNN (k=20)"), ("probe", "probe/top1", "linear probe"),
             ("fewshot", "fewshot/10shot", "10-shot ridge"))
# SparK's encoder: the ConvNeXt of configs/spark_convnext.py:runlocal, on the digits resized to 64 px.
SPARK_ENCODER = dict(img_size=64, in_chans=1, num_classes=0, depths=(1, 1, 1, 1), dims=(16, 32, 48, 64))
SPARK_SHIFT = "decode(channels=1)|random_crop(8, padding=1)|resize(64)|value_range(-1, 1)"
SPARK_PLAIN = "decode(channels=1)|resize(64)|value_range(-1, 1)"
SATMAE_SHIFT = "decode(channels=1)|random_crop(8, padding=1)|resize(16)|value_range(-1, 1)"
SATMAE_PLAIN = "decode(channels=1)|resize(16)|value_range(-1, 1)"
FINETUNE = ("finetune", "finetune/top1", f"fine-tune, {int(LABEL_FRACTION * 100)}% labels")
MAE_KWARGS = dict(mask_ratio=0.75, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, norm_pix_loss=False)


def _gmml(config):
    # Official ratios; blocks up to half a side (0.3 of 8 pixels would leave single pixels only).
    config.objective_kwargs = dict(mask_ratio=0.75, replace_ratio=0.3, max_block_fraction=0.5, recons_blocks=(2, 3, 4))


def _sit(config):
    config.objective_kwargs = dict(mask_ratio=0.5, corruption="zeros", replace_ratio=0.3, max_block_fraction=0.5,
                                   hidden_dim=256, out_dim=64)
    config.input["pp_train"] = VIEWS


def _mae(config):
    config.objective_kwargs = dict(MAE_KWARGS)


def _mp3(config):
    config.objective_kwargs = dict(mask_ratio=0.5)


def _sdft(config):
    # teacher_init: the round-1 (MAE) run of the same seed, set per run (Arm.run's frozen_kwargs).
    config.objective_kwargs = dict(MAE_KWARGS, distill_weight=1.0)


def _satmae(config):
    # SatMAE++'s RGB variant (the MAE row's model + one 2x up-sampling block; the multi-band variant needs bands the
    # digits do not have): the digits loaded at 16 px, the MAE input their 2x2 mean, the L1 target the 16 px image.
    config.objective_kwargs = dict(MAE_KWARGS, channel_groups=None)
    config.input.update(pp_train=SATMAE_SHIFT, pp_eval=SATMAE_PLAIN)


def _spark(config):
    config.model_name = "convnext_atto"
    config.model = dict(SPARK_ENCODER)
    config.objective_kwargs = dict(mask_ratio=0.6, decoder_width=64)
    config.input.update(pp_train=SPARK_SHIFT, pp_eval=SPARK_PLAIN)


@dataclasses.dataclass(frozen=True)
class Row:
    """One pretraining objective of the study: its table row and how its config differs from the shared one."""

    name: str                                  # the row's name in the table
    configure: Callable[[Any], None]           # sets objective_kwargs (and model / input where they differ)
    family: str = "vit"                        # "vit" | "convnext": which fine-tune classifier it gets
    finetune_skip: Tuple[str, ...] = ()        # init_from_skip of its fine-tune
    teacher: Optional[str] = None              # the row whose run of the same seed is its frozen teacher
    default: bool = True                       # in the default run (False: only when named in --objectives)


# The study's rows, in run order (a teacher before its student). Add an objective here.
OBJECTIVES: Dict[str, Row] = {
    "gmml": Row("GMML", _gmml),
    "sit": Row("SiT", _sit),
    "mae": Row("MAE", _mae),
    "mp3": Row("MP3", _mp3, finetune_skip=("^pos_embed$",)),
    "sdft": Row("SDFT (round 2, MAE teacher)", _sdft, teacher="mae"),
    "satmae": Row("SatMAE++ (RGB variant, 16 px targets)", _satmae, default=False),
    "spark": Row("SparK (ConvNeXt, 64 px)", _spark, family="convnext", default=False),
}
DEFAULT_OBJECTIVES = tuple(key for key, row in OBJECTIVES.items() if row.default)
ROW_NAMES = {key: row.name for key, row in OBJECTIVES.items()}


def evals():
    """Returns the evaluators every encoder gets (train split as the bank / probe data, test split scored)."""
    return dict(knn=dict(kind="knn", k=20, temperature=0.07),
                probe=dict(kind="linear_probe", epochs=100),
                fewshot=dict(kind="fewshot", shots=(1, 5, 10), num_seeds=5))


def pretrain_config(objective: str, steps: int, teacher_init: Optional[str] = None):
    """Returns the pretraining config of `objective` (a key of OBJECTIVES): the same ViT (SparK: a ConvNeXt), data
    and optimizer; `teacher_init` is the frozen teacher of an objective that has one."""
    config = config_utils.default_config()
    config.model = dict(ENCODER)
    config.objective = objective
    config.input = dict(dataset="digits", train_split="train", eval_split="test", pp_train=SHIFT, pp_eval=PLAIN)
    OBJECTIVES[objective].configure(config)
    if teacher_init is not None:
        config.objective_kwargs = dict(config.objective_kwargs, teacher_init=teacher_init)
    config.batch_size = 128
    config.total_steps = steps
    config.optim.update(name="adamw", blr=3e-3, b1=0.9, b2=0.95, weight_decay=0.05, warmup_steps=max(1, steps // 20),
                        no_decay=())
    config.evals = evals()
    return config_utils.validate_config(config)


def convnext_finetune_config(steps: int):
    """Returns SparK's fine-tuning config: a ConvNeXt classifier of SPARK_ENCODER on 10% of the train labels, with
    mae_digits.py's optimizer, steps and labels (init_from per run)."""
    config = finetune_config(steps).copy_and_resolve_references()
    config.model_name = "convnext_atto"
    config.model = dict(SPARK_ENCODER, num_classes=10, drop_path_rate=0.1)
    config.objective, config.objective_kwargs = "supervised", {}
    config.input = dict(config.input, pp_train=SPARK_SHIFT, pp_eval=SPARK_PLAIN)
    return config_utils.validate_config(config)


FINETUNE_CONFIGS = dict(vit=finetune_config, convnext=convnext_finetune_config)


class AllEvaluators:
    """The run's evaluators as one: `evaluate(state)` merges their metrics as "<name>/<metric>"."""

    def __init__(self, built):
        self.built = built

    def evaluate(self, state) -> Dict[str, float]:
        """Returns every evaluator's metrics, prefixed with its name."""
        result = {}
        for evaluator in self.built:
            result.update({f"{evaluator.name}/{key}": value for key, value in evaluator.evaluate(state).items()})
        return result


def make_arm(config) -> Arm:
    """Returns the trainer's arm of `config`, evaluated by all of `config.evals`."""
    arm = Arm(config)
    with arm._context():  # pylint: disable=protected-access
        arm.evaluator = AllEvaluators(evaluators.build_evaluators(config, evaluators.EvalContext(
            objective=arm.objective, input_config=config.input, mesh=arm.mesh,
            state_shardings=arm.setup.state_shardings, batch_sharding=arm.setup.batch_sharding,
            eval_batch_size=120, default_every_steps=0, data=arm.data)))
    return arm


def pixel_baseline() -> Dict[str, float]:
    """Returns the same protocols on the raw 64 pixels in [-1, 1] (no encoder): how linear the digits already are."""
    from vitjax.data import digits
    from vitjax.evaluate import fewshot, linear_probe
    images, labels = digits.load_arrays()
    pixels = images.reshape(len(images), -1).astype(np.float32) / 127.5 - 1.0
    train, test = digits.split_indices()
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
    top1, _ = evaluators.knn_classify(unit(pixels[train]), labels[train], unit(pixels[test]), labels[test], k=20,
                                      temperature=0.07)
    probe = linear_probe.linear_probe_accuracy(pixels[train], labels[train], pixels[test], labels[test], epochs=100)
    shots = fewshot.fewshot_accuracy(pixels[train], labels[train], pixels[test], labels[test], shots=(1, 5, 10),
                                     num_seeds=5)
    return {"knn/top1": top1, "probe/top1": probe["top1"], "fewshot/10shot": shots["10shot"]}


def plot(results: Dict[str, Any], names, path: str, protocols=PROTOCOLS) -> None:
    """Writes a grouped bar chart (protocol x encoder, mean ± std) to `path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(names)
    for index, name in enumerate(names):
        means = [results["summary"][name][key][0] for key, _, _ in protocols]
        stds = [results["summary"][name][key][1] for key, _, _ in protocols]
        axis.bar(np.arange(len(protocols)) + (index - (len(names) - 1) / 2) * width, means, width, yerr=stds,
                 capsize=3, label=name)
    axis.set_xticks(np.arange(len(protocols)), [label for _, _, label in protocols])
    axis.set_ylabel("test top-1 %")
    axis.set_ylim(0, 100)
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    axis.set_title("Pretrained encoders on digits: frozen protocols" + (", fine-tuning" if len(protocols) > 3 else "")
                   + f" (mean ± std over {len(results['runs'])} seeds)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> Dict[str, Any]:
    """Runs the study and returns the raw results (also written to experiments/out/)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=800, help="pretraining steps of 128 images, every objective")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the number of steps")
    parser.add_argument("--finetune_steps", type=int, default=400,
                        help="fine-tuning steps of 64 on 10%% of the labels (0: no fine-tuning column)")
    parser.add_argument("--out_dir", default=OUT_DIR)
    parser.add_argument("--pixels_only", action="store_true", help="print the raw-pixel row only and stop")
    parser.add_argument("--replot", default="", help="redraw out_dir/REPLOT.png from out_dir/REPLOT.json and stop")
    parser.add_argument("--objectives", default=",".join(DEFAULT_OBJECTIVES),
                        help=f"comma-separated subset of {list(OBJECTIVES)} (default: {list(DEFAULT_OBJECTIVES)})")
    args = parser.parse_args(argv)
    if args.replot:
        import json
        with open(os.path.join(args.out_dir, f"{args.replot}.json"), encoding="utf-8") as file:
            results = json.load(file)
        protocols = tuple(p for p in PROTOCOLS + (FINETUNE,) if p[0] in next(iter(results["summary"].values())))
        plot(results, tuple(results["summary"]), os.path.join(args.out_dir, f"{args.replot}.png"), protocols)
        return results
    pixels = pixel_baseline()
    pixel_cells = " | ".join(f"{100 * pixels[key]:.2f}" for _, key, _ in PROTOCOLS)
    pixel_row = f"| raw pixels (no encoder) | {pixel_cells} | - |"
    if args.pixels_only:
        print(pixel_row)
        return {"pixels": pixels}
    given = tuple(name for name in args.objectives.split(",") if name)
    if not given or set(given) - set(OBJECTIVES):
        raise ValueError(f"--objectives={args.objectives!r}: valid choices are comma-separated {list(OBJECTIVES)}")
    chosen = tuple(key for key in OBJECTIVES if key in given)   # run order: a teacher before its student
    for key in chosen:
        if OBJECTIVES[key].teacher and OBJECTIVES[key].teacher not in chosen:
            raise ValueError(f"--objectives: {key} distils the {OBJECTIVES[key].teacher} run of the same seed; "
                             f"add {OBJECTIVES[key].teacher}")
    steps = max(20, int(round(args.steps * args.scale)))
    started = time.time()
    # A student's arm is built once its teacher's first run exists (its objective checks the path).
    arms = {key: make_arm(pretrain_config(key, steps)) for key in chosen if not OBJECTIVES[key].teacher}
    teachers = {OBJECTIVES[key].teacher for key in chosen if OBJECTIVES[key].teacher}
    # The floors: each row's model at its initialisation (its arm run for no step); a student shares its teacher's.
    floors = {f"{ROW_NAMES[key]} at step 0": key for key in chosen if not OBJECTIVES[key].teacher}
    families = dict.fromkeys(OBJECTIVES[key].family for key in chosen)
    names = tuple(ROW_NAMES[key] for key in chosen) + tuple(floors)
    protocols = PROTOCOLS + ((FINETUNE,) if args.finetune_steps else ())
    finetune_steps = max(20, int(round(args.finetune_steps * args.scale)))
    finetunes = ({family: Arm(FINETUNE_CONFIGS[family](finetune_steps)) for family in families}
                 if args.finetune_steps else {})
    workroot = tempfile.mkdtemp(prefix="ssl_digits_")
    results: Dict[str, Any] = {"runs": [], "settings": {
        "encoder": ENCODER, "steps": steps, **{name: arm.config.to_dict() for name, arm in arms.items()},
        **{f"finetune_{family}": arm.config.to_dict() for family, arm in finetunes.items()}}}
    try:
        for seed in range(args.seeds):
            runs, workdirs = {}, {}
            for key in chosen:
                row = OBJECTIVES[key]
                workdir = (os.path.join(workroot, f"{key}_seed{seed}") if finetunes or key in teachers else None)
                frozen = None
                if row.teacher:
                    frozen = dict(teacher_init=workdirs[row.teacher])
                    if key not in arms:
                        arms[key] = make_arm(pretrain_config(key, steps, teacher_init=workdirs[row.teacher]))
                        results["settings"][key] = arms[key].config.to_dict()
                runs[row.name] = arms[key].run(seed, workdir=workdir, frozen_kwargs=frozen)
                workdirs[key] = workdir
                if finetunes:
                    runs[row.name]["eval"]["eval/finetune/top1"] = finetunes[row.family].run(
                        seed, init_from=workdir, init_from_skip=row.finetune_skip)["eval"]["eval/top1"]
                print(f"  seed {seed} {row.name}: {time.time() - started:.0f} s since the start", flush=True)
            for workdir in workdirs.values():
                shutil.rmtree(workdir or "", ignore_errors=True)
            scratch = {}  # the family's classifier from scratch: one run per seed, shared by its floors
            for name, key in floors.items():
                arms[key].steps, trained = 0, arms[key].steps
                runs[name] = arms[key].run(seed)
                arms[key].steps = trained
                if finetunes:
                    family = OBJECTIVES[key].family
                    if family not in scratch:
                        scratch[family] = finetunes[family].run(seed)["eval"]["eval/top1"]
                    runs[name]["eval"]["eval/finetune/top1"] = scratch[family]
            results["runs"].append({"seed": seed, **runs})
            print(f"seed {seed}: " + "; ".join(
                f"{name} " + ", ".join(f"{label} {100 * run['eval'][f'eval/{key}']:.1f}"
                                       for _, key, label in protocols)
                + f" ({run['seconds']:.0f} s)" for name, run in runs.items()), flush=True)
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
    results["summary"] = {name: {short: summarize([100 * r[name]["eval"][f"eval/{key}"] for r in results["runs"]])
                                 for short, key, _ in protocols} for name in names}
    results["seconds"] = time.time() - started
    input_notes = ("; SparK: ConvNeXt dims 16-64 on 64 px" if "spark" in chosen else "") + (
        "; SatMAE++: digits loaded at 16 px" if "satmae" in chosen else "")
    lines = [f"Self-supervised pretraining on digits (ViT width {ENCODER['embed_dim']}, depth {ENCODER['depth']}, "
             f"2x2 patches on 8x8{input_notes}; {steps} steps of 128 unlabelled train images each), frozen encoders, "
             f"test top-1 % "
             f"on the 360 test images, mean ± std over {args.seeds} seed(s)"
             + (f"; fine-tune: {finetune_steps} steps of 64 on {int(LABEL_FRACTION * 100)}% of the train labels "
                "(the random encoders': from scratch)" if finetunes else ""), "",
             "| encoder | " + " | ".join(label for _, _, label in protocols) + " | pretraining loss first → last |",
             "|---|" + "---:|" * len(protocols) + "---|"]
    for name in names:
        cells = [f"{results['summary'][name][short][0]:.2f} ± {results['summary'][name][short][1]:.2f}"
                 if np.isfinite(results['summary'][name][short][0]) else "-" for short, _, _ in protocols]
        losses = "-" if name in floors else (f"{np.mean([r[name]['first_loss'] for r in results['runs']]):.3f} → "
                                             f"{np.mean([r[name]['last_loss'] for r in results['runs']]):.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {losses} |")
    lines.append(pixel_row.replace(" | - |", " | - | - |") if finetunes else pixel_row)
    results["pixels"] = pixels
    lines += ["", f"Total {results['seconds'] / 60:.1f} min on this machine (2 shared CPU cores)."]
    table = "\n".join(lines)
    print(table)
    # A subset of the objectives writes its own files, never over the full study's.
    stem = ("ssl_digits" if set(DEFAULT_OBJECTIVES) <= set(chosen) and args.seeds >= 3 and args.scale == 1.0
            else "ssl_digits_" + "_".join(chosen) + ("" if args.scale == 1.0 else f"_scale{args.scale:g}"))
    write_outputs(args.out_dir, stem, table, results)
    plot(results, names, os.path.join(args.out_dir, f"{stem}.png"), protocols)
    return results


if __name__ == "__main__":
    main()
