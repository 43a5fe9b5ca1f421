"""objective="clip": text pp ops, the sharded loss inside the objective, the digits run, zero-shot and retrieval."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import objectives, parallel, train
from vitjax.evaluate import evaluators, zeroshot
from vitjax.text import templates

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import clip_digits  # noqa: E402


def tokenizer(context_length=16):
    """Returns CLIP's BPE tokenizer at the tiny model's context."""
    import vitjax.text as text
    return text.tokenizer("clip", context_length=context_length)


# ---- text ops ----------------------------------------------------------------------------------
def run_pp(pp, example, seed=(0, 0)):
    """Returns the numpy fields of `example` after the pp string."""
    import tensorflow as tf
    import vitjax.text.ops  # noqa: F401  (registers the ops)
    from vitjax.data import build_preprocess
    out = build_preprocess(pp)({key: tf.constant(value) for key, value in example.items()},
                               tf.constant(seed, tf.int64))
    return {key: value.numpy() for key, value in out.items()}


def test_label_caption_and_tokenize():
    out = run_pp("label_caption('digits', 'digits', template=0)|tokenize('clip', context_length=16)",
                 {"label": np.int64(7)})
    np.testing.assert_array_equal(out["text"], tokenizer()(["a photo of the number seven."])[0])
    assert out["text"].dtype == np.int32 and out["label"] == 7
    # A drawn template is one of the class's captions, and the seed decides which.
    drawn = {run_pp("label_caption('digits', 'digits')", {"label": np.int64(3)}, (seed, 1))["text"].decode()
             for seed in range(40)}
    assert drawn <= set(templates.captions("digits", "digits")[3]) and len(drawn) >= 4, drawn


def test_pad_truncate():
    ids = np.arange(1, 8, dtype=np.int32)
    np.testing.assert_array_equal(run_pp("pad_truncate(10)", {"text": ids})["text"], [1, 2, 3, 4, 5, 6, 7, 0, 0, 0])
    np.testing.assert_array_equal(run_pp("pad_truncate(4, end_id=99)", {"text": ids})["text"], [1, 2, 3, 99])
    np.testing.assert_array_equal(run_pp("pad_truncate(7, end_id=99)", {"text": ids})["text"], ids)


def test_imagenet_prompts_are_clips():
    assert len(templates.templates("imagenet")) == 80 and len(templates.classnames("imagenet")) == 1000
    assert templates.captions("imagenet", "imagenet")[0][0] == "a bad photo of a tench."


# ---- the objective on a mesh equals one device ---------------------------------------------------
def tiny_objective(loss):
    config = clip_digits.get_config(f"loss={loss},runlocal")
    config.model.update(vision_depth=1, text_depth=1)
    return objectives.create("clip", config)


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_objective_on_8_devices_equals_one_device(loss):
    """The train loss and every gradient of the two-tower model on a data x fsdp mesh equal one device's."""
    objective = tiny_objective(loss)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 16)
    batch = {"image": jnp.asarray(rng.uniform(-1, 1, (16, 16, 16, 3)), jnp.float32),
             "text": jnp.asarray(tokenizer()([f"a photo of the number {label}" for label in labels]))}
    params = train.unbox(objective.init_variables(jax.random.PRNGKey(0), batch))["params"]

    def loss_and_grads(params, batch):
        return jax.value_and_grad(lambda p: objective.train_loss({"params": p}, batch, jax.random.PRNGKey(1))[0])(
            params)

    with jax.default_matmul_precision("highest"):
        one_loss, one_grads = jax.jit(loss_and_grads)(params, batch)
        mesh = parallel.create_mesh(dict(data=2, fsdp=4, model=1))
        with parallel.use_mesh(mesh):
            sharded = jax.jit(loss_and_grads, in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)))
            text = sharded.lower(params, batch).compile().as_text()
            mesh_loss, mesh_grads = sharded(params, batch)
    # The mesh run takes the sharded form: a ring of permutes for sigmoid, gathered features for softmax.
    assert ("collective-permute" in text) == (loss == "sigmoid")
    assert float(mesh_loss) == pytest.approx(float(one_loss), rel=1e-5)
    for path, (got, want) in zip(jax.tree_util.tree_leaves_with_path(mesh_grads),
                                 zip(jax.tree.leaves(mesh_grads), jax.tree.leaves(one_grads))):
        scale = max(float(np.max(np.abs(want))), 1e-6)
        assert float(np.max(np.abs(np.asarray(got) - np.asarray(want)))) <= 5e-5 * scale, path[0]  # fp32: sums reordered over devices


# ---- the evaluators' arithmetic -------------------------------------------------------------------
def test_recall_at_k_and_class_embeddings():
    similarity = np.array([[0.9, 0.1, 0.5], [0.8, 0.7, 0.1], [0.1, 0.2, 0.3]])
    matches = np.eye(3, dtype=bool)
    # Row 0: its match is the best (rank 0); row 1: one column above it (rank 1); row 2: rank 0.
    assert zeroshot.recall_at_k(similarity, matches, ks=(1, 2)) == {1: pytest.approx(2 / 3), 2: 1.0}
    tokens = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    fake_features = {}

    def encode_text(batch):
        rows = np.random.default_rng(int(batch.sum())).normal(size=(len(batch), 5))
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        for row, feature in zip(batch, rows):
            fake_features[tuple(row)] = feature
        return rows

    classes = zeroshot.class_embeddings(encode_text, tokens, batch_size=4)
    for index in range(2):
        mean = np.mean([fake_features[tuple(row)] for row in tokens[index]], axis=0)
        np.testing.assert_allclose(classes[index], mean / np.linalg.norm(mean), rtol=1e-5)


# ---- the digits run ------------------------------------------------------------------------------
def test_clip_digits_runlocal(tmp_path, data_dir, monkeypatch):
    """The config trains through the trainer on a 2 x 2 data x fsdp mesh and reports zero-shot and retrieval figures."""
    monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
    config = clip_digits.get_config("loss=sigmoid,runlocal")
    config.input.data_dir = data_dir
    config.total_steps = 3
    mesh = parallel.create_mesh(dict(data=2, fsdp=2, model=1), devices=jax.devices()[:4])
    final = train.train_and_evaluate(config, str(tmp_path), mesh=mesh)
    assert final["step"] == 3
    assert final["zeroshot/num_examples"] == 360
    assert 0.0 <= final["zeroshot/top1"] <= final["zeroshot/top5"] <= 1.0
    # The eval captions use one template: the 360 test pairs hold the 10 classes' captions.
    assert final["retrieval/num_texts"] == 10 and final["retrieval/num_examples"] == 360
    for direction in ("image_to_text", "text_to_image"):
        recalls = [final[f"retrieval/{direction}_recall@{k}"] for k in (1, 5, 10)]
        assert recalls == sorted(recalls)
    assert final["retrieval/image_to_text_recall@10"] == 1.0  # all 10 texts are in the top 10


# ---- bad input ---------------------------------------------------------------------------------
def test_bad_input_fails_before_compiling():
    config = clip_digits.get_config("runlocal")
    config.objective_kwargs.loss = "infonce"
    with pytest.raises(ValueError, match=r"valid choices: \['softmax', 'sigmoid'\]"):
        train.build(config)
    config = clip_digits.get_config("runlocal")
    config.objective_kwargs.loss = "sigmoid"
    with pytest.raises(ValueError, match="init_logit_bias"):
        train.build(config)
    with pytest.raises(ValueError, match="Unknown loss 'hinge'"):
        clip_digits.get_config("loss=hinge")
    objective = tiny_objective("softmax")
    with pytest.raises(ValueError, match=r"image batch \(4\) and the text batch \(3\)"):
        objective.init_variables(jax.random.PRNGKey(0), {"image": jnp.zeros((4, 16, 16, 3)),
                                                         "text": jnp.zeros((3, 16), jnp.int32)})
    config = clip_digits.get_config("runlocal")
    config.evals.zeroshot.templates = "cifar"
    with pytest.raises(ValueError, match=r"config.evals.zeroshot: Unknown template set 'cifar'; valid choices"):
        evaluators.validate_evals(config)
    from vitjax.data import validate_input_config
    config = clip_digits.get_config("runlocal")
    config.input.pp_eval = config.input.pp_eval.replace("tokenize('clip'", "tokenize('bpe'")
    with pytest.raises(ValueError, match="Unknown tokenizer 'bpe'"):
        validate_input_config(config.input)
