"""SiT: parity of the student, teacher, heads and both losses with the official code (fixture), the contrastive
loss gathered over the mesh's batch axes, the momentum teacher's update, bad settings, and `:runlocal`'s loss."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from vitjax import config_utils, objectives, parallel
from vitjax.convert import vit as vit_convert
from vitjax.objectives import gmml, sit
from parity_utils import relative_error
from test_ssl_gmml import head_params
from test_train import read_metrics, run

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "sit", "sit.npz")
BATCH = 4


def fixture_config():
    config = config_utils.default_config()
    config.model_name = "vit"
    config.model = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2, mlp_dim=128)
    config.objective = "sit"
    config.objective_kwargs = dict(out_dim=16, hidden_dim=48, num_layers=3, temperature=0.2)
    config.total_steps = 10
    return config


def official_variables(data, prefix, objective):
    state = {key[len(prefix) + 1:]: data[key] for key in data.files if key.startswith(prefix + "/")}
    backbone = {key[len("backbone."):]: value for key, value in state.items() if key.startswith("backbone.")}
    params = {"encoder": vit_convert.convert_timm(backbone, objective.module.encoder)["params"],
              "rec_head": head_params(state, "head_recons"), "proj_head": {}}
    batch_stats = {}
    # CLSHead.mlp: 0 Linear, 1 BN, 2 ReLU, 3 Linear, 4 BN, 5 GELU, 6 Linear, 7 BN without affine.
    for index, (linear, norm) in enumerate(((0, 1), (3, 4), (6, 7))):
        params["proj_head"][f"fc{index}"] = {"kernel": state[f"head.mlp.{linear}.weight"].T,
                                             "bias": state[f"head.mlp.{linear}.bias"]}
        if f"head.mlp.{norm}.weight" in state:
            params["proj_head"][f"norm{index}"] = {"scale": state[f"head.mlp.{norm}.weight"],
                                                   "bias": state[f"head.mlp.{norm}.bias"]}
        batch_stats[f"norm{index}"] = {"mean": state[f"head.mlp.{norm}.running_mean"],
                                       "var": state[f"head.mlp.{norm}.running_var"]}
    return params, {"proj_head": batch_stats}


def test_student_teacher_heads_and_losses_equal_the_official_sit():
    data = np.load(FIXTURE)
    objective = objectives.create("sit", fixture_config())
    student, batch_stats = official_variables(data, "student", objective)
    teacher, _ = official_variables(data, "teacher", objective)
    (recons, aux), _ = objective.module.apply({"params": student, "batch_stats": batch_stats},
                                              jnp.asarray(data["corrupted"]), train=True, mutable=["batch_stats"])
    (_, teacher_aux), _ = objective.teacher_module.apply({"params": teacher, "batch_stats": batch_stats},
                                                         jnp.asarray(data["clean"]), train=True, reconstruct=False,
                                                         mutable=["batch_stats"])
    errors = dict(student=relative_error(aux["projection"], data["s_cls"]),
                  teacher=relative_error(teacher_aux["projection"], data["t_cls"]),
                  recons=relative_error(recons, data["recons"]))
    s0, s1 = jnp.split(aux["projection"], 2)
    t0, t1 = jnp.split(teacher_aux["projection"], 2)
    c_loss = sit.contrastive_loss(s0, t1, 0.2) + sit.contrastive_loss(s1, t0, 0.2)
    r_loss = gmml.reconstruction_l1(recons, jnp.asarray(data["clean"]), jnp.asarray(data["mask"]))
    errors["c_loss"] = abs(float(c_loss) - float(data["c_loss"])) / float(data["c_loss"])
    errors["r_loss"] = abs(float(r_loss) - float(data["r_loss"])) / float(data["r_loss"])
    assert max(errors.values()) <= 1e-5, errors


def test_contrastive_loss_gathered_over_data_and_fsdp_equals_the_full_matrix():
    mesh = parallel.create_mesh(dict(data=4, fsdp=2, model=1), devices=jax.devices()[:8])
    rng = np.random.default_rng(0)
    queries = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    keys = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))

    def loss(fn):
        return jax.jit(jax.value_and_grad(fn), in_shardings=(rows, rows))(queries, keys)

    full, full_grad = loss(lambda q, k: sit.contrastive_loss(q, k, 0.2))
    sharded, sharded_grad = loss(lambda q, k: sit.sharded_contrastive_loss(q, k, 0.2, mesh=mesh))
    assert abs(float(full) - float(sharded)) <= 1e-6 * abs(float(full))
    np.testing.assert_allclose(np.asarray(sharded_grad), np.asarray(full_grad), rtol=1e-5, atol=1e-7)
    # The keys get no gradient, the queries do.
    assert float(jnp.abs(full_grad).max()) > 0
    # A mismatched pairing scores worse than the matched one.
    shuffled = sit.contrastive_loss(queries, keys[::-1], 0.2)
    matched = sit.contrastive_loss(queries, queries + 0.1 * keys, 0.2)
    assert float(matched) < float(shuffled)


def test_teacher_follows_the_student_with_the_cosine_momentum():
    config = fixture_config()
    config.objective_kwargs.update(momentum=0.9)
    objective = objectives.create("sit", config)
    images = jax.random.normal(jax.random.key(0), (BATCH, 16, 16, 3))
    variables = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x,
                             objective.init_variables(jax.random.key(1), {"image_0": images, "image_1": images}),
                             is_leaf=lambda x: hasattr(x, "unbox"))
    shifted = jax.tree.map(lambda x: x + 1.0, variables["params"])   # the student moved away from the teacher
    batch = {"image_0": images, "image_1": images[::-1]}
    loss, aux = objective.train_loss({**variables, "params": shifted}, batch, jax.random.key(2))
    assert np.isfinite(float(loss)) and float(aux["metrics"]["contrastive_loss"]) > 0
    momentum = float(aux["metrics"]["teacher_momentum"])
    assert momentum == pytest.approx(0.9)                         # step 0 of the cosine from 0.9 to 1
    new = aux["updates"]["teacher"]
    expected = jax.tree.map(lambda t, s: 0.9 * t + 0.1 * s, variables["params"], shifted)
    for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    assert int(new["step"]) == 1
    assert float(sit.momentum_at(jnp.asarray(10), 10, 0.9)) == pytest.approx(1.0)
    assert float(sit.momentum_at(jnp.asarray(5), 10, 0.9)) == pytest.approx(0.95)


@pytest.mark.parametrize("change, message", [
    (dict(mask_ratio=1.0), r"mask_ratio must be a number in the open interval \(0, 1\)"),
    (dict(temperature=0.0), r"temperature must be > 0"),
    (dict(out_dim=0), r"out_dim must be an int >= 1"),
])
def test_bad_settings_are_rejected(change, message):
    config = fixture_config()
    config.objective_kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        objectives.create("sit", config)


def test_a_model_sit_cannot_use_is_rejected_with_the_valid_choices():
    config = fixture_config()
    config.model_name, config.model = "resnet50", {}
    with pytest.raises(ValueError, match=r"needs a VisionTransformer encoder.*Valid choices: \[.*'vit'"):
        objectives.create("sit", config)


def test_runlocal_loss_falls(tmp_path):
    config = config_utils.load_config("configs/sit_vit.py:runlocal", {"progress_bar": False,
                                                                      "checkpoint_async": False})
    config.total_steps = 60
    final = run(config, str(tmp_path / "run"))
    records = [record for record in read_metrics(str(tmp_path / "run")) if "train/loss" in record]
    losses = [record["train/loss"] for record in records]
    reconstruction = [record["train/reconstruction_loss"] for record in records]
    contrastive = [record["train/contrastive_loss"] for record in records]
    # The contrastive term starts near 2 x 2t log(2B) = 3.3 and dominates; both terms fall.
    assert losses[-1] < losses[0] - 0.3, losses
    assert reconstruction[-1] < 0.92 * reconstruction[0] and contrastive[-1] < contrastive[0], records
    assert records[-1]["train/teacher_momentum"] > records[0]["train/teacher_momentum"]
    assert 0.1 < final["knn/top1"] <= 1.0
