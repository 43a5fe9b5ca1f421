"""The ViT plug-ins (vitjax.models.plugins): GGeM pooling, adaptive polyphase patch embedding, the GMM mask.

Parity fixtures come from the official code (tests/fixtures/{poly_vit,gmm}/README.md); GGeM has none, so its
test is a NumPy transcription of the paper's formula. Every model here is tiny: the file runs in seconds.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from vitjax import config_utils, parallel, train
from vitjax.convert.vit import convert_timm
from vitjax.models import plugins
from vitjax.models.vit import VisionTransformer

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TINY = dict(num_classes=10, img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2, mlp_dim=64)


def _relative_error(actual, expected) -> float:
    return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected)))


def _fixture(name: str):
    data = np.load(os.path.join(HERE, "fixtures", name))
    state = {key[len("param/"):]: data[key] for key in data.files if key.startswith("param/")}
    return data, state


# --- GGeM -----------------------------------------------------------------------------------------------------

def _ggem_numpy(tokens: np.ndarray, exponents: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """f_c = (1/N sum_n max(x_nc, eps)^p_g(c))^(1/p_g(c)), g(c) the group of channel c (float64)."""
    channels = tokens.shape[-1]
    per_channel = np.repeat(exponents.astype(np.float64), channels // len(exponents))
    clamped = np.maximum(tokens.astype(np.float64), eps)
    return np.mean(clamped ** per_channel, axis=1) ** (1.0 / per_channel)


def test_ggem_matches_the_formula_per_group():
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((3, 17, 12)).astype(np.float32)  # signed, as ViT activations
    exponents = np.array([1.0, 2.5, 3.0, 6.0], np.float32)
    pooled = plugins.ggem_pool(jnp.asarray(tokens), jnp.asarray(exponents))
    assert pooled.shape == (3, 12)
    assert _relative_error(pooled, _ggem_numpy(tokens, exponents)) <= 1e-5
    # One exponent per group, not per tensor: a different p in one group changes only that group's channels.
    other = plugins.ggem_pool(jnp.asarray(tokens), jnp.asarray([1.0, 4.0, 3.0, 6.0]))
    changed = np.any(np.abs(np.asarray(other) - np.asarray(pooled)) > 1e-6, axis=0)
    np.testing.assert_array_equal(changed, np.repeat([False, True, False, False], 3))


def test_ggem_with_p_one_is_the_mean_and_p_large_nears_the_max():
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.uniform(0.1, 2.0, (2, 9, 8)).astype(np.float32))
    ones = plugins.ggem_pool(tokens, jnp.ones((4,)))
    assert _relative_error(ones, np.asarray(tokens).mean(axis=1)) <= 1e-6
    large = plugins.ggem_pool(tokens, jnp.full((4,), 60.0))
    assert _relative_error(large, np.asarray(tokens).max(axis=1)) <= 0.05


def test_ggem_vit_learns_one_exponent_per_head():
    model = VisionTransformer(**TINY, class_token=False, global_pool="ggem", ggem_p_init=2.0)
    model.validate()
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    variables = nn.meta.unbox(model.init(jax.random.PRNGKey(1), images))
    np.testing.assert_array_equal(variables["params"]["ggem"]["p"], [2.0, 2.0])
    assert "fc_norm" in variables["params"] and "norm" not in variables["params"]

    def loss(params):
        logits, _ = model.apply({"params": params}, images)
        return jnp.sum(logits[:, 0])
    grads = jax.jit(jax.grad(loss))(variables["params"])
    assert np.all(np.abs(np.asarray(grads["ggem"]["p"])) > 0)


# --- adaptive polyphase patch embedding ----------------------------------------------------------------------

def _poly_model(**overrides):
    settings = dict(num_classes=10, img_size=32, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                    mlp_ratio=4.0, patch_embed_type="poly", pos_embed="conv")
    return VisionTransformer(**{**settings, **overrides})


def test_polyphase_alignment_and_poly_vit_match_the_official_code():
    data, state = _fixture("poly_vit/poly_vit.npz")
    aligned = plugins.polyphase_align(jnp.asarray(data["images"]), (4, 4))
    np.testing.assert_array_equal(np.asarray(aligned), data["aligned"])
    model = _poly_model()
    variables = convert_timm(state, model)
    logits, _ = jax.jit(model.apply)(variables, jnp.concatenate([data["images"], data["shifted"]]))
    assert _relative_error(logits[:2], data["logits_fp32"]) <= 1e-5
    assert _relative_error(logits[2:], data["shifted_logits_fp32"]) <= 1e-5


SHIFTS = [(1, 0), (0, 3), (2, 5), (7, 13), (4, 8), (15, 15)]


def test_poly_vit_logits_are_unchanged_under_circular_shifts_and_plain_vit_logits_are_not():
    """Any circular shift, whole patches or not: the poly ViT's logits stay (100% consistency), the plain ViT's move."""
    images = jax.random.normal(jax.random.PRNGKey(2), (4, 16, 16, 3))
    batch = jnp.concatenate([images] + [jnp.roll(images, shift, axis=(1, 2)) for shift in SHIFTS])
    poly = VisionTransformer(**TINY, patch_embed_type="poly", pos_embed="conv")
    plain = VisionTransformer(**TINY)
    for model, equivariant in ((poly, True), (plain, False)):
        variables = model.init(jax.random.PRNGKey(3), images)
        logits = np.asarray(jax.jit(model.apply)(variables, batch)[0], np.float64).reshape(len(SHIFTS) + 1, 4, 10)
        errors = [_relative_error(moved, logits[0]) for moved in logits[1:]]
        if equivariant:
            assert max(errors) <= 1e-5, errors
            np.testing.assert_array_equal(np.argmax(logits, -1), np.broadcast_to(np.argmax(logits[0], -1), (7, 4)))
        else:
            assert min(errors) > 1e-3, f"the plain ViT should see every shift: {errors}"


# --- GMM mask -------------------------------------------------------------------------------------------------

def _gmm_model(**overrides):
    settings = dict(num_classes=10, img_size=32, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                    mlp_dim=64, qkv_bias=False, class_token=False, global_pool="avg", norm_eps=1e-5,
                    attention_mask="gmm", gmm_kernels=3)
    return VisionTransformer(**{**settings, **overrides})


def test_gmm_base_is_the_official_float32_mask():
    data, _ = _fixture("gmm/gmm_vit.npz")
    log_base, positive = plugins.gaussian_base((8, 8))
    np.testing.assert_array_equal(positive, data["mask_base"] > 0)
    base = np.where(positive, np.exp(log_base.astype(np.float64)), 0.0)
    assert _relative_error(base, data["mask_base"]) <= 1e-6


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_gmm_vit_matches_the_official_code(impl):
    """"pallas" runs the kernel in interpret mode, taking the multiplied logits as its full bias."""
    data, state = _fixture("gmm/gmm_vit.npz")
    model = _gmm_model(attention_impl=impl)
    variables = convert_timm(state, model)
    logits, _ = jax.jit(model.apply)(variables, jnp.asarray(data["images"]))
    assert _relative_error(logits, data["logits_fp32"]) <= 1e-5
    assert _relative_error(logits, data["logits_fp64"]) <= 1e-5


def test_gmm_multiplies_the_logits_and_pallas_gradients_equal_xla():
    model = VisionTransformer(**TINY, class_token=False, global_pool="avg", attention_mask="gmm", gmm_kernels=2)
    images = jax.random.normal(jax.random.PRNGKey(4), (2, 16, 16, 3))
    variables = nn.meta.unbox(model.init(jax.random.PRNGKey(5), images))
    gmm = variables["params"]["blocks_0"]["gmm"]
    assert gmm["sigma"].shape == gmm["alpha"].shape == (2, 2)

    def loss(impl):
        def function(params):
            logits, _ = model.clone(attention_impl=impl).apply({"params": params}, images)
            return jnp.sum(logits * jnp.arange(10.0))
        return jax.value_and_grad(function)
    value, grads = jax.jit(loss("xla"))(variables["params"])
    kernel_value, kernel_grads = jax.jit(loss("pallas"))(variables["params"])
    assert abs(float(kernel_value) - float(value)) <= 1e-5 * abs(float(value))
    for path, grad in jax.tree_util.tree_leaves_with_path(grads):
        kernel_grad = dict(jax.tree_util.tree_leaves_with_path(kernel_grads))[path]
        assert _relative_error(kernel_grad, np.asarray(grad, np.float64)) <= 1e-4, path
    assert np.all(np.abs(np.asarray(grads["blocks_0"]["gmm"]["sigma"])) > 0)

    # A multiplier of ones is plain attention: alpha = 1 on one kernel of infinite width.
    flat = dict(variables["params"])
    for index in range(2):
        flat[f"blocks_{index}"] = dict(flat[f"blocks_{index}"])
        flat[f"blocks_{index}"]["gmm"] = {"sigma": jnp.full((2, 2), 1e6), "alpha": jnp.array([[1.0, 1.0], [0, 0]])}
    plain = VisionTransformer(**TINY, class_token=False, global_pool="avg")
    plain_params = {k: ({kk: vv for kk, vv in v.items() if kk != "gmm"} if k.startswith("blocks_") else v)
                    for k, v in flat.items()}
    masked, _ = jax.jit(model.apply)({"params": flat}, images)
    unmasked, _ = jax.jit(plain.apply)({"params": plain_params}, images)
    assert _relative_error(masked, np.asarray(unmasked, np.float64)) <= 1e-5


# --- validation and training ------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings, message", [
    (dict(patch_embed_type="polyphase"), "valid choices"),
    (dict(patch_embed_type="poly"), "Valid choices: \\['conv', 'none'\\]"),
    (dict(attention_mask="gauss"), "valid choices"),
    (dict(attention_mask="gmm"), "class_token=False"),
    (dict(attention_mask="gmm", class_token=False, global_pool="avg", gmm_kernels=0), "gmm_kernels"),
    (dict(global_pool="ggem", ggem_groups=3), "must divide embed_dim"),
    (dict(global_pool="ggem", ggem_p_init=0.0), "ggem_p_init"),
    (dict(global_pool="gem"), "ggem"),
])
def test_bad_plugin_settings_fail_before_compiling(settings, message):
    with pytest.raises(ValueError, match=message):
        VisionTransformer(**{**TINY, **settings}).validate()


@pytest.mark.parametrize("plugin, expected", [
    ("ggem", dict(global_pool="ggem", class_token=False)),
    ("poly", dict(patch_embed_type="poly", pos_embed="conv")),
    ("gmm", dict(attention_mask="gmm", gmm_kernels=5, class_token=False, qkv_bias=False)),
])
def test_plugin_configs_build_valid_models(plugin, expected):
    from vitjax import models
    for arg in (f"plugin={plugin}", f"plugin={plugin},runlocal"):
        config = config_utils.load_config(f"{REPO}/configs/vit_plugins.py:{arg}")
        model = models.create(config.model_name, **config.model)
        assert {key: getattr(model, key) for key in expected} == expected
    assert model.img_size == 16 and model.embed_dim == 32


def test_runlocal_config_with_every_plugin_trains(tmp_path):
    """One trainer run (the CPU budget allows one) through GGeM, the polyphase embedding, PosConv and the GMM mask."""
    config = config_utils.load_config(f"{REPO}/configs/vit_plugins.py:plugin=all,runlocal")
    assert {key: config.model[key] for key in ("global_pool", "patch_embed_type", "attention_mask")} == dict(
        global_pool="ggem", patch_embed_type="poly", attention_mask="gmm")
    config.total_steps, config.total_epochs = 80, None
    config.optim.schedule = "constant"
    config.optim.warmup_steps, config.optim.warmup_epochs = 5, None
    config.log_every_steps = 1
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 0
    config.progress_bar = False
    config.checkpoint_async = False
    config.input.mixup = dict(mixup_alpha=0.0, cutmix_alpha=0.0)
    config.input.random_erasing = 0.0
    config.input.label_smoothing = 0.0
    mesh = parallel.create_mesh(dict(data=1, fsdp=1, model=1), devices=jax.devices()[:1])
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir, mesh=mesh)
    with open(os.path.join(workdir, "metrics.jsonl")) as file:
        losses = [record["train/loss"] for record in map(json.loads, file) if "train/loss" in record]
    assert len(losses) >= 76 and np.all(np.isfinite(losses))
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.9 * first, f"loss did not fall: first {first:.3f}, last {last:.3f}"
