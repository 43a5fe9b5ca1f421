"""ConViT: parity with timm 1.0.31 (GPSA and MHSA blocks), local init, registry, converter errors, training."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vitjax import convert, models  # noqa: E402
from vitjax.models import convit  # noqa: E402


def randomize_(module: "torch.nn.Module", seed: int = 0, std: float = 0.15) -> None:
    """Redraws every float tensor: norm scales 1 + N(0, 0.1), gates N(0, 1), everything else N(0, std)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if "norm" in key and key.endswith("weight"):
                tensor.copy_(1.0 + 0.1 * noise)
            elif key.endswith("gating_param"):
                tensor.copy_(noise)  # gates spread over (0.1, 0.9): both attentions count
            else:
                tensor.copy_(std * noise)


def relative_error(ours, reference) -> float:
    """Returns max |ours - reference| / max |reference|."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


# Two GPSA blocks, then the class token joins and one MHSA block runs.
SHRUNK = dict(depth=3, local_up_to_layer=2, patch_size=8, num_classes=7)


def reference_model(**overrides) -> "torch.nn.Module":
    """Returns a re-randomised eval-mode timm convit_tiny (32 px) with `overrides`."""
    reference = timm.create_model("convit_tiny", pretrained=False, img_size=32, **SHRUNK, **overrides).eval()
    randomize_(reference)
    return reference


@pytest.mark.parametrize("overrides", [{}, dict(qkv_bias=True, global_pool="avg")])
def test_timm_parity(overrides):
    reference = reference_model(**overrides)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(images).numpy()
    variables = convert.from_timm(reference.state_dict(), "convit_tiny", img_size=32, **SHRUNK, **overrides)
    model = models.create("convit_tiny", img_size=32, **SHRUNK, **overrides)
    apply = jax.jit(model.apply, static_argnames=("capture_attention",))
    nhwc = jnp.asarray(images.numpy().transpose(0, 2, 3, 1))
    ours, intermediates = apply(variables, nhwc)
    assert ours.shape == expected.shape == (2, 7)
    assert relative_error(ours, expected) <= 1e-5
    assert [block.shape for block in intermediates["blocks"]] == [(2, 16, 192)] * 2 + [(2, 17, 192)]
    assert intermediates["pre_logits"].shape == (2, 192)
    if not overrides:
        # Capturing the mixed GPSA maps takes the explicit-weights path: same logits, rows summing to one.
        captured, captured_intermediates = apply(variables, nhwc, capture_attention=True)
        assert relative_error(captured, expected) <= 1e-5
        maps = captured_intermediates["attention"]
        assert [m.shape for m in maps] == [(2, 4, 16, 16)] * 2 + [(2, 4, 17, 17)]
        np.testing.assert_allclose(np.asarray(maps[0]).sum(-1), 1.0, atol=1e-5)


def test_local_init_matches_timm():
    """GPSA starts as a convolution: timm's local_init of pos_proj (9 heads: a 3x3 grid) and the identity v."""
    reference = timm.create_model("convit_small", pretrained=False, depth=1, local_up_to_layer=1,
                                  global_pool="avg", img_size=32)
    expected = reference.blocks[0].attn.pos_proj.weight.detach().numpy().T   # (3, heads)
    kernel = np.asarray(convit.local_pos_proj_init(9, 1.0)(jax.random.key(0), (3, 9)))
    np.testing.assert_array_equal(kernel, expected)
    identity = np.asarray(convit._identity_value_init(jax.random.key(0), (432, 9, 48)))
    np.testing.assert_array_equal(identity.reshape(432, 432), reference.blocks[0].attn.v.weight.detach().numpy())


def test_registry_matches_timm_names_and_parameter_counts():
    assert models.list_models("convit") == sorted(timm.list_models("convit*"))
    # timm 1.0.31's counts (ConViT paper Table 1: Ti 6M, S 27M, B 86M), from shapes only.
    for name, count in {"convit_tiny": 5_710_512, "convit_base": 86_540_040}.items():
        model = models.create(name)
        shapes = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
        total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(flax.linen.meta.unbox(shapes["params"])))
        assert total == count, name


def test_bad_state_dict_names_the_key():
    state = dict(timm.create_model("convit_tiny", pretrained=False, img_size=32, **SHRUNK).state_dict())
    kwargs = dict(img_size=32, **SHRUNK)
    missing = dict(state)
    del missing["blocks.1.attn.gating_param"]
    with pytest.raises(KeyError, match=r"blocks\.1\.attn\.gating_param"):
        convert.from_timm(missing, "convit_tiny", **kwargs)
    extra = dict(state, **{"blocks.2.attn.pos_proj.weight": torch.zeros(4, 3)})
    with pytest.raises(KeyError, match=r"blocks\.2\.attn\.pos_proj\.weight"):
        convert.from_timm(extra, "convit_tiny", **kwargs)
    wrong = dict(state, **{"blocks.0.attn.pos_proj.bias": torch.zeros(5)})
    with pytest.raises(ValueError, match="blocks_0/attn/pos_proj/bias"):
        convert.from_timm(wrong, "convit_tiny", **kwargs)


def test_bad_settings_fail_at_create():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        models.create("convit_tiny", img_size=200)
    with pytest.raises(ValueError, match="per-head width"):
        models.create("convit_tiny", embed_dim=50)
    with pytest.raises(ValueError, match="class token"):
        models.create("convit_tiny", depth=10)
    with pytest.raises(ValueError, match="valid choices"):
        models.create("convit_tiny", global_pool="map")


def test_trains_with_dropouts_and_gradients_are_finite():
    settings = dict(SHRUNK, img_size=32, drop_path_rate=0.3, drop_rate=0.1, attn_drop_rate=0.1,
                    proj_drop_rate=0.1)
    model = models.create("convit_tiny", **settings)
    # Converted random weights stand in for `model.init`, whose RNG graph costs seconds of CPU compile here.
    variables = convert.from_timm(reference_model().state_dict(), "convit_tiny", **settings)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    labels = jnp.array([1, 3])
    rngs = {"dropout": jax.random.key(2), "drop_path": jax.random.key(3)}

    def loss_fn(params):
        logits, _ = model.apply({"params": params}, images, train=True, rngs=rngs)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels])

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(variables["params"])
    assert np.isfinite(float(loss))
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(grads))
    # The gates and the positional projection learn.
    assert float(jnp.abs(grads["blocks_0"]["attn"]["gating_param"]).sum()) > 0
    assert float(jnp.abs(grads["blocks_1"]["attn"]["pos_proj"]["kernel"]).sum()) > 0
