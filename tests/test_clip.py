"""CLIP / SigLIP two-tower model: shapes, unit-norm features, EOT pooling, and bad input failing before compile."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import models


@pytest.fixture(scope="module")
def tiny():
    model = models.create("clip_vit_tiny_digits")
    images = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
    tokens = np.zeros((3, 16), np.int32)
    rng = np.random.RandomState(0)
    for row, length in enumerate((5, 9, 16)):
        tokens[row, :length] = rng.randint(1, 49406, length)
        tokens[row, 0], tokens[row, length - 1] = 49406, 49407   # <start_of_text> ... <end_of_text>
    variables = jax.jit(model.init)(jax.random.key(1), images, jnp.asarray(tokens))
    return model, variables, images, jnp.asarray(tokens)


def test_forward_shapes_and_unit_norm(tiny):
    model, variables, images, tokens = tiny
    out, intermediates = jax.jit(model.apply)(variables, images, tokens)
    assert out["image"].shape == out["text"].shape == (3, 64)
    assert out["image"].dtype == out["text"].dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(out["image"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["text"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(float(out["scale"]), 1 / 0.07, rtol=1e-5)
    assert out["bias"] is None
    assert intermediates["image"]["pre_logits"].shape == (3, 64)
    # The three texts differ, so their features do too.
    assert float(jnp.max(jnp.abs(out["text"][0] - out["text"][1]))) > 1e-3
    image = jax.jit(lambda v, x: model.apply(v, x, method=model.encode_image))(variables, images)
    text = jax.jit(lambda v, t: model.apply(v, t, normalize=False, method=model.encode_text))(variables, tokens)
    np.testing.assert_allclose(image, out["image"], atol=1e-6)
    np.testing.assert_allclose(text / np.linalg.norm(text, axis=-1, keepdims=True), out["text"], atol=1e-6)
    assert float(jnp.min(jnp.linalg.norm(text, axis=-1))) > 0 and abs(float(jnp.linalg.norm(text[0])) - 1) > 1e-3


def test_text_pools_the_end_of_text_token_and_is_causal(tiny):
    model, variables, _, tokens = tiny
    # Tokens after <end_of_text> (padding) cannot reach it through the causal mask; tokens before it do.
    changed_after = tokens.at[0, 7].set(123)
    changed_before = tokens.at[0, 2].set(123)
    encode = jax.jit(lambda t: model.apply(variables, t, method=model.encode_text))
    base = encode(tokens)
    np.testing.assert_allclose(encode(changed_after)[0], base[0], atol=1e-6)
    assert float(jnp.max(jnp.abs(encode(changed_before)[0] - base[0]))) > 1e-4


def test_siglip_has_a_bias_and_bidirectional_text():
    model = models.create("siglip_base_patch16_224", img_size=16, patch_size=8, embed_dim=32, vision_width=32,
                          vision_depth=1, vision_heads=2, text_width=32, text_depth=1, text_heads=2,
                          vocab_size=100, context_length=8)
    images = jnp.ones((2, 16, 16, 3))
    tokens = jnp.asarray(np.arange(16).reshape(2, 8) % 100, jnp.int32)
    variables = jax.jit(model.init)(jax.random.key(0), images, tokens)
    out, _ = jax.jit(model.apply)(variables, images, tokens)
    np.testing.assert_allclose(float(out["scale"]), 10.0, rtol=1e-6)
    np.testing.assert_allclose(float(out["bias"]), -10.0)
    # Pooling the last position of a bidirectional tower: the first token changes it.
    changed = jax.jit(lambda v, t: model.apply(v, t, method=model.encode_text))(variables, tokens.at[0, 0].set(50))
    assert float(jnp.max(jnp.abs(changed[0] - out["text"][0]))) > 1e-4
    assert "attn_pool" in variables["params"]["visual"] and "image_proj" not in variables["params"]


def test_init_logit_scale_is_a_field():
    model = models.create("clip_vit_tiny_digits", init_logit_scale=math.log(10.0), init_logit_bias=-10.0)
    variables = jax.eval_shape(model.init, jax.random.key(0), *model.example_inputs(2))
    assert variables["params"]["logit_scale"].shape == () and "logit_bias" in variables["params"]


def test_bad_input_fails_before_compile(tiny):
    model, variables, images, tokens = tiny
    with pytest.raises(ValueError, match="same batch size"):
        model.apply(variables, images[:2], tokens)
    with pytest.raises(ValueError, match="context_length 16"):
        model.apply(variables, jnp.zeros((3, 20), jnp.int32), method=model.encode_text)
    with pytest.raises(ValueError, match="integer ids"):
        model.apply(variables, jnp.zeros((3, 16)), method=model.encode_text)
    with pytest.raises(ValueError, match=r"\(batch, 16, 16, 3\)"):
        model.apply(variables, jnp.zeros((3, 32, 32, 3)), method=model.encode_image)
    with pytest.raises(ValueError, match="valid choices"):
        models.create("clip_vit_tiny_digits", text_pool="mean")
    with pytest.raises(ValueError, match="valid choices"):
        models.create("clip_vit_tiny_digits", mlp_activation="relu")


def test_pretrained_preprocessing():
    # open_clip's OpenAI-statistics normalisation (open_clip.constants) and SigLIP's [-1, 1] inputs.
    assert models.pretrained_cfg("clip_vit_b32") == dict(
        input_size=(3, 224, 224), mean=(0.48145466, 0.4578275, 0.40821073),
        std=(0.26862954, 0.26130258, 0.27577711), crop_pct=1.0, interpolation="bicubic")
    assert models.pretrained_cfg("siglip_base_patch16_224")["mean"] == (0.5, 0.5, 0.5)
    assert models.pretrained_cfg("clip_vit_tiny_digits")["input_size"] == (3, 16, 16)
