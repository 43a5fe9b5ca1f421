"""MetaFormer (PoolFormer v1/v2, ConvFormer, CAFormer): parity with timm 1.0.31, registry, converter errors."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vitjax import convert, models  # noqa: E402


def randomize_(module: "torch.nn.Module", seed: int = 0, std: float = 0.15) -> None:
    """Redraws every float tensor: norm weights, residual scales and StarReLU scales 1 + N(0, 0.1);
    everything else (layer scales included) N(0, std)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            near_one = ("norm" in key and key.endswith("weight")) or "res_scale" in key or (
                key.endswith("act.scale") or key.endswith("act1.scale"))
            tensor.copy_(1.0 + 0.1 * noise if near_one else std * noise)


def relative_error(ours, reference) -> float:
    """Returns max |ours - reference| / max |reference|."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


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
    randomize_(reference)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(images).numpy()
    variables = convert.from_timm(reference.state_dict(), name, img_size=64, **SHRUNK)
    model = models.create(name, img_size=64, **SHRUNK)
    ours, intermediates = jax.jit(model.apply)(variables, jnp.asarray(images.numpy().transpose(0, 2, 3, 1)))
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
        model = models.create(name)
        shapes = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
        total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(flax.linen.meta.unbox(shapes["params"])))
        assert total == count, name


def test_bad_state_dict_names_the_key():
    state = dict(timm_metaformer("caformer_s18", **SHRUNK).state_dict())
    kwargs = dict(img_size=32, **SHRUNK)
    missing = dict(state)
    del missing["stages.2.blocks.1.res_scale2.scale"]
    with pytest.raises(KeyError, match=r"stages\.2\.blocks\.1\.res_scale2\.scale"):
        convert.from_timm(missing, "caformer_s18", **kwargs)
    extra = dict(state, **{"stages.3.blocks.0.token_mixer.qkv.bias": torch.zeros(384)})
    with pytest.raises(KeyError, match=r"stages\.3\.blocks\.0\.token_mixer\.qkv\.bias"):
        convert.from_timm(extra, "caformer_s18", **kwargs)
    wrong = dict(state, **{"stages.1.blocks.0.token_mixer.dwconv.weight": torch.zeros(128, 1, 5, 5)})
    with pytest.raises(ValueError, match="stages_1/blocks_0/token_mixer/dwconv/kernel"):
        convert.from_timm(wrong, "caformer_s18", **kwargs)


def test_bad_settings_fail_at_create():
    with pytest.raises(ValueError, match="total stride 32"):
        models.create("caformer_s18", img_size=200)
    with pytest.raises(ValueError, match="valid choices"):
        models.create("caformer_s18", token_mixers=("sepconv", "sepconv", "attention", "mlp"))
    with pytest.raises(ValueError, match="head_dim"):
        models.create("caformer_s18", dims=(64, 128, 320, 500))
    with pytest.raises(ValueError, match="one entry per stage"):
        models.create("convformer_s18", res_scale_init_values=(None, 1.0))


def test_trains_with_drop_path_and_gradients_are_finite():
    shallow = dict(SHRUNK, depths=(1, 1, 1, 1))
    settings = dict(shallow, img_size=32, drop_path_rate=0.3, drop_rate=0.1, proj_drop_rate=0.1,
                    attn_drop_rate=0.1, head_dropout=0.2)
    model = models.create("caformer_s18", **settings)
    # Converted random weights stand in for `model.init`, whose RNG graph costs seconds of CPU compile here.
    reference = timm_metaformer("caformer_s18", **shallow)
    randomize_(reference)
    variables = convert.from_timm(reference.state_dict(), "caformer_s18", **settings)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    labels = jnp.array([1, 3])
    rngs = {"dropout": jax.random.key(2), "drop_path": jax.random.key(3)}

    def loss_fn(params):
        logits, _ = model.apply({"params": params}, images, train=True, rngs=rngs)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels])

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(variables["params"])
    assert np.isfinite(float(loss))
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(grads))
    # StarReLU's learned scalars and the attention weights are trained.
    assert float(jnp.abs(grads["stages_0"]["blocks_0"]["token_mixer"]["act1"]["scale"]).sum()) > 0
    assert float(jnp.abs(grads["stages_3"]["blocks_0"]["token_mixer"]["qkv"]["kernel"]).sum()) > 0
