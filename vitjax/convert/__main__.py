"""Command line: convert PyTorch checkpoints to vitjax variables, or resample position embeddings.

    # a timm (or official MAE) checkpoint -> vitjax variables, fine-tuning resolution 384
    python -m vitjax.convert timm --model vit_base_patch16_224 --checkpoint vit_b16.pth \\
        --img-size 384 --out vit_b16_384.msgpack
    # resample a vitjax checkpoint's position embeddings to another resolution
    python -m vitjax.convert resample --model vit_base_patch16_224 --variables vit_b16.msgpack \\
        --img-size 384 --out vit_b16_384.msgpack

`--out` ending in `.msgpack` writes one file; anything else an orbax checkpoint directory.
"""
import argparse
import sys
from typing import List, Optional

import numpy as np


def _parse_setting(text: str):
    """Returns (key, value) from "key=value", the value read as a Python literal when it is one."""
    import ast
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set takes key=value, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _model_overrides(args) -> dict:
    overrides = dict(args.set or [])
    if args.img_size:
        overrides["img_size"] = args.img_size
    if args.num_classes is not None:
        overrides["num_classes"] = args.num_classes
    return overrides


def _summary(variables) -> str:
    import jax
    count = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(variables.get("params", variables)))
    return f"{count / 1e6:.2f}M parameters"


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the CLI; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m vitjax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    timm_cmd = commands.add_parser("timm", help="convert a timm / Hugging Face PyTorch checkpoint")
    timm_cmd.add_argument("--checkpoint", required=True, help=".pth, .pt, .bin or .safetensors file")
    mae_cmd = commands.add_parser("mae", help="convert an official MAE checkpoint (pretrain or fine-tuned)")
    mae_cmd.add_argument("--checkpoint", required=True, help="e.g. mae_pretrain_vit_base.pth")
    resample_cmd = commands.add_parser("resample", help="resample a vitjax checkpoint's position embeddings")
    resample_cmd.add_argument("--variables", required=True, help="a .msgpack file or orbax directory")
    for command in (timm_cmd, resample_cmd):
        command.add_argument("--model", required=True, help="a registered name (vitjax.models.list_models())")
    for command in (timm_cmd, mae_cmd, resample_cmd):
        command.add_argument("--img-size", type=int, default=None, help="target resolution (resamples posemb)")
        command.add_argument("--num-classes", type=int, default=None, help="0 drops the classifier")
        command.add_argument("--out", required=True, help="output .msgpack file or orbax directory")
        command.add_argument("--set", type=_parse_setting, action="append", metavar="KEY=VALUE",
                             help="any other model option, e.g. --set depth=6 --set global_pool=avg")
    args = parser.parse_args(argv)

    from vitjax import convert
    from vitjax.convert.io import load_variables, save_variables
    if args.command == "timm":
        variables = convert.from_timm(args.checkpoint, args.model, **_model_overrides(args))
    elif args.command == "mae":
        from vitjax.convert import mae
        variables = mae.from_official(args.checkpoint, **_model_overrides(args))
    else:
        from vitjax import models
        from vitjax.models import layers
        model = models.create(args.model, **_model_overrides(args))
        variables = load_variables(args.variables)
        params = dict(variables["params"])
        if "pos_embed" not in params:
            raise SystemExit(f"{args.variables} has no learned pos_embed to resample")
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        params["pos_embed"] = layers.resample_posemb(params["pos_embed"], model.grid_size, prefix)
        variables = dict(variables, params=params)
    path = save_variables(args.out, variables)
    print(f"wrote {path} ({_summary(variables)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
