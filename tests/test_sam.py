"""SAM and adaptive SAM (`optim.name="sam"`) around a base optimizer: one SAM update against a NumPy
transcription of the papers' equations (both gradients on one batch, as the paper, and on consecutive batches),
the lr schedule over SAM updates, config errors, and the trainer with gradient accumulation and on a sharded mesh
of fake devices matching one device."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vitjax import checkpoint, config_utils, optim, parallel, train
from test_train import read_metrics, tiny_config

RHO, ETA, LR, WD = 0.3, 0.01, 0.1, 0.05


def optim_config(base: str, adaptive: bool = False, same_batch: bool = True) -> ml_collections.ConfigDict:
    """Returns config_utils' optim defaults set to SAM around `base` at a constant lr."""
    config = config_utils.default_config().optim
    config.update(name="sam", sam_base=base, sam_rho=RHO, sam_adaptive=adaptive, sam_eta=ETA, lr=LR,
                  sam_same_batch=same_batch,
                  schedule="constant", weight_decay=WD, momentum=0.9, b1=0.9, b2=0.999, eps=1e-8)
    return config


def loss_numpy(w: dict) -> float:
    """A smooth non-quadratic loss of a kernel (2-D, decayed) and a bias (1-D, not decayed)."""
    return float(np.sum(np.cos(w["kernel"]) * np.arange(1, 7).reshape(2, 3)) + np.sum(w["bias"] ** 3))


def grad_numpy(w: dict) -> dict:
    return {"kernel": -np.sin(w["kernel"]) * np.arange(1, 7).reshape(2, 3), "bias": 3 * w["bias"] ** 2}


def loss_jax(w):
    return jnp.sum(jnp.cos(w["kernel"]) * jnp.arange(1, 7).reshape(2, 3)) + jnp.sum(w["bias"] ** 3)


def expected_sam_update(w: dict, base: str, adaptive: bool) -> dict:
    """Returns the params after one SAM update in float64: eps from the gradient at w, the base optimizer's first
    step (state from zeros) with the gradient at w + eps, applied to w."""
    g = grad_numpy(w)
    if adaptive:  # ASAM: T = |w| + eta, eps = rho T^2 g / ||T g||
        t = {k: np.abs(v) + ETA for k, v in w.items()}
        norm = np.sqrt(sum(np.sum((t[k] * g[k]) ** 2) for k in w))
        eps = {k: RHO * t[k] ** 2 * g[k] / norm for k in w}
    else:  # SAM: eps = rho g / ||g||
        norm = np.sqrt(sum(np.sum(g[k] ** 2) for k in w))
        eps = {k: RHO * g[k] / norm for k in w}
    g_sam = grad_numpy({k: w[k] + eps[k] for k in w})
    new = {}
    for k in w:
        decay = WD if k == "kernel" else 0.0   # 1-D params and biases are never decayed
        if base == "sgd":   # torch SGD: d = g + wd w; momentum buffer starts at d; w -= lr d
            new[k] = w[k] - LR * (g_sam[k] + decay * w[k])
        else:               # AdamW, first step: m_hat = g, v_hat = g^2; w -= lr (m_hat / (sqrt(v_hat) + eps) + wd w)
            new[k] = w[k] - LR * (g_sam[k] / (np.abs(g_sam[k]) + 1e-8) + decay * w[k])
    return new


@pytest.mark.parametrize("base,adaptive", [("sgd", False), ("adamw", False), ("sgd", True), ("adamw", True)])
def test_one_sam_update_matches_numpy(base, adaptive):
    rng = np.random.default_rng(0)
    w0 = {"kernel": rng.normal(size=(2, 3)), "bias": rng.normal(size=(3,))}
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), w0)
    expected = expected_sam_update(w0, base, adaptive)

    # One batch (the paper): one trainer step, the optimizer evaluating the second gradient through grad_fn.
    config = optim_config(base, adaptive)
    assert optim.needs_grad_fn(config)
    tx, schedule = optim.make_optimizer(config, params, batch_size=256, total_steps=10)
    grad_fn = lambda p, _: jax.grad(loss_jax)(p)  # noqa: E731
    updates, _ = jax.jit(lambda p, s: tx.update(jax.grad(loss_jax)(p), s, p, grad_fn=grad_fn))(params, tx.init(params))
    final = optax.apply_updates(params, updates)
    for k in w0:
        np.testing.assert_allclose(np.asarray(final[k]), expected[k], rtol=1e-5, atol=1e-6)
    assert float(schedule(0)) == float(schedule(1)) == pytest.approx(LR, rel=1e-6)

    # Consecutive batches: trainer step 1 ascends to w + eps; step 2 updates w with the gradient at w + eps.
    config = optim_config(base, adaptive, same_batch=False)
    assert not optim.needs_grad_fn(config)
    tx, schedule = optim.make_optimizer(config, params, batch_size=256, total_steps=10)
    state = tx.init(params)
    update = jax.jit(lambda p, s: tx.update(jax.grad(loss_jax)(p), s, p))
    updates, state = update(params, state)
    perturbed = optax.apply_updates(params, updates)
    g = grad_numpy(w0)
    if not adaptive:
        eps = {k: RHO * g[k] / np.sqrt(sum(np.sum(v ** 2) for v in g.values())) for k in g}
        for k in w0:
            np.testing.assert_allclose(np.asarray(perturbed[k]), w0[k] + eps[k], rtol=1e-5, atol=1e-6)
    updates, state = update(perturbed, state)
    final = optax.apply_updates(perturbed, updates)
    for k in w0:
        np.testing.assert_allclose(np.asarray(final[k]), expected[k], rtol=1e-5, atol=1e-6)
    # A plain step of the base optimizer from w lands elsewhere: the ascent matters.
    plain = {k: w0[k] - LR * grad_numpy(w0)[k] for k in w0} if base == "sgd" else None
    if plain is not None:
        assert np.max(np.abs(np.asarray(final["kernel"]) - plain["kernel"] + LR * WD * w0["kernel"])) > 1e-3
    assert float(schedule(0)) == float(schedule(1)) == pytest.approx(LR, rel=1e-6)


def test_schedule_runs_over_sam_updates():
    params = {"kernel": jnp.ones((2, 3))}
    config = optim_config("adamw", same_batch=False)
    config.update(schedule="cosine", warmup_steps=4, min_lr=0.0)
    _, schedule = optim.make_optimizer(config, params, batch_size=256, total_steps=20)
    # 10 SAM updates, 2 of warmup: trainer steps 2k and 2k + 1 share the lr of update k; cosine ends at 0.
    lrs = [float(schedule(step)) for step in range(20)]
    assert lrs[0::2] == lrs[1::2]
    assert lrs[4] == pytest.approx(LR, rel=1e-6)
    assert lrs[-1] == pytest.approx(LR * 0.5 * (1 + np.cos(np.pi * 7 / 8)), rel=1e-5)
    # One batch per update: the base schedule itself, one update per trainer step.
    config = optim_config("adamw")
    config.update(schedule="cosine", warmup_steps=4, min_lr=0.0)
    _, schedule = optim.make_optimizer(config, params, batch_size=256, total_steps=20)
    assert float(schedule(4)) == pytest.approx(LR, rel=1e-6)
    assert float(schedule(19)) == pytest.approx(LR * 0.5 * (1 + np.cos(np.pi * 15 / 16)), rel=1e-5)


def test_config_errors_name_the_valid_choices():
    config = tiny_config()
    config.optim.name = "sam"
    config.optim.sam_base = "sam"
    with pytest.raises(ValueError, match=r"optim.sam_base.*valid choices.*adamw"):
        config_utils.validate_config(config)
    config.optim.sam_base = "adamw"
    config.optim.sam_rho = 0.0
    with pytest.raises(ValueError, match="sam_rho must be positive"):
        config_utils.validate_config(config)


def run_sam(tmp_path, name: str, accum: int = 1, mesh_axes=None) -> tuple:
    """Returns (train losses, final params) of 4 trainer steps (4 SAM updates, each on one batch) of the tiny fp32 ViT."""
    config = tiny_config(total_steps=4, log_every_steps=1, checkpoint_every_steps=0)
    config.optim.name = "sam"
    config.optim.sam_base = "adamw"
    config.optim.sam_rho = 0.1
    config.optim.grad_accum_steps = accum
    mesh_axes = mesh_axes or dict(data=1, fsdp=1, model=1)
    devices = jax.devices()[:int(np.prod(list(mesh_axes.values())))]
    workdir = str(tmp_path / name)
    train.train_and_evaluate(config, workdir, mesh=parallel.create_mesh(mesh_axes, devices=devices))
    losses = np.asarray([record["train/loss"] for record in read_metrics(workdir) if "train/loss" in record])
    params = checkpoint.load_state(os.path.join(workdir, "checkpoints"))["params"]
    return losses, np.concatenate([np.ravel(np.asarray(leaf)) for leaf in jax.tree.leaves(params)])


def test_trainer_sam_with_accumulation_and_sharding(tmp_path):
    """Two micro-batches give one batch's SAM run; a data x fsdp x model mesh of 8 fake devices gives one
    device's; and SAM's run differs from AdamW's."""
    jax.config.update("jax_default_matmul_precision", "highest")
    losses, params = run_sam(tmp_path, "one")
    assert len(losses) == 4 and np.all(np.isfinite(losses))
    for name, kwargs in (("accum2", dict(accum=2)), ("mesh", dict(mesh_axes=dict(data=2, fsdp=2, model=2)))):
        other_losses, other_params = run_sam(tmp_path, name, **kwargs)
        np.testing.assert_allclose(other_losses, losses, rtol=1e-5, err_msg=name)
        assert np.max(np.abs(other_params - params)) / np.max(np.abs(params)) < 1e-5, name
