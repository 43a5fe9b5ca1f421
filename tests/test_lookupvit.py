"""LookupViT: its two cross-attentions against the public reimplementation's modules (lucidrains' vit-pytorch
`look_vit.py`, a reimplementation, not the authors' code), the bilinear token resize against torch,
multi-resolution, cost against a ViT of the same width, and bad settings."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import models
from vitjax.models import lookupvit

from parity_utils import assert_create_rejects, random_variables, relative_error

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "lookupvit", "lookupvit.npz")
SMALL = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10, compressed_grid=(4, 4))


def _norm(gamma):
    # lucidrains' LayerNorm has no bias and a unit-offset scale.
    return {"scale": gamma + 1.0, "bias": np.zeros_like(gamma)}


def _heads_in(weight, heads=2):
    return {"kernel": weight.T.reshape(weight.shape[1], heads, -1), "bias": np.zeros((heads, weight.shape[0] // heads),
                                                                                     np.float32)}


def _heads_out(weight, heads=2):
    return {"kernel": weight.T.reshape(heads, -1, weight.shape[0]), "bias": np.zeros(weight.shape[0], np.float32)}


def test_cross_attentions_match_the_reimplementation():
    data = dict(np.load(FIXTURE))
    gather_params = {"norm_query": _norm(data["gather.norm.gamma"]),
                     "norm_context": _norm(data["gather.norm_context.gamma"]),
                     "q": _heads_in(data["gather.to_q.weight"]), "k": _heads_in(data["gather.to_k.weight"]),
                     "v": _heads_in(data["gather.to_v.weight"]), "proj": _heads_out(data["gather.to_out.1.weight"])}
    gather = lookupvit.LookupCrossAttention(2, norm_eps=1e-5)
    update, logits = gather.apply({"params": gather_params}, data["compressed"], data["lookup"])
    assert relative_error(logits, data["qk_sim"]) <= 1e-5
    assert relative_error(update, data["gather_out"]) <= 1e-5

    infuse_params = {"norm_context": _norm(data["infuse.norm_context.gamma"]),
                     "v": _heads_in(data["infuse.to_v.weight"]), "proj": _heads_out(data["infuse.to_out.1.weight"])}
    infuse = lookupvit.ReusedCrossAttention(2, norm_eps=1e-5)
    out = infuse.apply({"params": infuse_params}, data["refined"], logits)
    assert out.shape == (2, 36, 32)
    assert relative_error(out, data["infuse_out"]) <= 1e-5


def test_token_resize_matches_torch_bilinear():
    data = np.load(FIXTURE)
    tokens = data["resize_in"].transpose(0, 2, 3, 1).reshape(2, 36, 32)
    ours = lookupvit.resize_token_grid(jnp.asarray(tokens), (6, 6), (4, 4))
    expected = data["resize_out"].transpose(0, 2, 3, 1).reshape(2, 16, 32)
    assert relative_error(ours, expected) <= 1e-6


def test_multi_resolution_shares_weights():
    model = models.create("lookupvit_base_patch16_224_7x7", **{**SMALL, "depth": 1},
                          train_grids=((2, 2), (4, 4), (8, 8)))
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    variables = random_variables(model, (32, 32, 3))
    # One compile for the three evaluations (eager flax applies cost more CPU than this jit).
    grids = (None, (2, 2), (8, 8))
    results = jax.jit(lambda v: [model.apply(v, images, compressed_grid=g) for g in grids])(variables)
    (logits, inter), *others = results
    assert logits.shape == (2, 10) and inter["compressed"].shape == (2, 16, 32) and inter["lookup"].shape == (2, 64, 32)
    outputs = {}
    for grid, (out, inter) in zip(grids[1:], others):
        outputs[grid] = out
        assert inter["compressed"].shape == (2, grid[0] * grid[1], 32)
    assert relative_error(outputs[(2, 2)], outputs[(8, 8)]) > 1e-3
    # Training draws one grid per step (all three compiled once under nn.switch); eval mode uses the fixed grid.
    step = jax.jit(lambda key: model.apply(variables, images, train=True, rngs={"dropout": key, "drop_path": key}))
    drawn = {}
    for seed in range(10):
        train_logits, inter = step(jax.random.key(seed))
        drawn[int(inter["grid_index"])] = np.asarray(train_logits)
    assert set(drawn) == {0, 1, 2}
    np.testing.assert_allclose(drawn[0], outputs[(2, 2)], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(drawn[2], outputs[(8, 8)], rtol=1e-5, atol=1e-6)


def _gflops(model, size):
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, {"params": jax.random.key(0)}, images)
    cost = jax.jit(lambda v, x: model.apply(v, x)).lower(shapes, images).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) / 1e9


def test_cost_falls_with_the_compressed_grid():
    """Same width and depth, 64 px / 4 px patches (256 lookup tokens): compute below a ViT's, rising with M."""
    settings = dict(img_size=64, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    vit = _gflops(models.create("vit_tiny_patch16_224", **settings, mlp_dim=256), 64)
    lookup = {grid: _gflops(models.create("lookupvit_base_patch16_224_7x7", **settings, compressed_grid=grid), 64)
              for grid in ((4, 4), (8, 8))}
    assert lookup[(4, 4)] < lookup[(8, 8)] < 0.7 * vit


def test_registry_and_validation():
    grids = ("10x10", "3x3", "5x5", "7x7")
    assert models.list_models("lookupvit") == [f"lookupvit_base_patch16_224_{grid}" for grid in grids]
    assert_create_rejects("lookupvit_base_patch16_224_7x7", [
        (dict(compressed_grid=(20, 20)), r"1 <= h <= 14"),
        (dict(train_grids=((3, 3), (0, 2))), "train_grids"),
        (dict(global_pool="token"), r"\['compressed', 'lookup', 'both'\]"),
        (dict(img_size=100), "not divisible by patch_size"),
    ])
    model = models.create("lookupvit_base_patch16_224_7x7", **SMALL)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="compressed_grid"):
        jax.eval_shape(lambda v, x: model.apply(v, x, compressed_grid=(9, 9)), variables, jnp.zeros((1, 32, 32, 3)))
