"""config.adapt in a run: frozen backbone without optimizer state, trained-only checkpoints, resume from init_from."""
import jax
import numpy as np
import pytest

from vitjax import checkpoint, train, weights
from vitjax.evaluate import standalone
from vitjax.pytree import param_paths
from test_train import run, tiny_config

LORA = {"adapt.method": "lora", "adapt.rank": 2, "adapt.targets": ("qkv", "proj")}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """Returns the workdir of a 10-step tiny digits run: the base weights."""
    workdir = str(tmp_path_factory.mktemp("base") / "run")
    run(tiny_config(total_steps=10), workdir)
    return workdir


def _setup(config):
    config, objective = train.build(config)
    batch = {"image": np.zeros((2, 16, 16, 1), np.float32), "label": np.zeros((2, 10), np.float32)}
    mesh = train.parallel.create_mesh(dict(data=1, fsdp=1, model=1), devices=jax.devices()[:1])
    return config, objective, train.create_train_setup(config, objective, mesh, batch, total_steps=4)


def _size(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def test_only_adaptation_params_and_head_have_optimizer_state(base_run):
    config, _, setup = _setup(tiny_config(init_from=base_run, **LORA))
    params = param_paths(setup.abstract_state.params)
    trained = {path: leaf for path, leaf in params.items() if "lora_" in path or path.startswith("head/")}
    # width 32, depth 2: qkv (32 x 2 + 2 x 96) and proj (32 x 2 + 2 x 32) per block; head 32 x 10 + 10
    assert _size(list(trained.values())) == 2 * (256 + 128) + 330
    # AdamW: mu and nu per trained param, a step count; nothing for the frozen backbone
    opt_leaves = jax.tree.leaves(setup.abstract_state.opt_state)
    assert _size(opt_leaves) == 2 * _size(list(trained.values())) + sum(leaf.size == 1 for leaf in opt_leaves)
    assert sum(leaf.size > 1 for leaf in opt_leaves) == 2 * len(trained)
    full_config, _, full_setup = _setup(tiny_config(init_from=base_run))
    assert _size(jax.tree.leaves(full_setup.abstract_state.opt_state)) > 2 * _size(full_setup.abstract_state.params)
    overview = train.param_overview(setup.abstract_state.params, train.optim.trainable_mask(
        config.optim, setup.abstract_state.params, train.adapted_params(config)))
    total = _size(setup.abstract_state.params)
    assert f"{_size(list(trained.values())):,} ({100 * _size(list(trained.values())) / total:.2f}%)" in overview


def test_init_from_lists_the_adaptation_params_as_kept_at_init(base_run):
    config, objective, setup = _setup(tiny_config(init_from=base_run, **{"adapt.method": "adapter"}))
    plan = train.plan_init_from(config, objective, setup.abstract_variables)
    skipped = sorted(path for path, (action, _) in plan.actions.items() if action == "skipped")
    assert skipped == [f"params/blocks_{i}/adapter/{layer}/{name}" for i in range(2)
                       for layer in ("down_proj", "up_proj") for name in ("bias", "kernel")]
    assert "adaptation parameter" in plan.table()


def test_checkpoints_hold_trained_params_and_a_resumed_run_rebuilds_the_rest(base_run, tmp_path):
    config = tiny_config(total_steps=4, checkpoint_every_steps=2, log_every_steps=2, init_from=base_run, **LORA)
    straight = run(config, str(tmp_path / "straight"))
    interrupted = str(tmp_path / "interrupted")
    run(config, interrupted, stop_after_steps=2)
    saved = checkpoint.load_state(interrupted)
    assert sorted(param_paths(saved["params"])) == sorted(
        [f"blocks_{i}/attn/{layer}/lora_{m}" for i in range(2) for layer in ("proj", "qkv") for m in "ab"]
        + ["head/bias", "head/kernel"])
    meta = checkpoint.Checkpointer(str(tmp_path / "interrupted" / "checkpoints")).manager.restore(
        2, args=checkpoint.ocp.args.Composite(meta=checkpoint.ocp.args.JsonRestore()))["meta"]
    assert meta["init_from"] == base_run and meta["adapt"] == "lora"
    resumed = run(config, interrupted)
    assert resumed["step"] == 4
    assert resumed["eval/loss"] == pytest.approx(straight["eval/loss"], rel=1e-6)
    a, b = checkpoint.load_state(str(tmp_path / "straight")), checkpoint.load_state(interrupted)
    for path, leaf in param_paths(a["params"]).items():
        np.testing.assert_allclose(leaf, param_paths(b["params"])[path], rtol=1e-6, atol=1e-7)
    # The base weights came from init_from: the LoRA run trained (B left zero) and its eval differs from the base.
    assert np.abs(param_paths(a["params"])["blocks_0/attn/qkv/lora_b"]).max() > 0
    # Loaded as weights (init_from of another run, `python -m vitjax.evaluate`): base + LoRA, merged.
    loaded = weights.load(interrupted)
    assert "LoRA, merged" in loaded.description and loaded.meta["model"].get("adapt") is None
    flat = param_paths(loaded.variables["params"])
    assert not any("lora_" in path for path in flat)
    base = param_paths(checkpoint.load_params(base_run)["params"])
    trained = param_paths(b["params"])
    update = 4.0 * trained["blocks_1/attn/qkv/lora_a"] @ trained["blocks_1/attn/qkv/lora_b"]  # alpha 8 / rank 2
    kernel = base["blocks_1/attn/qkv/kernel"]
    np.testing.assert_allclose(flat["blocks_1/attn/qkv/kernel"], kernel + update.reshape(kernel.shape),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(flat["blocks_1/mlp/fc1/kernel"], base["blocks_1/mlp/fc1/kernel"])
    np.testing.assert_array_equal(flat["head/kernel"], trained["head/kernel"])


def test_an_adapted_run_evaluates_standalone_as_it_did_in_training(base_run, tmp_path):
    """`python -m vitjax.evaluate --init_from=<adapted run> --kind=K` rebuilds base + adaptation inside the mesh."""
    workdir = str(tmp_path / "vpt")
    final = run(tiny_config(total_steps=2, init_from=base_run, **{"adapt.method": "vpt"}), workdir)
    again = standalone.evaluate_run(workdir, {"test": dict(kind="classification")}, log=lambda _: None)
    assert again["test/top1"] == pytest.approx(final["eval/top1"], abs=1e-6)
