r"""ChannelViT with and without hierarchical channel sampling (HCS) on 3-channel digits, evaluated on every channel
subset: the paper's robustness claim (Bao et al. 2024, Section 3.2), at toy scale.

    python experiments/channelvit_digits.py                # two 300-step runs (a few minutes on 2 CPU cores)
    python experiments/channelvit_digits.py --steps=100    # a quick look

1. Trains `channelvit_tiny` (all channels always) and `hcs_channelvit_tiny` (a random channel subset per batch) with
   the trainer on `configs/channelvit_i1k.py:runlocal` (8 px digits as 3 channels: the image and its vertical and
   horizontal differences), the same seed, steps and learning rate.
2. Evaluates both on the 360 test digits with each of the 7 non-empty channel subsets (`channels=` of the model).

Writes experiments/out/channelvit_digits.{md,json}.
"""
import argparse
import itertools
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiment_io import write_outputs  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vitjax import checkpoint as checkpoint_lib  # noqa: E402
from vitjax import config_utils, models  # noqa: E402
from vitjax import train as trainer  # noqa: E402
from vitjax.data import digits  # noqa: E402

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "channelvit_i1k.py")
CHANNEL_NAMES = ("image", "d/dy", "d/dx")


def test_images() -> tuple:
    """Returns the 360 test digits as (B, 8, 8, 3) float32 (the runlocal config's eval input) and their labels."""
    images, labels = digits.load_arrays()
    _, test = digits.split_indices()
    x = images[test].astype(np.float32) / 127.5 - 1.0
    x = np.concatenate([x, x - np.roll(x, 1, axis=1), x - np.roll(x, 1, axis=2)], axis=-1)
    return x, labels[test]


def train(model_name: str, steps: int, workdir: str) -> dict:
    """Returns the params of `model_name` trained by the runlocal recipe for `steps` steps in `workdir`."""
    config = config_utils.load_config(f"{CONFIG}:runlocal")
    config.model_name = model_name
    config.total_steps = steps
    config.progress_bar = False
    trainer.train_and_evaluate(config, workdir)
    return config, checkpoint_lib.load_params(workdir, parts=("params",))["params"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default=OUT_DIR)
    args = parser.parse_args()
    images, labels = test_images()
    subsets = [subset for size in (3, 2, 1) for subset in itertools.combinations(range(3), size)]
    results = {"steps": args.steps, "subsets": [list(s) for s in subsets], "top1": {}}
    for name in ("channelvit_tiny", "hcs_channelvit_tiny"):
        with tempfile.TemporaryDirectory() as workdir:
            config, params = train(name, args.steps, workdir)
        model = models.create(name, **config.model)
        apply = jax.jit(lambda x, channels: model.apply({"params": params}, x, channels=channels)[0])
        results["top1"][name] = [
            float(np.mean(np.argmax(apply(jnp.asarray(images[..., list(subset)]), jnp.asarray(subset)), -1) == labels))
            for subset in subsets]
    lines = ["| channels | ChannelViT top-1 | ChannelViT + HCS top-1 |", "|---|---:|---:|"]
    for index, subset in enumerate(subsets):
        label = " + ".join(CHANNEL_NAMES[c] for c in subset)
        lines.append(f"| {label} | {100 * results['top1']['channelvit_tiny'][index]:.1f}% | "
                     f"{100 * results['top1']['hcs_channelvit_tiny'][index]:.1f}% |")
    table = "\n".join(lines) + (f"\n\n{args.steps} steps each (batch 64, lr 2e-3), 360 test digits, "
                                f"jax {jax.__version__}.")
    write_outputs(args.out, "channelvit_digits", table, results)
    print(table)


if __name__ == "__main__":
    main()
