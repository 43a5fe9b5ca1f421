"""DVPT (vitjax.adapt.dvpt): the Meta-Net against a numpy reference, equal to VPT-deep untrained, per-input prompts."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import adapt, models
from vitjax.pytree import param_paths

TINY = dict(variant="mu/4", img_size=16, in_chans=1, embed_dim=32, depth=3, num_heads=2, mlp_dim=64, num_classes=10)
DVPT = dict(method="dvpt", num_tokens=3, deep=True, meta_dim=4)


def rel_error(value, reference) -> float:
    """Returns max |value - reference| / max |reference|."""
    reference = np.asarray(reference, np.float64)
    return float(np.max(np.abs(np.asarray(value, np.float64) - reference)) / np.max(np.abs(reference)))


def _init(settings, images):
    model = models.create("vit", **TINY, adapt=settings)
    return model, flax.core.unfreeze(flax.linen.meta.unbox(model.init(jax.random.PRNGKey(0), images)["params"]))


def _randomise(params, pattern, key, scale=0.3):
    """Returns params with the leaves whose path contains `pattern` set to scale * N(0, 1)."""
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    for index, path in enumerate(sorted(flat)):
        if pattern in path:
            flat[path] = scale * jax.random.normal(jax.random.fold_in(key, index), flat[path].shape)
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def test_meta_net_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    patches, static = rng.normal(size=(2, 16, 32)) * 3 + 1, rng.normal(size=(1, 3, 32))
    queries, down, down_bias = rng.normal(size=(3, 4)), rng.normal(size=(32, 4)) * 0.2, rng.normal(size=(4,))
    up, up_bias = rng.normal(size=(4, 32)) * 0.2, rng.normal(size=(32,))
    normed = (patches - patches.mean(-1, keepdims=True)) / np.sqrt(patches.var(-1, keepdims=True) + 1e-6)
    hidden = normed @ down + down_bias
    logits = np.einsum("pd,bnd->bpn", queries, hidden) / 2.0
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = static + np.einsum("bpn,bnd->bpd", weights, hidden) @ up + up_bias
    got = adapt.dvpt.dynamic_prompts(*(jnp.asarray(a, jnp.float32) for a in (patches, static, queries, down,
                                                                               down_bias, up, up_bias)))
    assert got.shape == (2, 3, 32)
    assert rel_error(got, expected) <= 1e-5


def test_untrained_dvpt_is_vpt_deep_and_training_the_meta_net_makes_prompts_per_input():
    images = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 1))
    model, params = _init(DVPT, images)
    paths = param_paths(params)
    assert sorted(p for p in paths if p.startswith("dvpt_0/")) == [
        "dvpt_0/down_bias", "dvpt_0/down_kernel", "dvpt_0/prompts", "dvpt_0/queries", "dvpt_0/up_bias",
        "dvpt_0/up_kernel"]
    # width 32, 3 prompts, meta_dim 4, 3 blocks: prompts 96, queries 12, down 132, up 160 per block
    assert sum(int(np.size(v)) for p, v in paths.items() if p.startswith("dvpt_")) == 3 * (96 + 12 + 132 + 160)
    vpt_model, vpt_params = _init(dict(method="vpt", num_tokens=3, deep=True), images)
    vpt_params = {**params, "vpt": {"prompts": params["dvpt_0"]["prompts"],
                                    "deep_prompts": jnp.concatenate([params[f"dvpt_{i}"]["prompts"] for i in (1, 2)])}}
    vpt_params = {k: v for k, v in vpt_params.items() if not k.startswith("dvpt_")}
    vpt_logits, _ = vpt_model.apply({"params": vpt_params}, images)
    logits, _ = model.apply({"params": params}, images)
    assert rel_error(logits, vpt_logits) <= 1e-6
    # A trained Meta-Net (random up-projections) changes the prompts, each image's from its own patches only.
    trained = _randomise(params, "up_kernel", jax.random.PRNGKey(2))
    trained_logits, _ = model.apply({"params": trained}, images)
    assert rel_error(trained_logits, vpt_logits) > 1e-2
    alone, _ = model.apply({"params": trained}, images[:1])
    assert rel_error(alone, trained_logits[:1]) <= 1e-5
    # Shallow: only block 0 has a Meta-Net.
    _, shallow = _init({**DVPT, "deep": False}, images)
    assert sorted(k for k in shallow if k.startswith("dvpt_")) == ["dvpt_0"]


def test_dvpt_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match="adapt.meta_dim must be a positive int"):
        adapt.parse(dict(method="dvpt", meta_dim=0))
    with pytest.raises(ValueError, match="valid keys"):
        adapt.parse(dict(method="dvpt", bottleneck_width=4))
    with pytest.raises(ValueError, match="adapt.rank does not apply to method 'dvpt'"):
        adapt.parse(dict(adapt.SECTION_DEFAULTS, method="dvpt", rank=2))
    with pytest.raises(ValueError, match="needs scan=False"):
        models.create("vit", **TINY, scan=True, adapt=DVPT)
    with pytest.raises(ValueError, match="cannot be combined with token_reduction"):
        models.create("vit", **TINY, tome=dict(r=2), adapt=DVPT)
