"""CvT: parity with Hugging Face transformers' CvtForImageClassification, registry, converter errors."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vitjax import convert, models  # noqa: E402
from vitjax.convert import cvt as cvt_convert  # noqa: E402

from parity_utils import (  # noqa: E402
    assert_converter_errors, assert_create_rejects, parameter_count, random_variables, randomize_, relative_error,
    run_parity)


# HF indexes its per-stage drop-path list by the stage number, so every stage needs depth > its index.
SMALL = dict(embed_dims=(16, 32, 48), depths=(1, 2, 3), num_heads=(1, 2, 3), num_classes=5, img_size=32)


def hf_reference(cls_token=(False, False, True)):
    """Returns a re-randomised eval-mode HF CvT of the SMALL shape."""
    from transformers import CvtConfig, CvtForImageClassification
    config = CvtConfig(embed_dim=list(SMALL["embed_dims"]), depth=list(SMALL["depths"]),
                       num_heads=list(SMALL["num_heads"]), num_labels=SMALL["num_classes"],
                       cls_token=list(cls_token))
    reference = CvtForImageClassification(config).eval()
    randomize_(reference)
    return reference


def hf_logits(reference, images):
    """Returns the HF CvT's logits; its head crashes without a cls token, so then its layers are applied as its
    forward intends."""
    if reference.config.cls_token[-1]:
        return reference(images).logits
    tokens = reference.cvt(images).last_hidden_state.flatten(2).transpose(1, 2)
    return reference.classifier(reference.layernorm(tokens).mean(dim=1))


@pytest.mark.parametrize("cls_token", [(False, False, True), (False, False, False)])
def test_huggingface_parity(cls_token):
    expected, ours, intermediates, _, variables, _ = run_parity(
        hf_reference(cls_token), "cvt_13", forward=hf_logits, cls_token=cls_token, **SMALL)
    assert "batch_stats" in variables
    assert ours.shape == expected.shape == (2, 5)
    assert relative_error(ours, expected) <= 1e-5
    assert [stage.shape for stage in intermediates["stages"]] == [(2, 8, 8, 16), (2, 4, 4, 32), (2, 2, 2, 48)]
    assert intermediates["pre_logits"].shape == (2, 48)


def test_train_mode_matches_huggingface_batch_statistics():
    """In train mode BatchNorm normalises with batch statistics: logits and running means match HF.

    (Running variances are not compared: torch updates them with the unbiased batch variance, flax with
    the biased one, a factor n / (n - 1) that is 2 for this test's 1x1 key/value maps.)
    """
    from transformers import CvtConfig, CvtForImageClassification
    config = CvtConfig(embed_dim=list(SMALL["embed_dims"]), depth=list(SMALL["depths"]),
                       num_heads=list(SMALL["num_heads"]), num_labels=5, drop_path_rate=[0.0, 0.0, 0.0])
    reference = CvtForImageClassification(config)
    randomize_(reference)
    variables = convert.from_timm(reference.state_dict(), "cvt_13", **SMALL)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    expected = reference.train()(images).logits.detach().numpy()
    model = models.create("cvt_13", **SMALL)
    (ours, _), updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, jnp.asarray(images.numpy().transpose(0, 2, 3, 1)))
    assert relative_error(ours, expected) <= 1e-5
    key = ("cvt.encoder.stages.1.layers.1.attention.attention.convolution_projection_query."
           "convolution_projection.normalization.running_mean")
    new_mean = updates["batch_stats"]["stages_1"]["blocks_1"]["attn"]["conv_proj_q"]["bn"]["mean"]
    assert relative_error(new_mean, reference.state_dict()[key].numpy()) <= 1e-5


def test_from_huggingface_alias_and_converter_errors():
    reference = hf_reference()
    state = {key: value.numpy() for key, value in reference.state_dict().items()}
    model = models.create("cvt_13", **SMALL)
    variables = cvt_convert.from_huggingface(state, model)
    assert variables["batch_stats"]["stages_2"]["blocks_0"]["attn"]["conv_proj_k"]["bn"]["var"].shape == (48,)
    assert_converter_errors(
        state, "cvt_13", SMALL, missing="cvt.encoder.stages.1.layers.0.attention.attention.projection_key.weight",
        misshapen={"cvt.encoder.stages.2.layers.2.intermediate.dense.bias": (
            np.zeros(7, np.float32), "stages_2/blocks_2/mlp/fc1/bias")},
        unexpected={"unexpected_key": np.zeros(1)})


def test_param_counts_match_huggingface():
    """cvt_13 has the published 20M parameters: counted without compute, against HF's default config."""
    from transformers import CvtConfig, CvtForImageClassification
    config = CvtConfig(num_labels=1000)
    expected = sum(p.numel() for p in CvtForImageClassification(config).parameters())
    count = parameter_count(models.create("cvt_13"))
    assert count == expected
    assert 19.9e6 < count < 20.1e6


def test_registry_and_validation():
    names = models.list_models("cvt")
    assert names == ["cvt_13", "cvt_13_384", "cvt_21", "cvt_21_384", "cvt_w24", "cvt_w24_384"]
    assert models.create("cvt_w24_384").img_size == 384
    assert_create_rejects("cvt_13", [
        (dict(qkv_projection="avg_pool"), "qkv_projection"),
        (dict(num_heads=(1, 5, 6)), "divisible"),
        (dict(depths=(1, 2)), "entries"),
    ])


def test_train_mode_updates_batch_stats_and_has_gradients():
    model = models.create("cvt_13", **dict(SMALL, depths=(1, 1, 1)), drop_path_rate=0.2, drop_rate=0.1)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    variables = random_variables(model, (32, 32, 3))
    rngs = {"dropout": jax.random.key(2), "drop_path": jax.random.key(3)}

    def loss_fn(params):
        (logits, _), updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images,
                                           train=True, rngs=rngs, mutable=["batch_stats"])
        return jnp.mean(logits ** 2), updates

    (loss, updates), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
    assert np.isfinite(float(loss))
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and sum(norms) > 0
    old = variables["batch_stats"]["stages_0"]["blocks_0"]["attn"]["conv_proj_q"]["bn"]["mean"]
    new = updates["batch_stats"]["stages_0"]["blocks_0"]["attn"]["conv_proj_q"]["bn"]["mean"]
    assert float(jnp.max(jnp.abs(new - old))) > 0
