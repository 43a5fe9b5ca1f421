"""Stitchable Neural Networks v2 (Pan et al. 2023, "Stitched ViTs are Flexible Vision Backbones").

Two pretrained ViTs of different widths (the anchors) are joined by stitching layers, linear maps from one
anchor's tokens to the other's, so one set of weights runs many networks between the two anchors' costs:

    model = vitjax.models.create("snnetv2_deit3_s_b", num_classes=1000)
    logits, _ = model.apply(variables, images, stitch=5)          # static id: one compiled program per id
    for cfg in stitch_configs(model): print(cfg.id, cfg.kind, cfg.route, stitch_gflops(model, cfg.id))

Stitch configurations (numbered as the official `get_stitch_configs_bidirection`, anchor 0 the shallower):
0 and 1 are the anchors alone; "sl" runs anchor 0 up to block i, a stitching layer, then anchor 1 from
block (i+1) * depth1 / depth0; "ls" the other way (anchor 1 up to block i, anchor 0 from the block its
nearest-neighbour depth map gives); "lsl" and "sls" stitch twice. Training samples one configuration per
step by FLOPs group (`sampling_probabilities`); `least_squares_init` fits every stitching layer to the
anchors' features, as the paper initialises them.

Each anchor is a `vit.VisionTransformer` whose parameters sit unchanged under `anchors_0` / `anchors_1`, so
any ViT checkpoint of that architecture loads into it. Stitching layers are `stitch_layers_{a}_{i}` (a: the
anchor they leave); with `lora_rank` > 0 (v2's default, 64) the least-squares kernel stays frozen and a
low-rank update (lora_a, lora_b) and the bias train, as the official `Linear` with r > 0.
"""
import dataclasses
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import layers, param_groups, vit
from vitjax.models.registry import register_model

STITCH_KINDS = ("anchor", "sl", "ls", "lsl", "sls")


@dataclasses.dataclass(frozen=True)
class StitchConfig:
    """One stitched network: which anchors run which blocks, joined by which stitching layers."""
    id: int
    kind: str                                  # one of STITCH_KINDS
    anchors: Tuple[int, ...]                   # anchor of each segment, e.g. (0, 1)
    route: Tuple[Tuple[int, int], ...]         # per segment, blocks begin..end inclusive (end may pass the depth)
    stitch_layers: Tuple[Tuple[int, int], ...]  # (anchor it leaves, index) after each segment but the last
    trained: bool                              # in the official training pool (`all_cfgs`)


def _nearest_map(depth_from: int, depth_to: int) -> List[int]:
    """Returns torch's `interpolate(mode="nearest")` index map from depth_to positions to depth_from blocks."""
    if depth_from == depth_to:
        return list(range(depth_to))
    if depth_to == 2 * depth_from:
        return [index >> 1 for index in range(depth_to)]
    scale = np.float32(depth_from) / np.float32(depth_to)  # torch computes the scale in fp32
    return [min(int(np.floor(np.float32(index) * scale)), depth_from - 1) for index in range(depth_to)]


def enumerate_stitches(depths: Sequence[int]) -> List[StitchConfig]:
    """Returns every stitch configuration of anchors with `depths` (shallower first), in the official order."""
    small, large = int(depths[0]), int(depths[1])
    if small > large or large % small:
        raise ValueError(f"SN-Net needs anchor 0 no deeper than anchor 1 and depth1 a multiple of depth0; got {depths}")
    ratio = large // small
    configs: List[Tuple[str, Tuple[int, ...], Tuple[Tuple[int, int], ...], Tuple[Tuple[int, int], ...]]] = [
        ("anchor", (0,), (), ()), ("anchor", (1,), (), ())]
    sl = [(i, (i + 1) * ratio, i) for i in range(small)]            # (front, end, stitch layer)
    end_map = _nearest_map(small, large)
    ls = [(i, end_map[i] + 1, i // ratio) for i in range(large - 1) if small == large or i % 2 == 1]
    for front, end, layer in sl:
        configs.append(("sl", (0, 1), ((0, front), (end, large)), ((0, layer),)))
    for front, end, layer in ls:
        configs.append(("ls", (1, 0), ((0, front), (end, small)), ((1, layer),)))
    for front1, end1, layer1 in ls:
        for front2, end2, layer2 in sl:
            if layer2 != small - 1 and front2 >= end1:
                configs.append(("lsl", (1, 0, 1), ((0, front1), (end1, front2), (end2, large)),
                                ((1, layer1), (0, layer2))))
    for front1, end1, layer1 in sl:
        for front2, end2, layer2 in ls:
            if front2 >= end1:
                configs.append(("sls", (0, 1, 0), ((0, front1), (end1, front2), (end2, small)),
                                ((0, layer1), (1, layer2))))
    out = []
    for index, (kind, anchors, route, stitch_layers) in enumerate(configs):
        # The official pool leaves out the small->large stitch after the small anchor's last block (it
        # hard-codes block 11 of a 12-block anchor; here: the last block, whatever the depth).
        trained = not (kind == "sl" and route[0][1] == small - 1)
        out.append(StitchConfig(index, kind, anchors, route, stitch_layers, trained))
    return out


def num_stitch_layers(depths: Sequence[int]) -> Tuple[int, int]:
    """Returns the stitching layers leaving anchor 0 (small->large) and anchor 1 (large->small)."""
    small, large = int(depths[0]), int(depths[1])
    return small, len([i for i in range(large - 1) if small == large or i % 2 == 1])


def anchor_settings(name: str, options: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Returns the `VisionTransformer` settings of the registered ViT `name` with `options`; raises if not a ViT."""
    from vitjax import models
    entry = models.get_entry(name)
    if entry.module_class is not vit.VisionTransformer:
        valid = [other for other in models.list_models() if models.get_entry(other).module_class
                 is vit.VisionTransformer]
        raise ValueError(f"SN-Net anchors must be ViTs (vit.VisionTransformer); {name!r} is a "
                         f"{entry.module_class.__name__}. Valid choices: {valid}")
    settings = {**entry.defaults, **dict(options or {})}
    if "variant" in settings:
        variant = settings.pop("variant")
        settings = {**vit.decode_variant(variant), **settings}
    fields = {field.name for field in dataclasses.fields(vit.VisionTransformer)} - {"parent", "name"}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise ValueError(f"Unknown anchor option(s) {unknown} for {name!r}; valid choices: {sorted(fields)}")
    return settings


class AnchorPart(vit.VisionTransformer):
    """A ViT run in parts (embedding, a range of blocks, norm and head) with the ViT's own parameter names."""

    @nn.compact
    def __call__(self, x: jax.Array, part: str = "all", begin: int = 0, end: int = -1,  # type: ignore[override]
                 train: bool = False) -> Tuple[jax.Array, Any]:
        """Returns (output, per-block tokens): part "embed" (images -> tokens), "blocks" (begin..end-1), "head"."""
        if part in ("embed", "all"):
            x = self.embed(x, train)
            if part == "embed":
                return x, []
        per_block = []
        if part in ("blocks", "all"):
            rates = np.linspace(0.0, self.drop_path_rate, self.depth)
            stop = self.depth if part == "all" or end < 0 else min(end, self.depth)
            for index in range(begin, stop):
                x, _ = vit.Block(drop_path_rate=float(rates[index]), name=f"blocks_{index}",
                                 **self.block_kwargs())(x, train)
                per_block.append(x)
            if part == "blocks":
                return x, per_block
        use_fc_norm = self.global_pool == "avg" if self.fc_norm is None else self.fc_norm
        if not use_fc_norm:
            x = layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, name="norm")(x)
        pooled = layers.pool_tokens(x, self.global_pool, self.num_prefix_tokens)
        if use_fc_norm:
            pooled = layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, name="fc_norm")(pooled)
        pooled = nn.Dropout(self.drop_rate)(pooled, deterministic=not train)
        logits = layers.classifier_head(self.num_classes, self.head_zero_init, self.dtype, self.param_dtype)(pooled)
        return (logits, pooled), per_block


class StitchingLayer(nn.Module):
    """A linear map between anchor widths; with `lora_rank` > 0 its kernel is frozen and a low-rank update trains."""
    features: int
    lora_rank: int = 0
    lora_alpha: float = 1.0
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns x @ kernel + bias (+ scaled x @ lora_a @ lora_b)."""
        width = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (width, self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        if self.lora_rank:
            # The official LoRA Linear freezes the least-squares weight (requires_grad=False); the bias trains.
            kernel = jax.lax.stop_gradient(kernel)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)
        if self.lora_rank:
            bound = 1.0 / math.sqrt(width)  # kaiming_uniform(a=sqrt(5)) of an (r, in) matrix, as the official init
            symmetric = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)  # noqa: E731
            lora_a = self.param("lora_a", symmetric, (width, self.lora_rank), self.param_dtype)
            lora_b = self.param("lora_b", nn.initializers.zeros, (self.lora_rank, self.features), self.param_dtype)
            update = jnp.dot(jnp.dot(x.astype(self.dtype), lora_a.astype(self.dtype)), lora_b.astype(self.dtype))
            y = y + update * (self.lora_alpha / self.lora_rank)
        return y


class SNNet(nn.Module):
    """SN-Net v2 classifier over two ViT anchors; `__call__(images, stitch=id)` returns (logits, intermediates).

    `anchor_models` are registered ViT names (or "vit" with a `variant` option), `anchor_options` their
    per-anchor settings (e.g. drop_path_rate); num_classes, img_size, in_chans, attention_impl and dtypes are
    shared. `stitch` None runs `default_stitch` (anchor 1, the larger). `stitch_kinds` picks the kinds in the
    training pool (the official include_sl / include_ls / include_lsl / include_sls).
    """
    anchor_models: Tuple[str, str] = ("vit", "vit")
    anchor_options: Tuple[Any, Any] = ({"variant": "S/16"}, {"variant": "B/16"})
    num_classes: int = 1000
    img_size: Any = 224
    in_chans: int = 3
    lora_rank: int = 0
    default_stitch: int = 1
    stitch_kinds: Tuple[str, ...] = STITCH_KINDS
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    def anchor_fields(self, index: int) -> Dict[str, Any]:
        """Returns the full `VisionTransformer` settings of anchor `index` (shared settings applied)."""
        settings = anchor_settings(self.anchor_models[index], self.anchor_options[index])
        return {**settings, "num_classes": self.num_classes, "img_size": self.img_size, "in_chans": self.in_chans,
                "attention_impl": self.attention_impl, "dtype": self.dtype, "param_dtype": self.param_dtype}

    @property
    def depths(self) -> Tuple[int, int]:
        """Returns the two anchors' depths."""
        return tuple(int(self.anchor_fields(index)["depth"]) for index in range(2))  # type: ignore[return-value]

    @property
    def widths(self) -> Tuple[int, int]:
        """Returns the two anchors' widths."""
        return tuple(int(self.anchor_fields(index)["embed_dim"]) for index in range(2))  # type: ignore[return-value]

    def validate(self) -> None:
        """Raises ValueError naming the valid choices if the two anchors cannot be stitched."""
        if len(self.anchor_models) != 2 or len(self.anchor_options) != 2:
            raise ValueError(f"SN-Net stitches exactly two anchors; got anchor_models={self.anchor_models}")
        unknown = sorted(set(self.stitch_kinds) - set(STITCH_KINDS[1:]) - {"anchor"})
        if unknown:
            raise ValueError(f"Unknown stitch_kinds {unknown}; valid choices: {list(STITCH_KINDS)}")
        fields = [self.anchor_fields(index) for index in range(2)]
        models = [AnchorPart(**settings, parent=None) for settings in fields]
        for model in models:
            model.validate()
        problems = []
        for field, why in (("scan", "blocks are run one by one"), ("remat", "blocks are run one by one"),
                           ("distilled", "the official anchors have one head"),
                           ("token_reduction", "stitched token counts must agree"), ("tome", "as token_reduction"),
                           ("adapt", "adaptation is not supported here"),
                           ("representation_size", "the head is a plain classifier"),
                           ("pre_norm", "the CLIP tower is not an SN-Net anchor")):
            for index, model in enumerate(models):
                if getattr(model, field):
                    problems.append(f"anchor {index} has {field}={getattr(model, field)!r} ({why})")
        for index, model in enumerate(models):
            if model.global_pool not in ("token", "avg"):
                problems.append(f"anchor {index} global_pool={model.global_pool!r}; valid choices: ['token', 'avg']")
        if models[0].grid_size != models[1].grid_size or models[0].num_prefix_tokens != models[1].num_prefix_tokens:
            problems.append(f"token sequences differ: grids {models[0].grid_size} / {models[1].grid_size}, prefix "
                            f"tokens {models[0].num_prefix_tokens} / {models[1].num_prefix_tokens} (patch_size and "
                            "class_token must agree)")
        depths = (models[0].depth, models[1].depth)
        if depths[0] > depths[1] or depths[1] % depths[0]:
            problems.append(f"depths {depths}: anchor 0 must be the shallower and depth1 a multiple of depth0")
        if problems:
            raise ValueError("Incompatible SN-Net anchors:\n  " + "\n  ".join(problems))
        self.check_stitch(self.default_stitch)

    def check_stitch(self, stitch: int) -> StitchConfig:
        """Returns the configuration `stitch`; raises ValueError naming the valid ids if there is none."""
        configs = enumerate_stitches(self.depths)
        if isinstance(stitch, bool) or not isinstance(stitch, (int, np.integer)) or not 0 <= stitch < len(configs):
            raise ValueError(f"Unknown stitch id {stitch!r}; valid choices: 0..{len(configs) - 1} "
                             f"(0, 1: the anchors; see snnet.stitch_configs)")
        return configs[int(stitch)]

    def setup(self):
        self.anchors = [AnchorPart(**self.anchor_fields(index)) for index in range(2)]
        counts = num_stitch_layers(self.depths)
        widths = self.widths
        self.stitch_layers = [
            [StitchingLayer(widths[1 - source], self.lora_rank, dtype=self.dtype, param_dtype=self.param_dtype)
             for _ in range(counts[source])] for source in range(2)]

    def block_features(self, images: jax.Array) -> Tuple[List[jax.Array], List[jax.Array]]:
        """Returns each anchor's per-block output tokens (eval mode), for `least_squares_init`."""
        out = []
        for anchor in self.anchors:
            x, _ = anchor(images, "embed")
            _, per_block = anchor(x, "blocks", 0, -1)
            out.append(per_block)
        return out[0], out[1]

    def __call__(self, images: jax.Array, train: bool = False, stitch: Optional[int] = None
                 ) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (logits, {"pre_logits"}) of the stitched network `stitch` (a Python int; None: default_stitch)."""
        config = self.check_stitch(self.default_stitch if stitch is None else stitch)
        if self.is_initializing():
            # Every parameter is created whatever the stitch: both anchors whole, and every stitching layer.
            for index, anchor in enumerate(self.anchors):
                anchor(images, "all", train=False)
                for layer in self.stitch_layers[index]:
                    layer(jnp.zeros((1, 1, self.widths[index]), self.dtype))
        first = self.anchors[config.anchors[0]]
        x, _ = first(images, "embed", train=train)
        for segment, (anchor, (begin, end)) in enumerate(zip(config.anchors, config.route)):
            if config.kind == "anchor":
                break
            # The official route's end is inclusive (`selective_forward` runs blocks begin..end).
            x, _ = self.anchors[anchor](x, "blocks", begin, end + 1, train=train)
            if segment < len(config.stitch_layers):
                source, index = config.stitch_layers[segment]
                x = self.stitch_layers[source][index](x)
        last = self.anchors[config.anchors[-1]]
        if config.kind == "anchor":
            x, _ = last(x, "blocks", 0, -1, train=train)
        (logits, pooled), _ = last(x, "head", train=train)
        return logits, {"pre_logits": pooled}

    # Parameter groups: each anchor's as the ViT's; stitching layers in the last group (trained from scratch).
    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns regexes of param paths not weight-decayed: the anchors' tokens and position embeddings,
        and the frozen least-squares kernels when LoRA trains instead."""
        patterns = [r"^anchors_\d+/(?:pos_embed|cls_token|reg_token|dist_token)$"]
        if self.lora_rank:
            patterns.append(r"^stitch_layers_\d+_\d+/kernel$")
        return tuple(patterns)

    def group_matcher(self) -> param_groups.Matcher:
        """Returns a timm-style matcher: the anchors' stems first, then their blocks by index, then the rest."""
        return dict(stem=r"^anchors_\d+/(?:cls_token|pos_embed|patch_embed)",
                    blocks=[(r"^anchors_\d+/blocks_(\d+)", None),
                            (r"^(?:anchors_\d+/norm|anchors_\d+/fc_norm|stitch_layers)",
                             (param_groups.MERGE_WITH_PREVIOUS,))])

    def layer_ids(self, params) -> Tuple[Dict[str, param_groups.LayerIds], int]:
        """Returns ({path: layer id}, num_layers) for layer-wise lr decay, numbered by `group_matcher`."""
        return param_groups.layer_ids_from_matcher(params, self.group_matcher())


# --- the stitch configurations and their cost ------------------------------------------------------------------

def stitch_configs(model: SNNet) -> List[StitchConfig]:
    """Returns every stitch configuration of `model` (ids are list positions; `trained` marks the training pool)."""
    configs = enumerate_stitches(model.depths)
    return [dataclasses.replace(cfg, trained=cfg.trained and cfg.kind in model.stitch_kinds) for cfg in configs]


def _anchor_costs(settings: Mapping[str, Any]) -> Dict[str, float]:
    """Returns multiply-accumulates of a ViT's parts, counted as fvcore counts them (norms: 5 per element)."""
    img = layers.to_2tuple(settings.get("img_size", 224))
    patch = layers.to_2tuple(settings.get("patch_size", 16))
    grid = img[0] // patch[0] * (img[1] // patch[1])
    prefix = int(settings.get("class_token", True)) + int(settings.get("distilled", False))
    tokens, width = grid + prefix, int(settings["embed_dim"])
    hidden = int(settings.get("mlp_dim") or width * settings.get("mlp_ratio", 4.0))
    block = tokens * (4 * width * width + 2 * width * hidden) + 2 * tokens * tokens * width + 2 * 5 * tokens * width
    embed = grid * width * settings.get("in_chans", 3) * patch[0] * patch[1]
    pool = settings.get("global_pool", "token")
    use_fc_norm = pool == "avg" if settings.get("fc_norm") is None else settings.get("fc_norm")
    head = (5 * width if use_fc_norm else 5 * tokens * width) + width * int(settings.get("num_classes", 1000))
    return dict(tokens=tokens, width=width, embed=embed, block=block, head=head)


def stitch_macs(model: SNNet, stitch: int) -> float:
    """Returns the multiply-accumulates of one image through `stitch` (fvcore's count, the paper's "FLOPs")."""
    config = model.check_stitch(stitch)
    costs = [_anchor_costs(model.anchor_fields(index)) for index in range(2)]
    depths = model.depths
    total = costs[config.anchors[0]]["embed"] + costs[config.anchors[-1]]["head"]
    if config.kind == "anchor":
        return float(total + depths[config.anchors[0]] * costs[config.anchors[0]]["block"])
    for anchor, (begin, end) in zip(config.anchors, config.route):
        total += max(0, min(end, depths[anchor] - 1) - begin + 1) * costs[anchor]["block"]
    for source, _ in config.stitch_layers:
        total += costs[source]["tokens"] * costs[0]["width"] * costs[1]["width"]  # a merged LoRA adds nothing
    return float(total)


def stitch_gflops(model: SNNet, stitch: int) -> float:
    """Returns `stitch_macs` / 1e9: the GFLOPs the paper and its code report per image."""
    return stitch_macs(model, stitch) / 1e9


def sampling_probabilities(model: SNNet, flops_gap: float = 1.0, flops_sampling_k: Optional[float] = None
                           ) -> np.ndarray:
    """Returns the training probability of every stitch id: a FLOPs group at random, then a member at random.

    Groups as the official `group_subnets_by_flops`: configurations sorted by GFLOPs start a new group when
    more than `flops_gap` from the group's first; groups are equally likely, or with `flops_sampling_k`
    weighted (i / k + 1 / #groups) towards the costlier ones.
    """
    configs = [cfg for cfg in stitch_configs(model) if cfg.trained]
    gflops = {cfg.id: stitch_gflops(model, cfg.id) for cfg in configs}
    groups: List[List[int]] = []
    last = 0.0
    for stitch_id in sorted(gflops, key=lambda key: (gflops[key], key)):
        if abs(last - gflops[stitch_id]) > flops_gap or not groups:
            groups.append([stitch_id])
            last = gflops[stitch_id]
        else:
            groups[-1].append(stitch_id)
    if flops_sampling_k:
        weights = np.array([index / flops_sampling_k + 1 / len(groups) for index in range(len(groups))])
    else:
        weights = np.ones(len(groups))
    weights = weights / weights.sum()
    probs = np.zeros(len(stitch_configs(model)))
    for weight, group in zip(weights, groups):
        probs[group] = weight / len(group)
    return probs


# --- least-squares initialisation of the stitching layers ------------------------------------------------------

def least_squares_fit(front: jax.Array, end: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Returns (kernel (C_front, C_end), bias (C_end,)) minimising |[front, 1] @ [kernel; bias] - end| by pinv."""
    front = front.reshape(-1, front.shape[-1])
    end = end.reshape(-1, end.shape[-1])
    if front.shape[0] != end.shape[0]:
        raise ValueError(f"least squares needs as many front as end tokens: {front.shape[0]} != {end.shape[0]}")
    ones = jnp.concatenate([front, jnp.ones((front.shape[0], 1), front.dtype)], axis=1)
    # torch.linalg.pinv's default cut-off (max(M, N) * eps of the largest singular value), as the official code.
    rtol = max(ones.shape) * jnp.finfo(ones.dtype).eps
    solution = jnp.linalg.pinv(ones, rtol=rtol) @ end.astype(ones.dtype)
    return solution[:-1], solution[-1]


def least_squares_init(model: SNNet, variables: Mapping[str, Any], images: jax.Array) -> Dict[str, Any]:
    """Returns `variables` with every stitching layer fitted by least squares to the anchors' features on `images`.

    As the official `initialize_stitching_weights`: the layer used by a 2-way configuration maps the front
    anchor's tokens after its block `front` to the end anchor's tokens after block `end - 1` (all tokens of
    all images, class token included). Features are taken in eval mode (the official code runs them in
    train mode, with drop path). LoRA factors are left as they are.
    """
    features = model.apply(variables, images, method=SNNet.block_features)
    params = jax.tree.map(lambda leaf: leaf, dict(variables["params"]))
    for config in enumerate_stitches(model.depths):
        if config.kind not in ("sl", "ls"):
            continue
        front_anchor, end_anchor = config.anchors
        front, end = config.route[0][1], config.route[1][0]
        kernel, bias = least_squares_fit(features[front_anchor][front], features[end_anchor][end - 1])
        source, index = config.stitch_layers[0]
        name = f"stitch_layers_{source}_{index}"
        layer = dict(params[name])
        layer["kernel"] = kernel.astype(layer["kernel"].dtype)
        layer["bias"] = bias.astype(layer["bias"].dtype)
        params[name] = layer
    return {**variables, "params": params}


# --- registry: the official configurations (classification/config/deit_stitching_snnetv2_*.json) ----------------

# DeiT-III anchors (`models_v2.deit_*_patch16_LS`): LayerScale 1e-4, the class token outside the position embedding.
_DEIT3 = dict(init_values=1e-4, no_embed_class=True)
_OFFICIAL = {
    "snnetv2_deit3_s_b": ("S/16", "B/16"),
    "snnetv2_deit3_s_l": ("S/16", "L/16"),
    "snnetv2_deit3_b_l": ("B/16", "L/16"),
}
for _name, (_small, _large) in _OFFICIAL.items():
    register_model(_name, SNNet, family="snnet", anchor_models=("vit", "vit"),
                   anchor_options=({"variant": _small, **_DEIT3}, {"variant": _large, **_DEIT3}), lora_rank=64,
                   pretrained_cfg=dict(crop_pct=1.0))
