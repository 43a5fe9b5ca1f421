"""LeViT: parity with timm 1.0.31 in linear and conv modes (params and BatchNorm statistics), recomputed bias
indices, converter errors, registry, distillation heads, training with BatchNorm updates."""
import flax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vitjax import models  # noqa: E402
from vitjax.models import levit  # noqa: E402

from parity_utils import (  # noqa: E402
    assert_converter_errors, assert_create_rejects, parameter_count, randomize_, relative_error, run_parity)

# At 64 px the s16 stem gives 4x4 tokens, the shrinking attentions 2x2 and 1x1.
SHRUNK = dict(img_size=64, embed_dim=(32, 48, 64), depth=(1, 2, 1), num_heads=(2, 3, 4), num_classes=10)


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
    expected, ours, intermediates, _, variables, _ = run_parity(reference, name, **SHRUNK)
    assert set(variables) == {"params", "batch_stats"}
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
    assert_converter_errors(
        state, "levit_128s", SHRUNK, missing="stages.1.downsample.attn_downsample.q.ln.bn.running_var",
        misshapen={"stages.2.blocks.0.attn.attention_biases": (
            np.zeros((4, 4), np.float32), "stages_2/blocks_0/attn/attention_biases")})


def test_registered_sizes_match_timm_parameter_counts():
    assert set(models.list_models("levit")) == set(timm.list_models("levit*"))
    # timm.create_model("levit_128s") parameters, both heads included
    assert parameter_count(models.create("levit_128s")) == 7_777_058


def test_validate_rejects_bad_settings():
    assert_create_rejects("levit_128s", [
        (dict(img_size=40), "divisible by the s16 stem"),
        (dict(activation="relu"), "valid choices"),
        (dict(stem_type="s4"), "valid choices"),
        (dict(depth=(2, 3)), "one entry per stage"),
    ])


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
