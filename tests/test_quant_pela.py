"""PELA: SVD low-rank replacement (exact at full rank), its parameter / MAC counts, bad input, recovery loss."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vitjax import models
from vitjax.quant import pela

IMAGE_SHAPE = (16, 16, 1)
TOKENS = 17          # 16 patches + the class token


@pytest.fixture(scope="module")
def vit():
    module = models.create("vit", variant="mu/4", num_classes=10, img_size=16, in_chans=1, embed_dim=32, depth=2,
                           num_heads=2, mlp_dim=64)
    images = jax.random.normal(jax.random.PRNGKey(1), (4,) + IMAGE_SHAPE)
    variables = module.init(jax.random.PRNGKey(0), images)
    return module, variables, images


def test_full_rank_equals_original(vit):
    module, variables, images = vit
    lowrank, lowrank_variables = pela.compress(module, variables, images, rank=1.0)
    # qkv and proj are DenseGeneral (kernels 32x2x... flattened), fc1 / fc2 Dense; the head is left alone.
    assert [layer.name for layer in lowrank.layers[:4]] == [
        "blocks_0/attn/qkv", "blocks_0/attn/proj", "blocks_0/mlp/fc1", "blocks_0/mlp/fc2"]
    assert len(lowrank.layers) == 8 and all(layer.rank == 32 for layer in lowrank.layers)
    assert "kernel" not in lowrank_variables["params"]["blocks_0"]["attn"].get("qkv", {})
    expected, _ = module.apply(variables, images)
    got, _ = lowrank.apply(lowrank_variables, images)
    error = float(jnp.max(jnp.abs(got - expected)) / jnp.max(jnp.abs(expected)))
    assert error <= 1e-5, error


def test_svd_factors_are_the_best_rank_r_approximation():
    kernel = np.random.default_rng(0).normal(size=(24, 40)).astype(np.float32)
    left, right = pela.svd_factors(kernel, 5)
    singular = np.linalg.svd(kernel.astype(np.float64), compute_uv=False)
    # Eckart-Young: the Frobenius error of the truncated SVD is the norm of the dropped singular values.
    np.testing.assert_allclose(np.linalg.norm(kernel - left @ right), np.linalg.norm(singular[5:]), rtol=1e-6)
    # The singular values are split evenly: both factors carry sqrt(S).
    np.testing.assert_allclose(np.linalg.norm(left, axis=0), np.sqrt(singular[:5]), rtol=1e-6)


def test_params_and_macs_at_two_ranks(vit):
    module, variables, images = vit
    full_params = pela.count_params(variables)
    full_macs = pela.gmacs(lambda v, x: module.apply(v, x)[0], variables, IMAGE_SHAPE)
    for rank, expected_rank in ((0.5, 16), (4, 4)):
        lowrank, lowrank_variables = pela.compress(module, variables, images, rank=rank)
        assert {layer.rank for layer in lowrank.layers} == {expected_rank}
        saved = sum(layer.in_features * layer.out_features - expected_rank * (layer.in_features + layer.out_features)
                    for layer in lowrank.layers)
        assert pela.count_params(lowrank_variables) == full_params - saved
        macs = pela.gmacs(lambda v, x: lowrank.apply(v, x)[0], lowrank_variables, IMAGE_SHAPE)
        # Only the replaced matmuls change: TOKENS rows each; XLA counts the rest identically.
        np.testing.assert_allclose((full_macs - macs) * 1e9, TOKENS * saved, rtol=0.02)


def test_per_layer_ranks(vit):
    module, variables, images = vit
    lowrank, lowrank_variables = pela.compress(module, variables, images,
                                               rank={"blocks_1/mlp/fc1": 3, "blocks_0/attn/qkv": 0.25})
    assert {layer.name: layer.rank for layer in lowrank.layers} == {"blocks_0/attn/qkv": 8, "blocks_1/mlp/fc1": 3}
    assert "kernel" in lowrank_variables["params"]["blocks_0"]["mlp"]["fc1"]
    assert lowrank_variables["low_rank"]["blocks_1/mlp/fc1"]["left"].shape == (32, 3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), r"must be in 1..32 \(min\(in, out\)\), got 0"),
    (dict(rank=33), r"must be in 1..32 \(min\(in, out\)\), got 33"),
    (dict(rank=1.5), r"must be in \(0, 1\], got 1.5"),
    (dict(rank=-0.1), r"must be in \(0, 1\], got -0.1"),
    (dict(targets="decoder"), r"match no linear layer.*valid paths: \['blocks_0/attn/qkv'"),
    (dict(rank={"blocks_0/qkv": 4}), r"\['blocks_0/qkv'\] are not linear layers.*valid paths:.*'head'"),
])
def test_bad_input_fails_before_compile(vit, monkeypatch, kwargs, message):
    module, variables, images = vit

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled before checking the arguments")

    monkeypatch.setattr(jax, "jit", no_compile)
    with pytest.raises(ValueError, match=message):
        pela.compress(module, variables, images, **kwargs)


def test_perturbation_penalty_is_the_squared_gap_of_the_largest_change(vit):
    module, variables, images = vit
    lowrank, lowrank_variables = pela.compress(module, variables, images, rank=4)
    expected = []
    for layer in lowrank.layers:
        parts = layer.name.split("/")
        kernel = nn.meta.unbox(variables["params"][parts[0]][parts[1]][parts[2]]["kernel"])
        factors = lowrank_variables["low_rank"][layer.name]
        change = np.asarray(factors["left"]) @ np.asarray(factors["right"]) - \
            np.asarray(kernel).reshape(layer.in_features, layer.out_features)
        expected.append((np.abs(change).max() - 1e-3) ** 2)
    got = pela.perturbation_penalty(lowrank, lowrank_variables["low_rank"], variables["params"])
    np.testing.assert_allclose(float(got), np.mean(expected), rtol=1e-5)
    assert float(got) > 1e-4      # rank 4 of 32 changes the kernels


def test_recovery_training_reduces_feature_gap(vit):
    module, variables, images = vit
    lowrank, lowrank_variables = pela.compress(module, variables, images, rank=4)
    trainable = {"params": lowrank_variables["params"], "low_rank": lowrank_variables["low_rank"]}
    optimizer = optax.adam(3e-3)
    state = optimizer.init(trainable)

    @jax.jit
    def step(trainable, state):
        (loss, terms), grads = jax.value_and_grad(
            lambda t: pela.recovery_loss(lowrank, t, variables, images), has_aux=True)(trainable)
        updates, state = optimizer.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, terms

    _, _, first = step(trainable, state)
    for _ in range(30):
        trainable, state, terms = step(trainable, state)
    assert set(first) == {"features", "logits", "perturbation"}
    assert float(terms["features"]) < 0.5 * float(first["features"])
    assert float(terms["perturbation"]) < float(first["perturbation"])


def test_swin_full_rank_equals_original_and_skips_downsampling():
    module = models.create("swin_tiny_patch4_window7_224", img_size=16, patch_size=2, in_chans=1, embed_dim=16,
                           depths=(1, 1), num_heads=(1, 2), window_size=4, num_classes=10)
    images = jax.random.normal(jax.random.PRNGKey(1), (2,) + IMAGE_SHAPE)
    variables = module.init(jax.random.PRNGKey(0), images)
    lowrank, lowrank_variables = pela.compress(module, variables, images, rank=1.0)
    names = [layer.name for layer in lowrank.layers]
    assert len(names) == 8 and names[-1] == "layers_1/blocks_0/mlp/fc2"
    assert not any("downsample" in name or "head" in name for name in names)
    expected, _ = module.apply(variables, images)
    got, _ = lowrank.apply(lowrank_variables, images)
    error = float(jnp.max(jnp.abs(got - expected)) / jnp.max(jnp.abs(expected)))
    assert error <= 1e-5, error
    _, features = lowrank.apply(lowrank_variables, images, features=pela.DEFAULT_FEATURES)
    assert len(features) == 2     # one per Swin block
