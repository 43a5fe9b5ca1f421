"""SN-Net v2 weights: official state dicts (ziplab/SN-Netv2 `classification/snnet.py`, `SNNetv2`) -> vitjax `SNNet`,
and an SN-Net's starting weights from its two anchors' checkpoints.

Key table (official -> vitjax): `anchors.{k}.` -> `anchors_{k}/` read by the ViT table (`convert.vit`), with the
DeiT-III block names `blocks.{j}.gamma_1` / `gamma_2` (`models_v2.Layer_scale_init_Block`) as timm's
`blocks.{j}.ls1.gamma` / `ls2.gamma`; `stitch_layers.{a}.{i}.transform.weight` (out, in) / `.bias` ->
`stitch_layers_{a}_{i}/kernel` (in, out) / `bias`; with LoRA `transform.lora_A` (r, in) / `lora_B` (out, r) ->
`lora_a` (in, r) / `lora_b` (r, out). The state dict must hold the unmerged kernel (the module in train mode,
as it is saved during training).
"""
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

from vitjax.convert import common
from vitjax.convert import vit as vit_convert


def _anchor_state(state_dict: Mapping[str, np.ndarray], index: int) -> Dict[str, np.ndarray]:
    prefix = f"anchors.{index}."
    out = {}
    for key, value in state_dict.items():
        if key.startswith(prefix):
            key = key[len(prefix):]
            for old, new in ((".gamma_1", ".ls1.gamma"), (".gamma_2", ".ls2.gamma")):
                if key.endswith(old):
                    key = key[: -len(old)] + new
            out[key] = value
    return out


def convert_timm(state_dict: Mapping[str, Any], model) -> Dict[str, Any]:
    """Returns {"params": ...} for an `SNNet` from an official `SNNetv2` state dict (`from_torch`)."""
    from vitjax.models import snnet
    params: Dict[str, Any] = {}
    for index in range(2):
        anchor = snnet.AnchorPart(**model.anchor_fields(index), parent=None)
        params[f"anchors_{index}"] = vit_convert.convert_timm(_anchor_state(state_dict, index), anchor)["params"]
    table = common.KeyTable({key: value for key, value in state_dict.items() if key.startswith("stitch_layers.")})
    for source, count in enumerate(snnet.num_stitch_layers(model.depths)):
        for index in range(count):
            prefix = f"stitch_layers.{source}.{index}.transform"
            layer = {"kernel": table.get(f"{prefix}.weight", common.linear), "bias": table.get(f"{prefix}.bias")}
            if model.lora_rank:
                layer["lora_a"] = table.get(f"{prefix}.lora_A", common.linear)
                layer["lora_b"] = table.get(f"{prefix}.lora_B", common.linear)
            params[f"stitch_layers_{source}_{index}"] = layer
    table.finish()
    return common.checked(params, model)


def from_anchors(sources: Sequence[str], name: str, images: Optional[np.ndarray] = None, seed: int = 0,
                 **model_overrides) -> Dict[str, Any]:
    """Returns SN-Net variables whose anchors are loaded from `sources` (one checkpoint per anchor: a vitjax run,
    a converted file or a timm `.pth`) and whose stitching layers are fitted by least squares on `images`
    (NHWC; left at their random initialisation when None), as the official training starts.
    """
    import jax
    import jax.numpy as jnp
    from vitjax import models, weights
    from vitjax.models import snnet
    if len(sources) != 2:
        raise ValueError(f"from_anchors needs one checkpoint per anchor (2); got {len(sources)}: {list(sources)}")
    model = models.create(name, **model_overrides)
    img = model.anchor_fields(0)["img_size"]
    side = (img, img) if isinstance(img, int) else tuple(img)
    variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, side[0], side[1], model.in_chans), jnp.float32))
    variables = jax.tree.map(np.asarray, dict(variables))
    for index, source in enumerate(sources):
        fields = model.anchor_fields(index)
        pretrained = weights.load(source, model_name=model.anchor_models[index],
                                  model_overrides={**dict(model.anchor_options[index]),
                                                   "num_classes": fields["num_classes"], "img_size": fields["img_size"],
                                                   "in_chans": fields["in_chans"]})
        rules = weights.Rules(scope=f"anchors_{index}", posemb_prefix=0 if fields.get("no_embed_class") else 1)
        variables = weights.plan(variables, pretrained, rules).apply(variables)
    if images is not None:
        variables = snnet.least_squares_init(model, variables, jnp.asarray(images, jnp.float32))
    return jax.tree.map(np.asarray, dict(variables))
