r"""Transfer harness: adaptation methods x datasets from one pretrained encoder, one table (trained-param %, top-1).

    # the supervised quickstart encoder (train it first: python -m vitjax.main --config=configs/digits_vit.py
    # --workdir=/tmp/vitjax_digits), 1,000 digits training images, 3 seeds, about 10 minutes on 2 CPU cores
    python experiments/transfer.py --init_from=/tmp/vitjax_digits
    # an MAE-pretrained digits encoder (experiments/mae_digits.py's pretraining run): its model and input
    python experiments/transfer.py --init_from=/tmp/mae_digits_run --overrides='{"model.variant": "mu/2",
        "model.img_size": 8, "model.pos_embed": "sincos2d", "model.global_pool": "token", "input.pp_train":
        "decode(channels=1)|random_crop(8, padding=1)|value_range(-1, 1)", "input.pp_eval":
        "decode(channels=1)|value_range(-1, 1)"}'
    # VTAB-1k tasks by TFDS name (prepared in the TFDS data dir), a model config of your own
    python experiments/transfer.py --init_from=vit_b16.pth --config=configs/finetune.py:model=vit_base_patch16_224 \
        --datasets=caltech101,cifar100,dtd --train_split='train[:800]+validation[:200]' --eval_split=test

Each (method, dataset, seed) is one run of `vitjax.train.train_and_evaluate` from `--config` (default the
quickstart's) with `init_from` the encoder and the classifier head re-initialised (`init_from_skip`), so
every method starts from the same features. The methods are config overrides (`METHODS`): full
fine-tuning, a linear probe (everything but the head frozen through `optim.frozen`), and `config.adapt`'s
LoRA, VPT shallow / deep, AdaptFormer adapters, HST and DVPT; `pvp` is VPT deep whose prompts start from a stage-1
VPT-deep run on a source task (`PVP_SOURCES`; on the digits: `--pvp_source_split`, relabelled class // 2,
`--pvp_source_steps`), run once per dataset with seed 0, its head dropped. The table reports the
trained-parameter percentage (of the adapted model's parameters), top-1 per dataset (mean +- std over the
seeds) and the mean over the datasets; it is printed and written to experiments/out/<--out>.md beside the
raw figures (.json). `--merge=A.json,B.json,...` writes one table of earlier runs (one digits dataset, the same
steps / split / seeds), a column pair per encoder (the runs' --label):

    python experiments/transfer.py --out=transfer_digits_all --merge=experiments/out/transfer_digits_supervised.json,...
"""
import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiment_io import write_outputs  # noqa: E402

import jax  # noqa: E402

from vitjax import config_utils, optim, parallel, train  # noqa: E402
from vitjax.adapt.pvp import DIGITS_SOURCE_MAPPING  # noqa: E402

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")

# Recipes: the overrides of each method (config keys as on the command line). PEFT methods take a 10x larger
# learning rate than full fine-tuning, as their papers do (few, freshly initialised parameters); no weight decay.
METHODS: Dict[str, Dict[str, Any]] = {
    "full": {"optim.blr": 1e-3},
    "linear": {"optim.blr": 1e-2, "optim.weight_decay": 0.0, "optim.frozen": (r"^(?!head/)",)},
    "lora": {"optim.blr": 1e-2, "optim.weight_decay": 0.0, "adapt.method": "lora", "adapt.rank": 4,
             "adapt.alpha": 4.0, "adapt.targets": ("qkv", "proj")},
    "vpt_shallow": {"optim.blr": 1e-2, "optim.weight_decay": 0.0, "adapt.method": "vpt", "adapt.num_tokens": 5},
    "vpt_deep": {"optim.blr": 1e-2, "optim.weight_decay": 0.0, "adapt.method": "vpt", "adapt.num_tokens": 5,
                 "adapt.deep": True},
    "adapter": {"optim.blr": 1e-2, "optim.weight_decay": 0.0, "adapt.method": "adapter", "adapt.bottleneck": 8},
    # HST's paper defaults (configs/hst_digits.py): 4 side stages 32-72 wide, one meta token per layer, its
    # lr 1e-2 and weight decay 5e-4; a 4-block encoder gives one layer per stage.
    "hst": {"optim.blr": 1e-2, "optim.weight_decay": 5e-4, "adapt.method": "hst", "model.drop_path_rate": 0.0},
    # DVPT (vitjax/adapt/dvpt.py): vpt_deep's prompts and recipe, generated per image by a Meta-Net (meta_dim 16).
    "dvpt": {"optim.blr": 1e-2, "optim.weight_decay": 0.0, "adapt.method": "dvpt", "adapt.num_tokens": 5,
             "adapt.deep": True, "adapt.meta_dim": 16},
}
# PVP (vitjax/adapt/pvp.py): VPT-deep whose prompts start from a stage-1 run on a source task (run once per
# dataset, seed 0, then reused by every seed, as the paper pre-trains once). The target run is vpt_deep's.
METHODS["pvp"] = dict(METHODS["vpt_deep"])
# The digits source task: a coarser label set (class // 2) on the training images after --train_split's.
# The head stays 10 wide (5 logits unused): it is dropped at stage 2 anyway.
PVP_SOURCES = {"digits": lambda args, target: {
    "input.pp_modules": tuple(target.input.get("pp_modules", ())) + ("vitjax.adapt.pvp",),
    "input.train_split": args.pvp_source_split,
    "input.pp_train": f"{target.input.pp_train}|relabel({DIGITS_SOURCE_MAPPING})",
    "input.pp_eval": f"{target.input.pp_eval}|relabel({DIGITS_SOURCE_MAPPING})",
    "total_steps": args.pvp_source_steps, "optim.warmup_steps": max(1, args.pvp_source_steps // 10),
    "log_every_steps": args.pvp_source_steps}}


def run_config(args, method: str, dataset: str, seed: int, extra=None):
    """Returns the validated config of one run (`extra`: overrides applied last)."""
    overrides = {
        "seed": seed, "init_from": args.init_from, "init_from_skip": (r"^head/",),
        "input.dataset": dataset, "input.train_split": args.train_split, "input.eval_split": args.eval_split,
        "total_steps": args.steps, "optim.warmup_steps": max(1, args.steps // 10),
        "log_every_steps": args.steps, "eval_every_steps": 0, "checkpoint_every_steps": 0,
        "keep_checkpoints": 1, "checkpoint_async": False, "progress_bar": False,
        **json.loads(args.overrides or "{}"), **METHODS[method], **(extra or {})}
    if dataset != "digits":
        overrides["model.num_classes"] = None  # set from the dataset below
    config = config_utils.load_config(args.config, {k: v for k, v in overrides.items() if v is not None})
    if dataset != "digits":
        import vitjax.data as data
        config.model.num_classes = int(data.dataset_info(config.input)["num_classes"])
    return config_utils.validate_config(config)


def trained_fraction(config) -> Dict[str, float]:
    """Returns {"trained": count, "total": count, "percent": %} of a run's params, read abstractly (no compile)."""
    import flax
    from vitjax import objectives
    objective = objectives.create(config.objective, config)
    size = config.model.get("img_size", 224)
    channels = config.model.get("in_chans", 3)
    batch = {"image": np.zeros((1, size, size, channels), np.float32)}
    params = flax.linen.meta.unbox(jax.eval_shape(lambda: objective.init_variables(jax.random.PRNGKey(0), batch))
                                   ["params"])
    mask = optim.trainable_mask(config.optim, params, train.adapted_params(config))
    sizes = [int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params)]
    trained = sum(size for size, use in zip(sizes, jax.tree.leaves(mask)) if use)
    return dict(trained=trained, total=sum(sizes), percent=100.0 * trained / sum(sizes))


def merge(paths: List[str], out: str) -> str:
    """Returns (and writes to experiments/out/<out>) one table of earlier runs' JSONs: a column pair per encoder."""
    encoders: Dict[str, Dict[str, Any]] = {}
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        encoder = encoders.setdefault(result["args"].get("label") or result["args"]["init_from"],
                                      dict(fractions={}, runs=[], settings=set()))
        encoder["fractions"].update(result["fractions"])
        encoder["runs"] += result["runs"]
        encoder["settings"].add((result["args"]["steps"], result["args"]["train_split"], result["args"]["seeds"]))
    if any(len(e["settings"]) > 1 for e in encoders.values()) or len({s for e in encoders.values()
                                                                       for s in e["settings"]}) > 1:
        raise SystemExit(f"--merge needs runs of one setting (steps, train split, seeds); got "
                         f"{sorted({s for e in encoders.values() for s in e['settings']})}")
    steps, split, seeds = next(iter(next(iter(encoders.values()))["settings"]))
    methods = list(dict.fromkeys(m for e in encoders.values() for m in e["fractions"]))
    names = list(encoders)
    lines = [f"Transfer on the digits: {steps} steps, train split {split!r}, top-1 % (mean +- std over seeds "
             f"{seeds}); trained params of the adapted model. Encoders: "
             + "; ".join(f"({i + 1}) {name}" for i, name in enumerate(names)), "",
             "| method | " + " | ".join(f"trained ({i + 1}) | top-1 ({i + 1})" for i in range(len(names))) + " |",
             "|---|" + "---:|---:|" * len(names)]
    for method in methods:
        cells = []
        for name in names:
            encoder = encoders[name]
            values = [r["top1"] for r in encoder["runs"] if r["method"] == method]
            share = encoder["fractions"].get(method)
            cells += [f"{share['trained']:,} ({share['percent']:.2f}%)" if share else "-",
                      f"{np.mean(values):.2f} +- {np.std(values):.2f}" if values else "-"]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    write_outputs(OUT_DIR, out, table, dict(sources=paths, encoders={
        name: dict(fractions=e["fractions"], runs=e["runs"]) for name, e in encoders.items()}))
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--merge", default="", help="comma-separated JSONs of earlier runs: write one table of them "
                        "(to --out) instead of running")
    parser.add_argument("--init_from", help="the encoder's weights (any config.init_from source)")
    parser.add_argument("--config", default="configs/digits_vit.py", help="the run config the methods start from")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {list(METHODS)}")
    parser.add_argument("--datasets", default="digits", help="comma-separated TFDS names (VTAB-1k: caltech101, ...)")
    parser.add_argument("--train_split", default="train[:1000]", help="1,000 training examples, as VTAB-1k")
    parser.add_argument("--eval_split", default="test")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--overrides", default="", help='JSON {"key.sub": value} applied to --config, e.g. the '
                        "encoder's model settings and preprocessing")
    parser.add_argument("--out", default="transfer", help="stem of the outputs in experiments/out")
    parser.add_argument("--label", default="", help="what the encoder is, for the table's title")
    parser.add_argument("--pvp_source_split", default="train[1000:]", help="PVP's source task images")
    parser.add_argument("--pvp_source_steps", type=int, default=200, help="PVP's stage-1 steps")
    args = parser.parse_args(argv)
    if args.merge:
        merge(args.merge.split(","), args.out)
        return
    if not args.init_from:
        raise SystemExit("--init_from (the encoder's weights) is required unless --merge is given")
    methods, datasets = args.methods.split(","), args.datasets.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"Unknown methods {unknown}; valid choices: {list(METHODS)}")
    if "pvp" in methods and any(d not in PVP_SOURCES for d in datasets):
        raise SystemExit(f"pvp has a source task for {list(PVP_SOURCES)} only; got datasets {datasets}")
    seeds = [int(s) for s in args.seeds.split(",")]
    mesh = parallel.create_mesh(dict(data=1, fsdp=1, model=1), devices=jax.devices()[:1])
    results: List[Dict[str, Any]] = []
    fractions: Dict[str, Dict[str, float]] = {}
    pvp_stage1: Dict[str, str] = {}
    scratch = tempfile.TemporaryDirectory()
    for method in methods:
        for dataset in datasets:
            for seed in seeds:
                config = run_config(args, method, dataset, seed)
                if method not in fractions:
                    fractions[method] = trained_fraction(config)
                start = time.time()
                if method == "pvp":
                    if dataset not in pvp_stage1:
                        pvp_stage1[dataset] = os.path.join(scratch.name, f"pvp_source_{dataset}")
                        source = run_config(args, method, dataset, 0, PVP_SOURCES[dataset](args, config))
                        stage1 = train.train_and_evaluate(source, pvp_stage1[dataset], mesh=mesh)
                        print(json.dumps(dict(pvp_source=dataset, top1=100.0 * stage1["eval/top1"],
                                              seconds=time.time() - start)), flush=True)
                    config = run_config(args, method, dataset, seed, {"init_from": pvp_stage1[dataset]})
                with tempfile.TemporaryDirectory() as workdir:
                    final = train.train_and_evaluate(config, workdir, mesh=mesh)
                results.append(dict(method=method, dataset=dataset, seed=seed, top1=100.0 * final["eval/top1"],
                                    seconds=time.time() - start))
                print(json.dumps(results[-1]), flush=True)
    lines = [f"Transfer from {args.label or args.init_from}: {args.steps} steps, train split {args.train_split!r}, "
             f"top-1 % on {args.eval_split!r} (mean +- std over seeds {seeds})", "",
             "| method | trained params | " + " | ".join(datasets) + " | mean |",
             "|---|---:|" + "---:|" * (len(datasets) + 1)]
    for method in methods:
        cells, means = [], []
        for dataset in datasets:
            values = [r["top1"] for r in results if r["method"] == method and r["dataset"] == dataset]
            cells.append(f"{np.mean(values):.2f} +- {np.std(values):.2f}")
            means.append(np.mean(values))
        share = fractions[method]
        lines.append(f"| {method} | {share['trained']:,} ({share['percent']:.2f}%) | " + " | ".join(cells)
                     + f" | {np.mean(means):.2f} |")
    table = "\n".join(lines)
    print(table)
    write_outputs(OUT_DIR, args.out, table, dict(args=vars(args), fractions=fractions, runs=results))


if __name__ == "__main__":
    main()
