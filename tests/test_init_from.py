"""config.init_from: pretrained weights into a new run, by explicit rules, with clear errors before compiling."""
import json
import os

import chex
import jax
import numpy as np
import pytest

from vitjax import checkpoint, config_utils, objectives, train, weights
from vitjax.convert import io as convert_io
from test_train import read_metrics, run, tiny_config


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """Returns (workdir, final metrics) of a 60-step tiny digits run (about 40% top-1; chance is 10%)."""
    workdir = str(tmp_path_factory.mktemp("source") / "run")
    config = tiny_config(total_steps=60, batch_size=128, log_every_steps=60, checkpoint_every_steps=60)
    config.optim.blr = 0.02
    final = run(config, workdir)
    assert final["eval/top1"] > 0.3
    return workdir, final


def _timm_checkpoint(path, **settings):
    """Writes a randomly initialised timm ViT's state dict to `path` and returns it (numpy)."""
    import timm
    import torch
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **settings)
    torch.save(model.state_dict(), path)
    return {key: value.numpy() for key, value in model.state_dict().items()}


def test_a_new_run_starts_from_the_source_weights(source_run, tmp_path):
    """One step at a negligible learning rate from the source's weights evaluates as the source did."""
    workdir, source_final = source_run
    config = tiny_config(total_steps=1, log_every_steps=1, init_from=workdir)
    config.optim.lr, config.optim.blr, config.optim.warmup_steps = 1e-9, None, 0
    final = run(config, str(tmp_path / "finetune"))
    assert final["eval/top1"] == pytest.approx(source_final["eval/top1"], abs=1 / 360 + 1e-9)
    assert final["eval/loss"] == pytest.approx(source_final["eval/loss"], rel=1e-4)
    scratch = tiny_config(total_steps=1, log_every_steps=1)
    scratch.optim.lr, scratch.optim.blr, scratch.optim.warmup_steps = 1e-9, None, 0
    assert run(scratch, str(tmp_path / "scratch"))["eval/loss"] > source_final["eval/loss"] + 0.2


def test_a_resumed_run_never_reapplies_init_from(source_run, tmp_path, monkeypatch):
    workdir, _ = source_run
    target = str(tmp_path / "resumed")
    config = tiny_config(total_steps=4, log_every_steps=1, checkpoint_every_steps=1, init_from=workdir)
    run(config, target, stop_after_steps=2)
    calls = []
    monkeypatch.setattr(train, "plan_init_from", lambda *args: calls.append(args))
    final = run(config, target)
    assert calls == [] and final["step"] == 4
    assert [record["step"] for record in read_metrics(target)] == [1, 2, 3, 4]


def test_resolution_and_class_count_change_from_a_timm_checkpoint(tmp_path):
    """A timm .pth at 32 px with 7 classes into a 64 px, 10-class model: the table says what happened."""
    state_dict = _timm_checkpoint(tmp_path / "vit.pth", img_size=32, patch_size=8, in_chans=1, depth=2,
                                  num_classes=7)
    config = tiny_config(model_name="vit_tiny_patch16_224", init_from=str(tmp_path / "vit.pth"))
    config.model = dict(img_size=64, patch_size=8, in_chans=1, depth=2, num_classes=10)
    config = config_utils.validate_config(config)
    objective = objectives.create("supervised", config)
    abstract = jax.eval_shape(lambda r: objective.init_variables(r, {"image": np.zeros((1, 64, 64, 1), np.float32)}),
                              jax.random.key(0))
    plan = train.plan_init_from(config, objective, abstract)
    counts = plan.counts()
    assert (counts["loaded"], counts["resampled"], counts["re-initialised"]) == (29, 1, 2), plan.table()
    assert plan.actions["params/pos_embed"] == ("resampled", "17 -> 65 rows")
    assert "| re-initialised | 2 | 1,930 | params/head/bias (the checkpoint has 7 classes)" in plan.table()
    fresh = jax.tree.map(np.asarray, train.unbox(jax.jit(objective.init_variables)(
        jax.random.key(0), {"image": np.zeros((1, 64, 64, 1), np.float32)})))
    loaded = plan.apply(fresh)["params"]
    np.testing.assert_array_equal(loaded["blocks_1"]["mlp"]["fc2"]["kernel"], state_dict["blocks.1.mlp.fc2.weight"].T)
    chex.assert_trees_all_equal(loaded["head"], fresh["params"]["head"])  # re-initialised: the fresh values


def test_converted_variables_and_skip_keep_patterns(source_run, tmp_path):
    """A .msgpack written by vitjax.convert loads; init_from_skip / init_from_keep leave params at init."""
    workdir, _ = source_run
    params = checkpoint.load_params(workdir, parts=("params",))["params"]
    convert_io.save_variables(str(tmp_path / "v.msgpack"), {"params": params}, meta={"model_name": "vit"})
    config = config_utils.validate_config(tiny_config(init_from=str(tmp_path / "v.msgpack"),
                                                      init_from_skip=("^blocks_1/",)))
    objective = objectives.create("supervised", config)
    abstract = jax.eval_shape(lambda r: objective.init_variables(r, {"image": np.zeros((1, 16, 16, 1), np.float32)}),
                              jax.random.key(0))
    plan = train.plan_init_from(config, objective, abstract)
    assert plan.counts()["skipped"] == 12 and plan.counts()["loaded"] == 20
    assert weights.load(str(tmp_path / "v.msgpack")).meta == {"model_name": "vit"}
    keep = config_utils.validate_config(tiny_config(init_from=f"{workdir}@60", init_from_keep=("^patch_embed/",)))
    plan = train.plan_init_from(keep, objectives.create("supervised", keep), abstract)
    assert plan.counts()["loaded"] == 2 and plan.counts()["skipped"] == 30


def test_bad_sources_fail_before_compiling_with_clear_messages(source_run, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"init_from .*nothing at .*missing. Valid sources: a vitjax workdir"):
        train.build(tiny_config(init_from=str(tmp_path / "missing")))
    with pytest.raises(FileNotFoundError, match=r"No complete checkpoint of step 7 .*steps: \[60\]"):
        weights.load(f"{source_run[0]}@7")
    # A run of another architecture (width 48, not 32) names the mismatched keys and shapes.
    config = tiny_config(init_from=source_run[0])
    config.model.update(embed_dim=48, mlp_dim=96)
    with pytest.raises(ValueError, match=r"does not fit the model: 30 mismatched parameter\(s\):\n  blocks_0/attn/proj/"
                                         r"bias: checkpoint shape \(32,\), model shape \(48,\)"):
        run(config, str(tmp_path / "other_run"))
    assert not os.path.exists(tmp_path / "other_run" / "checkpoints")
    # A timm checkpoint that does not fit (depth 2 into depth 3) names the first missing key.
    _timm_checkpoint(tmp_path / "other.pth", img_size=16, patch_size=4, in_chans=1, depth=2, num_classes=10)
    config = tiny_config(init_from=str(tmp_path / "other.pth"), model_name="vit_tiny_patch16_224")
    config.model = dict(img_size=16, patch_size=4, in_chans=1, depth=3, num_classes=10)
    with pytest.raises(ValueError, match=r"does not fit model 'vit_tiny_patch16_224' .*'blocks.2.norm1.weight'"):
        run(config, str(tmp_path / "other_timm"))


def test_resuming_with_a_changed_config_shows_the_diff(tmp_path):
    workdir = str(tmp_path / "run")
    run(tiny_config(total_steps=2, log_every_steps=1), workdir)
    changed = tiny_config(total_steps=3, log_every_steps=1)
    changed.optim.blr = 0.03
    changed.model.drop_path_rate = 0.2
    with pytest.raises(train.ConfigChangedError, match=r"model.drop_path_rate: 0.0 -> 0.2\n  optim.blr: 0.004 -> 0.03"):
        run(changed, workdir)
    assert json.load(open(os.path.join(workdir, "config.json")))["optim"]["blr"] == 0.004  # not overwritten
    # Run length and cadence may change; an explicit flag accepts the rest.
    assert run(tiny_config(total_steps=3, log_every_steps=3, eval_every_steps=3), workdir)["step"] == 3
    assert run(changed.copy_and_resolve_references(), workdir, allow_config_change=True)["step"] == 3
    assert json.load(open(os.path.join(workdir, "config.json")))["optim"]["blr"] == 0.03
