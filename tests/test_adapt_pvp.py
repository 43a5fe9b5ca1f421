"""PVP (vitjax/adapt/pvp.py): stage 2 starts from stage 1's prompts exactly, its head re-initialised."""
import jax
import numpy as np
import pytest

from vitjax import checkpoint, train
from vitjax.adapt import pvp
from vitjax.pytree import param_paths
from test_train import one_device_mesh, run, tiny_config

VPT_DEEP = {"adapt.method": "vpt", "adapt.num_tokens": 3, "adapt.deep": True, "optim.weight_decay": 0.0}
SOURCE = {"input.pp_modules": ("vitjax.adapt.pvp",),
          "input.pp_train": f"decode(channels=1)|resize(16)|value_range(-1, 1)|relabel({pvp.DIGITS_SOURCE_MAPPING})",
          "input.pp_eval": f"decode(channels=1)|resize(16)|value_range(-1, 1)|relabel({pvp.DIGITS_SOURCE_MAPPING})"}


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Returns (base workdir, stage-1 workdir): a 4-step tiny digits run, then 4 steps of VPT-deep on the source."""
    root = tmp_path_factory.mktemp("pvp")
    base = str(root / "base")
    run(tiny_config(total_steps=4), base)
    source = str(root / "source")
    run(tiny_config(total_steps=4, init_from=base, init_from_skip=(r"^head/",), **VPT_DEEP, **SOURCE), source)
    return base, source


def _initial_params(config):
    config, objective = train.build(config)
    batch = {"image": np.zeros((2, 16, 16, 1), np.float32), "label": np.zeros((2, 10), np.float32)}
    setup = train.create_train_setup(config, objective, one_device_mesh(), batch, total_steps=4)
    plan = train.plan_init_from(config, objective, setup.abstract_variables)
    rng = jax.random.PRNGKey(config.seed)
    return (param_paths(jax.device_get(train.initial_state(setup, rng, plan).params)),
            param_paths(jax.device_get(train.initial_state(setup, rng).params)), plan)


def test_stage2_starts_from_stage1_prompts_with_a_new_head(stages):
    base, source = stages
    started, fresh, plan = _initial_params(
        tiny_config(seed=1, init_from=source, init_from_skip=(r"^head/",), **VPT_DEEP))
    trained = param_paths(checkpoint.load_state(source)["params"])
    assert sorted(trained) == ["head/bias", "head/kernel", "vpt/deep_prompts", "vpt/prompts"]
    for path in ("vpt/prompts", "vpt/deep_prompts"):
        assert plan.actions[f"params/{path}"][0] == "loaded"
        np.testing.assert_array_equal(started[path], trained[path])
        # stage 1 moved them from their init, so equality above is not a coincidence of seeds
        assert np.abs(started[path] - fresh[path]).max() > 1e-4
    assert started["vpt/deep_prompts"].shape == (1, 3, 32)
    # the head is the new run's initialisation, not stage 1's trained one
    assert plan.actions["params/head/kernel"][0] == "skipped"
    np.testing.assert_array_equal(started["head/kernel"], fresh["head/kernel"])
    assert np.abs(started["head/kernel"] - trained["head/kernel"]).max() > 1e-4
    # the frozen backbone is the base run's
    backbone = param_paths(checkpoint.load_params(base)["params"])
    np.testing.assert_array_equal(started["blocks_1/mlp/fc1/kernel"], backbone["blocks_1/mlp/fc1/kernel"])


def test_stage2_with_another_prompt_count_fails_before_compiling(stages):
    _, source = stages
    with pytest.raises(ValueError, match="vpt/prompts"):
        _initial_params(tiny_config(init_from=source, init_from_skip=(r"^head/",),
                                    **{**VPT_DEEP, "adapt.num_tokens": 4}))


def test_relabel_maps_labels_and_rejects_bad_mappings():
    import tensorflow as tf
    op = pvp.relabel(pvp.DIGITS_SOURCE_MAPPING)
    out = op({"label": tf.constant([0, 1, 2, 5, 9], tf.int64), "image": tf.zeros((5, 1))}, None)
    np.testing.assert_array_equal(out["label"].numpy(), [0, 0, 1, 2, 4])
    assert out["label"].dtype == tf.int64
    for bad in ((), (0, -1), [0.5], "01"):
        with pytest.raises(ValueError, match="relabel's mapping"):
            pvp.relabel(bad)


def test_config_stages():
    from vitjax import config_utils
    source, target = (config_utils.validate_config(config_utils.load_config(
        f"configs/pvp_digits.py:{stage}", {"init_from": "/tmp/base_run"})) for stage in ("stage=source,runlocal",
                                                                                         "stage=target"))
    assert "relabel((0, 0, 1, 1, 2, 2, 3, 3, 4, 4))" in source.input.pp_train and source.input.train_split == \
        "train[1000:]"
    assert "relabel" not in target.input.pp_train and target.input.train_split == "train[:1000]"
    for config in (source, target):
        assert (config.adapt.method, config.adapt.deep, config.adapt.num_tokens) == ("vpt", True, 5)
        assert tuple(config.init_from_skip) == (r"^head/",)
    with pytest.raises(ValueError, match="source"):
        config_utils.load_config("configs/pvp_digits.py:stage=both")
