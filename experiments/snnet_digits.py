"""SN-Net v2 on the bundled digits: two ViTs of different widths, stitched, trained together, every stitch measured.

    python experiments/snnet_digits.py [--anchor_steps 400] [--stitch_steps 300] [--out experiments/out]

1. trains two digits ViTs through the trainer (configs/digits_vit.py: width 32 and width 64, both depth 4);
2. builds `snnetv2_deit3_s_b`-style SN-Net variables from the two runs (`vitjax.convert.snnet.from_anchors`) with
   every stitching layer fitted by least squares on 100 train images (the paper's initialisation);
3. trains the stitched net briefly through the trainer (objective "snnet": one stitch per step, FLOPs-grouped);
4. evaluates every stitch configuration on the 360 test images: top-1 and GFLOPs (analytic, fvcore's count), after
   the least-squares initialisation and after training; writes experiments/out/snnet_digits.{md,json,png}.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from experiment_io import write_outputs  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTHS = (32, 64)
HEADS = (2, 4)


def anchor_options(width, heads):
    return dict(variant="mu/4", embed_dim=width, depth=4, num_heads=heads, mlp_dim=2 * width)


def test_images():
    """Returns the digits test split as the eval pipeline sees it: (360, 16, 16, 1) in [-1, 1], labels."""
    import tensorflow as tf
    from vitjax.data import digits
    images, labels = digits.load_arrays()
    _, test = digits.split_indices()
    resized = tf.image.resize(tf.constant(images[test]), (16, 16), method="bilinear")
    resized = tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8).numpy()
    return resized.astype(np.float32) / 255.0 * 2.0 - 1.0, labels[test]


def train_images(count=100):
    """Returns `count` train images (16 px, [-1, 1]) for the least-squares fit."""
    import tensorflow as tf
    from vitjax.data import digits
    images, _ = digits.load_arrays()
    train, _ = digits.split_indices()
    picked = np.random.RandomState(0).choice(train, count, replace=False)
    resized = tf.image.resize(tf.constant(images[picked]), (16, 16), method="bilinear")
    resized = tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8).numpy()
    return resized.astype(np.float32) / 255.0 * 2.0 - 1.0


def run(config, workdir):
    from vitjax import train
    config.progress_bar = False
    config.checkpoint_async = False
    train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as file:
        records = [json.loads(line) for line in file]
    return [r for r in records if "eval/top1" in r or any(k.endswith("/top1") and k.startswith("eval") for k in r)]


def evaluate_all(model, variables, images, labels):
    import jax
    from vitjax.models import snnet
    apply = jax.jit(model.apply, static_argnames="stitch")
    out = []
    for cfg in snnet.stitch_configs(model):
        logits = np.concatenate([np.asarray(apply(variables, images[i:i + 120], stitch=cfg.id)[0])
                                 for i in range(0, len(images), 120)])
        out.append(dict(id=cfg.id, kind=cfg.kind, route=[list(r) for r in cfg.route], trained=cfg.trained,
                        gflops=snnet.stitch_gflops(model, cfg.id),
                        top1=float(np.mean(np.argmax(logits, -1) == labels)) * 100))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anchor_steps", type=int, default=400)
    parser.add_argument("--stitch_steps", type=int, default=300)
    parser.add_argument("--out", default=os.path.join(REPO, "experiments", "out"))
    args = parser.parse_args()
    from vitjax import config_utils, models
    from vitjax.convert import io as convert_io
    from vitjax.convert import snnet as snnet_convert
    start = time.time()
    root = tempfile.mkdtemp(prefix="snnet_digits_")
    anchor_dirs = []
    for width, heads in zip(WIDTHS, HEADS):
        config = config_utils.load_config("configs/digits_vit.py")
        config.model = dict(num_classes=10, img_size=16, in_chans=1, drop_path_rate=0.1,
                            **anchor_options(width, heads))
        config.total_steps = args.anchor_steps
        config.eval_every_steps = 0
        config.checkpoint_every_steps = args.anchor_steps
        workdir = os.path.join(root, f"anchor_{width}")
        run(config, workdir)
        anchor_dirs.append(workdir)
    anchor_minutes = (time.time() - start) / 60

    settings = dict(anchor_models=("vit", "vit"), num_classes=10, img_size=16, in_chans=1, lora_rank=0,
                    anchor_options=tuple(anchor_options(w, h) for w, h in zip(WIDTHS, HEADS)))
    model = models.create("snnetv2_deit3_s_b", **settings)
    images, labels = test_images()
    variables = snnet_convert.from_anchors(anchor_dirs, "snnetv2_deit3_s_b", images=train_images(), **settings)
    before = evaluate_all(model, variables, images, labels)
    init_path = convert_io.save_variables(os.path.join(root, "snnet_init.msgpack"), variables,
                                          {"model_name": "snnetv2_deit3_s_b"})

    config = config_utils.load_config("configs/snnet_deit.py:runlocal")
    config.model = dict(settings, anchor_options=tuple(dict(o, drop_path_rate=0.1) for o in settings["anchor_options"]))
    config.init_from = init_path
    config.objective_kwargs = dict(flops_gap=0.0, flops_sampling_k=None)  # each distinct cost its own group
    config.input = config_utils.digits_input(16, label_smoothing=0.1)
    config.input.pp_train = "decode(channels=1)|resize(16)|random_crop(16, padding=1)|value_range(-1, 1)"
    config.total_steps = args.stitch_steps
    config.optim.lr = 5e-4
    config.optim.warmup_steps = 20
    config.eval_every_steps = 0
    config.checkpoint_every_steps = args.stitch_steps
    workdir = os.path.join(root, "snnet")
    run(config, workdir)
    from vitjax import checkpoint
    directory, step = checkpoint.find_step(workdir, None)
    trained = {"params": checkpoint.load_params(directory, step, parts=("params",))["params"]}
    after = evaluate_all(model, trained, images, labels)
    minutes = (time.time() - start) / 60

    lines = ["| id | kind | route (blocks per segment) | GFLOPs | top-1 % after LS init | top-1 % after training |",
             "|---:|---|---|---:|---:|---:|"]
    for b, a in sorted(zip(before, after), key=lambda pair: pair[0]["gflops"]):
        lines.append(f"| {a['id']} | {a['kind']}{'' if a['trained'] else ' (not trained)'} | "
                     f"{a['route'] or 'anchor ' + str(a['id'])} | {a['gflops']:.5f} | {b['top1']:.2f} | "
                     f"{a['top1']:.2f} |")
    table = "\n".join(lines)
    table += (f"\n\nAnchors: digits ViTs of width {WIDTHS[0]} and {WIDTHS[1]}, depth 4, {args.anchor_steps} steps each; "
              f"stitched net: {args.stitch_steps} steps (objective snnet). Run time {minutes:.1f} min "
              f"(anchors {anchor_minutes:.1f}) on this machine's CPUs.\n")
    results = dict(before=before, after=after, minutes=minutes, anchor_minutes=anchor_minutes,
                   anchor_steps=args.anchor_steps, stitch_steps=args.stitch_steps, widths=WIDTHS)
    path = write_outputs(args.out, "snnet_digits", table, results)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(6, 4))
    for data, style, label in ((before, "x", "after least-squares init"), (after, "o", "after SN-Net training")):
        axis.scatter([d["gflops"] * 1e3 for d in data], [d["top1"] for d in data], marker=style, label=label)
    for anchor in after[:2]:
        axis.annotate(f"anchor {anchor['id']}", (anchor["gflops"] * 1e3, anchor["top1"]), fontsize=8)
        axis.scatter([anchor["gflops"] * 1e3], [anchor["top1"]], s=120, facecolors="none", edgecolors="red")
    axis.set_xlabel("MFLOPs per image (fvcore count)")
    axis.set_ylabel("test top-1 %")
    axis.set_title("SN-Net v2 on digits: every stitch configuration")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path + ".png", dpi=100)
    print(table)
    print(f"wrote {path}.md, .json, .png")


if __name__ == "__main__":
    main()
