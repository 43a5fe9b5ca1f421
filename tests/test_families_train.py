"""Every architecture family trains through the trainer on the bundled digits: the loss falls.

Each family's `configs/<family>_i1k.py:runlocal` is the paper recipe shrunk to a few-second CPU run;
here it runs 80 steps at the config's learning rate, held constant after warm-up on one device and the mean loss of the last steps must be below that of the first.
"""
import glob
import json
import os

import jax
import numpy as np
import pytest

from vitjax import config_utils, parallel, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILY_CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*_i1k.py")))


def load_runlocal(path: str):
    """Returns the config file's get_config("runlocal")."""
    return config_utils.load_config(f"{path}:runlocal")


# Families that are not ImageNet classifiers, and where their configs are instead.
NOT_CLASSIFIERS = {"clip": "image-text pretraining: configs/clip_*.py, configs/siglip_*.py"}


def test_every_family_has_a_config():
    from vitjax import models
    families = {models.model_family(name) for name in models.list_models()} - set(NOT_CLASSIFIERS)
    configs = {os.path.basename(path)[: -len("_i1k.py")] for path in FAMILY_CONFIGS}
    assert families <= configs, f"families without configs/<family>_i1k.py: {sorted(families - configs)}"


@pytest.mark.parametrize("path", FAMILY_CONFIGS, ids=lambda p: os.path.basename(p)[:-3])
def test_runlocal_config_trains(path, tmp_path):
    config = load_runlocal(path)
    config.total_steps, config.total_epochs = 80, None
    config.optim.schedule = "constant"  # a cosine over 80 steps would end before the loss has fallen
    config.log_every_steps = 1
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 0
    config.progress_bar = False
    config.checkpoint_async = False
    config.optim.warmup_steps, config.optim.warmup_epochs = 5, None
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
