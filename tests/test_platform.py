"""The trainer as a platform: named evaluators, a user objective on two views with exact resume, and shardings
of every part of the train state from logical axes."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vitjax import config_utils, objectives, parallel, train
from vitjax.evaluate import evaluators
from vitjax.objectives.supervised import Supervised
from vitjax.pytree import param_paths
from test_train import read_metrics, run, tiny_config

PP_EVAL = "decode(channels=1)|resize(16)|value_range(-1, 1)"


def test_three_evaluators_write_under_their_names_at_their_cadence(tmp_path):
    config = tiny_config(total_steps=4, log_every_steps=2, eval_every_steps=2)
    config.evals = dict(
        test=dict(kind="classification"),                                           # every 2 steps (the default)
        test_mirrored=dict(kind="classification", pp=PP_EVAL.replace("|value_range", "|flip_lr(1.0)|value_range"),
                           every_steps=0),                                          # only at the end
        knn=dict(kind="knn", k=10, every_steps=4, max_train_examples=600))
    workdir = str(tmp_path / "run")
    final = run(config, workdir)
    records = {record["step"]: record for record in read_metrics(workdir)}
    assert {"test/top1", "test/loss", "test/top5"} <= set(records[2]) and not any(
        key.startswith(("knn/", "test_mirrored/")) for key in records[2])
    assert {"test/top1", "test_mirrored/top1", "knn/top1", "knn/top5"} <= set(records[4])
    assert records[4]["test/num_examples"] == records[4]["test_mirrored/num_examples"] == 360
    assert records[4]["knn/num_train_examples"] == 600 and records[4]["knn/num_examples"] == 360
    # The mirrored digits are another input: the same params score differently on it.
    assert abs(records[4]["test_mirrored/loss"] - records[4]["test/loss"]) > 1e-5
    assert 0.1 <= final["knn/top1"] <= final["knn/top5"] <= 1.0
    from vitjax.main import final_summary
    summary = final_summary(final, config_utils.validate_config(config))
    assert [line.split(" top-1")[0] for line in summary.splitlines()] == [
        "Final knn (test)", "Final test (test)", "Final test_mirrored (test)"]


def test_evaluator_settings_are_checked_before_anything_runs():
    config = tiny_config()
    config.evals = dict(probe=dict(kind="linear"))
    with pytest.raises(ValueError, match=r"evals.probe.kind='linear' is not valid; valid kinds: \['classification', "
                                         r"'fewshot', 'knn', 'linear_probe', 'outliers', 'recall_at_k', "
                                         r"'retrieval', 'zeroshot'\]"):
        train.build(config)
    config.evals = dict(knn=dict(kind="knn", neighbours=5))
    with pytest.raises(ValueError, match=r"Unknown setting\(s\) \['neighbours'\] in config.evals.knn .*'k'"):
        train.build(config)


def test_knn_matches_a_brute_force_vote():
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((300, 8)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    bank_labels = rng.integers(0, 6, 300)
    queries = rng.standard_normal((50, 8)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    labels = rng.integers(0, 6, 50)
    top1, top5 = evaluators.knn_classify(bank, bank_labels, queries, labels, k=7, temperature=0.1, chunk=16)
    similarity = queries @ bank.T
    expected1 = expected5 = 0
    for row, label in zip(similarity, labels):
        nearest = np.argsort(-row)[:7]
        scores = np.zeros(6)
        np.add.at(scores, bank_labels[nearest], np.exp(row[nearest] / 0.1))
        ranked = np.argsort(-scores)
        expected1 += ranked[0] == label
        expected5 += label in ranked[:5]
    assert (top1, top5) == (expected1 / 50, expected5 / 50)


class TwoViewConsistency(Supervised):
    """A user objective: cross-entropy on view 0 plus the squared gap between the two views' logits."""

    batch_keys = ("image_0", "image_1", "label")

    def init_variables(self, rng, batch):
        return dict(self.module.init({"params": rng}, batch["image_0"], train=False))

    def train_loss(self, variables, batch, rng):
        logits_0, updates = self._apply(variables, batch["image_0"], True, rng)
        logits_1, _ = self._apply(variables, batch["image_1"], True, jax.random.fold_in(rng, 1))
        loss = optax.softmax_cross_entropy(logits_0, batch["label"]).mean()
        gap = jnp.mean(jnp.square(logits_0 - logits_1))
        return loss + gap, {"metrics": {"gap": gap}, "updates": updates}


objectives.register_objective("two_view_consistency_test", TwoViewConsistency)


def _two_view_config(total_steps):
    config = tiny_config(total_steps=total_steps, log_every_steps=1, checkpoint_every_steps=2, keep_checkpoints=4)
    config.objective = "two_view_consistency_test"
    config.model.drop_path_rate = 0.1
    config.input.pp_train = ('decode(channels=1)|resize(16)|views(2, "random_crop(16, padding=2)|flip_lr|'
                             'value_range(-1, 1)")')
    config.evals = dict(test=dict(kind="classification", pp=PP_EVAL))
    return config


def test_a_two_view_objective_resumes_exactly(tmp_path):
    """The pp op `views` feeds a registered user objective; a stopped and resumed run equals an unbroken one."""
    unbroken, broken = str(tmp_path / "unbroken"), str(tmp_path / "broken")
    final = run(_two_view_config(6), unbroken)
    run(_two_view_config(6), broken, stop_after_steps=4)
    resumed = run(_two_view_config(6), broken)
    losses = [[r["train/loss"] for r in read_metrics(path) if "train/loss" in r] for path in (unbroken, broken)]
    assert len(losses[0]) == 6 and losses[0] == losses[1]
    assert all(r["train/gap"] > 0 for r in read_metrics(unbroken) if "train/gap" in r)
    assert resumed["test/loss"] == final["test/loss"] and resumed["test/top1"] == final["test/top1"]


def _spec(sharding):
    return tuple(sharding.spec)


def test_fsdp_shards_the_optimizer_state_and_a_teacher_by_their_own_axes(tmp_path):
    """Under fsdp=8 Adam's moments follow their params, and a teacher named unlike the student is sharded too."""
    config = tiny_config()
    config.model.update(embed_dim=64, num_heads=4, mlp_dim=128, distilled=True)
    config.objective = "distill"
    # A teacher whose param names the student does not have (a ConvNeXt), and a wider ViT.
    config.objective_kwargs = dict(teacher="convnext_atto", teacher_init=str(tmp_path),
                                   teacher_model=dict(num_classes=10, in_chans=1))
    config.ema_decay = 0.9
    config = config_utils.validate_config(config)
    objective = objectives.create("distill", config)
    mesh = parallel.create_mesh(dict(data=1, fsdp=8, model=1))
    setup = train.create_train_setup(config, objective, mesh, {"image": np.zeros((8, 16, 16, 1), np.float32)},
                                     total_steps=10)
    shardings = setup.state_shardings
    kernel = shardings.params["blocks_0"]["mlp"]["fc1"]["kernel"]
    assert _spec(kernel) == ("fsdp", "model")
    adam = shardings.opt_state[0]  # chain: (scale_by_adam, weight decay, scale_by_learning_rate)
    assert _spec(adam.mu["blocks_0"]["mlp"]["fc1"]["kernel"]) == _spec(adam.nu["blocks_0"]["mlp"]["fc1"]["kernel"]) \
        == ("fsdp", "model")
    assert _spec(adam.count) == ()
    assert _spec(shardings.ema_params["blocks_0"]["mlp"]["fc1"]["kernel"]) == ("fsdp", "model")
    teacher = shardings.model_state["teacher"]["params"]
    teacher_specs = {path: _spec(sharding) for path, sharding in param_paths(teacher).items()}
    abstract_teacher = param_paths(setup.abstract_state.model_state["teacher"]["params"])
    large = {path: spec for path, spec in teacher_specs.items()
             if abstract_teacher[path].size >= 8 * 1024 and any(dim % 8 == 0 for dim in abstract_teacher[path].shape)}
    assert len(large) >= 8
    replicated = sorted(path for path, spec in large.items() if "fsdp" not in spec)
    assert not replicated, replicated
    bytes_per_device = sum(abstract_teacher[path].size * 4 / (8 if "fsdp" in spec else 1)
                           for path, spec in teacher_specs.items())
    total = sum(leaf.size * 4 for leaf in abstract_teacher.values())
    assert bytes_per_device < 0.2 * total  # an eighth of the large kernels, plus the small replicated leaves
