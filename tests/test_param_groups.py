"""Parameter groups owned by the models: every family's layer ids and no-weight-decay list give the
optimizer timm's `param_groups_layer_decay` (same params at each lr scale, same params undecayed)."""
import collections
import math

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from timm.models._manipulate import group_with_matcher  # noqa: E402
from timm.optim import param_groups_layer_decay  # noqa: E402

from vitjax import config_utils, models, objectives, optim  # noqa: E402
from vitjax.models import param_groups  # noqa: E402
from vitjax.objectives.base import Objective  # noqa: E402

DECAY = 0.75

# The matcher timm's MetaFormer would need (it declares none; see MetaFormer.layer_ids), in timm's names.
METAFORMER_MATCHER = dict(stem=r"^stem", blocks=[(r"^stages\.(\d+)\.downsample", (0,)),
                                                 (r"^stages\.(\d+)\.blocks\.(\d+)", None)])

# name -> (overrides, first block's path prefix, last block's, number of blocks = num_layers)
CASES = {
    "vit_tiny_patch16_224": ({}, "blocks_0/", "blocks_11/", 12),
    "deit_tiny_distilled_patch16_224": ({}, "blocks_0/", "blocks_11/", 12),
    "swin_tiny_patch4_window7_224": ({}, "layers_0/blocks_0/", "layers_3/blocks_1/", 12),
    "convnext_tiny": ({}, "stages_0/blocks_0/", "stages_3/blocks_2/", 18),
    "convnextv2_atto": ({}, "stages_0/blocks_0/", "stages_3/blocks_1/", 12),
    "crossvit_tiny_240": ({}, "blocks_0/", "blocks_2/", 3),
    "tnt_s_patch16_224": ({}, "blocks_0/", "blocks_11/", 12),
    "convit_tiny": ({}, "blocks_0/", "blocks_11/", 12),
    "poolformer_s12": ({}, "stages_0/blocks_0/", "stages_3/blocks_1/", 12),
    "caformer_s18": ({}, "stages_0/blocks_0/", "stages_3/blocks_2/", 18),
    "tiny_vit_5m_224": ({}, "stages_0/blocks_0/", "stages_3/blocks_1/", 12),
    "levit_128s": ({}, "stages_0/blocks_0/", "stages_2/blocks_3/", 9),
    "resnet18": ({}, "layer1_0/", "layer4_1/", 8),
    "regnety_002": ({}, "s1/b1/", "s4/b7/", 13),
}


def abstract_params(model):
    """Returns (params, logical axes) of `model` at its native input size, as shapes only."""
    size = getattr(model, "img_size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    images = jnp.zeros((1, height, width, getattr(model, "in_chans", 3)))
    boxed = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, images))["params"]
    return nn.meta.unbox(boxed), nn.get_partition_spec(boxed)


def exponent(scale: float) -> int:
    """Returns k with scale == DECAY ** k."""
    return int(round(math.log(scale) / math.log(DECAY)))


def our_groups(model, params, axes) -> collections.Counter:
    """Returns {(lr scale exponent, decayed): parameter count} of the optimizer vitjax builds for `model`."""
    scales = optim.layer_decay_scales(params, DECAY, model.layer_ids, axes)
    decayed = optim.param_paths(optim.decay_mask_fn(model.no_weight_decay(), axes)(params))
    counts = collections.Counter()
    for path, leaf in optim.param_paths(params).items():
        per_layer = np.ravel(scales[path])  # one scale, or one per layer of an nn.scan stack
        for scale in per_layer:
            counts[(exponent(float(scale)), bool(decayed[path]))] += int(np.prod(leaf.shape)) // len(per_layer)
    return counts


def timm_groups(reference, no_weight_decay) -> collections.Counter:
    """Returns {(lr scale exponent, decayed): parameter count} of timm's param_groups_layer_decay."""
    counts = collections.Counter()
    for group in param_groups_layer_decay(reference, weight_decay=0.05, layer_decay=DECAY,
                                          no_weight_decay_list=no_weight_decay):
        counts[(exponent(group["lr_scale"]), group["weight_decay"] > 0)] += sum(p.numel() for p in group["params"])
    return counts


def timm_reference(name: str):
    """Returns timm's `name` (1000 classes) and its no_weight_decay list; MetaFormer gets the matcher above."""
    reference = timm.create_model(name, pretrained=False, num_classes=1000)
    if models.model_family(name) == "metaformer":
        reference.group_matcher = lambda coarse=False: METAFORMER_MATCHER
    no_weight_decay = reference.no_weight_decay() if hasattr(reference, "no_weight_decay") else ()
    return reference, no_weight_decay


@pytest.mark.parametrize("name", sorted(CASES))
def test_layer_decay_and_weight_decay_match_timm(name):
    overrides, first_block, last_block, num_blocks = CASES[name]
    model = models.create(name, **overrides)
    params, axes = abstract_params(model)
    ids, num_layers = model.layer_ids(params)
    assert num_layers == num_blocks
    scales = optim.layer_decay_scales(params, DECAY, model.layer_ids, axes)
    # The first block is one step above the stem, the last one step below the head.
    assert {scales[path] for path in scales if path.startswith(first_block)} == {DECAY ** num_blocks}
    assert {scales[path] for path in scales if path.startswith(last_block)} == {DECAY}
    assert max(ids.values()) == num_blocks + 1 and min(ids.values()) == 0
    assert our_groups(model, params, axes) == timm_groups(*timm_reference(name))


def test_scanned_vit_matches_timm_per_layer():
    model = models.create("vit_tiny_patch16_224", scan=True)
    params, axes = abstract_params(model)
    scales = optim.layer_decay_scales(params, DECAY, model.layer_ids, axes)
    np.testing.assert_allclose(np.ravel(scales["blocks/attn/qkv/kernel"]), DECAY ** np.arange(12, 0, -1), rtol=1e-6)
    assert our_groups(model, params, axes) == timm_groups(*timm_reference("vit_tiny_patch16_224"))


def test_cvt_matches_the_official_groups_on_huggingface():
    """timm has no CvT: the same timm-style matcher, written in Hugging Face's names, through timm's
    param_groups_layer_decay; no weight decay on the cls token as the official CvT's no_weight_decay."""
    transformers = pytest.importorskip("transformers")
    small = dict(embed_dims=(16, 32, 48), depths=(1, 2, 3), num_heads=(1, 2, 3), num_classes=5, img_size=32)
    reference = transformers.CvtForImageClassification(transformers.CvtConfig(
        embed_dim=list(small["embed_dims"]), depth=list(small["depths"]), num_heads=list(small["num_heads"]),
        num_labels=5, cls_token=[False, False, True]))
    reference.group_matcher = lambda coarse=False: dict(
        stem=r"^cvt\.encoder\.stages\.0\.embedding",
        blocks=[(r"^cvt\.encoder\.stages\.(\d+)\.(?:embedding|cls_token)", (0,)),
                (r"^cvt\.encoder\.stages\.(\d+)\.layers\.(\d+)", None),
                (r"^layernorm", (param_groups.MERGE_WITH_PREVIOUS,))])
    model = models.create("cvt_13", **small)
    params, axes = abstract_params(model)
    _, num_layers = model.layer_ids(params)
    assert num_layers == 6
    ours = our_groups(model, params, axes)
    assert ours == timm_groups(reference, ["cvt.encoder.stages.*.cls_token"])
    assert ours[(num_layers - 3, False)] >= 48  # the (1, 1, 48) cls token joins stage 2's first block, undecayed


def test_number_groups_is_timms_group_with_matcher():
    names = ["cls_token", "patch_embed/proj/kernel", "layers_0/blocks_0/w", "layers_0/blocks_1/w",
             "layers_1/downsample/w", "layers_1/blocks_0/w", "layers_1/blocks_10/w", "layers_1/blocks_2/w",
             "norm/scale", "head/kernel"]
    matcher = dict(stem=r"^(?:cls_token|patch_embed)",
                   blocks=[(r"^layers_(\d+)/downsample", (0,)), (r"^layers_(\d+)/blocks_(\d+)", None),
                           (r"^norm", (param_groups.MERGE_WITH_PREVIOUS,))])
    ours = param_groups.number_groups(names, matcher)
    assert ours == group_with_matcher(((name, None) for name in names), matcher, reverse=True)
    assert [ours[name] for name in names] == [0, 0, 1, 2, 3, 3, 5, 4, 5, 6]


class NoGroups(nn.Module):
    """A model that declares no parameter groups."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(3)(x), {}


def test_a_model_without_layer_ids_rejects_layer_decay():
    params = NoGroups().init(jax.random.key(0), jnp.zeros((1, 4)))["params"]
    config = config_utils.default_config().optim
    config.update(lr=0.1, layer_decay=0.75)
    with pytest.raises(ValueError, match="declares no layer ids"):
        optim.make_optimizer(config, params, batch_size=8, total_steps=10)
    objective = Objective(config_utils.default_config())
    objective.module = NoGroups()
    assert objective.no_weight_decay() == ()
    with pytest.raises(ValueError, match="model NoGroups declares no layer ids"):
        optim.make_optimizer(config, params, batch_size=8, total_steps=10, layer_ids_fn=objective.layer_ids,
                             no_weight_decay=objective.no_weight_decay())
    config.layer_decay = None  # no layer decay asked: nothing to number
    optim.make_optimizer(config, params, batch_size=8, total_steps=10, layer_ids_fn=objective.layer_ids)


def mae_config(objective: str, **model):
    """Returns a validated config of the tiny runlocal MAE encoder for `objective`."""
    config = config_utils.default_config()
    config.model_name = "vit"
    config.model = dict(config_utils.MAE_RUNLOCAL_ENCODER, **model)
    config.objective = objective
    config.total_steps = 1
    config.optim.lr = 0.1
    return config_utils.validate_config(config)


@pytest.mark.parametrize("objective_name, model, encoder_scope, undecayed", [
    ("mae_finetune", dict(num_classes=10, global_pool="avg", fc_norm=True), "", {"cls_token", "pos_embed"}),
    # The probe and the pretraining encoder have fixed sin-cos position embeddings, not params.
    ("mae_linprobe", dict(num_classes=10, global_pool="token"), "encoder/", {"encoder/cls_token"}),
    ("mae", dict(), "encoder/", {"encoder/cls_token", "decoder/mask_token"}),
])
def test_objectives_give_the_groups_of_the_params_they_train(objective_name, model, encoder_scope, undecayed):
    objective = objectives.create(objective_name, mae_config(objective_name, **model))
    batch = {"image": jnp.zeros((1, 8, 8, 1)), "label": jnp.zeros((1, 10))}
    params = nn.meta.unbox(jax.eval_shape(lambda: objective.init_variables(jax.random.key(0), batch))["params"])
    paths = optim.param_paths(params)
    ids, num_layers = objective.layer_ids(params)
    assert set(ids) == set(paths)
    assert num_layers == 2  # the encoder's two blocks
    assert ids[f"{encoder_scope}cls_token"] == 0 and ids[f"{encoder_scope}blocks_1/mlp/fc1/kernel"] == 2
    last = {path.split("/")[0] for path, layer_id in ids.items() if layer_id == num_layers + 1}
    assert last == {"mae_finetune": {"fc_norm", "head"}, "mae_linprobe": {"head"}, "mae": {"decoder"}}[objective_name]
    decayed = optim.param_paths(optim.decay_mask_fn(objective.no_weight_decay())(params))
    assert {path for path, use in decayed.items() if not use and len(paths[path].shape) >= 2
            and not path.endswith("/bias")} == undecayed


def test_scanned_mae_numbers_each_encoder_layer():
    objective = objectives.create("mae", mae_config("mae", scan=True))
    params = nn.meta.unbox(jax.eval_shape(
        lambda: objective.init_variables(jax.random.key(0), {"image": jnp.zeros((1, 8, 8, 1))}))["params"])
    ids, num_layers = objective.layer_ids(params)
    assert num_layers == 2
    assert ids["encoder/blocks/mlp/fc1/kernel"] == [1, 2] and ids["encoder/norm/scale"] == 2
    assert {ids[path] for path in ids if path.startswith("decoder/")} == {3}
