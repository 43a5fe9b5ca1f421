"""Zero-TPrune on the token-reduction interface: WPR equals a NumPy power iteration, token counts, the
I- and S-stage choices, pallas == xla, bad settings rejected before compile, keep-all equals unreduced."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from vitjax import models, tokens
from vitjax.tokens import base, zero_tprune

from parity_utils import random_variables

TINY = dict(num_classes=5, img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2)
IMAGES = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
SETTINGS = dict(method="zero_tprune", keep_rate=0.5, prune_loc=(0, 1))


@pytest.fixture(scope="module")
def tiny_variables():
    return random_variables(models.create("vit_tiny_patch16_224", **TINY), (16, 16, 3), std=0.2)


def test_wpr_equals_numpy_power_iteration():
    # A hand-made 4-token graph: everyone attends mostly to token 2, token 2 splits between 0 and 3.
    graph = np.array([[0.1, 0.1, 0.7, 0.1],
                      [0.1, 0.1, 0.7, 0.1],
                      [0.4, 0.0, 0.2, 0.4],
                      [0.2, 0.1, 0.6, 0.1]], np.float32)
    rng = np.random.default_rng(0)
    random_graph = rng.random((4, 4)).astype(np.float32)
    random_graph /= random_graph.sum(-1, keepdims=True)
    attention = np.stack([graph, random_graph])[None]  # (1, 2 heads, 4, 4)
    expected = np.full((2, 4), 0.25)
    for _ in range(30):
        expected = np.stack([attention[0, h].T.astype(np.float64) @ expected[h] for h in range(2)])
    scores = np.asarray(zero_tprune.weighted_page_rank(jnp.asarray(attention), 30))[0]
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    np.testing.assert_allclose(scores.sum(-1), 1.0, rtol=1e-6)
    assert scores[0].argmax() == 2 and scores[0].argmin() == 1
    # One step is the in-degree weighted by the uniform start: the column means.
    np.testing.assert_allclose(np.asarray(zero_tprune.weighted_page_rank(jnp.asarray(attention), 1))[0, 0],
                               graph.mean(0), rtol=1e-6)


def test_plan_token_counts_and_official_like_names():
    assert "zero_tprune" in tokens.list_methods()
    assert tokens.method_options("zero_tprune") == ("keep_rate", "prune_loc", "wpr_iterations",
                                                    "similarity_fraction")
    method = tokens.parse(dict(method="zero_tprune", keep_rate=0.7))
    plan = method.plan(197, 12, 1)
    assert plan.token_counts == (197,) * 3 + (1 + 138,) * 3 + (1 + 97,) * 3 + (1 + 68,) * 3
    first = plan.blocks[3]
    assert (first.by_importance, first.by_similarity) == (29, 29)  # 58 removed, half by similarity
    only_importance = tokens.parse(dict(SETTINGS, similarity_fraction=0.0)).plan(17, 3, 1)
    assert only_importance.blocks[0].by_similarity == 0 and only_importance.token_counts == (9, 5, 5)
    # The S-stage pairs survivors: it cannot prune more than half of them.
    only_similarity = tokens.parse(dict(SETTINGS, keep_rate=0.25, similarity_fraction=1.0)).plan(17, 3, 1)
    block = only_similarity.blocks[0]
    assert block.by_importance + block.by_similarity == 12 and block.by_similarity <= (16 - block.by_importance) // 2


def test_token_counts_per_block_and_kept_tokens(tiny_variables):
    model = models.create("deit_tiny_distilled_patch16_224", token_reduction=SETTINGS, **TINY)
    variables = random_variables(model, (16, 16, 3), std=0.2)
    logits, intermediates = jax.jit(model.apply)(variables, IMAGES)
    assert [block.shape[1] for block in intermediates["blocks"]] == [2 + 8, 2 + 4, 2 + 4]
    assert intermediates["zero_tprune"]["token_counts"] == (10, 6, 6)
    kept = np.asarray(intermediates["zero_tprune"]["kept_index"][0])
    assert kept.shape == (2, 8) and all(len(set(row)) == 8 and list(row) == sorted(row) for row in kept)
    wpr = np.asarray(intermediates["zero_tprune"]["wpr"][0])
    assert wpr.shape == (2, 18) and np.allclose(wpr.sum(-1), 1.0, atol=1e-5)
    assert np.isfinite(np.asarray(logits)).all()


def test_stages_prune_the_least_important_and_the_most_similar():
    # Six patch tokens (no prefix). The query reads only the first key coordinate, log(importance), so every
    # attention row equals `importance` and so does the WPR. The other two coordinates (large) set the
    # cosine similarity of the keys.
    importance = np.array([0.30, 0.05, 0.20, 0.15, 0.25, 0.05])
    direction = 100 * np.array([[1, 0], [0, 1], [0, 1], [1, 0.01], [-1, 1], [0, 1]])
    key = np.concatenate([np.log(importance)[:, None] * np.sqrt(3), direction], -1)
    key = jnp.asarray(key[None, :, None], jnp.float32)
    query = jnp.zeros_like(key).at[..., 0].set(1.0)
    view = base.AttentionView(query, key, key)
    features = jnp.arange(6.0)[None, :, None] * jnp.ones((1, 6, 4))
    # I-stage only: the 2 least important (1 and 5) go, the rest stay in order.
    out, state = zero_tprune.BlockPrune(2, 0, 0, 5)(features, view, {})
    np.testing.assert_allclose(np.asarray(state["wpr"][0]), importance, rtol=1e-5)
    assert list(np.asarray(state["kept_index"][0])) == [0, 2, 3, 4]
    np.testing.assert_allclose(np.asarray(out[0, :, 0]), [0, 2, 3, 4])
    # Then the S-stage: by score 0, 4, 2, 3 -> B = {0, 2}, A = {4, 3}; 3's key nearly equals 0's (cosine ~1),
    # 4's is at 45 degrees to 2's, so 3 goes although it is more important than the I-stage's victims' peers.
    out, state = zero_tprune.BlockPrune(2, 1, 0, 5)(features, view, {})
    assert list(np.asarray(state["kept_index"][0])) == [0, 2, 4]
    np.testing.assert_allclose(np.asarray(out[0, :, 0]), [0, 2, 4])


@pytest.mark.parametrize("impl", ["pallas"])
def test_pallas_attention_equals_xla(tiny_variables, impl):
    outputs = {}
    for attention_impl in ("xla", impl):
        model = models.create("vit_tiny_patch16_224", attention_impl=attention_impl, token_reduction=SETTINGS,
                              **TINY)
        logits, intermediates = jax.jit(model.apply)(tiny_variables, IMAGES)
        outputs[attention_impl] = (np.asarray(logits), intermediates["zero_tprune"]["kept_index"])
    np.testing.assert_allclose(outputs[impl][0], outputs["xla"][0], rtol=1e-5, atol=1e-6)
    for index in (0, 1):
        np.testing.assert_array_equal(np.asarray(outputs[impl][1][index]), np.asarray(outputs["xla"][1][index]))


BAD = [
    (dict(method="zero_tprune", keep_rate=0.0), r"keep_rate must be a number in \(0, 1\], got 0.0"),
    (dict(method="zero_tprune", keep_rate=1.2), r"keep_rate must be a number in \(0, 1\], got 1.2"),
    (dict(method="zero_tprune", prune_loc=(1, 3)),
     r"prune_loc must be block indices in \[0, 2\] \(the model has depth 3\)"),
    (dict(method="zero_tprune", wpr_iterations=0), r"wpr_iterations must be an integer >= 1, got 0"),
    (dict(method="zero_tprune", similarity_fraction=1.5), r"similarity_fraction must be a number in \[0, 1\]"),
    (dict(method="zero_tprune", iterations=5),
     r"Unknown zero_tprune option\(s\) \['iterations'\]; valid choices: "
     r"\['keep_rate', 'prune_loc', 'wpr_iterations', 'similarity_fraction'\]"),
]


@pytest.mark.parametrize("spec, message", BAD)
def test_bad_settings_fail_at_create(spec, message):
    with pytest.raises(ValueError, match=message):
        models.create("vit_tiny_patch16_224", token_reduction=spec, **TINY)


def test_keep_all_budget_equals_unreduced(tiny_variables):
    reference, _ = jax.jit(models.create("vit_tiny_patch16_224", **TINY).apply)(tiny_variables, IMAGES)
    model = models.create("vit_tiny_patch16_224", token_reduction=dict(SETTINGS, keep_rate=1.0), **TINY)
    logits, intermediates = jax.jit(model.apply)(tiny_variables, IMAGES)
    assert intermediates["zero_tprune"]["token_counts"] == (17, 17, 17)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(reference), rtol=1e-5, atol=1e-6)
    # A reducer whose budget keeps every patch token returns them unchanged, in order.
    features = jax.random.normal(jax.random.PRNGKey(2), (2, 17, 32))
    qkv = jax.random.normal(jax.random.PRNGKey(3), (3, 2, 17, 2, 16))
    out, state = zero_tprune.BlockPrune(0, 0, 1, 30)(features, base.AttentionView(*qkv), {})
    np.testing.assert_array_equal(np.asarray(out), np.asarray(features))
    # Off the shelf with a mild budget (before the last block: pruning there cannot reach the class token):
    # the logits move, but stay close to the unreduced ones.
    mild = models.create("vit_tiny_patch16_224", token_reduction=dict(SETTINGS, keep_rate=0.9, prune_loc=(1,)),
                         **TINY)
    mild_logits, _ = jax.jit(mild.apply)(tiny_variables, IMAGES)
    difference = np.abs(np.asarray(mild_logits) - np.asarray(reference)).max()
    assert 0 < difference < 0.5 * np.abs(np.asarray(reference)).max()
