"""MetaFormer (PoolFormer v1/v2, ConvFormer, CAFormer): parity with timm 1.0.31, registry, converter errors."""
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vitjax import convert, models  # noqa: E402

from parity_utils import (  # noqa: E402
    assert_converter_errors, assert_create_rejects, parameter_count, randomize_, relative_error, run_parity,
    train_gradients)


def near_one_scales(key, noise):
    """`randomize_` hook: residual scales and StarReLU scales 1 + N(0, 0.1) (layer scales keep N(0, std))."""
    return 1.0 + 0.1 * noise if "res_scale" in key or key.endswith(("act.scale", "act1.scale")) else None


def timm_metaformer(name: str, **overrides) -> "torch.nn.Module":
    """Returns timm's MetaFormer with `name`'s settings and `overrides` (timm's entry points fix depths/dims)."""
    from timm.layers import GroupNorm1
    from timm.models import metaformer as reference
    settings = {
        "poolformer_s12": dict(downsample_norm=None, mlp_act=torch.nn.GELU, mlp_bias=True, norm_layers=GroupNorm1,
                               layer_scale_init_values=1e-5, res_scale_init_values=None, use_mlp_head=False),
        "poolformerv2_s12": dict(norm_layers=reference.GroupNorm1NoBias, use_mlp_head=False),
        "convformer_s18": dict(token_mixers=reference.SepConv, norm_layers=reference.LayerNorm2dNoBias),
        "caformer_s18": dict(token_mixers=[reference.SepConv] * 2 + [reference.Attention] * 2,
                             norm_layers=[reference.LayerNorm2dNoBias] * 2 + [reference.LayerNormNoBias] * 2),
    }[name]
    return reference.MetaFormer(**settings, **overrides)


SHRUNK = dict(depths=(1, 1, 2, 1), dims=(32, 64, 96, 128), num_classes=7)


@pytest.mark.parametrize("name", ["poolformer_s12", "poolformerv2_s12", "convformer_s18", "caformer_s18"])
def test_timm_parity(name):
    reference = timm_metaformer(name, **SHRUNK).eval()
    randomize_(reference, special=near_one_scales)
    expected, ours, intermediates, *_ = run_parity(reference, name, img_size=64, **SHRUNK)
    assert ours.shape == expected.shape == (2, 7)
    assert relative_error(ours, expected) <= 1e-5
    assert [stage.shape for stage in intermediates["stages"]] == [
        (2, 16, 16, 32), (2, 8, 8, 64), (2, 4, 4, 96), (2, 2, 2, 128)]
    assert intermediates["pre_logits"].shape == (2, 128)


def test_registry_matches_timm_names_and_parameter_counts():
    families = ("poolformer*", "convformer*", "caformer*")
    timm_names = {name for family in families for name in timm.list_models(family)}
    ours = {name for name in models.list_models() if models.model_family(name) == "metaformer"}
    assert ours == timm_names
    # timm 1.0.31's counts (PoolFormer paper Table 1: S12 12M; MetaFormer baselines Table: CAFormer-S18 26M).
    expected = {"poolformer_s12": 11_915_176, "poolformerv2_s12": 11_891_712, "caformer_s18": 26_341_656}
    for name, count in expected.items():
        assert parameter_count(models.create(name)) == count, name


def test_bad_state_dict_names_the_key():
    state = dict(timm_metaformer("caformer_s18", **SHRUNK).state_dict())
    assert_converter_errors(
        state, "caformer_s18", dict(img_size=32, **SHRUNK), missing="stages.2.blocks.1.res_scale2.scale",
        unexpected={"stages.3.blocks.0.token_mixer.qkv.bias": torch.zeros(384)},
        misshapen={"stages.1.blocks.0.token_mixer.dwconv.weight": (
            torch.zeros(128, 1, 5, 5), "stages_1/blocks_0/token_mixer/dwconv/kernel")})


def test_bad_settings_fail_at_create():
    assert_create_rejects("caformer_s18", [
        (dict(img_size=200), "total stride 32"),
        (dict(token_mixers=("sepconv", "sepconv", "attention", "mlp")), "valid choices"),
        (dict(dims=(64, 128, 320, 500)), "head_dim"),
    ])
    assert_create_rejects("convformer_s18", [(dict(res_scale_init_values=(None, 1.0)), "one entry per stage")])


def test_trains_with_drop_path_and_gradients_are_finite():
    shallow = dict(SHRUNK, depths=(1, 1, 1, 1))
    settings = dict(shallow, img_size=32, drop_path_rate=0.3, drop_rate=0.1, proj_drop_rate=0.1,
                    attn_drop_rate=0.1, head_dropout=0.2)
    model = models.create("caformer_s18", **settings)
    # Converted random weights stand in for `model.init`, whose RNG graph costs seconds of CPU compile here.
    reference = timm_metaformer("caformer_s18", **shallow)
    randomize_(reference, special=near_one_scales)
    variables = convert.from_timm(reference.state_dict(), "caformer_s18", **settings)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    _, grads = train_gradients(model, variables["params"], images, labels=jnp.array([1, 3]))
    # StarReLU's learned scalars and the attention weights are trained.
    assert float(jnp.abs(grads["stages_0"]["blocks_0"]["token_mixer"]["act1"]["scale"]).sum()) > 0
    assert float(jnp.abs(grads["stages_3"]["blocks_0"]["token_mixer"]["qkv"]["kernel"]).sum()) > 0
