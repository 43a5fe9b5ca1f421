r"""Shift consistency of the adaptive polyphase ViT vs the plain ViT on the bundled digits.

    python experiments/shift_consistency.py                 # two 800-step digits runs, a few minutes on 2 CPU cores
    python experiments/shift_consistency.py --steps=200 --shifts=20

Trains the quickstart ViT (configs/digits_vit.py: width 64, depth 4, 16x16 inputs in 4x4 patches) twice
through the trainer, as it is and with `patch_embed_type="poly", pos_embed="conv"` (the adaptive polyphase
patch embedding and PosConv of Ding et al., CVPR 2024), then classifies the 360 test images under `--shifts`
random circular shifts (dy, dx) in [0, 16)^2 (seeded; whole patches or not). Consistency: the percentage of
(image, shift) pairs whose predicted class equals the unshifted image's, the paper's metric.
Writes experiments/out/shift_consistency.{md,json}.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from experiment_io import write_outputs  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vitjax import config_utils, models, weights  # noqa: E402
from vitjax import train as trainer  # noqa: E402

ARMS = {"plain ViT": {}, "adaptive polyphase ViT": dict(patch_embed_type="poly", pos_embed="conv")}


def test_images(size: int = 16) -> tuple:
    """Returns (NHWC float32 images in [-1, 1] at `size` px, labels) of the digits test split (bilinear resize)."""
    import tensorflow as tf
    from vitjax.data import digits
    images, labels = digits.load_arrays()
    _, test = digits.split_indices()
    resized = tf.image.resize(tf.constant(images[test], tf.float32), (size, size), method="bilinear").numpy()
    return resized / 127.5 - 1.0, labels[test]


def run_arm(name: str, changes: dict, steps: int, workdir: str, images, labels, shifts) -> dict:
    """Returns accuracy and shift consistency of one trained arm."""
    start = time.time()
    config = config_utils.load_config("configs/digits_vit.py")
    config.total_steps = steps
    config.optim.warmup_steps = min(config.optim.warmup_steps, steps // 10)
    config.model = dict(config.model, **changes)
    config.progress_bar = False
    config.checkpoint_async = False
    trainer.train_and_evaluate(config, workdir)
    variables = weights.load(workdir).variables
    model = models.create(config.model_name, **config.model)
    apply = jax.jit(lambda batch: jnp.argmax(model.apply(variables, batch)[0], -1))
    reference = np.asarray(apply(jnp.asarray(images)))
    agree, correct = [], []
    for shift in shifts:
        predicted = np.asarray(apply(jnp.asarray(np.roll(images, tuple(shift), axis=(1, 2)))))
        agree.append(np.mean(predicted == reference))
        correct.append(np.mean(predicted == labels))
    return dict(arm=name, steps=steps, top1=100 * float(np.mean(reference == labels)),
                shifted_top1=100 * float(np.mean(correct)), consistency=100 * float(np.mean(agree)),
                worst_shift_consistency=100 * float(np.min(agree)), minutes=(time.time() - start) / 60)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--shifts", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = parser.parse_args(argv)
    images, labels = test_images()
    shifts = np.random.default_rng(args.seed).integers(0, 16, size=(args.shifts, 2))
    results = []
    for name, changes in ARMS.items():
        with tempfile.TemporaryDirectory() as workdir:
            results.append(run_arm(name, changes, args.steps, workdir, images, labels, shifts))
    table = ("| model | steps | top-1 % | top-1 % under shifts | consistency % | worst shift % | minutes |\n"
             "|---|---:|---:|---:|---:|---:|---:|\n")
    table += "".join(f"| {r['arm']} | {r['steps']} | {r['top1']:.2f} | {r['shifted_top1']:.2f} | "
                     f"{r['consistency']:.2f} | {r['worst_shift_consistency']:.2f} | {r['minutes']:.1f} |\n"
                     for r in results)
    table += (f"\n{args.shifts} random circular shifts (dy, dx) in [0, 16)^2 of the 360 digits test images "
              f"(16x16, 4x4 patches), seed {args.seed}; consistency: same predicted class as unshifted.\n")
    print(table)
    write_outputs(args.out_dir, "shift_consistency", table, dict(shifts=shifts.tolist(), results=results))
    return results


if __name__ == "__main__":
    main()
