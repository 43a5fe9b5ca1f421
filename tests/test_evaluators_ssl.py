"""The self-supervised evaluators (kNN, linear probe, few-shot ridge) against NumPy / scikit-learn transcriptions on
one small fixed feature set, and the two new kinds in `config.evals` of a short run."""
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, Ridge

from vitjax import train
from vitjax.evaluate import evaluators, fewshot, linear_probe, standalone
from test_train import read_metrics, run, tiny_config

NUM_CLASSES = 6


def fixed_features(dim=12, per_class_train=40, per_class_test=15, seed=0):
    """Returns (train x, train y, test x, test y): Gaussian classes around random centres, overlapping."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((NUM_CLASSES, dim)) * 1.2

    def draw(count):
        labels = np.repeat(np.arange(NUM_CLASSES), count)
        features = centres[labels] + rng.standard_normal((len(labels), dim)) * 1.5 + 3.0
        return features.astype(np.float32), labels
    return (*draw(per_class_train), *draw(per_class_test))


def test_knn_equals_a_numpy_transcription_exactly():
    train_x, train_y, test_x, test_y = fixed_features()

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    top1, top5 = evaluators.knn_classify(unit(train_x), train_y, unit(test_x), test_y, k=20, temperature=0.07)
    similarity = unit(test_x).astype(np.float64) @ unit(train_x).astype(np.float64).T
    nearest = np.argsort(-similarity, axis=1)[:, :20]
    votes = np.zeros((len(test_y), NUM_CLASSES))
    for row in range(len(test_y)):
        np.add.at(votes[row], train_y[nearest[row]], np.exp(similarity[row, nearest[row]] / 0.07))
    ranked = np.argsort(-votes, axis=1)
    assert top1 == np.mean(ranked[:, 0] == test_y)
    assert top5 == np.mean(np.any(ranked[:, :5] == test_y[:, None], axis=1))
    assert 0.5 < top1 < 1.0   # overlapping classes: neither trivial nor chance


@pytest.mark.parametrize("shots", [2, 25])   # fewer points than dimensions (x x^T) and more (x^T x)
def test_ridge_equals_scikit_learn(shots):
    train_x, train_y, test_x, _ = fixed_features()
    index, _ = fewshot.sample_shots(train_y, shots, NUM_CLASSES, seed=1)
    fit = fewshot.ridge_fit(train_x[index], train_y[index], NUM_CLASSES)
    # The same problem for scikit-learn: big_vision's whitening and bias feature, targets in {-1, 1}.
    mean, std = train_x[index].astype(np.float64).mean(0), train_x[index].astype(np.float64).std(0) + 1e-5

    def design(x):
        return np.pad((x - mean) / std, ((0, 0), (0, 1)), constant_values=100.0)

    targets = 2.0 * np.eye(NUM_CLASSES)[train_y[index]] - 1.0
    for l2 in (0.25, 2.0 ** 10):
        reference = Ridge(alpha=l2, fit_intercept=False, solver="cholesky").fit(design(train_x[index]), targets)
        ours = fewshot.ridge_scores(fit, test_x, l2)
        expected = reference.predict(design(test_x))
        assert np.max(np.abs(ours - expected)) <= 1e-5 * np.max(np.abs(expected))


def test_fewshot_protocol_equals_a_numpy_transcription():
    train_x, train_y, test_x, test_y = fixed_features()
    l2_regs = (0.25, 16.0, 1024.0)
    result = fewshot.fewshot_accuracy(train_x, train_y, test_x, test_y, shots=(1, 5, 10), l2_regs=l2_regs,
                                      num_seeds=3, num_val_per_class=5)
    for shots in (1, 5, 10):
        accuracies = []
        for seed in range(3):
            rng = np.random.default_rng(seed)
            orders = [rng.permutation(np.flatnonzero(train_y == c)) for c in range(NUM_CLASSES)]
            chosen = np.concatenate([o[:shots] for o in orders])
            held = np.concatenate([o[shots:shots + 5] for o in orders])
            x = train_x[chosen].astype(np.float64)
            mean, std = x.mean(0), x.std(0) + 1e-5
            targets = 2.0 * np.eye(NUM_CLASSES)[train_y[chosen]] - 1.0

            def design(z, mean=mean, std=std):
                return np.pad((z - mean) / std, ((0, 0), (0, 1)), constant_values=100.0)

            def solve(l2, x=x, targets=targets):
                return np.linalg.solve(design(x).T @ design(x) + l2 * np.eye(x.shape[1] + 1), design(x).T @ targets)
            val = [np.mean((design(train_x[held]) @ solve(l2)).argmax(1) == train_y[held]) for l2 in l2_regs]
            weights = solve(l2_regs[int(np.argmax(val))])
            accuracies.append(np.mean((design(test_x) @ weights).argmax(1) == test_y))
        assert result[f"{shots}shot"] == pytest.approx(np.mean(accuracies), abs=1e-12)
        assert result[f"{shots}shot_std"] == pytest.approx(np.std(accuracies), abs=1e-12)
    assert result["1shot"] < result["10shot"]


def test_linear_probe_matches_scikit_learn_logistic_regression():
    train_x, train_y, test_x, test_y = fixed_features(per_class_train=60)
    result = linear_probe.linear_probe_accuracy(train_x, train_y, test_x, test_y, learning_rates=(0.01, 0.1, 1.0),
                                                epochs=60, batch_size=64, val_fraction=0.2)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    reference = LogisticRegression(C=1e4, max_iter=5000).fit((train_x - mean) / std, train_y)
    expected = reference.score((test_x - mean) / std, test_y)
    assert abs(result["top1"] - expected) <= 0.04, (result, expected)
    assert result["lr"] in (0.01, 0.1, 1.0) and 0.5 < result["val_top1"] <= 1.0
    assert result["top1"] <= result["top5"]
    # Trained on shuffled labels the probe falls to about chance: the metric can fail.
    shuffled = np.random.default_rng(3).permutation(train_y)
    chance = linear_probe.linear_probe_accuracy(train_x, shuffled, test_x, test_y, learning_rates=(0.1,), epochs=20,
                                                batch_size=64)
    assert chance["top1"] < 0.35


def test_fewshot_and_linear_probe_in_config_evals_and_standalone(tmp_path, capsys):
    config = tiny_config(total_steps=2, log_every_steps=2, eval_every_steps=0)
    config.evals = dict(
        fewshot=dict(kind="fewshot", shots=(1, 10), num_seeds=2, max_train_examples=500),
        probe=dict(kind="linear_probe", epochs=5, learning_rates=(0.01, 0.1), max_train_examples=500))
    workdir = str(tmp_path / "run")
    final = run(config, workdir)
    assert {"fewshot/1shot", "fewshot/10shot", "fewshot/10shot_l2", "probe/top1", "probe/lr"} <= set(final)
    assert 0.1 < final["fewshot/10shot"] <= 1.0 and 0.1 < final["probe/top1"] <= final["probe/top5"] <= 1.0
    assert final["probe/num_examples"] == final["fewshot/num_examples"] == 360
    assert any("fewshot/10shot" in record for record in read_metrics(workdir))
    # Standalone, on the run's saved weights: the same figures as the run's own evaluation.
    again = standalone.evaluate_run(workdir, {"fewshot": dict(kind="fewshot", shots=(1, 10), num_seeds=2,
                                                              max_train_examples=500)}, log=lambda _: None)
    assert again["fewshot/10shot"] == final["fewshot/10shot"] and again["fewshot/1shot"] == final["fewshot/1shot"]
    from vitjax.evaluate.__main__ import cli
    cli([f"--init_from={workdir}", "--kind=linear_probe", "--eval_set=epochs=5", "--eval_set=learning_rates=(0.01,0.1)",
         "--eval_set=max_train_examples=500", "--batch_size=120"])
    lines = capsys.readouterr().out.splitlines()
    printed = dict(line.split(": ") for line in lines if line.startswith("linear_probe/"))
    assert float(printed["linear_probe/top1"]) == pytest.approx(final["probe/top1"], abs=1e-6)


@pytest.mark.parametrize("settings, message", [
    (dict(kind="fewshot", shots=(0, 5)), r"shots must be a non-empty list of ints >= 1"),
    (dict(kind="fewshot", l2=1.0), r"Unknown setting\(s\) \['l2'\].*'l2_regs'"),
    (dict(kind="linear_probe", learning_rates=()), r"learning_rates must be a non-empty list"),
    (dict(kind="linear_probe", val_fraction=1.5), r"val_fraction must be in \[0, 1\)"),
])
def test_bad_evaluator_settings_fail_before_the_run(settings, message):
    config = tiny_config(total_steps=2)
    config.evals = dict(bad=settings)
    with pytest.raises(ValueError, match=message):
        train.build(config)
