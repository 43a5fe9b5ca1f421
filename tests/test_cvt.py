"""CvT: parity with Hugging Face transformers' CvtForImageClassification, registry, converter errors."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vitjax import convert, models  # noqa: E402
from vitjax.convert import cvt as cvt_convert  # noqa: E402


def randomize_(module: "torch.nn.Module", seed: int = 0, std: float = 0.15) -> None:
    """Redraws every float tensor: norm scales 1 + N(0, 0.1), BN variances 0.5 + U(0, 1), the rest N(0, std)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if key.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif "norm" in key and key.endswith("weight"):
                tensor.copy_(1.0 + 0.1 * noise)
            else:
                tensor.copy_(std * noise)


def random_variables(model, image_shape, seed: int = 0):
    """Returns variables of the model's shapes drawn from N(0, 0.05) (BN variances 1), without compiling init."""
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1,) + image_shape)))
    shapes = flax.linen.meta.unbox(shapes)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: np.ones(s.shape, np.float32) if path[-1].key == "var"
        else rng.normal(0.0, 0.05, s.shape).astype(np.float32), shapes)


def relative_error(ours, reference) -> float:
    """Returns max |ours - reference| / max |reference|."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


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


@pytest.mark.parametrize("cls_token", [(False, False, True), (False, False, False)])
def test_huggingface_parity(cls_token):
    reference = hf_reference(cls_token)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if cls_token[-1]:
            expected = reference(images).logits.numpy()
        else:  # HF's head crashes without a cls token; apply its layers as its forward intends
            tokens = reference.cvt(images).last_hidden_state.flatten(2).transpose(1, 2)
            expected = reference.classifier(reference.layernorm(tokens).mean(dim=1)).numpy()
    variables = convert.from_timm(reference.state_dict(), "cvt_13", cls_token=cls_token, **SMALL)
    assert "batch_stats" in variables
    model = models.create("cvt_13", cls_token=cls_token, **SMALL)
    ours, intermediates = jax.jit(model.apply)(variables, jnp.asarray(images.numpy().transpose(0, 2, 3, 1)))
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
    missing = "cvt.encoder.stages.1.layers.0.attention.attention.projection_key.weight"
    with pytest.raises(KeyError, match=missing.replace(".", r"\.")):
        convert.from_timm({k: v for k, v in state.items() if k != missing}, "cvt_13", **SMALL)
    bad = "cvt.encoder.stages.2.layers.2.intermediate.dense.bias"
    with pytest.raises(ValueError, match="stages_2/blocks_2/mlp/fc1/bias"):
        convert.from_timm({**state, bad: np.zeros(7, np.float32)}, "cvt_13", **SMALL)
    with pytest.raises(KeyError, match="unexpected_key"):
        convert.from_timm({**state, "unexpected_key": np.zeros(1)}, "cvt_13", **SMALL)


def test_param_counts_match_huggingface():
    """cvt_13 has the published 20M parameters: counted without compute, against HF's default config."""
    from transformers import CvtConfig, CvtForImageClassification
    config = CvtConfig(num_labels=1000)
    expected = sum(p.numel() for p in CvtForImageClassification(config).parameters())
    model = models.create("cvt_13")
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 224, 224, 3))))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(flax.linen.meta.unbox(shapes["params"])))
    assert count == expected
    assert 19.9e6 < count < 20.1e6


def test_registry_and_validation():
    names = models.list_models("cvt")
    assert names == ["cvt_13", "cvt_13_384", "cvt_21", "cvt_21_384", "cvt_w24", "cvt_w24_384"]
    assert models.create("cvt_w24_384").img_size == 384
    with pytest.raises(ValueError, match="qkv_projection"):
        models.create("cvt_13", qkv_projection="avg_pool")
    with pytest.raises(ValueError, match="divisible"):
        models.create("cvt_13", num_heads=(1, 5, 6))
    with pytest.raises(ValueError, match="entries"):
        models.create("cvt_13", depths=(1, 2))


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
