r"""Command line: convert PyTorch checkpoints to vitjax variables, or resample position embeddings.

    # a timm / Hugging Face checkpoint -> vitjax variables, fine-tuning resolution 384
    python -m vitjax.convert --source=timm --model=vit_base_patch16_224 --checkpoint=vit_b16.pth \
        --img_size=384 --out=vit_b16_384.msgpack
    # an official MAE checkpoint (pretrain with decoder, encoder-only or fine-tuned)
    python -m vitjax.convert --source=mae --checkpoint=mae_pretrain_vit_base.pth --out=mae_b16.msgpack
    # resample a vitjax checkpoint's position embeddings to another resolution
    python -m vitjax.convert --source=resample --checkpoint=vit_b16.msgpack --img_size=384 \
        --out=vit_b16_384.msgpack
    # an open_clip CLIP (or with --source=transformers a SigLIP) checkpoint -> vitjax CLIP variables
    python -m vitjax.convert --source=open_clip --model=clip_vit_b32 --checkpoint=open_clip_model.safetensors \
        --out=clip_b32.msgpack

Flags: --source (timm | mae | resample | open_clip | transformers), --checkpoint (a .pth / .pt / .bin /
.safetensors file; for resample a .msgpack or orbax directory written here), --model (a registered name;
needed for timm, open_clip and transformers; for resample taken from the checkpoint's meta when absent),
--img_size, --num_classes (0 drops the classifier), --set KEY=VALUE (repeatable: any other model option,
e.g. --set=depth=6), --out.

`--out` ending in `.msgpack` writes one file; anything else an orbax checkpoint directory. Either
carries a `meta` (`vitjax.convert.io`): the model name, the model options used, the weights'
preprocessing (`pretrained_cfg`, input size set to the converted resolution) and the source file,
so that `python -m vitjax.evaluate --init_from=OUT` and `config.init_from=OUT` need nothing else.
Bad input stops with a message naming the valid choices.
"""
import os
from typing import Any, Dict, List, Optional, Tuple

from absl import flags

from vitjax import cli as cli_lib

SOURCES = ("timm", "mae", "resample", "open_clip", "transformers")


def define_flags(flag_values: flags.FlagValues) -> None:
    """Defines this command's flags in `flag_values` (the global FLAGS when run as a program)."""
    flags.DEFINE_enum("source", None, SOURCES, "What --checkpoint is: a timm / Hugging Face PyTorch checkpoint, an "
                      "official MAE checkpoint, a vitjax checkpoint whose position embeddings to resample, an "
                      "open_clip CLIP or a transformers SigLIP checkpoint.",
                      flag_values=flag_values)
    flags.DEFINE_string("checkpoint", None, "Input: .pth, .pt, .bin or .safetensors (timm, mae); .msgpack or orbax "
                        "directory (resample).", flag_values=flag_values)
    flags.DEFINE_string("model", None, "A registered model name (vitjax.models.list_models()).",
                        flag_values=flag_values)
    flags.DEFINE_integer("img_size", None, "Target resolution (position embeddings resampled).",
                         flag_values=flag_values)
    flags.DEFINE_integer("num_classes", None, "Classifier size; 0 drops the classifier.", flag_values=flag_values)
    flags.DEFINE_multi_string("set", [], "KEY=VALUE: any other model option (a Python literal where it parses as "
                              "one), e.g. --set=depth=6 --set=global_pool=avg.", flag_values=flag_values)
    flags.DEFINE_string("out", None, "Output .msgpack file or orbax directory.", flag_values=flag_values)
    flags.mark_flags_as_required(["source", "checkpoint", "out"], flag_values=flag_values)


def model_overrides(settings: List[str], img_size: Optional[int] = None,
                    num_classes: Optional[int] = None) -> Dict[str, Any]:
    """Returns the model options of --set KEY=VALUE items, --img_size and --num_classes."""
    overrides = dict(cli_lib.parse_setting(item) for item in settings)
    if img_size:
        overrides["img_size"] = img_size
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    return overrides


def _summary(variables) -> str:
    import jax
    import numpy as np
    count = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(variables.get("params", variables)))
    return f"{count / 1e6:.2f}M parameters"


def _pretrained_cfg(cfg: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    """Returns `cfg` with the input size of the converted model (img_size, in_chans)."""
    from vitjax.data import presets
    img_size = overrides.get("img_size")
    return presets.with_input_size(cfg, img_size if isinstance(img_size, (int, tuple, list)) else None,
                                   overrides.get("in_chans"))


def convert(source: str, checkpoint: str, out: str, *, model: Optional[str] = None,
            overrides: Optional[Dict[str, Any]] = None) -> Tuple[str, Dict[str, Any]]:
    """Returns (the path written, its meta) after converting `checkpoint` as `source` says (see the module doc)."""
    from vitjax import models
    from vitjax.convert import io
    if source not in SOURCES:
        raise ValueError(f"Unknown source {source!r}; valid choices: {list(SOURCES)}")
    overrides = dict(overrides or {})
    if model is not None:
        models.get_entry(model)  # an unknown name fails here, listing the valid ones
    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f"--checkpoint: nothing at {os.path.abspath(checkpoint)}")
    meta: Dict[str, Any] = {"source": os.path.abspath(checkpoint), "converted_from": source}
    if source == "timm":
        if not model:
            raise ValueError(f"--source=timm needs --model (a registered name; e.g. {models.list_models('vit_')[:4]}"
                             " ...; see vitjax.models.list_models())")
        from vitjax import convert as convert_lib
        variables = convert_lib.from_timm(checkpoint, model, **overrides)
        meta.update(model_name=model, model=overrides,
                    pretrained_cfg=_pretrained_cfg(models.pretrained_cfg(model), overrides))
    elif source in ("open_clip", "transformers"):
        clip_names = [name for name in models.list_models() if models.model_family(name) == "clip"]
        if not model:
            raise ValueError(f"--source={source} needs --model (one of {clip_names})")
        from vitjax import convert as convert_lib
        converter = convert_lib.from_open_clip if source == "open_clip" else convert_lib.from_transformers
        variables = converter(checkpoint, model, **overrides)
        meta.update(model_name=model, model=overrides,
                    pretrained_cfg=_pretrained_cfg(models.pretrained_cfg(model), overrides))
    elif source == "mae":
        from vitjax.convert import mae
        from vitjax.models.registry import make_pretrained_cfg
        module, variables = mae.load_official(checkpoint, **overrides)
        encoder = getattr(module, "encoder", module)
        size = encoder.img_size
        # MAE's own evaluation: ImageNet statistics, resize to 256 / centre crop 224 (crop 0.875), bicubic.
        cfg = make_pretrained_cfg(img_size=size, in_chans=encoder.in_chans)
        meta.update(model_name=model, model=overrides, pretrained_cfg=cfg)
    else:
        from vitjax.models import layers
        variables, input_meta = io.load_variables_and_meta(checkpoint)
        model = model or input_meta.get("model_name")
        if not model:
            raise ValueError(f"{checkpoint} names no model in its meta: give --model (see vitjax.models.list_models())")
        overrides = {**dict(input_meta.get("model") or {}), **overrides}
        module = models.create(model, **overrides)
        params = dict(variables["params"])
        if "pos_embed" not in params:
            raise ValueError(f"{checkpoint} has no learned pos_embed to resample")
        prefix = 0 if getattr(module, "no_embed_class", False) else module.num_prefix_tokens
        params["pos_embed"] = layers.resample_posemb(params["pos_embed"], module.grid_size, prefix)
        variables = dict(variables, params=params)
        cfg = input_meta.get("pretrained_cfg") or models.pretrained_cfg(model)
        meta.update({**input_meta, "model_name": model, "model": overrides,
                     "pretrained_cfg": _pretrained_cfg(cfg, overrides),
                     "resampled_from": os.path.abspath(checkpoint)})
        meta["source"] = input_meta.get("source", meta["source"])
    path = io.save_variables(out, variables, meta)
    print(f"wrote {path} ({_summary(variables)})")
    return path, meta


def run(flag_values: flags.FlagValues) -> None:
    """Converts as the parsed `flag_values` say; exits with a one-line message on bad input."""
    overrides = cli_lib.exit_on_user_error(
        lambda: model_overrides(flag_values.set, flag_values.img_size, flag_values.num_classes))
    cli_lib.exit_on_user_error(lambda: convert(flag_values.source, flag_values.checkpoint, flag_values.out,
                                               model=flag_values.model, overrides=overrides))


def cli(args: List[str]) -> None:
    """Runs the command with `args` (flags, without the program name) in this process."""
    cli_lib.cli("vitjax.convert", define_flags, run, args)


if __name__ == "__main__":
    cli_lib.main(define_flags, run)
