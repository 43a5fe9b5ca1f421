"""LeViT: parity with timm 1.0.31 in linear and conv modes (params and BatchNorm statistics), recomputed bias
indices, converter errors, registry, distillation heads, training with BatchNorm updates."""
import flax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vitjax import convert, models  # noqa: E402
from vitjax.models import levit  # noqa: E402

# At 64 px the s16 stem gives 4x4 tokens, the shrinking attentions 2x2 and 1x1.
SHRUNK = dict(img_size=64, embed_dim=(32, 48, 64), depth=(1, 2, 1), num_heads=(2, 3, 4), num_classes=10)


def randomize_(module: "torch.nn.Module", seed: int = 0, std: float = 0.15) -> None:
    """Redraws every tensor: BatchNorm scales 1 + N(0, 0.1) (the zero-initialised residual ones too), running
    variances U(0.5, 1.5), everything else N(0, std)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if key.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif key.endswith("bn.weight"):
                tensor.copy_(1.0 + 0.1 * noise)
            else:
                tensor.copy_(std * noise)


def relative_error(ours, reference) -> float:
    """Returns max |ours - reference| / max |reference|."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


@pytest.fixture(scope="module")
def reference():
    """Returns a re-randomised, shrunk timm LeViT-128S (linear mode, distilled) in eval mode."""
    model = timm.create_model("levit_128s", pretrained=False, **SHRUNK).eval()
    randomize_(model)
    return model


@pytest.mark.parametrize("name", ["levit_128s", "levit_conv_128s"])
def test_timm_parity(name, reference):
    if name != "levit_128s":
        reference = timm.create_model(name, pretrained=False, **SHRUNK).eval()
        randomize_(reference, seed=1)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(images).numpy()
    variables = convert.from_timm(reference.state_dict(), name, **SHRUNK)
    assert set(variables) == {"params", "batch_stats"}
    model = models.create(name, **SHRUNK)
    ours, intermediates = jax.jit(model.apply)(variables, jnp.asarray(images.numpy().transpose(0, 2, 3, 1)))
    assert ours.shape == expected.shape
    assert relative_error(ours, expected) <= 1e-5
    assert [stage.shape[1:] for stage in intermediates["stages"]] == [(4, 4, 32), (2, 2, 48), (1, 1, 64)]


def test_attention_bias_indices_match_timm(reference):
    for stage in reference.stages:
        if not isinstance(stage.downsample, torch.nn.Identity):
            attention = stage.downsample.attn_downsample
            np.testing.assert_array_equal(levit.attention_bias_index(attention.resolution, attention.stride),
                                          attention.attention_bias_idxs.numpy())
        for block in stage.blocks:
            np.testing.assert_array_equal(levit.attention_bias_index(block.attn.resolution),
                                          block.attn.attention_bias_idxs.numpy())


def test_converter_names_missing_and_misshapen_keys(reference):
    state = {key: value.numpy() for key, value in reference.state_dict().items()}
    missing = dict(state)
    del missing["stages.1.downsample.attn_downsample.q.ln.bn.running_var"]
    with pytest.raises(KeyError, match="stages.1.downsample.attn_downsample.q.ln.bn.running_var"):
        convert.from_timm(missing, "levit_128s", **SHRUNK)
    misshapen = dict(state)
    misshapen["stages.2.blocks.0.attn.attention_biases"] = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="stages_2/blocks_0/attn/attention_biases"):
        convert.from_timm(misshapen, "levit_128s", **SHRUNK)


def test_registered_sizes_match_timm_parameter_counts():
    assert set(models.list_models("levit")) == set(timm.list_models("levit*"))
    model = models.create("levit_128s")
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 224, 224, 3))))
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(flax.linen.meta.unbox(shapes["params"])))
    assert count == 7_777_058  # timm.create_model("levit_128s") parameters, both heads included


def test_validate_rejects_bad_settings():
    with pytest.raises(ValueError, match="divisible by the s16 stem"):
        models.create("levit_128s", img_size=40)
    with pytest.raises(ValueError, match="valid choices"):
        models.create("levit_128s", activation="relu")
    with pytest.raises(ValueError, match="valid choices"):
        models.create("levit_128s", stem_type="s4")
    with pytest.raises(ValueError, match="one entry per stage"):
        models.create("levit_128s", depth=(2, 3))


def test_trains_with_distillation_heads_batch_stats_and_grad():
    """32x32 input, train=True with rngs and mutable batch_stats, both heads in distilled training, jax.grad."""
    model = models.create("levit_128s", img_size=32, embed_dim=(32, 48), depth=(1, 1), num_heads=(2, 3),
                          num_classes=10, drop_rate=0.1, drop_path_rate=0.1, distilled_training=True)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    labels = jnp.array([1, 7])
    variables = jax.jit(model.init)({"params": jax.random.key(1)}, images)

    def loss_fn(params, rng):
        dropout, drop_path = jax.random.split(rng)
        ((logits, dist_logits), _), updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, images, train=True,
            rngs={"dropout": dropout, "drop_path": drop_path}, mutable=["batch_stats"])
        losses = [-jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(head), labels[:, None], axis=1))
                  for head in (logits, dist_logits)]
        return (losses[0] + losses[1]) / 2, updates["batch_stats"]

    (loss, new_stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        variables["params"], jax.random.key(2))
    assert np.isfinite(float(loss)) and all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    grads = flax.linen.meta.unbox(grads)
    for head in ("head", "head_dist"):
        assert float(jnp.linalg.norm(grads[head]["linear"]["kernel"])) > 0
    assert float(jnp.linalg.norm(grads["stem_conv1"]["conv"]["kernel"])) > 0
    old_var = variables["batch_stats"]["stem_conv1"]["bn"]["var"]
    assert float(jnp.max(jnp.abs(new_stats["stem_conv1"]["bn"]["var"] - old_var))) > 0
