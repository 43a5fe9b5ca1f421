"""MP3: masked patches' keys / values are invisible to every other token, no position embedding (permutation
equivariance), the encoder loads into a ViT classifier with position embeddings added back, bad settings,
and `:runlocal`'s position loss falling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

from vitjax import config_utils, objectives, train, weights
from test_train import read_metrics, run


def mp3_config(**kwargs):
    config = config_utils.default_config()
    config.model = dict(config_utils.MAE_RUNLOCAL_ENCODER)
    config.objective = "mp3"
    config.objective_kwargs = dict(kwargs)
    return config


def setup():
    objective = objectives.create("mp3", mp3_config())
    images = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
    variables = meta.unbox(objective.init_variables(jax.random.key(1), {"image": images}))
    return objective, variables, images


def test_masked_patches_are_seen_by_nobody_but_themselves():
    objective, variables, images = setup()
    context = jnp.asarray(np.tile([1.0, 0.0] * 8, (3, 1)))        # odd patches masked
    logits, _ = objective.module.apply(variables, images, context=context)
    changed = images.at[:, 0:2, 2:4].add(3.0)                       # patch 1 (row 0, column 1): masked
    moved = np.abs(np.asarray(objective.module.apply(variables, changed, context=context)[0] - logits)).max(axis=(0, 2))
    assert moved[1] > 1e-3 and np.all(moved[np.arange(16) != 1] == 0.0)
    # The same change to a context patch (patch 0) reaches every token.
    changed = images.at[:, 0:2, 0:2].add(3.0)
    moved = np.abs(np.asarray(objective.module.apply(variables, changed, context=context)[0] - logits)).max(axis=(0, 2))
    assert np.all(moved > 1e-4)


def test_without_position_embeddings_shuffled_patches_give_shuffled_outputs():
    objective, variables, images = setup()
    assert "pos_embed" not in variables["params"]["encoder"]
    patches = images.reshape(3, 4, 2, 4, 2, 1).transpose(0, 1, 3, 2, 4, 5).reshape(3, 16, 2, 2, 1)
    order = np.random.default_rng(0).permutation(16)
    shuffled = patches[:, order].reshape(3, 4, 4, 2, 2, 1).transpose(0, 1, 3, 2, 4, 5).reshape(3, 8, 8, 1)
    context = jnp.asarray((np.random.default_rng(1).random((3, 16)) > 0.5).astype(np.float32))
    logits, _ = objective.module.apply(variables, images, context=context)
    shuffled_logits, _ = objective.module.apply(variables, shuffled, context=context[:, order])
    np.testing.assert_allclose(np.asarray(shuffled_logits), np.asarray(logits)[:, order], rtol=1e-5, atol=1e-5)


def test_the_encoder_loads_into_a_vit_classifier_with_position_embeddings_added_back(tmp_path, capsys):
    config = config_utils.load_config("configs/mp3_vit.py:runlocal", {"progress_bar": False,
                                                                      "checkpoint_async": False})
    config.total_steps = 40
    workdir = str(tmp_path / "mp3")
    final = run(config, workdir)
    # `python -m vitjax.evaluate --kind=knn` on the saved run: the run's own final kNN, from MP3's features.
    from vitjax.evaluate.__main__ import cli
    capsys.readouterr()
    cli([f"--init_from={workdir}", "--kind=knn", "--eval_set=k=20", "--batch_size=120"])
    printed = dict(line.split(": ") for line in capsys.readouterr().out.splitlines() if line.startswith("knn/"))
    assert 0.1 < final["knn/top1"] <= 1.0
    assert float(printed["knn/top1"]) == pytest.approx(final["knn/top1"], abs=1e-6), (printed, final)
    records = [r for r in read_metrics(workdir) if "train/loss" in r]
    assert records[-1]["train/loss"] < records[0]["train/loss"] - 0.1, records
    assert records[-1]["train/position_top1"] > records[0]["train/position_top1"]
    classifier = config_utils.default_config()
    classifier.model = dict(config_utils.MAE_RUNLOCAL_ENCODER, num_classes=10, global_pool="avg", fc_norm=False)
    classifier.init_from = workdir
    classifier.init_from_skip = ("^pos_embed$",)
    classifier.optim.lr = 1e-3
    classifier.total_steps = 10
    classifier.input = config_utils.digits_input()
    _, supervised = train.build(classifier)
    example = {"image": jnp.zeros((1, 8, 8, 1))}
    abstract = meta.unbox(jax.eval_shape(lambda: supervised.init_variables(jax.random.key(0), example)))
    plan = weights.plan(abstract, weights.load(workdir), supervised.init_from_rules())
    loaded = [key for key, (action, _) in plan.actions.items() if action == "loaded"]
    assert any(key.startswith("params/blocks_1/") for key in loaded) and "params/patch_embed/proj/kernel" in loaded
    assert plan.actions["params/pos_embed"][0] != "loaded"


@pytest.mark.parametrize("kwargs, model, message", [
    (dict(mask_ratio=1.0), {}, r"mask_ratio must be a number in the open interval \(0, 1\)"),
    (dict(), dict(pos_embed="learn"), r"pos_embed must be 'none'"),
])
def test_bad_settings_are_rejected(kwargs, model, message):
    config = mp3_config(**kwargs)
    config.model.update(model)
    with pytest.raises(ValueError, match=message):
        objectives.create("mp3", config)
