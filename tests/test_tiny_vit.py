"""TinyViT: parity with timm 1.0.31 (params and BatchNorm statistics), recomputed bias index, converter
errors, registry, training with BatchNorm updates."""
import flax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vitjax import models  # noqa: E402
from vitjax.models import tiny_vit  # noqa: E402

from parity_utils import (  # noqa: E402
    assert_converter_errors, assert_create_rejects, parameter_count, randomize_, relative_error, run_parity)

NAME = "tiny_vit_5m_224"
# At 64 px: the MBConv stage sees 16x16; stage 1 (8x8, window 8) is one whole window (timm's unpartitioned
# branch), stage 2 (4x4, window 3) pads to 6x6, stage 3 (2x2, window 2) is again exact.
SHRUNK = dict(embed_dims=(16, 32, 48, 64), depths=(1, 2, 1, 1), num_heads=(1, 2, 3, 4), window_sizes=(7, 8, 3, 2),
              num_classes=10)
IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def reference():
    """Returns a re-randomised, shrunk timm TinyViT-5M in eval mode."""
    model = timm.create_model(NAME, pretrained=False, **SHRUNK).eval()
    randomize_(model)
    return model


def test_timm_parity(reference):
    expected, ours, intermediates, _, variables, _ = run_parity(reference, NAME, img_size=IMAGE_SIZE, **SHRUNK)
    assert set(variables) == {"params", "batch_stats"}
    assert ours.shape == expected.shape
    assert relative_error(ours, expected) <= 1e-5
    assert [stage.shape[1:] for stage in intermediates["stages"]] == [
        (16, 16, 16), (8, 8, 32), (4, 4, 48), (2, 2, 64)]
    assert intermediates["pre_logits"].shape == (2, 64)


def test_attention_bias_index_matches_timm(reference):
    for stage in list(reference.stages)[1:]:
        for block in stage.blocks:
            window = (block.window_size, block.window_size)
            np.testing.assert_array_equal(tiny_vit.attention_bias_index(window),
                                          block.attn.attention_bias_idxs.numpy())


def test_converter_names_missing_and_misshapen_keys(reference):
    state = {key: value.numpy() for key, value in reference.state_dict().items()}
    assert_converter_errors(
        state, NAME, dict(img_size=IMAGE_SIZE, **SHRUNK), missing="stages.2.blocks.0.local_conv.bn.running_mean",
        misshapen={
            "stages.1.blocks.1.attn.attention_biases": (np.zeros((2, 9), np.float32),
                                                        "stages_1/blocks_1/attention_biases"),
            "stages.0.blocks.0.conv2.bn.running_var": (np.ones(3, np.float32), "stages_0/blocks_0/conv2/bn/var"),
        })


def test_registered_sizes_match_timm_parameter_counts():
    assert set(models.list_models("tiny_vit")) == set(timm.list_models("tiny_vit_*"))
    # timm.create_model("tiny_vit_5m_224", num_classes=1000) parameters
    assert parameter_count(models.create(NAME)) == 5_392_764


def test_validate_rejects_bad_settings():
    assert_create_rejects(NAME, [
        (dict(window_sizes=(7, 7, 14)), "one entry per stage"),
        (dict(num_heads=(2, 3, 5, 10)), "not divisible by its num_heads"),
        (dict(attention_impl="flash"), "valid choices"),
    ])


def test_trains_with_batch_stats_drop_path_and_grad():
    """32x32 input, train=True with both rngs and mutable batch_stats, and jax.grad."""
    model = models.create(NAME, img_size=32, embed_dims=(16, 32), depths=(1, 1), num_heads=(1, 2),
                          window_sizes=(7, 4), num_classes=10, drop_rate=0.1, drop_path_rate=0.2)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    labels = jnp.array([1, 7])
    variables = jax.jit(model.init)({"params": jax.random.key(1)}, images)
    assert "batch_stats" in variables

    def loss_fn(params, rng):
        dropout, drop_path = jax.random.split(rng)
        (logits, _), updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images,
                                           train=True, rngs={"dropout": dropout, "drop_path": drop_path},
                                           mutable=["batch_stats"])
        loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))
        return loss, updates["batch_stats"]

    (loss, new_stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        variables["params"], jax.random.key(2))
    assert np.isfinite(float(loss)) and all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    grads = flax.linen.meta.unbox(grads)
    for leaf in (grads["patch_embed_conv1"]["conv"]["kernel"], grads["head_norm"]["scale"], grads["head"]["kernel"]):
        assert float(jnp.linalg.norm(leaf)) > 0
    # Training mode moves the running statistics towards the batch's (torch momentum 0.1).
    old_mean = variables["batch_stats"]["patch_embed_conv1"]["bn"]["mean"]
    new_mean = new_stats["patch_embed_conv1"]["bn"]["mean"]
    assert float(jnp.max(jnp.abs(new_mean - old_mean))) > 0
