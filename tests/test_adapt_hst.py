"""HST (vitjax.adapt.hst) against the official code's outputs (tests/fixtures/hst), trained params, errors."""
import os
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parity_utils import fixture_entries
from vitjax import adapt, convert, models
from vitjax.pytree import param_paths

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hst", "hst_official.npz")
# The fixture's shrunk models (see tests/fixtures/hst/README.md).
VIT = dict(img_size=32, patch_size=8, embed_dim=16, num_heads=2, mlp_dim=32, num_classes=5)
CASES = {
    "even": (4, dict(method="hst", side_dims=(8, 12, 16, 24), side_heads=(2, 2, 4, 4), meta_tokens=1,
                     side_mlp_ratio=2.0)),
    "uneven": (6, dict(method="hst", side_dims=(8, 12, 16, 24), side_heads=(2, 2, 4, 4), side_depths=(2, 2, 1, 1),
                       meta_tokens=2, side_mlp_ratio=2.0)),
}


def rel_error(value, reference) -> float:
    """Returns max |value - reference| / max |reference|."""
    return float(np.max(np.abs(np.asarray(value, np.float64) - reference)) / np.max(np.abs(reference)))


def _linear(state, key):
    return {"kernel": state[f"{key}.weight"].T, "bias": state[f"{key}.bias"]}


def _norm(state, key):
    return {"scale": state[f"{key}.weight"], "bias": state[f"{key}.bias"]}


def _conv(state, key, bias=True):
    out = {"kernel": np.transpose(state[f"{key}.weight"], (2, 3, 1, 0))}
    if bias:
        out["bias"] = state[f"{key}.bias"]
    return out


def official_variables(case: str):
    """Returns (model, variables mapped from the official state dict, images NHWC, the fixture)."""
    data = np.load(FIXTURE)
    depth, settings = CASES[case]
    state = fixture_entries(data, f"{case}/state")
    backbone = {k: v for k, v in state.items() if k.split(".")[0] in ("cls_token", "pos_embed", "patch_embed",
                                                                       "blocks", "norm")}
    params = flax.core.unfreeze(convert.from_timm(backbone, "vit_tiny_patch16_224", **{**VIT, "num_classes": 0},
                                                  depth=depth)["params"])
    params["head"] = _linear(state, "head")
    params["hst_meta"] = {"tokens": np.concatenate([state[f"m_embeddings.{i}"] for i in range(depth)])}
    side = {"embed_0_conv1": _conv(state, "m_patch_embed1.conv.0", bias=False),
            "embed_0_bn": _norm(state, "m_patch_embed1.conv.1"),
            "embed_0_conv2": _conv(state, "m_patch_embed1.conv.3"),
            "embed_0_norm": _norm(state, "m_patch_embed1.norm")}
    stages = adapt.hst.stage_layers(depth, settings.get("side_depths", ()), 4)
    for stage, layers_ in enumerate(stages):
        if stage:
            side[f"embed_{stage}_conv"] = _conv(state, f"m_patch_embed{stage + 1}.proj")
            side[f"embed_{stage}_norm"] = _norm(state, f"m_patch_embed{stage + 1}.norm")
        side[f"bridge_{stage}"] = _linear(state, f"T_Bridge_{stage + 1}")
        side[f"norm_{stage}"] = _norm(state, f"m_norm{stage + 1}")
        for position, layer in enumerate(layers_):
            side[f"meta_norm_{layer}"] = _norm(state, f"m_proj_norm{layer + 1}")
            block = f"m_block{stage + 1}.{position}"
            side[f"blocks_{stage}_{position}"] = {
                **{name: _linear(state, f"{block}.attn.{name}") for name in ("q", "k", "v", "proj")},
                "norm1": _norm(state, f"{block}.norm1"), "norm2": _norm(state, f"{block}.norm2"),
                "mlp": {"fc1": _linear(state, f"{block}.mlp.fc1"), "fc2": _linear(state, f"{block}.mlp.fc2")}}
    params["hst"] = side
    stats = {"hst": {"embed_0_bn": {"mean": state["m_patch_embed1.conv.1.running_mean"],
                                    "var": state["m_patch_embed1.conv.1.running_var"]},
                     "fc_norm": {"mean": state["fc_norm.running_mean"], "var": state["fc_norm.running_var"]}}}
    model = models.create("vit_tiny_patch16_224", **VIT, depth=depth, adapt=settings)
    images = np.transpose(data["images"], (0, 2, 3, 1))
    return model, {"params": params, "batch_stats": stats}, images, {k[len(case) + 1:]: data[k] for k in data.files
                                                                      if k.startswith(f"{case}/")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hst_matches_the_official_code(case):
    model, variables, images, data = official_variables(case)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.asarray(images)))
    assert set(param_paths(flax.linen.meta.unbox(abstract["params"]))) == set(param_paths(variables["params"]))
    assert set(param_paths(abstract["batch_stats"])) == set(param_paths(variables["batch_stats"]))
    logits, _ = model.apply(variables, jnp.asarray(images))
    assert rel_error(logits, data["logits64"]) <= 1e-5
    assert rel_error(data["logits"], data["logits64"]) <= 1e-5
    # Training mode: both BatchNorms normalise with the batch's statistics, as torch's train().
    (train_logits, _), _ = model.apply(variables, jnp.asarray(images), train=True, mutable=["batch_stats"])
    assert rel_error(train_logits, data["train_logits64"]) <= 1e-5
    assert rel_error(logits, data["train_logits64"]) > 1e-3  # the two modes differ: the check can fail
    # Trained: exactly the parameters of the official freeze_vit (side network, meta tokens, block norms, head).
    patterns = adapt.trained_patterns(model.adapt_method())
    flat = flax.traverse_util.flatten_dict(variables["params"], sep="/")
    trained = sum(int(np.size(v)) for path, v in flat.items() if any(re.search(p, path)
                                                                       for p in patterns))
    assert trained == int(data["trained_size"])
    assert sum(int(np.size(v)) for v in flat.values()) == int(data["total_size"])


def test_hst_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match="must sum to the model's depth 4"):
        models.create("vit", variant="mu/4", **VIT, depth=4, adapt=dict(method="hst", side_depths=(3, 3, 3, 3)))
    with pytest.raises(ValueError, match="not divisible by 4"):
        models.create("vit", variant="mu/4", **VIT, depth=6, adapt=dict(method="hst"))
    with pytest.raises(ValueError, match="divisible by adapt.side_heads"):
        adapt.parse(dict(method="hst", side_dims=(8, 12, 16, 24), side_heads=(3, 2, 4, 4)))
    with pytest.raises(ValueError, match="valid keys"):
        adapt.parse(dict(method="hst", side_width=4))
    with pytest.raises(ValueError, match="needs scan=False"):
        models.create("vit", variant="mu/4", **VIT, depth=4, scan=True, adapt=dict(method="hst"))
    with pytest.raises(ValueError, match="cannot be combined with token_reduction"):
        models.create("vit", variant="mu/4", **VIT, depth=4, tome=dict(r=2), adapt=dict(method="hst"))
    # A model family without the adaptation hook says which models have it, for the new methods too.
    for method in ("hst", "dvpt"):
        with pytest.raises(ValueError, match=r"ConvNeXt has none. Models with it: \[\"VisionTransformer"):
            adapt.attach(models.create("convnext_atto", num_classes=10), dict(method=method))


def test_an_hst_run_trains_the_side_network_and_block_norms_only(tmp_path):
    from test_train import run, tiny_config
    from vitjax import checkpoint, config_utils, weights
    base = str(tmp_path / "base")
    run(tiny_config(total_steps=4), base)
    config = config_utils.load_config("configs/hst_digits.py:runlocal", {
        "init_from": base, "total_steps": 4, "progress_bar": False, "checkpoint_async": False})
    workdir = str(tmp_path / "hst")
    final = run(config, workdir)
    assert 0.0 <= final["eval/top1"] <= 1.0 and np.isfinite(final["eval/loss"])
    saved = param_paths(checkpoint.load_state(workdir)["params"])
    # Only the trained params are checkpointed: side network, meta tokens, the blocks' LayerNorms, the head.
    assert {path.split("/")[0] for path in saved} == {"hst", "hst_meta", "blocks_0", "blocks_1", "head"}
    assert all(re.search(r"/norm[12]/", path) for path in saved if path.startswith("blocks_"))
    assert saved["hst_meta/tokens"].shape == (2, 1, 32)
    loaded = weights.load(workdir)
    assert loaded.meta["model"]["adapt"]["method"] == "hst"
    flat, before = param_paths(loaded.variables["params"]), param_paths(checkpoint.load_params(base)["params"])
    np.testing.assert_array_equal(flat["blocks_1/attn/qkv/kernel"], before["blocks_1/attn/qkv/kernel"])
    assert np.abs(flat["blocks_1/norm2/scale"] - before["blocks_1/norm2/scale"]).max() > 0
    # The BatchNorms' running statistics moved off their initial (0, 1) with the training batches.
    stats = param_paths(loaded.variables["batch_stats"])
    assert np.abs(stats["hst/fc_norm/mean"]).max() > 0 and np.abs(stats["hst/embed_0_bn/var"] - 1).max() > 0
    model = models.create(loaded.meta["model_name"], **loaded.meta["model"])
    logits, _ = model.apply(loaded.variables, jnp.zeros((2, 16, 16, 1)))
    assert logits.shape == (2, 10) and np.isfinite(np.asarray(logits)).all()
