"""ToMe: the merge against a literal reading of the paper, the Pallas kernel against the jnp merge,
the model transform (r=0 is the plain model, token counts follow the schedule), gradients, the picture."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax

from vitjax import models
from vitjax.kernels import tome_merge
from vitjax.tokens import tome, visualize

from parity_utils import random_variables

TINY = dict(num_classes=5, img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2)
# Compiled once per shape: op-by-op execution of the merge is slower than compiling it on a CPU.
merge_reference = jax.jit(tome_merge.merge_reference, static_argnums=(3, 4))


def paper_merge(x, metric, sizes, r, num_protected):
    """Returns (tokens, sizes) of bipartite soft matching written out with loops, straight from the paper.

    With one protected cls token the output is the paper's concatenation [unmerged A in order, B]; a
    protected dist token (position 1, in B) is placed second, after cls.
    """
    outputs, out_sizes = [], []
    for tokens, keys, size in zip(np.asarray(x, np.float64), np.asarray(metric, np.float64), np.asarray(sizes)):
        keys = keys / np.linalg.norm(keys, axis=1, keepdims=True)
        set_a, set_b = list(range(0, len(tokens), 2)), list(range(1, len(tokens), 2))
        scores = keys[set_a] @ keys[set_b].T
        for row, position in enumerate(set_a):
            if position < num_protected:
                scores[row, :] = -np.inf
        for col, position in enumerate(set_b):
            if position < num_protected:
                scores[:, col] = -np.inf
        best, match = scores.max(axis=1), scores.argmax(axis=1)
        ranked = sorted(range(len(set_a)), key=lambda row: -best[row])  # stable: earlier first on ties
        merged, kept = ranked[:r], sorted(ranked[r:])
        b_tokens, b_sizes = [], []
        for col, position in enumerate(set_b):
            members = [position] + [set_a[row] for row in merged if match[row] == col]
            weights = size[members]
            b_tokens.append((weights[:, None] * tokens[members]).sum(axis=0) / weights.sum())
            b_sizes.append(weights.sum())
        a_positions = [set_a[row] for row in kept]
        order_tokens = [tokens[p] for p in a_positions] + b_tokens
        order_sizes = [size[p] for p in a_positions] + b_sizes
        if num_protected == 2:  # move the dist token (first of B) next to cls
            dist = len(a_positions)
            order_tokens.insert(1, order_tokens.pop(dist))
            order_sizes.insert(1, order_sizes.pop(dist))
        outputs.append(np.stack(order_tokens))
        out_sizes.append(np.asarray(order_sizes))
    return np.stack(outputs), np.stack(out_sizes)


def random_inputs(batch, num_tokens, channels, metric_dim, seed=0, integer_sizes=True):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, num_tokens, channels)), jnp.float32)
    metric = jnp.asarray(rng.normal(size=(batch, num_tokens, metric_dim)), jnp.float32)
    sizes = rng.integers(1, 5, size=(batch, num_tokens)) if integer_sizes else np.ones((batch, num_tokens))
    return x, metric, jnp.asarray(sizes, jnp.float32)


@pytest.mark.parametrize("num_tokens, num_protected, r", [(17, 1, 6), (18, 1, 8), (18, 2, 8), (16, 0, 5), (9, 1, 4)])
def test_merge_is_the_papers(num_tokens, num_protected, r):
    x, metric, sizes = random_inputs(3, num_tokens, 12, 6, seed=num_tokens + r)
    result = merge_reference(x, metric, sizes, r, num_protected)
    expected_tokens, expected_sizes = paper_merge(x, metric, sizes, r, num_protected)
    assert result.tokens.shape == (3, num_tokens - r, 12)
    np.testing.assert_array_equal(np.asarray(result.sizes), expected_sizes)
    np.testing.assert_allclose(np.asarray(result.tokens), expected_tokens, rtol=1e-6, atol=1e-6)
    # The size-weighted sum of the tokens and the total size are what they were.
    before = np.einsum("bn,bnc->bc", np.asarray(sizes, np.float64), np.asarray(x, np.float64))
    after = np.einsum("bn,bnc->bc", np.asarray(result.sizes, np.float64), np.asarray(result.tokens, np.float64))
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(result.sizes).sum(1), np.asarray(sizes).sum(1))
    # Protected tokens stay first and untouched; slot/weight replay the merge.
    np.testing.assert_array_equal(np.asarray(result.tokens[:, :num_protected]), np.asarray(x[:, :num_protected]))
    replayed = tome_merge.apply_merge(x, result.slot, result.weight, num_tokens - r)
    np.testing.assert_allclose(np.asarray(replayed), np.asarray(result.tokens), rtol=1e-6, atol=1e-6)


def test_merge_cap_and_errors():
    assert tome_merge.max_merge(197, 1) == 98 and tome_merge.max_merge(198, 2) == 98
    x, metric, sizes = random_inputs(1, 9, 4, 3)
    with pytest.raises(ValueError, match=r"outside \[0, 4\]"):
        tome_merge.merge_reference(x, metric, sizes, 5, 1)
    with pytest.raises(ValueError, match="valid choices"):
        tome_merge.merge(x, metric, sizes, 2, 1, impl="cuda")
    merged_all = merge_reference(x, metric, sizes, 4, 1)  # the cap itself works
    assert merged_all.tokens.shape[1] == 5


def _assert_decisions_separated(metric, num_protected, r, gap):
    """Asserts that each candidate's best and second-best match scores, and the r-th and (r+1)-th best
    matches, differ by more than `gap`: the merge is then the same under a few ulp of rounding."""
    unit = np.asarray(tome_merge.normalize_metric(metric), np.float64)
    protected_a, protected_b = (num_protected + 1) // 2, num_protected // 2
    scores = np.einsum("bid,bjd->bij", unit[:, 0::2][:, protected_a:], unit[:, 1::2][:, protected_b:])
    top_two = np.sort(scores, axis=-1)[..., -2:]
    assert np.min(top_two[..., 1] - top_two[..., 0]) > gap
    best = np.sort(scores.max(axis=-1), axis=-1)[:, ::-1]
    assert np.min(best[:, r - 1] - best[:, r]) > gap


def test_interpret_pallas_merge_equals_jnp_merge():
    """Interpret mode (the kernel evaluated op by op on the CPU): the Triton-flavoured kernel (and its
    gradient) and the Mosaic-flavoured one."""
    x, metric, sizes = random_inputs(2, 37, 40, 8, seed=3)
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=(2, 37 - 12, 40)), jnp.float32)

    @jax.jit
    def pallas_and_gradient(x):
        result, pull_back = jax.vjp(lambda tokens: tome_merge.merge(tokens, metric, sizes, 12, 1, "pallas"), x)
        zeros = jax.tree.map(jnp.zeros_like, result)._replace(tokens=cotangent)
        return result, pull_back(zeros)[0]

    @jax.jit
    def reference_and_gradient(x):
        result = tome_merge.merge_reference(x, metric, sizes, 12, 1)
        _, pull_back = jax.vjp(lambda tokens: tome_merge.merge_reference(tokens, metric, sizes, 12, 1).tokens, x)
        return result, pull_back(cotangent)[0]

    pallas, pallas_gradient = pallas_and_gradient(x)
    reference, reference_gradient = reference_and_gradient(x)
    # Tolerances that hold compiled too, not only in interpret mode: Triton's fp32 division (div.full.f32)
    # and square root (sqrt.approx.f32) are within 2 ulp (2.4e-7 relative), so the weights get rtol 1e-6;
    # sizes are sums of counts (exact). The slots are exact as long as no two scores that decide a match or
    # the top-r are within that error: here the closest such pair is 1.0e-3 apart (asserted > 1e-5, 40x it).
    _assert_decisions_separated(metric, 1, 12, gap=1e-5)
    np.testing.assert_array_equal(np.asarray(pallas.slot), np.asarray(reference.slot))
    np.testing.assert_array_equal(np.asarray(pallas.sizes), np.asarray(reference.sizes))
    np.testing.assert_allclose(np.asarray(pallas.weight), np.asarray(reference.weight), rtol=1e-6, atol=0)
    np.testing.assert_allclose(np.asarray(pallas.tokens), np.asarray(reference.tokens), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(pallas_gradient), np.asarray(reference_gradient), rtol=1e-6, atol=1e-6)

    x, metric, sizes = random_inputs(2, 20, 24, 8, seed=4)  # a distilled sequence: cls and dist protected
    reference = merge_reference(x, metric, sizes, 9, 2)
    mosaic = jax.jit(lambda x, metric, sizes: tome_merge.merge_pallas(
        x, metric, sizes, 9, 2, backend="mosaic", interpret=True))(x, metric, sizes)
    np.testing.assert_array_equal(np.asarray(mosaic.slot), np.asarray(reference.slot))
    np.testing.assert_array_equal(np.asarray(mosaic.sizes), np.asarray(reference.sizes))
    np.testing.assert_allclose(np.asarray(mosaic.tokens), np.asarray(reference.tokens), rtol=1e-6, atol=1e-6)


def test_pallas_merge_that_cannot_run_raises_with_the_reason_instead_of_running_jnp():
    x, metric, sizes = random_inputs(1, 9, 4, 3)
    with pytest.raises(ValueError, match=r"merge_impl='pallas' cannot run this merge: dtype int32 not supported.*"
                                         r"valid choices: \('jnp', 'pallas'\)"):
        tome_merge.merge(x.astype(jnp.int32), metric, sizes, 2, 1, impl="pallas")
    x, metric, sizes = random_inputs(1, 600, 4, 3)  # 300 A tokens: past what one Triton program plans
    with pytest.raises(ValueError, match="600 tokens: one Triton program plans at most 512"):
        tome_merge.merge(x, metric, sizes, 2, 1, impl="pallas")
    assert tome_merge.merge(x, metric, sizes, 2, 1, impl="jnp").tokens.shape == (1, 598, 4)


@pytest.mark.parametrize("platform, backend, custom_call", [("cuda", "triton", "triton"),
                                                            ("tpu", "mosaic", "tpu_custom_call")])
def test_pallas_merge_lowers_for_cuda_and_tpu(platform, backend, custom_call):
    """Not a run: the kernel's Triton / Mosaic lowering is built for its hardware from this CPU (ViT-B/16's shape)."""
    x = jax.ShapeDtypeStruct((2, 197, 768), jnp.bfloat16)
    metric = jax.ShapeDtypeStruct((2, 197, 64), jnp.bfloat16)
    sizes = jax.ShapeDtypeStruct((2, 197), jnp.float32)
    merge = lambda x, metric, sizes: tome_merge.merge_pallas(  # noqa: E731
        x, metric, sizes, 16, 1, backend=backend, interpret=False)
    text = jax.jit(merge).trace(x, metric, sizes).lower(lowering_platforms=(platform,)).as_text()
    calls = [line for line in text.splitlines() if "stablehlo.custom_call @" in line and custom_call in line]
    assert len(calls) == 1, [line[:120] for line in calls]


def test_schedules():
    assert tome.merge_schedule(8, 4) == (8, 8, 8, 8)
    assert tome.merge_schedule([3, 1], 4) == (3, 1, 0, 0)
    assert tome.merge_schedule((8, 0.0), 3) == (8, 8, 8)
    assert tome.merge_schedule((8, -1.0), 5) == (16, 12, 8, 4, 0)  # decreasing
    assert tome.merge_schedule((8, 1.0), 5) == (0, 4, 8, 12, 16)   # increasing
    assert tome.token_counts(197, (16,) * 12, 1) == (
        (16,) * 11 + (10,), (181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21, 11))
    assert tome.token_counts(198, (60, 60, 60), 2)[1] == (138, 78, 40)
    for bad in (dict(r=-1), dict(r=(8, 1.5)), dict(r="8"), dict(merge_impl="cuda"), dict(ratio=0.5)):
        with pytest.raises(ValueError, match="valid choices|tome r must be"):
            tome.parse_config(bad)
    with pytest.raises(ValueError, match="scan=False"):
        models.create("vit_tiny_patch16_224", tome=dict(r=2), scan=True, **TINY)
    with pytest.raises(ValueError, match="depth 3"):
        models.create("vit_tiny_patch16_224", tome=dict(r=[1, 1, 1, 1]), **TINY)


@pytest.fixture(scope="module")
def tiny_variables():
    """Returns the variables of the TINY ViT (ToMe adds no parameters, so every variant shares them)."""
    return random_variables(models.create("vit_tiny_patch16_224", **TINY), (16, 16, 3), std=0.2)


def test_r0_is_bit_identical_and_counts_follow_schedule(tiny_variables):
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
    plain = models.create("vit_tiny_patch16_224", **TINY)
    variables = tiny_variables
    expected, _ = jax.jit(plain.apply)(variables, images)
    logits, _ = jax.jit(models.create("vit_tiny_patch16_224", tome=dict(r=0), **TINY).apply)(variables, images)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(expected))

    # 17 tokens; r = [2, 9, 5]: the second layer is capped at (15 - 1) // 2 = 7, the third at 3.
    model = models.create("vit_tiny_patch16_224", tome=dict(r=[2, 9, 5], trace_source=True), **TINY)
    logits, intermediates = jax.jit(model.apply)(variables, images)
    assert np.all(np.isfinite(np.asarray(logits)))
    counts = [int(count) for count in intermediates["tome"]["token_counts"]]
    assert counts == [15, 8, 5] == [tokens.shape[1] for tokens in intermediates["blocks"]]
    assert float(np.abs(np.asarray(logits) - np.asarray(expected)).max()) > 1e-4  # merging changes the output
    for sizes, source in zip(intermediates["tome"]["sizes"], intermediates["tome"]["sources"]):
        source = np.asarray(source)
        np.testing.assert_array_equal(source.sum(axis=1), np.ones((2, 17)))     # each input in one token
        np.testing.assert_array_equal(source.sum(axis=2), np.asarray(sizes))    # sizes count the inputs
        np.testing.assert_array_equal(source[:, 0], np.eye(17)[None, 0].repeat(2, 0))  # cls first, alone


def test_distilled_and_pooled_models():
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
    deit = models.create("deit_tiny_distilled_patch16_224", tome=dict(r=3, trace_source=True), **TINY)
    variables = random_variables(deit, (16, 16, 3), std=0.2)
    _, intermediates = jax.jit(deit.apply)(variables, images)
    source = np.asarray(intermediates["tome"]["sources"][-1])
    assert source.shape == (2, 18 - 9, 18)
    np.testing.assert_array_equal(source[:, :2], np.eye(18)[None, :2].repeat(2, 0))  # cls, dist in place

    # Average pooling weights a merged token by its size: equal to the plain mean over the input patches
    # when the tokens are constant, which a merge keeps.
    gap = models.create("vit_tiny_patch16_224", tome=dict(r=4), class_token=False, global_pool="avg",
                        num_classes=0, **{k: v for k, v in TINY.items() if k != "num_classes"})
    tokens = jnp.ones((2, 7, 32)) * jnp.arange(32.0)
    pooled = tome.weighted_average(tokens, jnp.asarray([[1.0, 2, 3, 1, 1, 4, 4]] * 2))
    np.testing.assert_allclose(np.asarray(pooled), np.asarray(tokens[:, 0]), rtol=1e-6)
    features, intermediates = jax.eval_shape(gap.apply, random_variables(gap, (16, 16, 3), std=0.2), images)
    assert features.shape == (2, 32) and [tokens.shape[1] for tokens in intermediates["blocks"]] == [12, 8, 4]


def test_map_pooling_weighs_a_merged_token_by_its_size():
    """Attention pooling with log(size) on the keys: a token of size 2 pools like the same token twice."""
    from vitjax.models import layers
    head = layers.MapHead(num_heads=2)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.standard_normal((2, 5, 32), np.float32))
    variables = head.init(jax.random.PRNGKey(0), tokens)
    variables = jax.tree.map(lambda leaf: jnp.asarray(rng.normal(0, 0.2, leaf.shape), jnp.float32), variables)
    duplicated = jnp.concatenate([tokens, tokens[:, 2:3]], axis=1)  # token 2 appears twice
    sizes = jnp.asarray([[1.0, 1.0, 2.0, 1.0, 1.0]] * 2)
    merged = head.apply(variables, tokens, key_bias=jnp.log(sizes))
    np.testing.assert_allclose(np.asarray(merged), np.asarray(head.apply(variables, duplicated)), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(merged), np.asarray(head.apply(variables, tokens)), atol=1e-4)

    vit = models.create("vit_tiny_patch16_224", tome=dict(r=4), class_token=False, global_pool="map",
                        **{k: v for k, v in TINY.items()})
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
    logits, intermediates = jax.jit(vit.apply)(random_variables(vit, (16, 16, 3), std=0.2), images)
    assert logits.shape == (2, TINY["num_classes"]) and np.all(np.isfinite(np.asarray(logits)))


def test_training_with_tome_gradients_flow(tiny_variables):
    model = models.create("vit_tiny_patch16_224", tome=dict(r=3), **dict(TINY, depth=2))  # 17 -> 14 -> 11
    images = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3))
    labels = jnp.asarray([0, 1, 2, 3])
    params = {key: value for key, value in tiny_variables["params"].items() if key != "blocks_2"}
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(params)

    def loss_fn(params):
        logits, _ = model.apply({"params": params}, images, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    losses = []
    for _ in range(25):
        params, opt_state, loss, grads = step(params, opt_state)
        losses.append(float(loss))
        if len(losses) == 1:
            norms = {jax.tree_util.keystr(path): float(jnp.abs(leaf).max())
                     for path, leaf in jax.tree_util.tree_leaves_with_path(grads)}
            assert all(np.isfinite(v) for v in norms.values())
            # Every block's weights get a gradient, the ones after the merges too.
            assert all(v > 0 for k, v in norms.items() if "blocks_1" in k or "blocks_0']['attn']['qkv" in k), norms
    assert losses[-1] < 0.5 * losses[0], losses


def test_merged_tokens_png(tmp_path):
    grid = (4, 4)
    source = np.zeros((1 + 3, 17))
    source[0, 0] = 1.0  # cls
    groups = np.asarray([0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2])
    source[1 + groups, 1 + np.arange(16)] = 1.0
    np.testing.assert_array_equal(visualize.patch_groups(source, grid), 1 + groups.reshape(4, 4))
    image = np.linspace(0.0, 1.0, 16 * 16).reshape(16, 16)
    path = tmp_path / "merge.png"
    picture = visualize.merged_tokens_png(image, source, grid, str(path), min_size=64, with_original=False)
    assert path.exists() and picture.shape == (64, 64, 3)
    from PIL import Image
    np.testing.assert_array_equal(np.asarray(Image.open(path)), picture)
    # Borders between groups are black, the inside of a group is not; one group, one colour.
    assert (picture[:, 31] == 0).all(axis=-1)[:32].all() and not (picture[5:27, 5:27] == 0).all(axis=-1).any()
    mean = visualize.render_merged_tokens(image, source, grid, colors="mean", min_size=64)
    assert len(np.unique(mean[40:62, 2:62].reshape(-1, 3), axis=0)) == 1
    with pytest.raises(ValueError, match="valid choices"):
        visualize.render_merged_tokens(image, source, grid, colors="rainbow")
