"""ResNet / ResNet-D and RegNetY teachers: parity with timm 1.0.31 on re-randomised shrunk models (params and
BatchNorm running statistics, eval and train mode), RegNet stage widths against timm's generator, converter
errors, registry and settings errors."""
import flax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import jax  # noqa: E402

from vitjax import convert, models  # noqa: E402
from vitjax.models import regnet  # noqa: E402

from parity_utils import (  # noqa: E402
    assert_converter_errors, assert_create_rejects, randomize_, relative_error, run_parity)

# 38 px: the stem gives 19, the max pool 10, then 5, 3, 2: odd maps exercise the padding and ResNet-D's
# ceil-mode average pool (a last partial window).
RESNET = dict(img_size=38, depths=(1, 2, 1, 1), widths=(8, 16, 24, 32), num_classes=10)
RESNET_TIMM = dict(layers=[1, 2, 1, 1], channels=(8, 16, 24, 32), num_classes=10)
# w0=8, wa=8, wm=2, depth 6 gives per-block widths 8, 16, 32, 32, 32, 64: stages (8 x1, 16 x1, 32 x3, 64 x1)
# with 1, 2, 4 and 8 groups of 8; 40 px maps are 20, 10, 5, 3, 2.
REGNET = dict(img_size=40, w0=8, wa=8.0, wm=2.0, depth=6, group_size=8, num_classes=10)
REGNET_TIMM = dict(w0=8, wa=8.0, wm=2.0, depth=6, group_size=8, num_classes=10)


def reference(name: str, seed: int = 0, **settings):
    """Returns a re-randomised, shrunk timm model (eval mode)."""
    model = timm.create_model(name, pretrained=False, **settings).eval()
    randomize_(model, seed=seed)
    return model


@pytest.mark.parametrize("name,block", [("resnet18", "basic"), ("resnet26d", "bottleneck"),
                                        ("resnet34d", "basic"), ("resnet50", "bottleneck")])
def test_resnet_timm_parity(name, block):
    parity = run_parity(reference(name, **RESNET_TIMM), name, **RESNET)
    assert set(parity.variables) == {"params", "batch_stats"}
    assert parity.model.block_type == block
    assert parity.ours.shape == parity.expected.shape == (2, 10)
    assert relative_error(parity.ours, parity.expected) <= 1e-5
    assert [stage.shape[1:3] for stage in parity.intermediates["stages"]] == [(10, 10), (5, 5), (3, 3), (2, 2)]


def test_regnety_timm_parity():
    parity = run_parity(reference("regnety_160", **REGNET_TIMM), "regnety_160", **REGNET)
    assert [tuple(spec) for spec in parity.model.stages] == [(8, 1, 8), (16, 1, 8), (32, 3, 8), (64, 1, 8)]
    assert relative_error(parity.ours, parity.expected) <= 1e-5
    assert [stage.shape[1:] for stage in parity.intermediates["stages"]] == [
        (10, 10, 8), (5, 5, 16), (3, 3, 32), (2, 2, 64)]


@pytest.mark.parametrize("name,ours,theirs", [("resnet26d", RESNET, RESNET_TIMM),
                                              ("regnety_002", REGNET, REGNET_TIMM)])
def test_train_mode_batch_statistics_match_timm(name, ours, theirs):
    """train=True: the logits use batch statistics as torch's, and every running statistic updates with
    momentum 0.1 from the batch statistics of that layer's input (captured from the torch model by hooks).

    The running variances fold in the unbiased batch variance (x n / (n - 1)), as torch's: `layers.BatchNorm`;
    flax's own BatchNorm folds in the biased one, which this test tells apart (the maps are small, so n / (n - 1)
    is far from 1).
    """
    torch_model = reference(name, seed=3, **theirs)
    variables = convert.from_timm(torch_model.state_dict(), name, **ours)
    inputs = {}
    hooks = [module.register_forward_hook(lambda mod, args, out, key=key: inputs.__setitem__(key, args[0].double()))
             for key, module in torch_model.named_modules() if isinstance(module, torch.nn.BatchNorm2d)]
    images = torch.randn(4, 3, ours["img_size"], ours["img_size"], generator=torch.Generator().manual_seed(4))
    torch_model.train()
    with torch.no_grad():
        expected = torch_model(images).numpy()
    for hook in hooks:
        hook.remove()
    model = models.create(name, **ours)
    (logits, _), updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, images.numpy().transpose(0, 2, 3, 1))
    assert relative_error(logits, expected) <= 1e-5
    after = torch_model.state_dict()
    smallest_map = min(x.numel() // x.shape[1] for x in inputs.values())
    assert smallest_map <= 16  # n / (n - 1) >= 1.067 there: the biased rule would miss by far more than 1e-5
    assert len(inputs) == sum(key.endswith("running_var") for key in after)
    flat_ours = flax.traverse_util.flatten_dict(updates["batch_stats"], sep="/")
    flat_expected = flax.traverse_util.flatten_dict(
        convert.from_timm(dict(after), name, **ours)["batch_stats"], sep="/")
    assert set(flat_ours) == set(flat_expected)
    for path, value in flat_expected.items():
        assert relative_error(flat_ours[path], value) <= 1e-5, path
    moved = flax.traverse_util.flatten_dict(variables["batch_stats"], sep="/")
    assert min(np.max(np.abs(flat_ours[path] - moved[path])) for path in moved) > 0


@pytest.mark.parametrize("name", sorted(regnet._TIMM_REGNETYS))
def test_regnet_stages_match_timm_generator(name):
    from timm.models.regnet import adjust_widths_groups_comp, generate_regnet
    w0, wa, wm, depth, group_size = regnet._TIMM_REGNETYS[name]
    widths, num_stages, groups = generate_regnet(wa, w0, wm, depth, group_size)
    stage_widths, stage_depths = np.unique(widths, return_counts=True)
    stage_widths, groups = adjust_widths_groups_comp(stage_widths.tolist(), [1.0] * num_stages, groups)
    assert [tuple(spec) for spec in models.create(name).stages] == list(
        zip(stage_widths, stage_depths.tolist(), groups))


def test_registry_names_and_parameter_counts():
    names = set(models.list_models("resnet")) | set(models.list_models("regnety"))
    assert names == {f"resnet{depth}{suffix}" for depth in (18, 26, 34, 50, 101, 152) for suffix in ("", "d")} | {
        f"regnety_{size}" for size in ("002", "004", "006", "008", "016", "032", "040", "064", "080", "120", "160",
                                       "320")}
    assert all(models.model_family(name) in ("resnet", "regnet") for name in names)
    # timm.create_model(name) parameter counts (tests/test_registry.py checks every name against the table).
    from parity_utils import parameter_count
    assert parameter_count(models.create("resnet50d")) == 25_576_264
    assert parameter_count(models.create("regnety_160")) == 83_590_140


def test_converter_names_missing_unexpected_and_misshapen_keys():
    state = {key: value.numpy() for key, value in reference("resnet26d", **RESNET_TIMM).state_dict().items()}
    assert_converter_errors(state, "resnet26d", RESNET, missing="layer2.0.downsample.2.running_var",
                            unexpected={"layer9.0.conv1.weight": np.zeros((1,), np.float32)},
                            misshapen={"layer1.0.conv2.weight": (np.zeros((8, 8, 1, 1), np.float32),
                                                                 "layer1_0/conv2/kernel")})
    state = {key: value.numpy() for key, value in reference("regnety_002", **REGNET_TIMM).state_dict().items()}
    assert_converter_errors(state, "regnety_002", REGNET, missing="s3.b2.se.fc1.bias",
                            misshapen={"s1.b1.conv2.conv.weight": (np.zeros((8, 1, 3, 3), np.float32),
                                                                   "s1/b1/conv2/conv/kernel")})


def test_validate_rejects_bad_settings():
    assert_create_rejects("resnet50", [
        (dict(block_type="preact"), "valid choices"),
        (dict(depths=(1, 1, 1)), "one entry per stage"),
        (dict(depths=(1, 0, 1, 1)), "at least one block"),
    ])
    assert_create_rejects("regnety_160", [
        (dict(wm=0.5), "wm > 1"),
        (dict(depth=2), "needs exactly 4"),
        (dict(se_ratio=1.5), r"se_ratio must be in \[0, 1\)"),
    ])


def test_deit_distilled_config_loads_a_timm_regnety_teacher(tmp_path):
    """configs/vit_i1k.py:distilled with a shrunk timm RegNetY file as teacher_init: the teacher the trainer
    loads (train.load_frozen_weights) is timm's, BatchNorm statistics included, and the distillation loss
    uses its hard labels."""
    import os

    import jax.numpy as jnp

    from vitjax import config_utils, train
    torch_teacher = reference("regnety_160", seed=5, **dict(REGNET_TIMM, in_chans=1))
    path = str(tmp_path / "regnety_160_digits.pth")
    torch.save(torch_teacher.state_dict(), path)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = config_utils.load_config(os.path.join(repo, "configs", "vit_i1k.py") + f":runlocal,distilled,"
                                      f"teacher_init={path}")
    assert config.objective == "distill" and config.objective_kwargs.teacher == "regnety_160"
    objective = train.build(config)[1]
    images = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(6))
    nhwc = jnp.asarray(images.numpy().transpose(0, 2, 3, 1))
    abstract = jax.eval_shape(lambda: objective.init_variables(jax.random.key(0), {"image": nhwc}))
    teacher = train.load_frozen_weights(objective, abstract)["teacher"]
    assert set(teacher) == {"params", "batch_stats"}
    with torch.no_grad():
        expected = torch_teacher(images).numpy()
    teacher_logits = objective.teacher_logits(teacher, nhwc)
    assert relative_error(teacher_logits, expected) <= 1e-5
    # The distilled student's loss with this teacher is finite and has its distillation term.
    variables = flax.linen.meta.unbox(objective.init_variables(jax.random.key(1), {"image": nhwc}))
    variables["teacher"] = teacher
    labels = jax.nn.one_hot(jnp.arange(4) % 10, 10)
    loss, aux = objective.train_loss(variables, {"image": nhwc, "label": labels}, jax.random.key(2))
    assert np.isfinite(float(loss)) and float(aux["metrics"]["distill_loss"]) > 0
