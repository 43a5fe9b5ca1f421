"""ViT / DeiT: parity with timm 1.0.31, scan/remat equivalence, registry and converter errors."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vitjax import convert, models  # noqa: E402
from vitjax.models import layers, vit  # noqa: E402

from parity_utils import (  # noqa: E402
    assert_converter_errors, assert_create_rejects, parameter_count, randomize_, relative_error, run_parity)


def timm_and_vitjax(name: str, image_size: int, std: float, **overrides):
    """Returns (timm logits, vitjax logits) for a re-randomised timm model converted to vitjax."""
    reference = timm.create_model(name, pretrained=False, img_size=image_size, **overrides).eval()
    randomize_(reference, std=std)
    expected, ours, *_ = run_parity(reference, name, img_size=image_size, **overrides)
    return expected, ours


# Full-depth models use std 0.1: at 0.15, 12 random blocks saturate the softmax and torch's own fp32 result
# drifts 2.3e-5 from its fp64 result (test_fp64_parity shows the implementations agree to 1e-13).
@pytest.mark.parametrize("name, image_size, std, overrides", [
    ("vit_tiny_patch16_224", 224, 0.1, {}),
    ("vit_small_patch16_224", 224, 0.1, {}),
    ("deit_tiny_distilled_patch16_224", 224, 0.1, {}),
    ("vit_tiny_patch16_224", 64, 0.15, dict(global_pool="avg", depth=4)),
    ("vit_tiny_patch16_224", 64, 0.15, dict(class_token=False, global_pool="avg", depth=4)),
    ("vit_tiny_patch16_224", 64, 0.15, dict(global_pool="map", depth=4)),
    ("vit_tiny_patch16_224", 64, 0.15, dict(qk_norm=True, init_values=0.5, qkv_bias=False, depth=4)),
])
def test_timm_parity(name, image_size, std, overrides):
    expected, ours = timm_and_vitjax(name, image_size, std, **overrides)
    assert ours.shape == expected.shape
    assert relative_error(ours, expected) <= 1e-5


def test_fp64_parity_is_exact():
    """In float64 on both sides the only difference left is summation order: agreement to ~1e-13."""
    reference = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64, depth=6).eval()
    randomize_(reference, std=0.15)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    variables = convert.from_timm(reference.state_dict(), "vit_small_patch16_224", img_size=64, depth=6)
    with torch.no_grad():
        expected = reference.double()(images.double()).numpy()
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        model = models.create("vit_small_patch16_224", img_size=64, depth=6, dtype=jnp.float64,
                              param_dtype=jnp.float64)
        ours, _ = model.apply(params, jnp.asarray(images.double().numpy().transpose(0, 2, 3, 1)))
        assert ours.dtype == jnp.float64
    assert relative_error(ours, expected) <= 1e-10


def test_deit_distilled_heads():
    model = models.create("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=5)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    variables = model.init({"params": jax.random.key(1)}, images)
    (cls_logits, dist_logits), _ = model.apply(variables, images, train=True,
                                               rngs={"dropout": jax.random.key(2), "drop_path": jax.random.key(3)})
    mean_logits, _ = model.apply(variables, images)
    np.testing.assert_allclose(mean_logits, (cls_logits + dist_logits) / 2, rtol=1e-6, atol=1e-6)


def _tiny(**overrides):
    settings = dict(variant="mu/4", depth=3, img_size=16, num_classes=7, drop_path_rate=0.0)
    settings.update(overrides)
    return models.create("vit", **settings)


def test_scan_equals_unscanned_and_param_converters_roundtrip():
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    plain = _tiny()
    variables = plain.init({"params": jax.random.key(1)}, images)
    params = jax.tree.map(np.asarray, flax_unbox(variables["params"]))
    scanned_params = vit.scan_params(params, depth=3)
    assert scanned_params["blocks"]["attn"]["qkv"]["kernel"].shape[0] == 3
    out_plain, inter_plain = plain.apply({"params": params}, images)
    out_scan, inter_scan = _tiny(scan=True).apply({"params": scanned_params}, images)
    assert relative_error(out_scan, out_plain) <= 1e-6
    np.testing.assert_allclose(inter_scan["blocks"][2], inter_plain["blocks"][2], rtol=1e-5, atol=1e-6)
    roundtrip = vit.unscan_params(scanned_params)
    jax.tree.map(np.testing.assert_array_equal, roundtrip, params)
    # A scanned init has the same parameter shapes as the stacked unscanned ones.
    scanned_init = _tiny(scan=True).init({"params": jax.random.key(1)}, images)["params"]
    assert jax.tree.map(np.shape, flax_unbox(scanned_init)) == jax.tree.map(np.shape, scanned_params)


def test_remat_matches_plain_values_and_gradients():
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    rngs = {"dropout": jax.random.key(4), "drop_path": jax.random.key(5)}
    for scan in (False, True):
        plain, remat = _tiny(scan=scan, drop_path_rate=0.2), _tiny(scan=scan, drop_path_rate=0.2, remat=True)
        params = plain.init({"params": jax.random.key(1)}, images)["params"]

        def loss(p, model):
            logits, _ = model.apply({"params": p}, images, train=True, rngs=rngs)
            return jnp.mean(logits ** 2)

        value_plain, grad_plain = jax.value_and_grad(loss)(params, plain)
        value_remat, grad_remat = jax.value_and_grad(loss)(params, remat)
        np.testing.assert_allclose(value_remat, value_plain, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                     flax_unbox(grad_remat), flax_unbox(grad_plain))


def test_scanned_drop_path_is_per_layer():
    """Stochastic depth under scan follows the same linear per-layer schedule as unscanned blocks."""
    images = jax.random.normal(jax.random.key(0), (64, 16, 16, 3))
    model = _tiny(scan=True, depth=2, drop_path_rate=0.9)
    variables = model.init({"params": jax.random.key(1)}, images)
    _, inter = model.apply(variables, images, train=True,
                           rngs={"dropout": jax.random.key(2), "drop_path": jax.random.key(3)})
    _, inter_eval = model.apply(variables, images)
    # Layer 0 has rate 0 (linspace(0, 0.9, 2)): its tokens equal the eval-mode tokens.
    np.testing.assert_allclose(inter["blocks"][0], inter_eval["blocks"][0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(inter["blocks"][1], inter_eval["blocks"][1])


def flax_unbox(tree):
    import flax.linen as nn
    return nn.meta.unbox(tree)


def test_registry_errors_name_valid_choices():
    with pytest.raises(ValueError, match="vit_tiny_patch16_224"):
        models.create("vit_tinny_patch16_224")
    assert_create_rejects("vit_tiny_patch16_224", [
        (dict(drop_pth_rate=0.1), "Unknown option.*valid choices.*drop_path_rate"),
        (dict(img_size=100), "not divisible by patch_size"),
        (dict(global_pool="mean"), "valid choices"),
    ])
    with pytest.raises(ValueError, match="valid sizes"):
        models.create("vit", variant="XXL/16")
    assert "deit_tiny_distilled_patch16_224" in models.list_models("deit")


def test_variants_match_published_sizes():
    """Parameter counts of full-size models, from shapes only (ViT paper Table 1: B 86M, L 307M, H 632M)."""
    expected = {"vit_base_patch16_224": 86.57e6, "vit_large_patch16_224": 304.33e6,
                "vit_huge_patch14_224": 632.05e6, "deit_tiny_distilled_patch16_224": 5.91e6}
    for name, count in expected.items():
        total = parameter_count(models.create(name))
        assert abs(total - count) / count < 2e-3, (name, total)


def test_bad_state_dict_names_the_key():
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)
    assert_converter_errors(
        reference.state_dict(), "vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=1),
        missing="blocks.0.mlp.fc1.bias", unexpected={"blocks.0.surprise": torch.zeros(3)},
        misshapen={"blocks.0.norm2.weight": (torch.zeros(7), "blocks_0/norm2/scale")})


def test_checkpoint_files_and_posemb_resampling(tmp_path):
    """A .pth (read with weights_only) and a .safetensors load; a 224 checkpoint runs at 384 like timm's."""
    from safetensors.torch import save_file
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2).eval()
    randomize_(reference)
    torch.save({"model": reference.state_dict()}, tmp_path / "ckpt.pth")
    save_file(reference.state_dict(), str(tmp_path / "ckpt.safetensors"))
    from_pth = convert.from_timm(tmp_path / "ckpt.pth", "vit_tiny_patch16_224", depth=2)
    from_st = convert.from_timm(str(tmp_path / "ckpt.safetensors"), "vit_tiny_patch16_224", depth=2)
    jax.tree.map(np.testing.assert_array_equal, from_pth, from_st)

    big = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=96).eval()
    big.load_state_dict(timm.models.vision_transformer.checkpoint_filter_fn(reference.state_dict(), big))
    resampled = convert.from_timm(tmp_path / "ckpt.pth", "vit_tiny_patch16_224", depth=2, img_size=96)
    assert relative_error(resampled["params"]["pos_embed"], big.pos_embed.detach().numpy()) <= 1e-5
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = big(images).numpy()
    ours, _ = models.create("vit_tiny_patch16_224", depth=2, img_size=96).apply(
        resampled, jnp.asarray(images.numpy().transpose(0, 2, 3, 1)))
    assert relative_error(ours, expected) <= 1e-5


def test_posemb_sincos_matches_mae_table():
    """The 'mae' style equals MAE's get_2d_sincos_pos_embed (re-derived: [sin x, cos x, sin y, cos y])."""
    table = layers.posemb_sincos_2d(3, 4, 8)
    row, col = 1, 2  # token index 1 * 4 + 2
    omega = 1.0 / 10000 ** (np.arange(2) / 2.0)
    expected = np.concatenate([np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)])
    np.testing.assert_allclose(table[row * 4 + col], expected, rtol=1e-6)


@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
@pytest.mark.parametrize("antialias", [False, True])
def test_resize_matches_torch_interpolate(method, antialias):
    image = np.random.default_rng(0).normal(size=(1, 7, 9, 5))
    for size in [(14, 20), (3, 4), (7, 13)]:
        expected = torch.nn.functional.interpolate(
            torch.tensor(image.transpose(0, 3, 1, 2)), size=size, mode=method, align_corners=False,
            antialias=antialias).numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(layers.resize_like_torch(image, size, method, antialias), expected, atol=1e-12)


def test_convert_cli_writes_loadable_variables(tmp_path):
    from vitjax.convert.__main__ import cli
    from vitjax.convert.io import load_variables_and_meta
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, patch_size=8)
    torch.save(reference.state_dict(), tmp_path / "tiny.pth")
    common = ["--num_classes=1000", "--set=depth=1", "--set=patch_size=8"]
    cli(["--source=timm", "--model=vit_tiny_patch16_224", f"--checkpoint={tmp_path / 'tiny.pth'}", "--img_size=32",
         f"--out={tmp_path / 'tiny.msgpack'}"] + common)
    variables, meta = load_variables_and_meta(str(tmp_path / "tiny.msgpack"))
    assert variables["params"]["pos_embed"].shape == (1, 1 + 16, 192)
    assert meta["model"] == {"depth": 1, "patch_size": 8, "img_size": 32, "num_classes": 1000}
    # The model name, preprocessing and options travel with the file: resample needs only the new size.
    cli(["--source=resample", f"--checkpoint={tmp_path / 'tiny.msgpack'}", "--img_size=64",
         f"--out={tmp_path / 'tiny64'}"])
    variables, meta = load_variables_and_meta(str(tmp_path / "tiny64"))
    assert variables["params"]["pos_embed"].shape == (1, 1 + 64, 192)
    assert meta["model_name"] == "vit_tiny_patch16_224" and meta["model"]["img_size"] == 64
    assert meta["pretrained_cfg"]["input_size"] == [3, 64, 64]
