"""CLIP's softmax and SigLIP's sigmoid loss sharded over 8 fake CPU devices equal the one-device full-matrix loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import parallel
from vitjax.objectives import clip

MESHES = {
    "data8": dict(data=8, fsdp=1, model=1),
    "data2_fsdp4": dict(data=2, fsdp=4, model=1),
    "data2_fsdp2_model2": dict(data=2, fsdp=2, model=2),
}


def features(batch: int, embed: int, seed: int = 0):
    """Returns L2-normalised (batch, embed) image and text features, loosely paired so the loss is not trivial."""
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(batch, embed)).astype(np.float32)
    text = (0.5 * image + rng.normal(size=(batch, embed))).astype(np.float32)
    return (image / np.linalg.norm(image, axis=1, keepdims=True), text / np.linalg.norm(text, axis=1, keepdims=True))


def full_matrix(name):
    """Returns the one-device reference loss `name` as f(image, text, scale, bias)."""
    if name == "softmax":
        return lambda image, text, scale, bias: clip.softmax_loss(image, text, scale)
    return clip.sigmoid_loss


def numpy_loss(name, image, text, scale, bias) -> float:
    """Returns the loss in float64 numpy, straight from the papers' formulas."""
    image, text = image.astype(np.float64), text.astype(np.float64)
    logits = scale * image @ text.T
    if name == "softmax":
        log_rows = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        log_cols = logits - np.log(np.exp(logits).sum(0, keepdims=True))
        return float(-(np.trace(log_rows) + np.trace(log_cols)) / (2 * len(image)))
    signs = 2 * np.eye(len(image)) - 1
    return float(np.sum(np.log1p(np.exp(-signs * (logits + bias)))) / len(image))


@pytest.mark.parametrize("name", clip.LOSSES)
def test_full_matrix_loss_matches_the_formula(name):
    image, text = features(12, 8)
    value = full_matrix(name)(image, text, np.float32(7.0), np.float32(-2.0))
    assert float(value) == pytest.approx(numpy_loss(name, image, text, 7.0, -2.0), rel=1e-6)


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("name", clip.LOSSES)
def test_sharded_loss_equals_full_matrix(name, mesh_name):
    """Value and gradients (features, scale, bias) on the mesh equal the one-device full-matrix loss."""
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    mesh = parallel.create_mesh(MESHES[mesh_name])
    image, text = features(32, 16)
    scale, bias = np.float32(10.0), np.float32(-3.0)
    with jax.default_matmul_precision("highest"):
        reference, reference_grads = jax.value_and_grad(full_matrix(name), argnums=(0, 1, 2, 3))(
            jax.device_put(image, jax.devices()[0]), text, scale, bias)
        sharded = jax.jit(jax.value_and_grad(
            lambda i, t, s, b: clip.sharded_loss(name, i, t, s, b, mesh=mesh), argnums=(0, 1, 2, 3)))
        rows = parallel.batch_sharding(mesh)
        value, grads = sharded(jax.device_put(image, rows), jax.device_put(text, rows), scale, bias)
    assert float(value) == pytest.approx(float(reference), rel=1e-5)
    assert float(value) == pytest.approx(numpy_loss(name, image, text, 10.0, -3.0), rel=1e-5)
    for part, got, want in zip(("image", "text", "scale", "bias"), grads, reference_grads):
        got, want = np.asarray(got), np.asarray(want)
        if part == "bias" and name == "softmax":
            assert np.all(got == 0) and np.all(want == 0)  # the softmax loss has no bias
            continue
        assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want)), (part, got, want)


def test_sharded_sigmoid_loss_is_a_ring_without_all_gather():
    """The chunked loss moves text chunks with collective-permutes and never gathers the features."""
    mesh = parallel.create_mesh(dict(data=8, fsdp=1, model=1))
    image, text = features(32, 16)
    rows = parallel.batch_sharding(mesh)
    compiled = jax.jit(jax.value_and_grad(lambda i, t: clip.sharded_loss("sigmoid", i, t, 10.0, -3.0, mesh=mesh),
                                          argnums=(0, 1))).lower(
        jax.device_put(image, rows), jax.device_put(text, rows)).compile().as_text()
    assert "collective-permute" in compiled
    assert "all-gather" not in compiled


def sigmoid_temp_bytes(num_devices: int, per_device_batch: int, embed: int, chunked: bool) -> int:
    """Returns XLA's per-device temporary bytes of the sigmoid loss's value and feature gradients."""
    mesh = parallel.create_mesh(dict(data=num_devices, fsdp=1, model=1), devices=jax.devices()[:num_devices])
    batch = num_devices * per_device_batch
    features_spec = jax.ShapeDtypeStruct((batch, embed), jnp.float32, sharding=parallel.batch_sharding(mesh))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=parallel.replicated(mesh))
    if chunked:
        loss = lambda i, t, s, b: clip.sharded_loss("sigmoid", i, t, s, b, mesh=mesh)  # noqa: E731
    else:  # jit partitions the full-matrix loss as it likes
        loss = clip.sigmoid_loss
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(
        features_spec, features_spec, scalar, scalar).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def test_chunked_sigmoid_memory_is_linear_in_the_per_device_batch():
    """Peak temporary memory: flat in the device count (global batch) and ~linear in the per-device batch."""
    embed = 128
    chunked = {(n, b): sigmoid_temp_bytes(n, b, embed, True) for n in (4, 8) for b in (16, 32, 64)}
    full = {(n, b): sigmoid_temp_bytes(n, b, embed, False) for n in (4, 8) for b in (32, 64)}
    for b in (16, 32, 64):  # twice the devices, twice the global batch: the same memory per device
        assert chunked[(8, b)] <= 1.05 * chunked[(4, b)], chunked
    for n in (4, 8):  # twice the per-device batch: at most ~twice the memory while b <= embed / 2
        assert chunked[(n, 32)] <= 2.2 * chunked[(n, 16)], chunked
        assert chunked[(n, 64)] <= 2.2 * chunked[(n, 32)], chunked
    # The full matrix grows with the global batch: per device ~B^2 / n, twice from 4 to 8 devices.
    assert full[(8, 64)] >= 1.8 * full[(4, 64)], full
    assert full[(8, 64)] >= 2.0 * chunked[(8, 64)], (full, chunked)


def test_bad_input_fails_before_compiling():
    image, text = features(8, 4)
    with pytest.raises(ValueError, match=r"valid choices: \['softmax', 'sigmoid'\]"):
        clip.sharded_loss("infonce", image, text, 1.0)
    with pytest.raises(ValueError, match="image batch \\(8\\) and the text batch \\(6\\)"):
        clip.sharded_loss("softmax", image, text[:6], 1.0)
    with pytest.raises(ValueError, match="needs a bias"):
        clip.sharded_loss("sigmoid", image, text, 1.0)
    mesh = parallel.create_mesh(dict(data=8, fsdp=1, model=1))
    with pytest.raises(ValueError, match="not divisible by the 8 shards"):
        clip.sharded_loss("softmax", features(12, 4)[0], features(12, 4)[1], 1.0, mesh=mesh)
