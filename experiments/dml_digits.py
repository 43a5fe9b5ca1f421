r"""Deep metric learning on the digits: train on classes 0-4, Recall@1/2/4/8 and MAP@R among the unseen classes 5-9.

    # the supervised quickstart encoder first: python -m vitjax.main --config=configs/digits_vit.py
    # --workdir=/tmp/vitjax_digits; then 4 trained methods x 3 seeds of 300 steps, about 25 minutes on 2 CPU cores
    python experiments/dml_digits.py --init_from=/tmp/vitjax_digits

Methods, all from configs/proxy_dml_vit.py:runlocal (AdamW lr 1e-3, the learnable proxies' lr x20, batch 64, the
embedding head LayerNorm + Dense to 64, Proxy-Anchor with the official alphas and deltas; the paper's SGD diverged
here, see the config; experiments/out/dml_digits_sgd.md is this script's table under SGD momentum 0.9, lr 0.05):
  frozen            the quickstart encoder's pooled features, no training;
  linear_pa         Proxy-Anchor, only the embedding head and proxies train (`optim.frozen`);
  full_pa           Proxy-Anchor, everything trains;
  vpt_pa            Proxy-Anchor, VPT-deep (5 prompts per layer) + BitFit, backbone otherwise frozen;
  vpt_semantic      the paper's: as vpt_pa with the semantic proxies of class prompts (2 per layer and class).
Retrieval runs over the 179 test images of digits 5-9. The quickstart encoder's supervised pretraining saw digits
5-9's train images with labels, so "unseen" holds for the DML training only; `--pretrain_classes=0,1,2,3,4` first
trains the quickstart config on digits 0-4 alone into `--init_from` (if no run is there yet), an encoder for which
5-9 are unseen altogether:

    python experiments/dml_digits.py --init_from=/tmp/digits04 --pretrain_classes=0,1,2,3,4 --out=dml_digits_enc04

Writes experiments/out/<--out>.md / .json.
"""
import argparse
import os
import sys
import tempfile
import time
from typing import Any, Dict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiment_io import write_outputs  # noqa: E402

import jax  # noqa: E402

from vitjax import config_utils, parallel, train  # noqa: E402

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
METRICS = ("recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "map_at_r")
METHODS: Dict[str, Dict[str, Any]] = {
    "linear_pa": {"objective_kwargs.proxies": "learnable", "adapt.method": None, "optim.frozen": (r"^(?!dml/)",)},
    "full_pa": {"objective_kwargs.proxies": "learnable", "adapt.method": None},
    "vpt_pa": {"objective_kwargs.proxies": "learnable"},
    "vpt_semantic": {},
}
LABELS = {"frozen": "frozen encoder (no training)", "linear_pa": "linear (head + proxies) + Proxy-Anchor",
          "full_pa": "full fine-tuning + Proxy-Anchor", "vpt_pa": "VPT-deep + BitFit + Proxy-Anchor",
          "vpt_semantic": "VPT-deep + BitFit + semantic proxies (the paper)"}


def frozen_metrics(init_from: str) -> Dict[str, float]:
    """Returns the retrieval metrics of the encoder's own pooled features on the eval classes (no training)."""
    import jax.numpy as jnp

    from vitjax import data, models, weights
    from vitjax.evaluate.recall_at_k import retrieval_metrics
    config = config_utils.load_config("configs/proxy_dml_vit.py:runlocal")
    model = models.create(config.model_name, **config.model.to_dict())
    params = weights.load(init_from).variables["params"]
    params = {key: value for key, value in params.items() if not key.startswith("head")}
    apply = jax.jit(lambda images: model.apply({"params": params}, images)[0])
    features, labels = [], []
    for batch in data.make_eval_iterator(config.input, global_batch_size=60):
        mask = np.asarray(batch["mask"], bool)
        features.append(np.asarray(apply(jnp.asarray(batch["image"])))[mask])
        labels.append(np.asarray(batch["label"])[mask])
    result = retrieval_metrics(np.concatenate(features), np.concatenate(labels))
    result["num_examples"] = int(sum(len(part) for part in labels))
    return result


def pretrain_encoder(workdir: str, classes) -> Dict[str, float]:
    """Returns the final metrics of the quickstart config trained on `classes` only (relabelled 0..n-1) in `workdir`."""
    config = config_utils.load_config("configs/digits_vit.py", {"progress_bar": False, "checkpoint_async": False,
                                                                "model.num_classes": len(classes)})
    config.input.train_classes = tuple(classes)
    config.input.eval_classes = tuple(classes)
    mesh = parallel.create_mesh(dict(data=1, fsdp=1, model=1), devices=jax.devices()[:1])
    return train.train_and_evaluate(config, workdir, mesh=mesh)


def run_method(init_from: str, method: str, seed: int, steps: int) -> Dict[str, float]:
    """Returns the final retrieval metrics of one run."""
    overrides = {"progress_bar": False, "checkpoint_async": False, "init_from": init_from, "seed": seed,
                 "total_steps": steps, "log_every_steps": steps, **METHODS[method]}
    config = config_utils.load_config("configs/proxy_dml_vit.py:runlocal", overrides)
    mesh = parallel.create_mesh(dict(data=1, fsdp=1, model=1), devices=jax.devices()[:1])
    with tempfile.TemporaryDirectory() as workdir:
        final = train.train_and_evaluate(config, workdir, mesh=mesh)
    return {key.split("/", 1)[1]: float(value) for key, value in final.items() if key.startswith("retrieval/")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init_from", default="/tmp/vitjax_digits")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default="dml_digits")
    parser.add_argument("--pretrain_classes", default="", help="e.g. 0,1,2,3,4: train the encoder on these first")
    args = parser.parse_args(argv)
    results: Dict[str, Any] = {"args": vars(args), "runs": {}}
    if args.pretrain_classes and not os.path.exists(os.path.join(args.init_from, "checkpoints")):
        classes = [int(c) for c in args.pretrain_classes.split(",")]
        results["pretraining"] = {key: float(value) for key, value in pretrain_encoder(args.init_from, classes).items()}
    results["runs"]["frozen"] = [frozen_metrics(args.init_from)]
    for method in args.methods.split(","):
        results["runs"][method] = []
        for seed in range(args.seeds):
            start = time.time()
            metrics = run_method(args.init_from, method, seed, args.steps)
            metrics["seconds"] = time.time() - start
            results["runs"][method].append(metrics)
            print(method, seed, {key: round(value, 4) for key, value in metrics.items()}, flush=True)
    header = "| method | " + " | ".join(METRICS) + " |\n|---|" + "---:|" * len(METRICS) + "\n"
    rows = []
    for method, runs in results["runs"].items():
        cells = []
        for metric in METRICS:
            values = np.array([run[metric] for run in runs]) * 100
            cells.append(f"{values.mean():.1f}" if len(values) == 1 else f"{values.mean():.1f} ± {values.std():.1f}")
        rows.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    table = (f"Digits, DML trained on classes 0-4, retrieval among the {results['runs']['frozen'][0]['num_examples']} "
             f"test images of classes 5-9 (%, mean ± std over {args.seeds} seeds, {args.steps} steps)\n\n"
             + header + "\n".join(rows) + "\n")
    print(table)
    print(write_outputs(OUT_DIR, args.out, table, results))


if __name__ == "__main__":
    main()
