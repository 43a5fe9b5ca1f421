"""Swin Transformer v1: parity with timm 1.0.31, recomputed buffers, converter errors, registry, training."""
import flax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vitjax import convert, models  # noqa: E402
from vitjax.models import swin  # noqa: E402

from parity_utils import (  # noqa: E402
    assert_converter_errors, assert_create_rejects, parameter_count, randomize_, relative_error, run_parity)

# Three stages at 40 px: stage 0 (10x10, window 4) pads to 12 and shifts, stage 1 (5x5) pads,
# stage 2 (3x3) is smaller than the window, so its window is clipped to 3 and unshifted (as timm).
SHRUNK = dict(img_size=40, embed_dim=32, depths=(2, 2, 2), num_heads=(2, 2, 4), window_size=4, num_classes=10)


@pytest.fixture(scope="module")
def reference():
    """Returns a re-randomised, shrunk timm Swin-T in eval mode."""
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **SHRUNK).eval()
    randomize_(model)
    return model


@pytest.mark.parametrize("name, settings", [
    ("swin_tiny_patch4_window7_224", SHRUNK),
    # Per-stage windows (Swin-S3), four stages, the last two maps no larger than their windows.
    ("swin_s3_tiny_224", dict(img_size=64, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                              window_size=(4, 2, 4, 2), num_classes=10)),
])
def test_timm_parity(name, settings, reference):
    if name != "swin_tiny_patch4_window7_224":
        reference = timm.create_model(name, pretrained=False, **settings).eval()
        randomize_(reference)
    expected, ours, intermediates, model, _, _ = run_parity(reference, name, **settings)
    assert ours.shape == expected.shape
    assert relative_error(ours, expected) <= 1e-5
    assert [stage.shape[-1] for stage in intermediates["stages"]] == list(model.stage_dims)
    assert intermediates["pre_logits"].shape == (2, model.stage_dims[-1])


def test_buffers_match_timm(reference):
    """The relative position index and shifted-window masks timm keeps as buffers are recomputed exactly."""
    for stage in reference.layers:
        for block in stage.blocks:
            window = tuple(block.window_size)
            np.testing.assert_array_equal(swin.relative_position_index(window),
                                          block.attn.relative_position_index.numpy())
            if block.attn_mask is None:
                assert not any(block.shift_size)
                continue
            height, width = block.input_resolution
            padded = (-(-height // window[0]) * window[0], -(-width // window[1]) * window[1])
            np.testing.assert_array_equal(swin.shifted_window_mask(*padded, window, tuple(block.shift_size)),
                                          block.attn_mask.numpy())


def test_original_checkpoint_layout_converts_alike(reference):
    """Microsoft's layout (merging at the end of a stage, `head.*`) converts to the same params as timm's."""
    state = {key: value.numpy() for key, value in reference.state_dict().items()}
    original = {}
    for key, value in state.items():
        for stage in range(1, 3):
            key = key.replace(f"layers.{stage}.downsample", f"layers.{stage - 1}.downsample")
        original[key.replace("head.fc.", "head.")] = value
    original["layers.0.blocks.1.attn_mask"] = np.zeros((9, 16, 16), np.float32)  # buffers are dropped
    ours = convert.from_timm(original, "swin_tiny_patch4_window7_224", **SHRUNK)
    expected = convert.from_timm(state, "swin_tiny_patch4_window7_224", **SHRUNK)
    jax.tree.map(np.testing.assert_array_equal, ours, expected)


def test_converter_names_missing_and_misshapen_keys(reference):
    state = {key: value.numpy() for key, value in reference.state_dict().items()}
    assert_converter_errors(
        state, "swin_tiny_patch4_window7_224", SHRUNK,
        missing="layers.1.blocks.0.attn.relative_position_bias_table",
        misshapen={"layers.2.blocks.1.attn.relative_position_bias_table": (
            np.zeros((49, 4), np.float32), "layers_2/blocks_1/relative_position_bias_table")},
        unexpected={"layers.9.blocks.0.norm1.weight": np.ones(4, np.float32)})


def test_registered_sizes_match_timm_parameter_counts():
    assert set(models.list_models("swin")) == {name for name in timm.list_models("swin_*")
                                               if not name.startswith("swinv2")}
    count = parameter_count(models.create("swin_tiny_patch4_window7_224"))
    assert count == 28_288_354  # timm.create_model("swin_tiny_patch4_window7_224") parameters


def test_validate_rejects_bad_settings():
    assert_create_rejects("swin_tiny_patch4_window7_224", [
        (dict(img_size=30), "not divisible by patch_size"),
        (dict(window_size=(7, 7)), "one int per stage"),
        (dict(attention_impl="flash"), "valid choices"),
        (dict(global_pool="max"), "valid choices"),
    ])


def test_trains_with_dropout_drop_path_and_grad():
    """A 32x32 input, train=True with both rngs, and jax.grad: finite, non-zero gradients, rng-dependent output."""
    model = models.create("swin_tiny_patch4_window7_224", img_size=32, embed_dim=16, depths=(2, 1),
                          num_heads=(1, 2), window_size=4, num_classes=10, drop_rate=0.1, drop_path_rate=0.2)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    labels = jnp.array([1, 7])
    variables = jax.jit(model.init)({"params": jax.random.key(1)}, images)

    def loss_fn(params, rng):
        dropout, drop_path = jax.random.split(rng)
        logits, _ = model.apply({"params": params}, images, train=True,
                                rngs={"dropout": dropout, "drop_path": drop_path})
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

    loss_and_grad = jax.jit(jax.value_and_grad(loss_fn))
    loss_a, grads = loss_and_grad(variables["params"], jax.random.key(2))
    loss_b, _ = loss_and_grad(variables["params"], jax.random.key(3))
    assert np.isfinite(float(loss_a)) and all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    # Stochastic depth may drop a whole block for both images, so only the always-used ends must get gradient.
    for path in (("patch_embed", "proj", "kernel"), ("norm", "scale"), ("head", "kernel")):
        leaf = flax.linen.meta.unbox(grads)
        for key in path:
            leaf = leaf[key]
        assert float(jnp.linalg.norm(leaf)) > 0, path
    assert float(loss_a) != float(loss_b)
