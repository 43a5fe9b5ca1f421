"""The trainer end to end on the bundled digits: the loss falls, outputs are written, accumulation and bf16 hold."""
import json
import os
import subprocess
import sys
import tempfile

import chex
import jax
import numpy as np
import pytest

from vitjax import checkpoint, config_utils, parallel, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The trainer tests compile the same tiny model many times (and in child processes): a persistent
# compilation cache turns every compile after the first into a lookup. Set at import, which pytest
# does while collecting, before anything compiles; JAX_COMPILATION_CACHE_DIR overrides the place.
if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "vitjax_jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def load_config(arg: str = "runlocal", name: str = "digits_vit"):
    """Returns configs/NAME.py's get_config(arg); by default the tiny ViT of the tests."""
    return config_utils.load_config(f"configs/{name}.py:{arg}" if arg else f"configs/{name}.py")


def tiny_config(**overrides):
    """Returns the runlocal digits config (ViT width 32, depth 2) with quiet logging and `overrides`."""
    return config_utils.load_config("configs/digits_vit.py:runlocal",
                                    {"progress_bar": False, "checkpoint_async": False, **overrides})


def one_device_mesh():
    """Returns a 1x1x1 mesh on the first device: the tests' 8 fake devices would only slow a tiny model."""
    return parallel.create_mesh(dict(data=1, fsdp=1, model=1), devices=jax.devices()[:1])


def run(config, workdir: str, **kwargs):
    """Returns train_and_evaluate(config, workdir) on one device."""
    return train.train_and_evaluate(config, workdir, mesh=one_device_mesh(), **kwargs)


def read_metrics(workdir: str):
    """Returns the records of WORKDIR/metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_loss_falls_and_outputs_are_written(tmp_path):
    workdir = str(tmp_path / "run")
    # A ViT sits on a loss plateau for its first few thousand images: 60 steps of 128 get past it.
    config = tiny_config(total_steps=60, batch_size=128, log_every_steps=15, eval_every_steps=30,
                         checkpoint_every_steps=30)
    config.optim.blr = 0.02
    final = run(config, workdir)

    records = read_metrics(workdir)
    train_losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert [r["step"] for r in records] == [15, 30, 45, 60]
    assert train_losses[-1] < train_losses[0] - 0.3, train_losses
    for key in ("train/lr", "train/grad_norm", "train/param_norm", "images_per_sec", "epoch"):
        assert key in records[-1], key
    # Every one of the 360 test images counts once (3 batches of 120, the last one full).
    assert records[1]["eval/num_examples"] == records[-1]["eval/num_examples"] == 360
    assert final["eval/top1"] == records[-1]["eval/top1"] > 0.3  # chance is 0.1
    assert 0.0 <= final["eval/top1"] <= final["eval/top5"] <= 1.0
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(workdir, "tensorboard")))
    assert checkpoint.complete_steps(os.path.join(workdir, "checkpoints")) == (60,)  # keep_checkpoints=1
    # lr = blr * 128 / 256 after 2 warmup steps, cosine to 0 at step 60; logged as of the record's last step.
    peak = 0.02 * 128 / 256
    for record in records:
        expected = peak * 0.5 * (1 + np.cos(np.pi * (record["step"] - 1 - 2) / (60 - 2)))
        assert record["train/lr"] == pytest.approx(expected, rel=1e-4)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """Two micro-batches of 16 give the update of one batch of 32 (no dropout, fp32)."""
    results = {}
    for accum in (1, 2):
        workdir = str(tmp_path / f"accum{accum}")
        config = tiny_config(total_steps=3, log_every_steps=1, checkpoint_every_steps=0)
        config.optim.grad_accum_steps = accum
        final = run(config, workdir)
        params = checkpoint.load_state(os.path.join(workdir, "checkpoints"))["params"]
        results[accum] = ([r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r], final, params)
    losses_1, final_1, params_1 = results[1]
    losses_2, final_2, params_2 = results[2]
    np.testing.assert_allclose(losses_2, losses_1, rtol=1e-5)
    np.testing.assert_allclose(final_2["eval/loss"], final_1["eval/loss"], rtol=1e-5)
    leaves_1, leaves_2 = (np.concatenate([np.ravel(x) for x in _leaves(p)]) for p in (params_1, params_2))
    assert np.max(np.abs(leaves_1 - leaves_2)) / np.max(np.abs(leaves_1)) < 1e-5


def test_bf16_compute_keeps_fp32_master_weights(tmp_path):
    workdir = str(tmp_path / "bf16")
    config = tiny_config(total_steps=3, log_every_steps=1, checkpoint_every_steps=0)
    config.model.dtype = "bfloat16"
    final = run(config, workdir)
    state = checkpoint.load_state(os.path.join(workdir, "checkpoints"))
    assert {np.asarray(leaf).dtype for leaf in _leaves(state["params"])} == {np.dtype("float32")}
    assert np.isfinite(final["eval/loss"])
    assert all(np.isfinite(r["train/loss"]) for r in read_metrics(workdir) if "train/loss" in r)


def test_ema_follows_its_recurrence_is_checkpointed_and_evaluated(tmp_path):
    workdir = str(tmp_path / "ema")
    decay = 0.75
    config = tiny_config(total_steps=4, log_every_steps=1, eval_every_steps=4, checkpoint_every_steps=1,
                         keep_checkpoints=4, ema_decay=decay)
    final = run(config, workdir)
    assert {"eval_ema/top1", "eval_ema/loss"} <= set(final) and {"eval/top1", "eval/loss"} <= set(final)
    states = [checkpoint.load_state(os.path.join(workdir, "checkpoints"), step) for step in range(1, 5)]
    for previous, current in zip(states, states[1:]):
        expected = jax.tree.map(lambda ema, new: decay * ema + (1 - decay) * new, previous["ema_params"],
                                current["params"])
        chex.assert_trees_all_close(expected, current["ema_params"], rtol=1e-6, atol=1e-7)
    assert not np.allclose(jax.tree.leaves(states[-1]["ema_params"])[0], jax.tree.leaves(states[-1]["params"])[0])
    with pytest.raises(ValueError, match="ema_decay must be 0 .off. or in .0, 1."):
        run(tiny_config(ema_decay=1.0), str(tmp_path / "bad"))


def test_quickstart_command_runlocal(tmp_path):
    """The README command (shrunk by :runlocal) through absl flags, with a --config override."""
    workdir = str(tmp_path / "cli")
    result = subprocess.run(
        [sys.executable, "-m", "vitjax.main", "--config=configs/digits_vit.py:runlocal", f"--workdir={workdir}",
         "--config.total_steps=4", "--config.progress_bar=False"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ, XLA_FLAGS="", JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
                                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Final test top-1:" in result.stdout
    assert read_metrics(workdir)[-1]["step"] == 4
    assert "total" in result.stderr and "params" in result.stderr  # the parameter overview


def _leaves(tree):
    """Returns the leaves of a nested dict in key order."""
    return jax.tree.leaves(tree)


@pytest.mark.parametrize("arg", ["variant=S/16", "variant=B/16", "recipe=plain,epochs=300"])
def test_vit_i1k_configs_build_the_recipe_models(tmp_path, arg):
    """get_config is pure: it builds the ImageNet recipe with no data anywhere (the run reports that later)."""
    from vitjax import objectives
    config = config_utils.validate_config(load_config(f"{arg},data_dir={tmp_path / 'empty'}", "vit_i1k"))
    module = objectives.create(config.objective, config).module
    assert (module.embed_dim, module.depth, module.patch_size, module.num_classes) == \
        ({"S": 384, "B": 768}[module_size(arg)], 12, 16, 1000)
    assert config.batch_size == 1024 and module.dtype == np.dtype("bfloat16")
    if "plain" in arg:
        assert (config.optim.lr, config.total_epochs, module.global_pool, module.pos_embed) == (1e-3, 300, "avg", "sincos2d")
    else:
        assert (config.optim.blr, config.total_epochs, config.input.mixup.cutmix_alpha) == (2.5e-4, 300, 1.0)
    assert config.input.data_dir == str(tmp_path / "empty") and not (tmp_path / "empty").exists()


def module_size(arg: str) -> str:
    """Returns the ViT size letter named in a vit_i1k argument string (S by default)."""
    return "B" if "B/16" in arg else "S"
