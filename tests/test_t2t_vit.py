"""T2T-ViT: parity with the official yitu-opensource/T2T-ViT code (fixture), soft split = torch's nn.Unfold, the
sin-cos table, parameter counts of the official README, frozen tensors, converter errors and bad settings."""
import os
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import convert, models, optim
from vitjax.models import t2t_vit

from parity_utils import (assert_converter_errors, assert_create_rejects, fixture_entries, measured_param_counts,
                          relative_error)

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "t2t_vit", "t2t_vit.npz")
SMALL = dict(img_size=32, embed_dim=32, depth=2, num_heads=2, mlp_ratio=3.0, num_classes=5, token_dim=16)
CASES = {"performer": ("t2t_vit_14", {}), "transformer": ("t2t_vit_t_14", dict(qk_scale=32 ** -0.5))}


def _case(data, case):
    state = fixture_entries(data, f"{case}/state")
    name, extra = CASES[case]
    return state, name, {**SMALL, **extra}


@pytest.mark.parametrize("case", sorted(CASES))
def test_official_parity(case):
    data = dict(np.load(FIXTURE))
    state, name, settings = _case(data, case)
    variables = convert.from_timm(state, name, **settings)
    model = models.create(name, **settings)
    logits, intermediates = jax.jit(model.apply)(variables, jnp.asarray(data["images"]))
    assert logits.shape == (2, 5) and intermediates["tokens"].shape == (2, 4, 32)
    assert relative_error(logits, data[f"{case}/logits"]) <= 1e-5
    if f"{case}/logits64" in data:
        assert relative_error(logits, data[f"{case}/logits64"]) <= 1e-5


def test_soft_split_is_torch_unfold():
    torch = pytest.importorskip("torch")
    images = np.random.default_rng(0).normal(size=(2, 3, 12, 12)).astype(np.float32)
    expected = torch.nn.functional.unfold(torch.from_numpy(images), 7, padding=2, stride=4).transpose(1, 2).numpy()
    ours, grid = t2t_vit.soft_split(jnp.asarray(images.transpose(0, 2, 3, 1)), 7, 4, 2)
    assert grid == (3, 3)
    np.testing.assert_array_equal(np.asarray(ours), expected)


def test_sinusoid_table_and_init_match_official():
    data = np.load(FIXTURE)
    assert relative_error(t2t_vit.sinusoid_table(197, 64), data["sinusoid_197_64"]) <= 1e-7


def test_parameter_counts_match_the_official_readme():
    """The README's counts (every nn.Parameter, as main.py counts them: the frozen pos_embed and performer `w` too)
    equal experiments/out/model_table.json's, which test_registry checks against the models."""
    readme = {"t2t_vit_7": 4.3, "t2t_vit_10": 5.9, "t2t_vit_12": 6.9, "t2t_vit_14": 21.5, "t2t_vit_19": 39.2,
              "t2t_vit_24": 64.1, "t2t_vit_t_14": 21.5, "t2t_vit_t_19": 39.2, "t2t_vit_t_24": 64.1}
    assert {name: round(count / 1e6, 1) for name, count in measured_param_counts(readme).items()} == readme


def test_frozen_tensors_get_no_gradient_and_no_decay():
    performer = t2t_vit.TokenPerformer(16)
    w = np.asarray(flax.linen.meta.unbox(performer.init(jax.random.key(0), jnp.zeros((1, 4, 12))))["params"]["w"])
    np.testing.assert_allclose(w @ w.T, 8.0 * np.eye(8), atol=1e-4)  # orthogonal rows scaled by sqrt(m), m = 8
    data = dict(np.load(FIXTURE))
    state, name, settings = _case(data, "performer")
    model = models.create(name, **settings)
    params = convert.from_timm(state, name, **settings)["params"]
    images = jnp.asarray(data["images"])

    def loss(params):
        logits, _ = model.apply({"params": params}, images, train=True,
                                rngs={"dropout": jax.random.key(1), "drop_path": jax.random.key(2)})
        return jnp.mean(logits ** 2)

    grads = optim.param_paths(jax.jit(jax.grad(loss))(params))
    frozen = [path for path in grads if path in ("pos_embed",) or path.endswith("/w")]
    assert len(frozen) == 3 and all(not np.any(np.asarray(grads[path])) for path in frozen)
    assert np.any(np.asarray(grads["tokens_to_token/attention1/kqv/kernel"]))
    for path in frozen:
        assert any(re.search(pattern, path) for pattern in model.no_weight_decay())
    # A freshly built model's table is the official sin-cos one (what the fixture's pos_embed holds).
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)
    assert flax.linen.meta.unbox(shapes)["params"]["pos_embed"].shape == (1, 5, 32)
    assert relative_error(t2t_vit.sinusoid_table(5, 32), state["pos_embed"]) <= 1e-7


def test_converter_errors_and_validation():
    data = dict(np.load(FIXTURE))
    state, name, settings = _case(data, "performer")
    assert_converter_errors(
        state, name, settings, missing="tokens_to_token.attention2.w",
        unexpected={"tokens_to_token.attention1.extra": np.zeros(3, np.float32)},
        misshapen={"tokens_to_token.project.bias": (np.zeros(7, np.float32), "tokens_to_token/project/bias")})
    assert_create_rejects("t2t_vit_14", [
        (dict(tokens_type="convolution"), r"\['transformer', 'performer'\]"),
        (dict(img_size=200), "multiple of 16"),
        (dict(num_heads=5), "not divisible"),
    ])
