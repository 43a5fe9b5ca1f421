"""Deep metric learning: Proxy-Anchor and semantic proxies vs the official code, Recall@K / MAP@R vs brute force,
the class split, a run of configs/proxy_dml_vit.py:runlocal, errors before compile."""
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import config_utils, convert, objectives, optim, train
from vitjax.evaluate import evaluators
from vitjax.evaluate.recall_at_k import retrieval_metrics
from vitjax.objectives import proxy_dml
from vitjax.pytree import param_paths
from test_train import read_metrics, run, tiny_config

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "proxy_dml", "proxy_dml.npz")
# The fixture's shrunk timm ViT and method settings (tests/fixtures/proxy_dml/README.md).
FIXTURE_VIT = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, mlp_dim=64,
                   num_classes=0)
FIXTURE_KWARGS = dict(num_classes=4, embed_dim=8, num_proxy_prompts=2, proxy_bias_ratio=0.5)


def rel_error(value, reference) -> float:
    """Returns max |value - reference| / max |reference|."""
    reference = np.asarray(reference, np.float64)
    return float(np.max(np.abs(np.asarray(value, np.float64) - reference)) / np.max(np.abs(reference)))


def _config(**overrides):
    base = {"progress_bar": False, "checkpoint_async": False}
    return config_utils.load_config("configs/proxy_dml_vit.py:runlocal", {**base, **overrides})


# ---- Recall@K and MAP@R -------------------------------------------------------------------------------------------
def _brute_force(features, labels, ks):
    features = features / np.linalg.norm(features, axis=1, keepdims=True)
    recalls, precisions = {k: [] for k in ks}, []
    for query in range(len(labels)):
        others = [i for i in range(len(labels)) if i != query]
        ranked = sorted(others, key=lambda i: -float(features[query] @ features[i]))
        correct = [labels[i] == labels[query] for i in ranked]
        for k in ks:
            recalls[k].append(any(correct[:k]))
        r = sum(correct)
        precisions.append(sum(np.mean(correct[:i + 1]) for i in range(r) if correct[i]) / r)
    return {**{f"recall_at_{k}": float(np.mean(recalls[k])) for k in ks}, "map_at_r": float(np.mean(precisions))}


def test_retrieval_metrics_match_a_brute_force_ranking():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 70)
    features = rng.normal(size=(70, 5)) + 0.8 * np.eye(6, 5)[labels] * 3  # some class structure
    expected = _brute_force(features, labels, (1, 2, 4, 8))
    got = retrieval_metrics(features, labels, ks=(1, 2, 4, 8), chunk=16)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0.2 < expected["recall_at_1"] < 0.95 and expected["recall_at_1"] < expected["recall_at_8"]
    # A perfect embedding scores 1; the query must not count itself (it would make every recall 1).
    perfect = retrieval_metrics(np.eye(6)[labels], labels, ks=(1,))
    assert perfect == {"recall_at_1": 1.0, "map_at_r": 1.0}
    singletons = retrieval_metrics(rng.normal(size=(5, 3)), np.arange(5), ks=(1, 4))
    assert singletons["recall_at_1"] == singletons["recall_at_4"] == 0.0


# ---- parity with the official code ---------------------------------------------------------------------------------
def _fixture_objective_and_variables():
    data = np.load(FIXTURE)
    config = config_utils.default_config()
    config.model_name = "vit_tiny_patch16_224"
    config.model = dict(FIXTURE_VIT)
    config.objective = "proxy_dml"
    config.objective_kwargs = dict(FIXTURE_KWARGS)
    config.adapt.update(dict(method="vpt", num_tokens=3, deep=True, train=(r"^dml/",)))
    objective = objectives.create("proxy_dml", config)
    state = {key[len("state/"):]: data[key] for key in data.files if key.startswith("state/")}
    params = flax.core.unfreeze(convert.from_timm(state, "vit_tiny_patch16_224", **FIXTURE_VIT)["params"])
    params["vpt"] = {"prompts": data["prompts"][:1], "deep_prompts": data["prompts"][1:]}
    gru = {name: data[f"gru/{name}"] for name in ("W_ir", "W_iz", "W_in", "W_hr", "W_hz", "W_hn",
                                                  "b_ir", "b_iz", "b_in")}
    params["dml"] = {
        "embed_norm": {"scale": data["fc_norm/weight"], "bias": data["fc_norm/bias"]},
        "embed_dense": {"kernel": data["head/weight"].T, "bias": data["head/bias"]},
        "proxy_norm": {"scale": data["p_fc_norm/weight"], "bias": data["p_fc_norm/bias"]},
        "proxy_dense": {"kernel": data["p_head/weight"].T, "bias": data["p_head/bias"]},
        "proxies": data["proxies_bias"], "class_prompts": data["class_prompts"],
        "gru_input": np.concatenate([gru["W_ir"], gru["W_iz"], gru["W_in"]], 1),
        "gru_hidden": np.concatenate([gru["W_hr"], gru["W_hz"], gru["W_hn"]], 1),
        "gru_bias": np.concatenate([gru["b_ir"], gru["b_iz"], gru["b_in"]]),
    }
    images = np.transpose(data["images"], (0, 2, 3, 1))
    batch = {"image": jnp.asarray(images), "label": jax.nn.one_hot(data["labels"].astype(np.int32), 4)}
    variables = {"params": jax.tree.map(jnp.asarray, params),
                 proxy_dml.STATE: {"container": jnp.asarray(data["container_before"])}}
    return objective, variables, batch, data


def test_loss_proxies_and_gradients_match_the_official_code():
    objective, variables, batch, data = _fixture_objective_and_variables()
    abstract = jax.eval_shape(objective.init_variables, jax.random.key(0), batch)
    assert set(param_paths(flax.linen.meta.unbox(abstract["params"]))) == set(param_paths(variables["params"]))

    def loss_fn(params):
        loss, aux = objective.train_loss({**variables, "params": params}, batch, jax.random.key(0))
        return loss, aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    ref = {key[len("ref64/"):]: data[key] for key in data.files if key.startswith("ref64/")}
    embeddings = objective.embeddings(variables, batch["image"], True, jax.random.key(1))
    labels = jnp.asarray(data["labels"].astype(np.int32))
    proxies, container = objective.proxies(variables, batch["image"], labels, True, jax.random.key(2))
    errors = {
        "loss": rel_error(loss, ref["loss"]),
        "embeddings": rel_error(embeddings, ref["embeddings"]),
        "proxies": rel_error(proxies, ref["proxies"]),
        "container": rel_error(aux["updates"][proxy_dml.STATE]["container"], ref["container"]),
        "grad_proxies": rel_error(grads["dml"]["proxies"], ref["grad_proxies"]),
        "grad_class_prompts": rel_error(grads["dml"]["class_prompts"], ref["grad_class_prompts"]),
        "grad_prompts": rel_error(np.concatenate([grads["vpt"]["prompts"], grads["vpt"]["deep_prompts"]]),
                                  ref["grad_prompts"]),
        "grad_gru_w_iz": rel_error(grads["dml"]["gru_input"][:, 8:16], ref["grad_gru_w_iz"]),
        "grad_proxy_head": rel_error(grads["dml"]["proxy_dense"]["kernel"].T, ref["grad_proxy_head"]),
        "grad_head": rel_error(grads["dml"]["embed_dense"]["kernel"].T, ref["grad_head"]),
        "loss_learnable": rel_error(objective.loss_of(embeddings, variables["params"]["dml"]["proxies"], labels),
                                    ref["loss_learnable"]),
    }
    assert rel_error(container, ref["container"]) <= 1e-5
    assert max(errors.values()) <= 1e-5, errors
    # The semantic path matters: the learnable proxies alone give another loss.
    assert abs(float(ref["loss"]) - float(ref["loss_learnable"])) > 0.1


def test_semantic_proxies_fold_in_batch_order_whatever_the_layout():
    rng = np.random.default_rng(0)
    gru = {"gru_input": rng.normal(size=(4, 12)) * 0.3, "gru_hidden": rng.normal(size=(4, 12)) * 0.3,
           "gru_bias": rng.normal(size=12) * 0.1}
    vectors, container, bias = rng.normal(size=(5, 4)), rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    labels = np.array([1, 0, 1, 1, 0])
    proxies, memory = proxy_dml.semantic_proxies(jnp.asarray(vectors), jnp.asarray(labels), jnp.asarray(container),
                                                 jnp.asarray(bias), jax.tree.map(jnp.asarray, gru), 0.25)
    expected = container.copy()
    for vector, label in zip(vectors, labels):   # numpy GRU (gru_relu), one example at a time
        h = expected[label]
        gx, gh = vector @ gru["gru_input"], h @ gru["gru_hidden"]
        sig = lambda v: 1.0 / (1.0 + np.exp(-v))  # noqa: E731
        reset, update = sig(gx[:4] + gh[:4] + gru["gru_bias"][:4]), sig(gx[4:8] + gh[4:8] + gru["gru_bias"][4:8])
        candidate = np.maximum(gx[8:] + reset * gh[8:] + gru["gru_bias"][8:], 0.0)
        expected[label] = (1 - update) * candidate + update * h
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert rel_error(memory, expected) <= 1e-5
    assert rel_error(proxies, 0.25 * bias + 0.75 * expected) <= 1e-5
    assert np.allclose(memory[2], container[2] / np.linalg.norm(container[2]), atol=1e-6)  # class 2: not in the batch


# ---- the class split and a run -------------------------------------------------------------------------------------
def test_class_split_keeps_and_relabels_the_named_classes(data_dir):
    from vitjax import data
    input_config = dict(dataset="digits", data_dir=data_dir, train_classes=(3, 7), eval_classes=(5, 6, 7, 8, 9),
                        pp_train="decode(channels=1)|value_range(-1, 1)",
                        pp_eval="decode(channels=1)|value_range(-1, 1)")
    info = data.dataset_info(input_config)
    assert info["num_classes"] == 2 and 250 < info["num_train_examples"] < 320   # ~144 train images per digit
    assert 150 < info["num_eval_examples"] < 210
    labels = np.concatenate([batch["label"][batch["mask"]] for batch in
                             data.make_eval_iterator(input_config, global_batch_size=64)])
    assert len(labels) == info["num_eval_examples"] and set(labels.tolist()) == {0, 1, 2, 3, 4}
    batch = next(data.make_train_iterator(input_config, global_batch_size=64, seed=0))
    assert set(np.unique(batch["label"]).tolist()) == {0, 1}
    with pytest.raises(ValueError, match=r"input.train_classes must be None or a non-empty tuple of class ids"):
        data.dataset_info(dict(input_config, train_classes="0-4"))
    with pytest.raises(ValueError, match=r"Classes \[12\] have no example in the split; its classes: \[0, 1"):
        data.dataset_info(dict(input_config, train_classes=(1, 12)))
    with pytest.raises(ValueError, match=r"input.long_tail and input.train_classes cannot be combined"):
        data.validate_input_config(dict(input_config, long_tail=dict(imbalance=10.0)))
    assert "train_classes" not in data.validate_input_config(dict(input_config, train_classes=None))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, data_dir):
    """Returns the workdir of a 10-step tiny digits classifier: the encoder the DML run starts from."""
    workdir = str(tmp_path_factory.mktemp("dml_base") / "run")
    run(tiny_config(total_steps=10, **{"input.data_dir": data_dir}), workdir)
    return workdir


def test_runlocal_trains_only_prompts_head_and_proxies_and_the_loss_falls(base_run, data_dir, tmp_path):
    tiny = {"model.embed_dim": 32, "model.depth": 2, "model.num_heads": 2, "model.mlp_dim": 64,
            "objective_kwargs.embed_dim": 32, "adapt.train": (r"^dml/",)}
    config = _config(init_from=base_run, total_steps=24, log_every_steps=4, batch_size=32, **{"optim.lr": 1e-2},
                     **{"input.data_dir": data_dir, **tiny})
    workdir = str(tmp_path / "dml")
    final = run(config, workdir)
    losses = [record["train/loss"] for record in read_metrics(workdir) if "train/loss" in record]
    assert np.mean(losses[-2:]) < losses[0] - 0.5, losses
    assert 0.0 <= final["retrieval/recall_at_1"] <= final["retrieval/recall_at_8"] <= 1.0
    assert 150 < final["retrieval/num_examples"] < 210       # the test images of digits 5-9
    # What the optimizer trains: the prompts and the objective's params; the paper's recipe adds the biases (BitFit).
    for overrides, extra in (({}, r"/bias$"), ({"adapt.train": (r"^dml/",)}, None)):
        built, objective = train.build(_config(init_from=base_run, **{"input.data_dir": data_dir, **overrides}))
        abstract = jax.eval_shape(objective.init_variables, jax.random.key(0),
                                  {"image": jnp.zeros((2, 16, 16, 1)), "label": jnp.zeros((2, 5))})
        mask = optim.trainable_mask(built.optim, flax.linen.meta.unbox(abstract["params"]),
                                    train.adapted_params(built))
        trained = {path for path, value in param_paths(mask).items() if value}
        assert {"vpt/prompts", "vpt/deep_prompts", "dml/proxies", "dml/class_prompts", "dml/gru_input",
                "dml/embed_dense/kernel", "dml/proxy_dense/kernel"} <= trained
        other = {path for path in trained if not path.startswith(("vpt/", "dml/"))}
        assert (other == set()) if extra is None else (other and all(path.endswith("/bias") for path in other))


def test_bad_settings_fail_before_compile(tmp_path):
    base = tmp_path / "base.pth"   # build checks that init_from exists; nothing reads it here
    base.write_bytes(b"")

    def config(**overrides):
        return _config(init_from=str(base), **overrides)

    with pytest.raises(ValueError, match=r"objective_kwargs.proxies='prompt' is not valid; valid choices: "
                                         r"\['semantic', 'learnable'\]"):
        train.build(config(**{"objective_kwargs.proxies": "prompt"}))
    with pytest.raises(ValueError, match=r"objective_kwargs.mode='triplet' is not valid; valid choices: "
                                         r"\['anchor', 'nca'\]"):
        train.build(config(**{"objective_kwargs.mode": "triplet"}))
    with pytest.raises(ValueError, match=r"valid choices with objective_kwargs.proxies='semantic': \['vpt', None\]"):
        train.build(config(**{"adapt.method": "lora", "adapt.deep": False, "adapt.num_tokens": 10}))
    with pytest.raises(ValueError, match=r"leaves the objective's own parameters \(dml/: embedding head, proxies\) "
                                         r"frozen; add r'\^dml/' to it"):
        train.build(config(**{"adapt.train": (r"^head/",)}))
    # A model without the adaptation hook: the semantic proxies' class prompts need it.
    with pytest.raises(ValueError, match=r"needs a model with the adaptation hook .* Models with it: "):
        train.build(config(model_name="convnext_atto", model={"num_classes": 0}, **{"adapt.method": None}))
    with pytest.raises(ValueError, match=r"config.evals.retrieval.ks must be a non-empty list of ints >= 1"):
        train.build(config(evals={"retrieval": {"kind": "recall_at_k", "ks": (0, 1)}}))
    with pytest.raises(ValueError, match=r"optim.lr_mult pattern '\^dml/proxy\$' matches no param"):
        optim.lr_multipliers({"dml": {"proxies": np.zeros(2)}}, ((r"^dml/proxy$", 2.0),))
    assert evaluators.list_kinds().count("recall_at_k") == 1
