"""Bad input fails early and clearly: unknown keys and names, bad sizes, NaN losses."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from vitjax import checkpoint, config_utils, train
from test_train import REPO, load_config, read_metrics, run, tiny_config


def test_unknown_config_key_lists_valid_keys():
    config = tiny_config()
    config.optim.lrr = 0.1
    with pytest.raises(ValueError, match=r"Unknown config key 'optim.lrr'; valid keys under 'optim': \[.*'lr'"):
        config_utils.validate_config(config)
    config = tiny_config()
    config.batchsize = 8
    with pytest.raises(ValueError, match=r"Unknown config key 'batchsize'; valid keys: \[.*'batch_size'"):
        config_utils.validate_config(config)


def test_unknown_config_override_on_the_command_line():
    result = subprocess.run(
        [sys.executable, "-m", "vitjax.main", "--config=configs/digits_vit.py:runlocal", "--workdir=/tmp/unused",
         "--config.optim.lrr=0.1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "config.optim has no key 'lrr'; valid keys: [" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "vitjax.main", "--config=configs/digits_vit.py:run_local", "--workdir=/tmp/unused"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Unknown config argument 'run_local' in 'run_local'; valid arguments: runlocal=False" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_config_argument_and_values():
    with pytest.raises(ValueError, match=r"Unknown config argument 'run_local'.*runlocal"):
        load_config("run_local")
    for key, value, message in [("optim.name", "adam", r"valid choices: \['adamw', 'sgd', 'lars', 'lamb', 'sam'\]"),
                                ("optim.schedule", "cos", r"valid choices: \['cosine'"),
                                ("objective", "simclr", r"valid choices: \[.*'supervised'"),
                                ("mesh.data", -2, "at most one -1")]:
        with pytest.raises(ValueError, match=message):
            config_utils.validate_config(tiny_config(**{key: value}))


def test_unknown_model_name_before_anything_compiles():
    config = tiny_config(model_name="vit_tiny_patch16_2244")
    with pytest.raises(ValueError, match=r"Unknown model 'vit_tiny_patch16_2244'.*Valid choices: \[.*'vit'"):
        train.build(config)


def test_image_size_not_divisible_by_patch_size():
    config = tiny_config()
    config.model.patch_size = 3
    with pytest.raises(ValueError, match="img_size 16 is not divisible by patch_size 3"):
        train.build(config)


def test_unknown_input_key():
    config = tiny_config()
    config.input.pp_trian = "decode"
    with pytest.raises(ValueError, match="Unknown input config key.*valid keys"):
        train.build(config)


class _NanFromStep3:
    """vitjax.data whose train images turn NaN from the batch of step 3 on."""

    def __init__(self):
        import vitjax.data
        self._data = vitjax.data

    def __getattr__(self, name):
        return getattr(self._data, name)

    def make_train_iterator(self, input_config, **kwargs):
        step = kwargs.get("start_step", 0) + 1
        for batch in self._data.make_train_iterator(input_config, **kwargs):
            if step >= 3:
                batch = dict(batch, image=batch["image"] * np.nan)
            yield batch
            step += 1


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "_data_module", _NanFromStep3)
    workdir = str(tmp_path / "nan")
    config = tiny_config(total_steps=6, log_every_steps=1, checkpoint_every_steps=1, keep_checkpoints=2)
    with pytest.raises(FloatingPointError, match=r"Non-finite train/loss = nan at step 3: stopping the run. The last "
                                                 r"good checkpoint \(step 2\) is kept in .* \(read back and verified "
                                                 r"against its fingerprints\). Try a lower learning rate"):
        run(config, workdir)
    checkpoints = os.path.join(workdir, "checkpoints")
    assert checkpoint.complete_steps(checkpoints) == (1, 2)
    state = checkpoint.load_state(checkpoints)
    assert int(state["step"]) == 2
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(state["params"]))
    assert [record["step"] for record in read_metrics(workdir)] == [1, 2]


def test_a_missing_imagenet_is_reported_when_the_run_starts_with_the_runlocal_hint(tmp_path):
    """get_config reads no data; the run stops before compiling with how to prepare it and the :runlocal way out."""
    config = load_config(f"data_dir={tmp_path / 'tfds'}", "mae_b16")  # pure: nothing to find yet
    assert config.input.dataset == "imagenet2012"
    result = subprocess.run(
        [sys.executable, "-m", "vitjax.main", f"--config=configs/mae_b16.py:data_dir={tmp_path / 'tfds'}",
         f"--workdir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, XLA_FLAGS=""))
    assert result.returncode != 0
    assert "downloads/manual" in result.stderr and "--config=configs/mae_b16.py:runlocal" in result.stderr, \
        result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
