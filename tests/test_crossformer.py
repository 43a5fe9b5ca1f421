"""CrossFormer / CrossFormer++: parity with the official cheerss/CrossFormer code (fixture: SDA and LDA groups,
padded groups, a map smaller than its group, the cooling layer), attention_impl="pallas" (interpret mode on the CPU)
equal to "xla" with the position bias and padding mask, parameter counts of every official name, converter errors."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import convert, models
from vitjax.models import crossformer

from parity_utils import (assert_converter_errors, assert_create_rejects, fixture_entries, measured_param_counts,
                          relative_error)

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "crossformer", "crossformer.npz")
# Three stages on 64 px (maps 16, 8, 4): stage 1 groups 4 (LDA interval 2), stage 2 groups 3 (both SDA and LDA
# pad 8 up to 9 and 12), stage 3's group 4 covers its whole 4x4 map.
SMALL = dict(img_size=64, num_classes=5, embed_dim=16, depths=(4, 2, 1), num_heads=(1, 2, 4), group_sizes=(4, 3, 4),
             intervals=(2, 2, 1), merge_sizes=((2, 4), (2, 4)))
CASES = {"v1": ("crossformer_tiny", dict(use_acl=False)), "pp": ("crossformer_pp_small", dict(use_acl=True))}


def _case(data, case):
    state = fixture_entries(data, "v1/state")
    if case == "pp":  # the same weights plus the cooling layer of stage 1's third block
        state.update(fixture_entries(data, "pp/state"))
    name, extra = CASES[case]
    return state, name, {**SMALL, **extra}


@pytest.mark.parametrize("case", sorted(CASES))
def test_official_parity(case):
    data = dict(np.load(FIXTURE))
    state, name, settings = _case(data, case)
    variables = convert.from_timm(state, name, **settings)
    model = models.create(name, **settings)
    logits, intermediates = jax.jit(model.apply)(variables, jnp.asarray(data["images"]))
    assert [x.shape[1:] for x in intermediates["stages"]] == [(16, 16, 16), (8, 8, 32), (4, 4, 64)]
    assert relative_error(logits, data[f"{case}/logits"]) <= 1e-5
    assert relative_error(logits, data[f"{case}/logits64"]) <= 1e-5


def test_pallas_equals_xla_with_position_bias_and_padding_mask():
    """An LDA block on a 5x5 map, groups of 2 at interval 2: padded to 8 (a key mask), the position bias per head."""
    x = jax.random.normal(jax.random.key(0), (1, 25, 16))
    xla = crossformer.CrossFormerBlock(5, 2, 2, 2, True)
    variables = xla.init(jax.random.key(1), x)
    pallas = crossformer.CrossFormerBlock(5, 2, 2, 2, True, attention_impl="pallas")
    expected = jax.jit(xla.apply)(variables, x)
    ours = jax.jit(pallas.apply)(variables, x)
    assert crossformer.block_geometry(5, 2, 2, True) == (2, True, 3)
    assert relative_error(ours, expected) <= 1e-5


def test_group_and_ungroup_are_inverse_and_lda_strides_by_the_interval():
    x = np.arange(2 * 8 * 8).reshape(2, 8, 8, 1)
    groups = crossformer.group_tokens(x, 2, 4, True)
    assert groups.shape == (2 * 16, 4, 1)
    assert groups[1, :, 0].tolist() == [1, 5, 33, 37]  # offsets (0, 1) + interval 4 in both directions
    back = crossformer.ungroup_tokens(groups, 2, 8, 8, 2, 4, True)
    np.testing.assert_array_equal(back, x)
    assert crossformer.block_geometry(7, 7, 1, True) == (7, False, 0)   # a 7x7 map: one group, SDA
    assert crossformer.block_geometry(8, 3, 2, True) == (3, True, 4)


def test_parameter_counts_equal_the_official_code():
    """The official counts equal experiments/out/model_table.json's, which test_registry checks against the models."""
    data = np.load(FIXTURE)
    counts = dict(zip(data["param_names"].tolist(), data["param_counts"].tolist()))
    assert sorted(counts) == models.list_models("crossformer")
    assert measured_param_counts(counts) == counts


def test_converter_errors_and_validation():
    data = dict(np.load(FIXTURE))
    state, name, settings = _case(data, "pp")
    assert_converter_errors(
        state, name, settings, missing="layers.0.blocks.2.ex_conv.weight",
        unexpected={"layers.1.blocks.0.attn.extra": np.zeros(3, np.float32)},
        misshapen={"layers.1.blocks.1.attn.pos.pos2.2.bias": (np.zeros(3, np.float32),
                                                              "layers_1/blocks_1/attn/pos/pos2_fc/bias")})
    assert_create_rejects("crossformer_tiny", [
        (dict(img_size=200), "multiple of 32"),
        (dict(depths=(1, 1, 8)), "one entry per stage"),
        (dict(num_heads=(3, 4, 8, 16)), "divisible by its num_heads"),
        (dict(embed_dim=8), ">= 16"),
        (dict(merge_sizes=((2, 3), (2, 4), (2, 4))), "even steps"),
        (dict(attention_impl="flash"), r"valid choices: \[.xla., .cudnn., .pallas., .auto.\]"),
    ])


def test_from_torch_is_the_entry_for_timm_and_official_layouts_and_from_timm_its_alias():
    """A timm ViT state dict and an official-layout CrossFormer one convert through both names, identically."""
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    vit_settings = dict(img_size=32, patch_size=8, depth=1, num_classes=3)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, **vit_settings).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(images).numpy()
    data = dict(np.load(FIXTURE))
    state, name, settings = _case(data, "v1")
    for source, model_name, overrides in ((reference.state_dict(), "vit_tiny_patch16_224", vit_settings),
                                          (state, name, settings)):
        ours = convert.from_torch(source, model_name, **overrides)
        alias = convert.from_timm(source, model_name, **overrides)
        assert jax.tree.structure(ours) == jax.tree.structure(alias)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(alias)))
    logits, _ = models.create("vit_tiny_patch16_224", **vit_settings).apply(
        convert.from_torch(reference.state_dict(), "vit_tiny_patch16_224", **vit_settings),
        jnp.asarray(images.numpy().transpose(0, 2, 3, 1)))
    assert relative_error(logits, expected) <= 1e-5
    with pytest.raises(ValueError, match="from_open_clip or from_transformers"):
        convert.from_torch({}, "clip_vit_tiny_digits")


def test_layer_ids_end_each_stage_with_its_patch_merging():
    import flax.linen as nn
    settings = dict(img_size=64, embed_dim=16, depths=(2, 1, 1), num_heads=(1, 2, 4), merge_sizes=((2, 4), (2, 4)),
                    intervals=(2, 1, 1), group_sizes=(2, 2, 2))
    model = models.create("crossformer_tiny", **settings)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
    ids, num_layers = model.layer_ids(nn.meta.unbox(shapes["params"]))
    assert num_layers == 4   # the stem, then one id per block; the head is num_layers + 1
    assert int(ids["patch_embed/norm/scale"]) == 0
    assert int(ids["layers_0/blocks_1/norm1/scale"]) == 2
    assert int(ids["layers_0/downsample/reductions_1/kernel"]) == 2
    assert int(ids["layers_1/blocks_0/norm1/scale"]) == 3
    assert int(ids["norm/scale"]) == 4 and int(ids["head/kernel"]) == 5
