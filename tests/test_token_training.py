"""Token reduction in training: EViT's keep-rate warm-up and MCTF's consistency loss through the trainer."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vitjax import objectives, tokens, train

IMAGE = 16  # 4 px patches: 16 patch tokens


def make_config(token_reduction, **objective_kwargs):
    return ml_collections.ConfigDict(dict(
        objective="token_reduction", objective_kwargs=objective_kwargs,
        model_name="deit_tiny_patch16_224",
        model=dict(num_classes=5, img_size=IMAGE, patch_size=4, depth=2, embed_dim=32, num_heads=2,
                   token_reduction=token_reduction),
        optim=dict(grad_accum_steps=1)))


def make_batch(seed=0, batch=4):
    rng = np.random.default_rng(seed)
    labels = np.eye(5, dtype=np.float32)[rng.integers(0, 5, batch)] * 0.9 + 0.02
    return {"image": jnp.asarray(rng.normal(size=(batch, IMAGE, IMAGE, 3)), jnp.float32),
            "label": jnp.asarray(labels)}


def run_steps(objective, batch, num_steps, learning_rate=1e-2):
    """Returns the metrics of each of `num_steps` trainer steps (sgd) and the final state."""
    variables = objective.init_variables(jax.random.PRNGKey(0), batch)
    tx = optax.sgd(learning_rate)
    params = variables.pop("params")
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                             model_state=variables, rng=jax.random.PRNGKey(1))
    step_fn = jax.jit(train.make_train_step(objective, tx, lambda step: 1e-2, 1, None))
    history = []
    for _ in range(num_steps):
        state, metrics = step_fn(state, batch)
        history.append(jax.device_get(metrics))
    return history, state


def test_evit_keep_rate_follows_official_schedule():
    # The official flags in epochs: shrink_start_epoch=1, shrink_epochs=1 at 2 steps per epoch.
    iters_per_epoch, start_epoch, shrink_epochs = 2, 1, 1
    objective = objectives.create("token_reduction", make_config(
        dict(method="evit", base_keep_rate=0.5, drop_loc=(1,), fuse_token=True),
        shrink_start_step=start_epoch * iters_per_epoch, shrink_steps=shrink_epochs * iters_per_epoch))
    batch = make_batch()
    # lr 0 keeps the initial weights, so each step's loss can be recomputed at its keep rate.
    history, _ = run_steps(objective, batch, 5, learning_rate=0.0)
    used = np.array([metrics["train/keep_rate"] for metrics in history])
    official = np.array([tokens.evit.adjust_keep_rate(step, step // iters_per_epoch, start_epoch,
                                                      start_epoch + shrink_epochs, iters_per_epoch, 0.5)
                         for step in range(5)])
    np.testing.assert_allclose(used, official, rtol=1e-6)
    assert used[0] == 1.0 and 0.5 < used[3] < 1.0 and used[4] == 0.5

    # The loss of a step is the model's at that step's keep rate (the rate reaches the model).
    variables = objective.init_variables(jax.random.PRNGKey(0), batch)
    for step in (0, 3, 4):
        loss = history[step]["train/loss"]
        module = objective.module.clone(token_reduction=tokens.evit.with_keep_rate(objective.method, official[step]))
        logits, intermediates = module.apply({"params": variables["params"]}, batch["image"], train=False)
        expected = optax.softmax_cross_entropy(logits, batch["label"]).mean()
        np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
        assert intermediates["evit"]["token_counts"][1] == 1 + int(np.ceil(official[step] * 16)) + \
            (official[step] < 1)


def test_mctf_consistency_loss_in_training():
    method = dict(method="mctf", r_student=4, r_eval=2, r_teacher_max=2, activate_layer=(1,))
    objective = objectives.create("token_reduction", make_config(method, consistency_threshold=0.01,
                                                                 consistency_weight=2.0))
    batch = make_batch(1)
    history, state = run_steps(objective, batch, 2)
    for metrics in history:
        assert np.isfinite(metrics["train/loss"])
        np.testing.assert_allclose(metrics["train/loss"],
                                   metrics["train/loss_ce"] + metrics["train/loss_consistency"], rtol=1e-6)
    assert int(state.model_state["token_schedule"]["step"]) == 2

    # Step 0's term equals consistency_loss on the student (r_student) and the drawn teacher's forwards,
    # both from the initial weights with the step's key (as the trainer folds it).
    variables = objective.init_variables(jax.random.PRNGKey(0), batch)
    rng = jax.random.fold_in(jax.random.PRNGKey(1), 0)
    _, _, teacher_rng = jax.random.split(rng, 3)
    r_teacher = int(jax.random.randint(teacher_rng, (), 0, 2))
    params = {"params": variables["params"]}

    def encoded(r):
        module = objective.module.clone(token_reduction=dict(method, r_eval=None, r_student=r))
        logits, intermediates = module.apply(params, batch["image"], train=False)
        return logits, intermediates["encoded"]

    logits, student = encoded(4)
    _, teacher = encoded(r_teacher)
    per_image = tokens.mctf.consistency_loss(student, teacher)
    probs = jax.nn.softmax(logits, -1)
    passed = np.asarray(jnp.sum(probs * (batch["label"] > 0.05), -1) > 0.01, np.float32)
    assert passed.sum() > 0
    expected = 2.0 * float(np.sum(per_image * passed) / passed.sum())
    assert expected > 0
    np.testing.assert_allclose(history[0]["train/loss_consistency"], expected, rtol=1e-5)


def test_bad_settings_fail_early():
    with pytest.raises(ValueError, match="'evit' or 'mctf'"):
        objectives.create("token_reduction", make_config(dict(method="tome", r=2)))
    with pytest.raises(ValueError, match="consistency_threshold is MCTF's"):
        objectives.create("token_reduction", make_config(dict(method="evit", drop_loc=(1,)), consistency_threshold=0.5))
    with pytest.raises(ValueError, match="valid keys"):
        objectives.create("token_reduction", make_config(dict(method="evit", drop_loc=(1,)), shrink_epochs=3))
