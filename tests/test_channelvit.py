"""ChannelViT: parity with the official insitro/ChannelViT backbones (plain and HCS layouts, on all channels, a
reordered subset and one channel), HCS equal to evaluating on the kept channels, the DINO position resampling
against torch, attention_impl="pallas" (interpret mode) equal to "xla" under the HCS key bias, parameter counts of
every official name, converter errors, and the 3-channel digits input of the runlocal config (which
test_families_train trains)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import config_utils, convert, data, models
from vitjax.models import channelvit

from parity_utils import (assert_converter_errors, assert_create_rejects, fixture_entries, measured_param_counts,
                          relative_error)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "channelvit", "channelvit.npz")
SMALL = dict(img_size=32, patch_size=8, in_chans=4, embed_dim=32, depth=2, num_heads=4, num_classes=5)
NAMES = {"plain": "channelvit_small", "hcs": "hcs_channelvit_small"}


@pytest.fixture(scope="module")
def fixture():
    return dict(np.load(FIXTURE))


@pytest.mark.parametrize("tag", sorted(NAMES))
def test_official_parity(fixture, tag):
    variables = convert.from_torch(fixture_entries(fixture, f"{tag}/state"), NAMES[tag], **SMALL)
    model = models.create(NAMES[tag], **SMALL)
    images = jnp.asarray(fixture["images"])
    subset = tuple(fixture["subset"].tolist())
    apply = jax.jit(model.apply, static_argnames="channels")
    for case, inputs, channels in (("all", images, None), ("subset", images[..., list(subset)], subset),
                                   ("one", images[..., 2:3], (2,))):
        logits, intermediates = apply(variables, inputs, channels=channels)
        assert len(intermediates["blocks"]) == 2
        assert intermediates["blocks"][0].shape == (2, 1 + 16 * inputs.shape[-1], 32)
        assert relative_error(logits, fixture[f"{tag}/logits_{case}"]) <= 1e-5, case
        assert relative_error(logits, fixture[f"{tag}/logits64_{case}"]) <= 1e-5, case
    # The official code resamples the position table whenever several channels are present: without it, no match.
    plain = models.create(NAMES[tag], **SMALL, dino_pos_resample=False)
    logits, _ = jax.jit(plain.apply)(variables, images)
    assert relative_error(logits, fixture[f"{tag}/logits64_all"]) > 1e-3


def test_dino_resample_matrix_equals_torch_interpolate():
    import torch
    table = np.random.default_rng(0).normal(size=(1, 3, 5, 5))
    ours = np.einsum("ij,kl,cjl->cik", channelvit.dino_resample_matrix(5), channelvit.dino_resample_matrix(5),
                     table[0])
    expected = torch.nn.functional.interpolate(torch.tensor(table), scale_factor=(5.1 / 5, 5.1 / 5),
                                               mode="bicubic")[0].numpy()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)
    assert not np.allclose(channelvit.dino_resample_matrix(5), np.eye(5), atol=1e-3)


def _tiny(**overrides):
    settings = dict(img_size=8, patch_size=4, in_chans=4, embed_dim=16, depth=1, num_heads=2, num_classes=3)
    return models.create("hcs_channelvit_tiny", **{**settings, **overrides})


def test_channel_sampling_equals_evaluating_on_the_kept_channels():
    model = _tiny()
    images = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    variables = jax.jit(model.init)(jax.random.key(1), images)
    train_apply = jax.jit(lambda rng: model.apply(variables, images, train=True, rngs={"channels": rng}))
    eval_apply = jax.jit(lambda images, channels: model.apply(variables, images, channels=channels))
    counts = set()
    for seed in range(6):
        logits, intermediates = train_apply(jax.random.key(seed))
        kept = np.flatnonzero(np.asarray(intermediates["channels_kept"]))
        counts.add(len(kept))
        expected, _ = eval_apply(images[..., kept], jnp.asarray(kept))
        assert relative_error(logits, expected) <= 1e-5, kept
    assert len(counts) >= 3  # the count is drawn too, not only which channels
    # Without the `channels` rng the draw comes from `dropout`; outside training every channel is kept.
    _, intermediates = model.apply(variables, images, train=True, rngs={"dropout": jax.random.key(0)})
    assert 1 <= int(np.sum(intermediates["channels_kept"])) <= 4
    _, intermediates = model.apply(variables, images)
    assert bool(np.all(intermediates["channels_kept"]))


def test_per_example_channels():
    model = _tiny()
    images = jax.random.normal(jax.random.key(0), (2, 8, 8, 2))
    variables = jax.jit(model.init, static_argnames="channels")(jax.random.key(1), images, channels=(0, 1))
    variables = jax.tree.map(np.asarray, variables)  # as restored from a checkpoint: a traced index must still work
    apply = jax.jit(lambda images, channels: model.apply(variables, images, channels=channels)[0])
    both = apply(images, jnp.array([[3, 1], [0, 2]]))
    separate = jnp.concatenate([apply(images[:1], jnp.array([3, 1])), apply(images[1:], jnp.array([0, 2]))])
    assert relative_error(both, separate) <= 1e-6


def test_pallas_equals_xla_under_the_sampling_key_bias():
    model = _tiny()
    images = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
    variables = jax.jit(model.init)(jax.random.key(1), images)
    xla = jax.jit(lambda v, rng: model.apply(v, images, train=True, rngs={"channels": rng}))
    # The first draw that keeps some channels but not all, so the key bias hides some tokens.
    rng = next(rng for rng in map(jax.random.key, range(20))
               if 0 < int(np.sum(xla(variables, rng)[1]["channels_kept"])) < 4)
    expected, _ = xla(variables, rng)
    pallas = _tiny(attention_impl="pallas")
    ours, _ = jax.jit(lambda v: pallas.apply(v, images, train=True, rngs={"channels": rng}))(variables)
    assert relative_error(ours, expected) <= 1e-5


def test_parameter_counts_equal_the_official_code(fixture):
    counts = dict(zip(fixture["param_names"].tolist(), fixture["param_counts"].tolist()))
    assert sorted(counts) == models.list_models("channelvit_")
    # The official backbones have no classifier; the table's models have 1000 classes ((D + 1) * 1000 more).
    heads = {name: (models.create(name).embed_dim + 1) * 1000 for name in counts}
    assert {name: count - heads[name] for name, count in measured_param_counts(counts).items()} == counts


def test_converter_errors_and_validation(fixture):
    state = fixture_entries(fixture, "hcs/state")
    assert_converter_errors(
        state, "hcs_channelvit_small", SMALL, missing="blocks.1.attn.qkv.bias",
        unexpected={"blocks.0.attn.extra": np.zeros(3, np.float32)},
        misshapen={"patch_embed.channel_embed.weight": (np.zeros((3, 32), np.float32), "channel_embed")})
    wrapped = {f"backbone.{key}": value for key, value in state.items() if not key.startswith("head.")}
    wrapped.update({key.replace("head.", "classifier."): value for key, value in state.items()
                    if key.startswith("head.")})
    ours = convert.from_torch(wrapped, "hcs_channelvit_small", **SMALL)
    np.testing.assert_array_equal(ours["params"]["head"]["bias"], state["head.bias"])
    assert_create_rejects("channelvit_small", [
        (dict(img_size=30), "multiple of patch_size"),
        (dict(num_heads=5), "num_heads"),
        (dict(attention_impl="flash"), "Unknown attention_impl .flash.; valid choices"),
    ])
    model = _tiny()
    images = jnp.zeros((1, 8, 8, 2))
    with pytest.raises(ValueError, match="pass `channels`"):
        model.init(jax.random.key(0), images)
    with pytest.raises(ValueError, match="must lie in 0..3"):
        model.init(jax.random.key(0), images, channels=(0, 4))


def test_runlocal_input_has_three_distinct_channels():
    """The runlocal config (which tests/test_families_train.py trains through the trainer) feeds 3-channel digits."""
    config = config_utils.load_config(os.path.join(REPO, "configs", "channelvit_i1k.py") + ":runlocal")
    assert config.model.in_chans == 3 and config.model_name.startswith("hcs_")
    import tensorflow as tf
    process = data.build_preprocess(config.input.pp_eval)
    image = np.arange(64, dtype=np.uint8).reshape(8, 8, 1) * 3
    out = np.asarray(process({"image": tf.constant(image), "label": tf.constant(0)}, tf.constant([0, 0]))["image"])
    assert out.shape == (8, 8, 3)
    scaled = image[..., 0] / 127.5 - 1.0
    np.testing.assert_allclose(out[..., 0], scaled, atol=1e-6)
    np.testing.assert_allclose(out[..., 1], scaled - np.roll(scaled, 1, axis=0), atol=1e-6)
    np.testing.assert_allclose(out[..., 2], scaled - np.roll(scaled, 1, axis=1), atol=1e-6)
