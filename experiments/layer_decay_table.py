r"""Layer-wise lr decay of Swin-T and ConvNeXt-T: each layer group, its lr scale and its parameters, beside timm's.

    python experiments/layer_decay_table.py                       # layer_decay 0.75, a few seconds
    python experiments/layer_decay_table.py --layer_decay=0.65 --models=swin_tiny_patch4_window7_224

The groups are the models' own (`model.layer_ids`, `model.no_weight_decay()`, see
vitjax/models/param_groups.py), read from `jax.eval_shape` params (no weights are made). timm's columns are
`timm.optim.param_groups_layer_decay` on `timm.create_model(name)` with its `no_weight_decay()`: the
parameters it puts at the same lr scale, and those of them it does not weight-decay.
Writes experiments/out/layer_decay_swin_convnext.{md,json}.
"""
import argparse
import collections
import os
import re
import sys

import torch  # noqa: F401  (torch before anything that may import TensorFlow)
import timm
from timm.optim import param_groups_layer_decay

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from experiment_io import write_outputs  # noqa: E402
from vitjax import models, optim  # noqa: E402

MODELS = ("swin_tiny_patch4_window7_224", "convnext_tiny")


def module_of(path: str) -> str:
    """Returns the module a param belongs to for the table: "layers_1/blocks_0", "patch_embed", "stem_0", ..."""
    parts = path.split("/")
    return "/".join(parts[:2]) if re.search(r"_\d+$", parts[0]) and len(parts) > 2 else parts[0]


def groups(name: str, layer_decay: float) -> list:
    """Returns one row per layer id of `name`: modules, lr scale, params and params not decayed, ours and timm's."""
    model = models.create(name)
    size = model.img_size if isinstance(model.img_size, int) else model.img_size[0]
    boxed = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, size, size, 3))))["params"]
    params, axes = nn.meta.unbox(boxed), nn.get_partition_spec(boxed)
    ids, num_layers = model.layer_ids(params)
    decayed = optim.param_paths(optim.decay_mask_fn(model.no_weight_decay(), axes)(params))
    rows = {layer_id: dict(layer_id=layer_id, scale=layer_decay ** (num_layers + 1 - layer_id), modules=[],
                           params=0, not_decayed=0, timm_params=0, timm_not_decayed=0)
            for layer_id in range(num_layers + 2)}
    for path, leaf in optim.param_paths(params).items():
        row = rows[ids[path]]
        if module_of(path) not in row["modules"]:
            row["modules"].append(module_of(path))
        count = int(np.prod(leaf.shape))
        row["params"] += count
        row["not_decayed"] += 0 if decayed[path] else count
    reference = timm.create_model(name, pretrained=False)
    timm_by_scale = collections.Counter()
    for group in param_groups_layer_decay(reference, weight_decay=0.05, layer_decay=layer_decay,
                                          no_weight_decay_list=getattr(reference, "no_weight_decay", set)()):
        key = (round(group["lr_scale"], 12), group["weight_decay"] > 0)
        timm_by_scale[key] += sum(p.numel() for p in group["params"])
    for row in rows.values():
        decayed_count = timm_by_scale.pop((round(row["scale"], 12), True), 0)
        row["timm_not_decayed"] = timm_by_scale.pop((round(row["scale"], 12), False), 0)
        row["timm_params"] = decayed_count + row["timm_not_decayed"]
    if timm_by_scale:
        raise SystemExit(f"timm has lr scales vitjax does not: {dict(timm_by_scale)}")
    return list(rows.values())


def markdown(tables: dict, layer_decay: float) -> str:
    """Returns one markdown table per model."""
    lines = []
    for name, rows in tables.items():
        num_layers = len(rows) - 2
        lines += [f"### `{name}`: layer_decay {layer_decay}, {num_layers} layers + stem + head", "",
                  "| id | params of | lr scale | #params | not decayed | timm #params | timm not decayed |",
                  "|---:|---|---:|---:|---:|---:|---:|"]
        for row in rows:
            power = num_layers + 1 - row["layer_id"]
            lines.append(f"| {row['layer_id']} | {', '.join(row['modules'])} | {layer_decay}^{power} = "
                         f"{row['scale']:.4g} | {row['params']:,} | {row['not_decayed']:,} | {row['timm_params']:,} | "
                         f"{row['timm_not_decayed']:,} |")
        total = sum(row["params"] for row in rows)
        lines += [f"| | total | | {total:,} | {sum(row['not_decayed'] for row in rows):,} | "
                  f"{sum(row['timm_params'] for row in rows):,} | {sum(row['timm_not_decayed'] for row in rows):,} |",
                  ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer_decay", type=float, default=0.75)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated registered names")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = parser.parse_args()
    tables = {name: groups(name, args.layer_decay) for name in args.models.split(",")}
    table = markdown(tables, args.layer_decay)
    write_outputs(args.out, "layer_decay_swin_convnext", table, {"layer_decay": args.layer_decay, "models": tables})
    print(table)


if __name__ == "__main__":
    main()
