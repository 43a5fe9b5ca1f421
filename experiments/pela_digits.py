r"""PELA on the quickstart ViT: low-rank (SVD) replacement at three ranks, top-1 before and after recovery.

    python experiments/pela_digits.py                                   # trains the quickstart first (~4 min)
    python experiments/pela_digits.py --vit_workdir=/tmp/vitjax_digits  # reuse the quickstart's run

Every linear layer of the blocks (qkv, proj, fc1, fc2; not the patch embedding or the head, as the paper)
becomes two SVD-initialised factors at 1/4, 1/8 and 1/16 of full rank (min(in, out) = 64 here). Recovery
trains every weight with AdamW (5e-4, cosine, no weight decay) for --steps steps of 128 training images
(the eval preprocessing, no augmentation, the model in eval mode), on cross-entropy + block feature MSE
against the original model + the weight-perturbation penalty (PELA), and, beside it, on cross-entropy
alone. Top-1 on the 360 test images. Writes experiments/out/pela_digits.{md,json}.
"""
import argparse
import os
import sys
import tempfile
import time
from typing import Any, Dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from experiment_io import write_outputs  # noqa: E402
from quant_digits import train, train_arrays  # noqa: E402

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
RANKS = (0.25, 0.125, 0.0625)
RECIPES = {"PELA (CE + features + perturbation)": dict(feature_weight=1.0, perturbation_weight=1.0),
           "CE only": dict(feature_weight=0.0, perturbation_weight=0.0)}


def recover(lowrank, variables, teacher, images, labels, steps: int, weights: Dict[str, float], seed: int = 0):
    """Returns the low-rank variables after `steps` of recovery training on the weighted PELA loss."""
    import jax
    import numpy as np
    import optax

    from vitjax.quant import pela
    optimizer = optax.adamw(optax.cosine_decay_schedule(5e-4, steps), weight_decay=0.0)
    trainable = {"params": variables["params"], "low_rank": variables["low_rank"]}
    state = optimizer.init(trainable)

    @jax.jit
    def step(trainable, state, x, y):
        grads, _ = jax.grad(lambda t: pela.recovery_loss(lowrank, t, teacher, x, y, **weights,
                                                         apply_kwargs=dict(train=False)), has_aux=True)(trainable)
        updates, state = optimizer.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        index = rng.choice(len(images), 128, replace=False)
        trainable, state = step(trainable, state, images[index], labels[index])
    return {**variables, **trainable}


def run(workdir: str, steps: int, log) -> Dict[str, Any]:
    """Returns the rows (rank, recipe, params, GMACs, top-1 before / after recovery) for the run in `workdir`."""
    import jax
    import numpy as np

    from vitjax.evaluate import pretrained
    from vitjax.quant import pela
    prepared = pretrained.prepare_pretrained(workdir, log=lambda _: None)
    module, teacher = prepared.objective.module, prepared.variables
    images, labels = train_arrays(prepared, prepared.input_config.get("train_split", "train"))
    test_images, test_labels = train_arrays(prepared, prepared.input_config["eval_split"])
    image_shape = test_images.shape[1:]

    def top1(apply_fn, variables):
        logits = jax.jit(lambda v, x: apply_fn(v, x)[0])(variables, test_images)
        return 100 * float((np.asarray(logits).argmax(-1) == test_labels).mean())

    def dense_apply(v, x):
        return module.apply(v, x, train=False)

    rows = [dict(rank="full (original)", recipe="-", params=pela.count_params(teacher),
                 gmacs=pela.gmacs(lambda v, x: dense_apply(v, x)[0], teacher, image_shape),
                 top1_before=top1(dense_apply, teacher), top1_after=None, seconds=0.0)]
    log(rows[-1])
    for rank in RANKS:
        lowrank, variables = pela.compress(module, teacher, test_images[:1], rank=rank,
                                           apply_kwargs=dict(train=False))

        def lowrank_apply(v, x, lowrank=lowrank):
            return lowrank.apply(v, x, train=False)

        params = pela.count_params(variables)
        gmacs = pela.gmacs(lambda v, x: lowrank_apply(v, x)[0], variables, image_shape)
        before = top1(lowrank_apply, variables)
        for recipe, weights in RECIPES.items():
            started = time.time()
            recovered = recover(lowrank, variables, teacher, images, labels, steps, weights)
            rows.append(dict(rank=f"{rank:g} ({lowrank.layers[0].rank} of {lowrank.layers[0].full_rank})",
                             recipe=recipe, params=params, gmacs=gmacs, top1_before=before,
                             top1_after=top1(lowrank_apply, recovered), seconds=time.time() - started))
            log(rows[-1])
    return dict(steps=steps, rows=rows)


def main(argv=None) -> Dict[str, Any]:
    """Trains the quickstart (unless given), compresses it at two ranks, recovers it; writes the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vit_workdir", default=None, help="a finished quickstart run (default: train one)")
    parser.add_argument("--steps", type=int, default=300, help="recovery steps of 128 training images")
    args = parser.parse_args(argv)
    workdir = args.vit_workdir
    if workdir is None:
        workdir = os.path.join(tempfile.mkdtemp(prefix="pela_digits_"), "vit")
        train(workdir, False)
    results = run(workdir, args.steps, print)
    lines = [f"PELA on the quickstart ViT (digits): every qkv / proj / fc1 / fc2 replaced by SVD factors at a "
             f"fraction of full rank, then {args.steps} recovery steps of 128 training images (AdamW 5e-4, "
             "cosine). Params: all weights; GMACs: XLA's count for one image; top-1 % on the 360 test images.", "",
             "| rank | recovery | params | GMACs | top-1 % before recovery | top-1 % after | recovery s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in results["rows"]:
        after = "-" if row["top1_after"] is None else f"{row['top1_after']:.2f}"
        lines.append(f"| {row['rank']} | {row['recipe']} | {row['params']:,} | {row['gmacs']:.5f} | "
                     f"{row['top1_before']:.2f} | {after} | {row['seconds']:.0f} |")
    lines += ["", f"On {__import__('jax').default_backend().upper()} (2 shared cores)."]
    table = "\n".join(lines)
    print(table)
    write_outputs(OUT_DIR, "pela_digits", table, results)
    return results


if __name__ == "__main__":
    main()
