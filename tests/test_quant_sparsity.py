"""vitjax.quant.sparsity: L1 subgradient, magnitude masks at the asked sparsity, masks kept through fine-tuning."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vitjax.quant import sparsity


def params():
    rng = np.random.default_rng(0)
    return {"blocks_0": {"fc1": {"kernel": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
                                 "bias": jnp.asarray(rng.normal(size=(16,)), jnp.float32)},
                         "fc2": {"kernel": jnp.asarray(rng.normal(size=(16, 8)) * 0.1, jnp.float32)}},
            "head": {"kernel": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)}}


def test_magnitude_masks_global_and_layer():
    """Exactly the asked fraction of prunable weights goes; global pruning takes more of the small layer."""
    tree = params()
    for scope in ("global", "layer"):
        masks = sparsity.magnitude_masks(tree, 0.75, scope=scope)
        assert masks["head"]["kernel"] is None and masks["blocks_0"]["fc1"]["bias"] is None
        pruned = sparsity.apply_masks(tree, masks)
        assert sparsity.sparsity_of(pruned) == pytest.approx(0.75)
        np.testing.assert_array_equal(pruned["head"]["kernel"], tree["head"]["kernel"])
        kept_small = float(np.mean(np.asarray(masks["blocks_0"]["fc2"]["kernel"])))
        assert kept_small == (0.0 if scope == "global" else 0.25)  # fc2's weights are 10x smaller
    with pytest.raises(ValueError, match="valid choices"):
        sparsity.magnitude_masks(tree, 0.5, scope="block")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        sparsity.magnitude_masks(tree, 1.0)


def test_l1_then_masked_finetuning():
    """L1 shrinks the prunable weights (not the head); pruned weights stay exactly zero through fine-tuning."""
    tree = params()
    target = jax.random.normal(jax.random.key(0), (4, 3))
    inputs = jax.random.normal(jax.random.key(1), (4, 8))

    def loss(p):
        hidden = jax.nn.gelu(inputs @ p["blocks_0"]["fc1"]["kernel"] + p["blocks_0"]["fc1"]["bias"])
        return jnp.mean((hidden @ p["blocks_0"]["fc2"]["kernel"] @ p["head"]["kernel"] - target) ** 2)

    def train(p, optimizer, steps):
        state = optimizer.init(p)
        for _ in range(steps):
            updates, state = optimizer.update(jax.grad(loss)(p), state, p)
            p = optax.apply_updates(p, updates)
        return p

    plain = train(tree, optax.sgd(0.01), 30)
    sparse = train(tree, optax.chain(sparsity.l1_regularization(0.5), optax.sgd(0.01)), 30)
    l1 = lambda p: float(jnp.abs(p["blocks_0"]["fc1"]["kernel"]).sum())  # noqa: E731
    assert l1(sparse) < l1(plain) - 0.5 * 0.01 * 30 * 8 * 16 * 0.9
    transform = sparsity.l1_regularization(0.5)
    added, _ = transform.update(jax.tree.map(jnp.zeros_like, tree), transform.init(tree), tree)
    np.testing.assert_array_equal(added["blocks_0"]["fc1"]["kernel"], 0.5 * np.sign(tree["blocks_0"]["fc1"]["kernel"]))
    assert not np.any(added["blocks_0"]["fc1"]["bias"]) and not np.any(added["head"]["kernel"])
    masks = sparsity.magnitude_masks(sparse, 0.5)
    pruned = sparsity.apply_masks(sparse, masks)
    tuned = train(pruned, optax.chain(optax.adamw(0.01, weight_decay=0.1), sparsity.keep_masked(masks)), 10)
    assert sparsity.sparsity_of(tuned) == pytest.approx(0.5)
    kernel, mask = np.asarray(tuned["blocks_0"]["fc1"]["kernel"]), np.asarray(masks["blocks_0"]["fc1"]["kernel"])
    assert np.all(kernel[~mask] == 0) and np.all(kernel[mask] != 0)
    assert loss(tuned) < loss(pruned)
