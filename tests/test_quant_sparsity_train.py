"""Sparse then prune inside the trainer (`config.optim.sparsity`): L1, pruning at prune_step to exactly the
target sparsity, masks kept to the end and through a checkpoint resume; bad settings fail before compile."""
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_train import run, tiny_config  # noqa: E402

from vitjax import checkpoint, optim  # noqa: E402
from vitjax.quant import sparsity  # noqa: E402

TARGET = 0.7


def _kernel_sparsity(params):
    """Returns the fraction of exact zeros among the prunable kernels, and how many prunable weights there are."""
    paths = jax.tree_util.tree_map_with_path(lambda path, _: "/".join(str(getattr(k, "key", k)) for k in path), params)
    leaves = [np.asarray(w) for w, p in zip(jax.tree.leaves(params), jax.tree.leaves(paths)) if sparsity.prunable(p, w)]
    size = sum(leaf.size for leaf in leaves)
    return sum(int((leaf == 0).sum()) for leaf in leaves) / size, size


def _config(total_steps, **overrides):
    config = tiny_config(total_steps=total_steps, checkpoint_every_steps=2, keep_checkpoints=3, **overrides)
    config.optim.sparsity = dict(l1=2e-4, prune_step=3, target=TARGET, scope="global")
    return config


def test_prune_step_masks_kept_to_the_end_and_through_resume(tmp_path):
    workdir = str(tmp_path / "run")
    run(_config(4), workdir)                      # steps 1-4: L1, pruned at step 3, then masked
    checkpoints = os.path.join(workdir, "checkpoints")
    before = checkpoint.load_params(checkpoints, 2)["params"]
    at_4 = checkpoint.load_params(checkpoints, 4)["params"]
    dense, count = _kernel_sparsity(before)
    assert dense < 0.01
    fraction, _ = _kernel_sparsity(at_4)
    assert fraction == pytest.approx(round(TARGET * count) / count, abs=0.5 / count)  # exactly the target
    run(_config(6), workdir)                      # resumes at step 4, trains 5-6 with the saved masks
    at_6 = checkpoint.load_params(checkpoints, 6)["params"]
    assert _kernel_sparsity(at_6)[0] == fraction
    zeros_4 = jax.tree.map(lambda w: np.asarray(w) == 0, at_4)
    zeros_6 = jax.tree.map(lambda w: np.asarray(w) == 0, at_6)
    jax.tree.map(np.testing.assert_array_equal, zeros_4, zeros_6)  # the same weights, not just as many
    # ... and the kept ones still train.
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), at_4, at_6)
    assert max(jax.tree.leaves(moved)) > 0
    head_zeros = np.mean(np.asarray(at_6["head"]["kernel"]) == 0)
    assert head_zeros == 0  # the classifier head is never pruned


@pytest.mark.parametrize("settings,match", [
    (dict(prune_step=3, target=1.0), r"in \[0, 1\)"),
    (dict(prune_step=3, target=-0.1), r"in \[0, 1\)"),
    (dict(prune_step=99, target=0.5), "beyond the run's total_steps=10"),
    (dict(prune_step=3, target=0.5, scope="row"), "valid choices"),
    (dict(prune_step=3, target=0.5, l1=-1.0), "l1 must be >= 0"),
    (dict(target=0.5), "prune_step and target required"),
])
def test_bad_sparsity_settings_fail_before_compile(settings, match):
    config = tiny_config()
    config.optim.sparsity = settings
    params = {"blocks_0": {"fc1": {"kernel": np.zeros((4, 4), np.float32)}}}
    with pytest.raises(ValueError, match=match):
        optim.make_optimizer(config.optim, params, batch_size=32, total_steps=10)
