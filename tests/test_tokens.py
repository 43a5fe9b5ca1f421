"""The token-reduction interface: registry and settings errors (before any compile), every method with
the Pallas attention kernel equal to XLA, the one-query class-attention row, EViT and ATS behaviour."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from vitjax import models, tokens
from vitjax.tokens import ats, base, evit

from parity_utils import random_variables

TINY = dict(num_classes=5, img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2)
IMAGES = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
# One setting per method that reduces at least once on TINY's 17 tokens.
METHODS = {"tome": dict(r=3), "evit": dict(base_keep_rate=0.5, drop_loc=(1,), fuse_token=True),
           "ats": dict(ats_blocks=(1, 2), num_tokens=12),
           "mctf": dict(r_student=3, activate_layer=(0, 1)),
           "mctf_after_mlp": dict(method="mctf", r_student=3, one_step_ahead=0, activate_layer=(1,))}


def test_registry_and_official_names():
    assert {"tome", "evit", "ats", "mctf"} <= set(tokens.list_methods())
    assert tokens.method_options("evit") == ("base_keep_rate", "drop_loc", "fuse_token", "keep_rate")
    assert tokens.method_options("ats") == ("ats_blocks", "num_tokens", "drop_tokens")
    assert tokens.parse(dict(method="tome", r=4)) == tokens.ToMeConfig(r=4)
    assert tokens.resolve(None, dict(r=4)) == tokens.resolve(dict(method="tome", r=4))


BAD = [
    (dict(method="evict"), r"Unknown token_reduction method 'evict'; valid choices: \[.*'evit'"),
    (dict(base_keep_rate=0.5), r"needs a 'method'"),
    (dict(method="evit", keep_ratio=0.5), r"Unknown evit option\(s\) \['keep_ratio'\]; valid choices: "
                                          r"\['base_keep_rate', 'drop_loc', 'fuse_token', 'keep_rate'\]"),
    (dict(method="evit", base_keep_rate=0.0), r"base_keep_rate must be a number in \(0, 1\], got 0.0"),
    (dict(method="evit", base_keep_rate=1.5), r"base_keep_rate must be a number in \(0, 1\], got 1.5"),
    (dict(method="evit", keep_rate=(1, 1, -0.2)), r"keep_rate \(each block's\) must be a number in \(0, 1\]"),
    (dict(method="evit", drop_loc=(1, 3)), r"drop_loc must be block indices in \[0, 2\] \(the model has depth 3\)"),
    (dict(method="evit", keep_rate=(1, 0.5)), r"keep_rate lists 2 blocks; .*depth 3"),
    (dict(method="ats", ats_blocks=(0, 5)), r"ats_blocks must be block indices in \[0, 2\]"),
    (dict(method="ats", num_tokens=-3), r"num_tokens must be None, a token count >= 1 or a ratio in \(0, 1\]"),
    (dict(method="ats", drop_tokens=True), r"drop_tokens must be False"),
    (dict(method="tome", r=-1), r"tome r must be"),
    (dict(method="mctf", activate_layer=(3,)), r"activate_layer must be block indices in \[0, 2\]"),
    (dict(method="mctf", pooling_type=4), r"Unknown mctf pooling_type 4; valid choices: \(0, 1, 2, 3\)"),
    (dict(method="mctf", r_student=-0.1), r"r_student must be a ratio in \[0, 1\) or a token count"),
]


@pytest.mark.parametrize("spec, message", BAD)
def test_bad_settings_fail_at_create(spec, message):
    with pytest.raises(ValueError, match=message):
        models.create("vit_tiny_patch16_224", token_reduction=spec, **TINY)


def test_methods_on_models_they_cannot_apply_to_fail_at_create():
    no_cls = dict(TINY, class_token=False, global_pool="avg")
    for method in ("evit", "ats"):
        with pytest.raises(ValueError, match=rf"'{method}' ranks tokens by the class token's attention; this model "
                                             r"has class_token=False. Methods that need none: "
                                             r"\['mctf', 'tome', 'zero_tprune'\]"):
            models.create("vit_tiny_patch16_224", token_reduction=dict(method=method), **no_cls)
    models.create("vit_tiny_patch16_224", token_reduction=dict(method="tome", r=2), **no_cls)  # fine
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['token_reduction'\] for model 'swin_tiny"):
        models.create("swin_tiny_patch4_window7_224", token_reduction=dict(method="evit"))
    with pytest.raises(ValueError, match="needs scan=False"):
        models.create("vit_tiny_patch16_224", token_reduction=dict(method="evit", drop_loc=(1,)), scan=True, **TINY)
    with pytest.raises(ValueError, match="not both"):
        models.create("vit_tiny_patch16_224", token_reduction=dict(method="tome", r=2), tome=dict(r=2), **TINY)


@pytest.fixture(scope="module")
def tiny_variables():
    return random_variables(models.create("vit_tiny_patch16_224", **TINY), (16, 16, 3), std=0.2)


def test_class_attention_row_is_the_full_matrix_row():
    rng = np.random.default_rng(0)
    query, key, value = (jnp.asarray(rng.normal(size=(2, 9, 3, 8)), jnp.float32) for _ in range(3))
    key_bias = jnp.asarray(np.where(rng.random((2, 9)) < 0.3, base.MASKED_LOGIT, 0.0), jnp.float32)
    key_bias = key_bias.at[:, 0].set(0.0)
    full = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", query, key) / np.sqrt(8) + key_bias[:, None, None], -1)
    view = base.AttentionView(query, key, value, key_bias)
    np.testing.assert_allclose(np.asarray(view.class_attention(heads_mean=False)), np.asarray(full[:, :, 0]),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(view.class_attention()), np.asarray(full[:, :, 0].mean(1)), rtol=1e-6)
    assert float(jnp.abs(view.class_attention() * (key_bias < 0)).max()) == 0.0  # padding gets exactly 0


@pytest.mark.parametrize("method", ["tome", "mctf_after_mlp"])
def test_pallas_attention_equals_xla(tiny_variables, method):
    """Interpret mode on the CPU. EViT and ATS (which take the class-attention row from one query) are
    compared with pallas in tests/test_tokens_parity.py against the official code; MCTF one step ahead
    attends with its fused weights (no kernel) in the blocks that fuse."""
    outputs = {}
    for impl in ("xla", "pallas"):
        model = models.create("vit_tiny_patch16_224", attention_impl=impl,
                              token_reduction=dict(dict(method=method), **METHODS[method]), **TINY)
        logits, intermediates = jax.jit(model.apply)(tiny_variables, IMAGES)
        outputs[impl] = (np.asarray(logits), [block.shape[1] for block in intermediates["blocks"]])
    assert outputs["xla"][1] == outputs["pallas"][1] and outputs["xla"][1][-1] < 17, outputs["xla"][1]
    np.testing.assert_allclose(outputs["pallas"][0], outputs["xla"][0], rtol=1e-5, atol=1e-6)


def test_evit_keeps_prefix_and_fuses_the_rest(tiny_variables):
    deit = models.create("deit_tiny_distilled_patch16_224", token_reduction=dict(
        method="evit", keep_rate=(1, 0.5, 1), fuse_token=True), **TINY)
    variables = random_variables(deit, (16, 16, 3), std=0.2)
    _, intermediates = jax.jit(deit.apply)(variables, IMAGES)
    assert intermediates["evit"]["token_counts"] == (18, 2 + 8 + 1, 11)
    kept = np.asarray(intermediates["evit"]["kept_index"][1])
    assert kept.shape == (2, 8) and kept.max() < 16 and all(len(set(row)) == 8 for row in kept)
    # The fused token is the class-attention-weighted sum of the dropped ones, so dropping none leaves none.
    plan = tokens.parse(dict(method="evit", keep_rate=(1, 1, 1))).plan(18, 3, 2)
    assert plan.blocks == (None, None, None) and plan.token_counts == (18, 18, 18)


def test_evit_keep_rate_warmup_and_token_counts():
    method = tokens.parse(dict(method="evit", base_keep_rate=0.7, drop_loc=(3, 6, 9), fuse_token=True))
    counts = method.plan(197, 12, 1).token_counts
    assert counts[3] == 1 + 138 + 1 and counts[6] == 1 + 98 + 1 and counts[9] == 1 + 70 + 1
    rates = [evit.adjust_keep_rate(step, step // 10, warmup_epochs=2, total_epochs=6, iters_per_epoch=10,
                                   base_keep_rate=0.7) for step in range(0, 80, 5)]
    assert rates[:4] == [1.0] * 4 and rates[-1] == 0.7 and all(a >= b for a, b in zip(rates, rates[1:]))
    warm = evit.with_keep_rate(method, 0.85)
    assert warm.base_keep_rate == 0.85 and warm.drop_loc == method.drop_loc
    assert evit.with_keep_rate(method, 1.0).plan(197, 12, 1).token_counts == (197,) * 12


def test_ats_masks_drive_pooling_and_budget_shrinks_shapes():
    settings = dict(TINY, global_pool="avg", num_classes=0)
    model = models.create("vit_tiny_patch16_224", token_reduction=dict(method="ats", ats_blocks=(0, 1)), **settings)
    variables = random_variables(model, (16, 16, 3), std=0.2)
    features, intermediates = jax.jit(model.apply)(variables, IMAGES)
    mask = np.asarray(intermediates["ats"]["masks"][-1])
    assert intermediates["ats"]["token_counts"] == (17, 17, 17) and mask.sum(1).max() < 17
    assert np.all(mask[:, :1] == 1) and np.all(np.diff(mask[:, 1:], axis=1) <= 0)  # valid first, padding last
    # The pool is fc_norm(mean over the sampled patch tokens only).
    encoded = np.asarray(intermediates["encoded"])[:, 1:]
    expected = (encoded * mask[:, 1:, None]).sum(1) / mask[:, 1:].sum(1, keepdims=True)
    normed = (expected - expected.mean(-1, keepdims=True)) / np.sqrt(expected.var(-1, keepdims=True) + 1e-6)
    scale = np.asarray(variables["params"]["fc_norm"]["scale"])
    bias = np.asarray(variables["params"]["fc_norm"]["bias"])
    np.testing.assert_allclose(np.asarray(features), normed * scale + bias, rtol=1e-4, atol=1e-5)
    budget = models.create("vit_tiny_patch16_224", token_reduction=dict(method="ats", ats_blocks=(1,), num_tokens=0.6),
                           **TINY)
    _, intermediates = jax.jit(budget.apply)(random_variables(budget, (16, 16, 3), std=0.2), IMAGES)
    assert [block.shape[1] for block in intermediates["blocks"]] == [17, 10, 10]
    assert ats.sampled_count(0.1, 17) == 8 and ats.sampled_count(500, 17) == 17 and ats.sampled_count(12, 17) == 12


@pytest.mark.parametrize("method", ["evit", "ats", "mctf"])
def test_training_gradients_flow_through_reduction(tiny_variables, method):
    model = models.create("vit_tiny_patch16_224", token_reduction=dict(method=method, **METHODS[method]), **TINY)
    labels = jnp.asarray([0, 3])

    def loss_fn(params):
        logits, _ = model.apply({"params": params}, IMAGES, train=True)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

    grads = jax.jit(jax.grad(loss_fn))(tiny_variables["params"])
    for block in ("blocks_0", "blocks_2"):
        norm = max(float(jnp.abs(leaf).max()) for leaf in jax.tree.leaves(grads[block]))
        assert np.isfinite(norm) and norm > 0, (block, norm)


def test_recipe_configs_build_their_models():
    from vitjax import config_utils
    for method in ("evit", "ats", "mctf", "tome"):
        for runlocal in ("", ",runlocal"):
            config = config_utils.load_config(f"configs/token_reduction_deit_s.py:method={method}{runlocal}")
            model = models.create(config.model_name, **config.model.to_dict())
            assert model.token_method().name == method
    config = config_utils.load_config("configs/token_reduction_deit_s.py:method=evit")
    assert (config.total_epochs, config.optim.blr, config.optim.weight_decay) == (30.0, 1e-5, 1e-6)


def test_token_sources_rebuild_what_each_token_holds():
    """EViT's and ATS's per-block index maps become source maps (for the pictures): each patch in at most
    one token, the fused token holding exactly the patches not kept."""
    from vitjax.tokens import visualize
    for method, settings in (("evit", dict(keep_rate=(1, 0.5, 0.5), fuse_token=True)),
                             ("evit", dict(keep_rate=(0.5, 1, 1))), ("ats", dict(ats_blocks=(1, 2), num_tokens=10))):
        model = models.create("vit_tiny_patch16_224", token_reduction=dict(method=method, **settings), **TINY)
        _, intermediates = jax.jit(model.apply)(random_variables(model, (16, 16, 3), std=0.2), IMAGES)
        sources = visualize.token_sources(method, intermediates[method], 17)
        for source, tokens_after in zip(sources, intermediates["blocks"]):
            assert source.shape == (2, tokens_after.shape[1], 17)
            held = source.sum(axis=1)
            assert np.all((held == 0) | (held == 1)) and np.all(source[:, 0, 0] == 1)
        if settings.get("fuse_token"):
            assert np.all(sources[-1].sum(axis=1) == 1)  # nothing lost: the fused token holds the rest
            assert np.all(sources[-1][:, -1].sum(axis=1) >= 9 - 5)  # 8 + fused -> 5 kept: 4 or more fused
        else:
            assert sources[-1].sum() < 2 * 17
