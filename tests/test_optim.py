"""Optimizers: parity with torch (AdamW, SGD), a reference LARS, optax LAMB; schedules, masks, layer decay."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

from vitjax import config_utils, optim
from vitjax.models.vit import VisionTransformer

# What a ViT declares in its `no_weight_decay()`, for the ViT-shaped trees below.
NO_DECAY = VisionTransformer().no_weight_decay()


def optim_config(**overrides) -> ml_collections.ConfigDict:
    """Returns the default optim config with `overrides` (constant lr 0.01, no warmup)."""
    config = config_utils.default_config().optim
    config.lr = 0.01
    config.schedule = "constant"
    config.update(overrides)
    return config


def small_params(seed: int = 0):
    """Returns a ViT-shaped param tree (unscanned) with random values."""
    rng = np.random.RandomState(seed)
    shapes = {
        "patch_embed": {"proj": {"kernel": (2, 2, 1, 4), "bias": (4,)}},
        "cls_token": (1, 1, 4),
        "pos_embed": (1, 5, 4),
        "blocks_0": {"mlp": {"kernel": (4, 6), "bias": (6,)}, "norm1": {"scale": (4,)}},
        "blocks_1": {"mlp": {"kernel": (4, 6), "bias": (6,)}, "norm1": {"scale": (4,)}},
        "norm": {"scale": (4,), "bias": (4,)},
        "head": {"kernel": (4, 3), "bias": (3,)},
    }
    return jax.tree.map(lambda shape: jnp.asarray(rng.normal(size=shape), jnp.float32), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


def run_steps(tx, params, grads_list):
    """Returns the params after applying `tx` to each gradient tree in turn."""
    state = tx.init(params)
    for grads in grads_list:
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def random_grads(params, steps: int, seed: int = 1):
    """Returns `steps` random gradient trees shaped like `params`."""
    rng = np.random.RandomState(seed)
    return [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
            for _ in range(steps)]


def max_relative_error(tree_a, tree_b) -> float:
    """Returns max |a - b| / max |b| over all leaves."""
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree_a)])
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree_b)])
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def decayed(path: str, shape) -> bool:
    """Returns whether a ViT's mask decays a param: >= 2-D and not a token / position embedding."""
    return len(shape) >= 2 and path not in ("cls_token", "pos_embed")


def torch_step(name: str, params, grads_list, lr: float, weight_decay: float):
    """Returns the params after torch.optim.AdamW / SGD(momentum) steps with no decay on 1-D params and tokens."""
    import torch
    flat = optim.param_paths(params)
    tensors = {path: torch.tensor(np.asarray(value), requires_grad=True) for path, value in flat.items()}
    groups = [{"params": [t for p, t in tensors.items() if decayed(p, t.shape)], "weight_decay": weight_decay},
              {"params": [t for p, t in tensors.items() if not decayed(p, t.shape)], "weight_decay": 0.0}]
    if name == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    else:
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9)
    for grads in grads_list:
        for path, grad in optim.param_paths(grads).items():
            tensors[path].grad = torch.tensor(np.asarray(grad))
        optimizer.step()
    return {path: tensor.detach().numpy() for path, tensor in tensors.items()}


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_parity_with_torch(name):
    params = small_params()
    grads_list = random_grads(params, steps=4)
    tx, _ = optim.make_optimizer(optim_config(name=name, weight_decay=0.1), params, batch_size=256, total_steps=10,
                                 no_weight_decay=NO_DECAY)
    ours = optim.param_paths(run_steps(tx, params, grads_list))
    reference = torch_step(name, params, grads_list, lr=0.01, weight_decay=0.1)
    assert max_relative_error([ours[p] for p in sorted(ours)], [reference[p] for p in sorted(ours)]) < 1e-6


def test_lars_matches_reference_formula():
    """LARS as MoCo v3 / MAE write it: decay and trust ratio on >= 2-D params, momentum, then lr."""
    params = small_params()
    grads_list = random_grads(params, steps=3)
    lr, weight_decay, momentum, trust = 0.1, 0.05, 0.9, 0.001
    tx, _ = optim.make_optimizer(optim_config(name="lars", lr=lr, weight_decay=weight_decay, momentum=momentum,
                                              trust_coefficient=trust), params, batch_size=256, total_steps=10,
                                 no_weight_decay=NO_DECAY)
    ours = optim.param_paths(run_steps(tx, params, grads_list))

    reference = {p: np.asarray(v, np.float64) for p, v in optim.param_paths(params).items()}
    buffers = {p: np.zeros_like(v) for p, v in reference.items()}
    for grads in grads_list:
        for path, grad in optim.param_paths(grads).items():
            param, update = reference[path], np.asarray(grad, np.float64)
            if decayed(path, param.shape):
                update = update + weight_decay * param
                param_norm, update_norm = np.linalg.norm(param), np.linalg.norm(update)
                update = update * (trust * param_norm / update_norm)
            buffers[path] = momentum * buffers[path] + update
            reference[path] = param - lr * buffers[path]
    assert max_relative_error([ours[p] for p in sorted(ours)], [reference[p] for p in sorted(ours)]) < 1e-6


def test_lamb_matches_optax_on_matrices():
    rng = np.random.RandomState(0)
    params = {"a": {"kernel": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)},
              "b": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}}
    grads_list = random_grads(params, steps=3)
    tx, _ = optim.make_optimizer(optim_config(name="lamb", weight_decay=0.01, eps=1e-6), params,
                                 batch_size=256, total_steps=10)
    reference = optax.lamb(0.01, eps=1e-6, weight_decay=0.01)
    assert max_relative_error(run_steps(tx, params, grads_list), run_steps(reference, params, grads_list)) < 1e-6


def test_schedules_and_base_lr_scaling():
    config = optim_config(lr=None, blr=1e-3, schedule="cosine", warmup_steps=10, min_lr=1e-5)
    assert optim.peak_learning_rate(config, batch_size=1024) == pytest.approx(4e-3)
    schedule = optim.make_schedule("cosine", 4e-3, total_steps=110, warmup_steps=10, end_lr=1e-5)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(2e-3)
    assert float(schedule(10)) == pytest.approx(4e-3)
    assert float(schedule(60)) == pytest.approx(1e-5 + (4e-3 - 1e-5) * 0.5, rel=1e-5)
    assert float(schedule(110)) == pytest.approx(1e-5)
    linear = optim.make_schedule("linear", 1.0, total_steps=20, warmup_steps=0, end_lr=0.0)
    assert float(linear(5)) == pytest.approx(0.75)
    constant = optim.make_schedule("constant", 0.5, total_steps=20, warmup_steps=4)
    assert [float(constant(s)) for s in (2, 4, 19)] == pytest.approx([0.25, 0.5, 0.5])
    with pytest.raises(ValueError, match="valid choices"):
        optim.make_schedule("cosine_restarts", 1.0, 10)


def test_weight_decay_mask_and_scanned_params():
    params = small_params()
    mask = optim.param_paths(optim.decay_mask_fn(NO_DECAY)(params))
    assert {path for path, use in mask.items() if use} == {
        "patch_embed/proj/kernel", "blocks_0/mlp/kernel", "blocks_1/mlp/kernel", "head/kernel"}
    # A DenseGeneral's (3, heads, head_dim) qkv bias is torch's 1-D bias: never decayed, as timm's.
    qkv = {"attn": {"qkv": {"kernel": jnp.zeros((4, 3, 2, 2)), "bias": jnp.zeros((3, 2, 2))}}}
    assert optim.param_paths(optim.decay_mask_fn(())(qkv)) == {"attn/qkv/kernel": True, "attn/qkv/bias": False}
    # Stacked over layers by nn.scan, a bias is 2-D but still a bias.
    scanned = {"blocks": {"mlp": {"kernel": jnp.zeros((2, 4, 6)), "bias": jnp.zeros((2, 6))}}}
    axes = {"blocks": {"mlp": {"kernel": PartitionSpec("layers", "embed", "mlp"),
                               "bias": PartitionSpec("layers", "mlp")}}}
    mask = optim.param_paths(optim.decay_mask_fn((), axes)(scanned))
    assert mask == {"blocks/mlp/kernel": True, "blocks/mlp/bias": False}


def test_layer_decay_scales_unscanned_and_scanned():
    decay = 0.5
    vit_ids = VisionTransformer(depth=2).layer_ids
    scales = optim.layer_decay_scales(small_params(), decay, vit_ids)
    # timm's ViT numbering, depth 2: embeddings 0 -> decay**3, block i -> decay**(2 - i), the final norm
    # with the last block, the head 1.
    assert scales["pos_embed"] == scales["patch_embed/proj/kernel"] == pytest.approx(decay ** 3)
    assert scales["blocks_0/mlp/kernel"] == pytest.approx(decay ** 2)
    assert scales["blocks_1/norm1/scale"] == scales["norm/scale"] == pytest.approx(decay)
    assert scales["head/kernel"] == 1.0

    scanned = {"pos_embed": jnp.zeros((1, 5, 4)), "blocks": {"mlp": {"kernel": jnp.zeros((2, 4, 6))}},
               "head": {"kernel": jnp.zeros((4, 3))}}
    axes = {"pos_embed": PartitionSpec(None, None, "embed"),
            "blocks": {"mlp": {"kernel": PartitionSpec("layers", "embed", "mlp")}},
            "head": {"kernel": PartitionSpec("embed", "classes")}}
    scales = optim.layer_decay_scales(scanned, decay, VisionTransformer(depth=2, scan=True).layer_ids, param_axes=axes)
    np.testing.assert_allclose(np.ravel(scales["blocks/mlp/kernel"]), [decay ** 2, decay])
    assert scales["pos_embed"] == pytest.approx(decay ** 3)

    # The scales reach the updates: SGD without momentum moves each param by lr * scale * grad.
    params = small_params()
    grads = jax.tree.map(jnp.ones_like, params)
    tx, _ = optim.make_optimizer(optim_config(name="sgd", momentum=0.0, layer_decay=decay, lr=1.0), params,
                                 batch_size=256, total_steps=10, layer_ids_fn=vit_ids)
    updates, _ = tx.update(grads, tx.init(params), params)
    updates = optim.param_paths(updates)
    assert float(updates["blocks_0/mlp/kernel"][0, 0]) == pytest.approx(-decay ** 2)
    assert float(updates["head/bias"][0]) == pytest.approx(-1.0)
    # Without the model's layer ids there is no layer decay to apply: a config error, not a silent default.
    with pytest.raises(ValueError, match="declares no layer ids"):
        optim.make_optimizer(optim_config(layer_decay=decay), params, batch_size=256, total_steps=10)


def test_config_no_decay_replaces_the_models_list():
    params = small_params()
    grads = jax.tree.map(jnp.zeros_like, params)

    def decayed_paths(**overrides):
        tx, _ = optim.make_optimizer(optim_config(name="sgd", momentum=0.0, lr=1.0, weight_decay=0.5, **overrides),
                                     params, batch_size=256, total_steps=10, no_weight_decay=NO_DECAY)
        updates, _ = tx.update(grads, tx.init(params), params)
        return {path for path, update in optim.param_paths(updates).items() if np.any(update != 0)}

    matrices = {"patch_embed/proj/kernel", "blocks_0/mlp/kernel", "blocks_1/mlp/kernel", "head/kernel"}
    assert decayed_paths() == matrices                                          # None: the model's list
    assert decayed_paths(no_decay=()) == matrices | {"cls_token", "pos_embed"}  # (): tokens decayed too
    assert decayed_paths(no_decay=(r"^head/",)) == (matrices - {"head/kernel"}) | {"cls_token", "pos_embed"}
    with pytest.raises(ValueError, match="not a regex"):
        config_utils.validate_config(dict(total_steps=1, optim=dict(lr=0.1, no_decay=("(",))))


def test_layer_ids_hook():
    """Another architecture supplies its own layer ids."""
    params = {"stem": {"kernel": jnp.zeros((3, 3))}, "stage": {"kernel": jnp.zeros((3, 3))}}
    scales = optim.layer_decay_scales(params, 0.5, layer_ids_fn=lambda p: ({"stem/kernel": 0, "stage/kernel": 1}, 1))
    assert scales == {"stem/kernel": 0.25, "stage/kernel": 0.5}


def test_clipping_and_frozen_params():
    params = small_params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 10.0), params)
    tx, _ = optim.make_optimizer(optim_config(name="sgd", momentum=0.0, lr=1.0, clip_grad_norm=1.0), params,
                                 batch_size=256, total_steps=10)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-5)

    tx, _ = optim.make_optimizer(optim_config(name="adamw", frozen=(r"^blocks_", r"^patch_embed")), params,
                                 batch_size=256, total_steps=10)
    new_params = optim.param_paths(run_steps(tx, params, random_grads(params, steps=2)))
    old_params = optim.param_paths(params)
    for path, value in new_params.items():
        unchanged = np.array_equal(value, old_params[path])
        assert unchanged == path.startswith(("blocks_", "patch_embed")), path
    # Frozen params carry no optimizer slots: adam's moments cover the 6 trained leaves only
    # (cls_token, pos_embed, norm scale and bias, head kernel and bias).
    slots = [leaf for leaf in jax.tree.leaves(tx.init(params)) if np.ndim(leaf) > 0]
    assert len(slots) == 2 * 6
    with pytest.raises(ValueError, match="match no param"):
        optim.make_optimizer(optim_config(frozen=("encoder",)), params, batch_size=256, total_steps=10)


def test_warmup_epochs_and_errors():
    config = optim_config(warmup_epochs=2.0, schedule="cosine")
    assert optim.warmup_steps_from_config(config, steps_per_epoch=12.5) == 25
    with pytest.raises(ValueError, match="valid choices"):
        optim.make_optimizer(optim_config(name="adam_w"), small_params(), batch_size=8, total_steps=5)
    assert math.isclose(optim.peak_learning_rate(optim_config(lr=0.3), 4096), 0.3)
