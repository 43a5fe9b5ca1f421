"""Sharding on 8 fake CPU devices: the same 5 steps on data / fsdp / model meshes match one device."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from vitjax import objectives, optim, parallel, train
from test_train import read_metrics, tiny_config

MESHES = {
    "data8": dict(data=8, fsdp=1, model=1),
    "data2_fsdp4": dict(data=2, fsdp=4, model=1),
    "data4_model2": dict(data=4, fsdp=1, model=2),
}


def sharding_config():
    """Returns the tiny fp32 config with drop-path on (its rngs must not depend on the layout)."""
    config = tiny_config(total_steps=5, log_every_steps=1, checkpoint_every_steps=0)
    config.model.drop_path_rate = 0.1
    return config


def run(workdir: str, mesh) -> dict:
    """Returns per-step train losses and final eval metrics of the config on `mesh`."""
    final = train.train_and_evaluate(sharding_config(), workdir, mesh=mesh)
    losses = [record["train/loss"] for record in read_metrics(workdir) if "train/loss" in record]
    return dict(losses=np.asarray(losses), eval_loss=final["eval/loss"], top1=final["eval/top1"])


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """Returns the reference run on a 1x1x1 mesh of the first device."""
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    mesh = parallel.create_mesh(dict(data=1, fsdp=1, model=1), devices=jax.devices()[:1])
    return run(str(tmp_path_factory.mktemp("one_device")), mesh)


@pytest.mark.parametrize("name", sorted(MESHES))
def test_mesh_matches_one_device(name, one_device, tmp_path):
    jax.config.update("jax_default_matmul_precision", "highest")
    result = run(str(tmp_path / name), parallel.create_mesh(MESHES[name]))
    assert len(result["losses"]) == 5
    relative = np.max(np.abs(result["losses"] - one_device["losses"]) / np.abs(one_device["losses"]))
    assert relative < 1e-5, (name, result["losses"], one_device["losses"])
    assert result["eval_loss"] == pytest.approx(one_device["eval_loss"], rel=1e-5)
    assert result["top1"] == pytest.approx(one_device["top1"], abs=1 / 360 + 1e-9)


def test_rules_shard_params_over_fsdp_and_model():
    """The default rules put `embed` on fsdp and `mlp` / `heads` on model, and replicate the rest."""
    config = sharding_config()
    objective = objectives.create("supervised", config)
    mesh = parallel.create_mesh(dict(data=2, fsdp=2, model=2))
    images = np.zeros((2, 16, 16, 1), np.float32)
    abstract = jax.eval_shape(lambda rng: objective.init_variables(rng, {"image": images}), jax.random.PRNGKey(0))
    specs = parallel.logical_param_specs(abstract["params"])
    shardings = parallel.param_shardings(train.unbox(abstract["params"]), specs, mesh, config.sharding_rules)
    flat = {path: sharding.spec for path, sharding in optim.param_paths(shardings).items()}
    mlp_kernels = [spec for path, spec in flat.items() if path.startswith("blocks_0/mlp") and path.endswith("kernel")]
    assert PartitionSpec("fsdp", "model") in mlp_kernels and PartitionSpec("model", "fsdp") in mlp_kernels
    assert flat["cls_token"] == PartitionSpec(None, None, "fsdp")
    # A dim its mesh axes do not divide (10 over fsdp=4) is replicated instead of failing.
    odd = parallel.param_shardings({"head": jax.ShapeDtypeStruct((10, 6), np.float32)},
                                   {"head": PartitionSpec("embed", None)},
                                   parallel.create_mesh(dict(data=2, fsdp=4, model=1)), config.sharding_rules)
    assert odd["head"].spec == PartitionSpec(None, None)


def test_mesh_sizes_must_tile_the_devices():
    with pytest.raises(ValueError, match="has 3 devices, but 8 are available"):
        parallel.create_mesh(dict(data=3, fsdp=1, model=1))
    assert parallel.mesh_shape(dict(data=-1, fsdp=2, model=2), 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="Unknown mesh axes"):
        parallel.mesh_shape(dict(data=-1, tensor=2), 8)


def test_interpret_pallas_attention_trains_on_a_sharded_mesh_like_xla(tmp_path):
    """The shard_mapped Pallas kernel (interpret mode here) inside the trainer's sharded step matches XLA."""
    mesh = parallel.create_mesh(dict(data=2, fsdp=2, model=2))
    losses = {}
    for impl in ("pallas", "xla"):
        config = tiny_config(total_steps=3, log_every_steps=1, checkpoint_every_steps=0, eval_every_steps=0)
        config.model.attention_impl = impl
        train.train_and_evaluate(config, str(tmp_path / impl), mesh=mesh)
        losses[impl] = np.asarray([r["train/loss"] for r in read_metrics(str(tmp_path / impl)) if "train/loss" in r])
    assert len(losses["pallas"]) == 3
    np.testing.assert_allclose(losses["pallas"], losses["xla"], rtol=1e-5)
