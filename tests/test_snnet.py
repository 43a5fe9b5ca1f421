"""SN-Net v2: stitched forwards and the least-squares initialisation equal to the official code, the stitch
configurations and their FLOPs equal to the official ones, anchors equal to the plain ViTs, bad input refused.

Fixture: tests/fixtures/snnet/ (README there: the official commit, the shrunk anchors, how it was made).
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parity_utils import fixture_entries
from vitjax import convert, models
from vitjax.models import snnet, vit

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "snnet", "snnet.npz")


@functools.lru_cache(maxsize=None)
def fixture():
    data = np.load(FIXTURE)
    return {key: data[key] for key in data.files}


def meta():
    return json.loads(str(fixture()["meta"]))


def anchor_options(settings):
    return dict(variant="mu/4", embed_dim=settings["embed_dim"], depth=settings["depth"],
                num_heads=settings["num_heads"], mlp_dim=4 * settings["embed_dim"], init_values=1e-4,
                no_embed_class=True)


def shrunk(pair, **overrides):
    """Returns (model, overrides) of the fixture's shrunk pair as an `snnetv2_deit3_s_b` with other anchors."""
    info = meta()[pair]
    settings = dict(anchor_options=(anchor_options(info["small"]), anchor_options(info["large"])), img_size=16,
                    num_classes=5, lora_rank=info["lora_r"], **overrides)
    return models.create("snnetv2_deit3_s_b", **settings), settings


def official_state(pair):
    return fixture_entries(fixture(), f"{pair}/state")


@functools.lru_cache(maxsize=None)
def converted(pair):
    """Returns the fixture's official state of `pair` converted (cached: several tests use it)."""
    _, settings = shrunk(pair)
    return convert.from_torch(official_state(pair), "snnetv2_deit3_s_b", **settings)


def rel_err(ours, reference):
    return float(np.max(np.abs(np.asarray(ours, np.float64) - reference)) / np.max(np.abs(reference)))


@pytest.mark.parametrize("pair", ["eq", "uneq"])
def test_stitch_configs_equal_official(pair):
    model, _ = shrunk(pair)
    info = meta()[pair]
    ours = snnet.stitch_configs(model)
    assert len(ours) == len(info["configs"])
    for cfg, reference in zip(ours, info["configs"]):
        assert list(cfg.anchors) == reference["comb_id"]
        if cfg.kind != "anchor":
            assert [list(segment) for segment in cfg.route] == reference["route"]
            assert [index for _, index in cfg.stitch_layers] + [-1] == reference["stitch_layer_ids"]
    # The official pool drops the small->large stitch after block 11 (hard-coded); ours after the last block.
    last_sl = [cfg.id for cfg in ours if cfg.kind == "sl" and cfg.route[0][1] == model.depths[0] - 1]
    assert [cfg.id for cfg in ours if cfg.trained] == sorted(set(info["all_cfgs"]) - set(last_sl))


@pytest.mark.parametrize("pair,stitches", [("eq", (3, 8, 10, 13)), ("uneq", (3, 4))])
def test_stitched_logits_equal_official(pair, stitches):
    """One stitch of each kind (the anchors alone: test_anchor_stitch_equals_plain_vit_and_official)."""
    model, _ = shrunk(pair)
    variables = converted(pair)
    kinds = {snnet.stitch_configs(model)[stitch].kind for stitch in stitches}
    assert kinds == ({"sl", "ls", "lsl", "sls"} if pair == "eq" else {"sl", "ls"})
    apply = jax.jit(model.apply, static_argnames="stitch")
    images = jnp.asarray(fixture()["images"])
    reference, reference64 = fixture()[f"{pair}/logits"], fixture()[f"{pair}/logits64"]
    for stitch in stitches:
        logits, _ = apply(variables, images, stitch=stitch)
        error = rel_err(logits, reference[stitch])
        assert error <= 1e-5, (stitch, error, rel_err(reference[stitch], reference64[stitch]))
    # The logits differ between stitches, so the comparison above tells them apart.
    assert rel_err(reference[stitches[0]], reference[stitches[-1]]) > 1e-2


def test_least_squares_init_equals_official():
    model, settings = shrunk("eq", dtype=jnp.float64, param_dtype=jnp.float64)
    images = fixture()["ls_images"]
    with jax.enable_x64(True):
        variables = convert.from_torch(official_state("eq"), "snnetv2_deit3_s_b", **settings)
        variables = jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float64), variables)
        fitted = snnet.least_squares_init(model, variables, jnp.asarray(images, jnp.float64))
        checked = 0
        for key, reference in fixture().items():
            if not key.startswith("eq/ls64/") or not key.endswith("weight"):
                continue
            _, source, index = key[len("eq/ls64/"):].split(".")[:3]
            layer = fitted["params"][f"stitch_layers_{source}_{index}"]
            assert rel_err(layer["kernel"], reference.T) <= 1e-10
            assert rel_err(layer["bias"], fixture()[key[:-len("weight")] + "bias"]) <= 1e-10
            # The fit replaced the official state's random kernel.
            assert rel_err(variables["params"][f"stitch_layers_{source}_{index}"]["kernel"], reference.T) > 0.1
            checked += 1
    assert checked == sum(snnet.num_stitch_layers(model.depths)) == 7


def test_anchor_stitch_equals_plain_vit_and_official():
    model, _ = shrunk("eq")
    variables = converted("eq")
    images = jnp.asarray(fixture()["images"])
    for index in range(2):
        plain = vit.VisionTransformer(**model.anchor_fields(index))
        expected, _ = plain.apply({"params": variables["params"][f"anchors_{index}"]}, images)
        logits, _ = model.apply(variables, images, stitch=index)
        np.testing.assert_array_equal(np.asarray(logits), np.asarray(expected))
        assert rel_err(logits, fixture()["eq/logits"][index]) <= 1e-5


def test_stitch_flops_equal_official_and_params():
    info = meta()
    model = models.create("snnetv2_deit3_s_l")
    official = {int(key): value for key, value in info["flops_s_l"].items()}
    assert sorted(official) == [cfg.id for cfg in snnet.stitch_configs(model) if cfg.trained]
    assert len(snnet.stitch_configs(model)) == 135
    for stitch, macs in official.items():
        assert snnet.stitch_macs(model, stitch) == macs, stitch
    assert snnet.stitch_gflops(model, 0) == pytest.approx(4.608, abs=1e-3)   # DeiT-S
    assert snnet.stitch_gflops(model, 1) == pytest.approx(61.604, abs=1e-3)  # DeiT-L
    for name, count in info["param_counts"].items():
        model = models.create(name)
        shapes = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
        assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes["params"])) == count, name


def test_sampling_probabilities_group_by_flops():
    model = models.create("snnetv2_deit3_s_l")
    probs = snnet.sampling_probabilities(model)
    assert probs.sum() == pytest.approx(1.0) and probs[13] == 0.0  # not in the training pool
    # Both anchors are alone in their 1-GFLOPs groups, so each group's weight is theirs.
    assert probs[0] == pytest.approx(probs[1]) and probs[0] > probs[2]
    weighted = snnet.sampling_probabilities(model, flops_sampling_k=2.0)
    assert weighted[1] > weighted[0]


def test_bad_stitch_and_anchors_fail_before_compile():
    model, settings = shrunk("uneq")
    with pytest.raises(ValueError, match=r"valid choices: 0\.\.4"):
        model.check_stitch(5)
    with pytest.raises(ValueError, match="valid choices: 0..4"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), stitch=-1))
    deep_first = dict(settings, anchor_options=settings["anchor_options"][::-1])
    with pytest.raises(ValueError, match="anchor 0 must be the shallower"):
        models.create("snnetv2_deit3_s_b", **deep_first)
    other_patch = dict(settings, anchor_options=(dict(settings["anchor_options"][0], patch_size=8),
                                                 settings["anchor_options"][1]))
    with pytest.raises(ValueError, match="token sequences differ"):
        models.create("snnetv2_deit3_s_b", **other_patch)
    with pytest.raises(ValueError, match="must be ViTs.*Valid choices"):
        models.create("snnetv2_deit3_s_b", anchor_models=("swin_tiny_patch4_window7_224", "vit"))
    with pytest.raises(ValueError, match="Unknown stitch_kinds"):
        models.create("snnetv2_deit3_s_b", stitch_kinds=("sl", "slx"))


def test_pallas_equals_xla_stitched():
    model, _ = shrunk("eq")
    variables = converted("eq")
    pallas, _ = shrunk("eq", attention_impl="pallas")
    images = jnp.asarray(fixture()["images"])
    expected, _ = model.apply(variables, images, stitch=10)
    logits, _ = pallas.apply(variables, images, stitch=10)  # on a CPU the Pallas kernel runs in interpret mode
    assert rel_err(logits, np.asarray(expected, np.float64)) <= 1e-5


def test_from_anchors_loads_both_checkpoints_and_fits_stitches(tmp_path):
    from vitjax.convert import io as convert_io
    from vitjax.convert import snnet as snnet_convert
    model, settings = shrunk("uneq")
    variables = converted("uneq")
    paths = []
    for index in range(2):
        path = str(tmp_path / f"anchor_{index}.msgpack")
        convert_io.save_variables(path, {"params": variables["params"][f"anchors_{index}"]}, {"model_name": "vit"})
        paths.append(path)
    images = fixture()["ls_images"]
    built = snnet_convert.from_anchors(paths, "snnetv2_deit3_s_b", images=images, **settings)
    expected = snnet.least_squares_init(model, variables, jnp.asarray(images))
    flat_built = jax.tree_util.tree_leaves_with_path(built["params"])
    flat_expected = dict(jax.tree_util.tree_leaves_with_path(expected["params"]))
    assert len(flat_built) == len(flat_expected)
    for path, leaf in flat_built:
        name = jax.tree_util.keystr(path)
        if "lora" in name:  # LoRA factors start at their own initialisation
            continue
        np.testing.assert_allclose(np.asarray(leaf), np.asarray(flat_expected[path]), rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    with pytest.raises(ValueError, match="one checkpoint per anchor"):
        snnet_convert.from_anchors(paths[:1], "snnetv2_deit3_s_b", **settings)


def test_objective_samples_the_pool_and_rejects_other_models():
    from vitjax import config_utils, objectives
    config = config_utils.load_config("configs/snnet_deit.py:runlocal")
    objective = objectives.create("snnet", config)
    assert objective.pool == [0, 1, 2, 4]  # stitch 3 (after the small anchor's last block) is not trained
    np.testing.assert_allclose(objective.pool_probs.sum(), 1.0)
    config.model_name, config.model = "vit", dict(variant="mu/4", num_classes=10, img_size=16, in_chans=1)
    with pytest.raises(ValueError, match="trains an SN-Net.*Valid choices"):
        objectives.create("snnet", config)
