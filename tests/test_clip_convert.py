"""CLIP and SigLIP weights in: parity with open_clip 3.3.0 and transformers' SiglipModel on re-randomised shrunk
models (built through their own constructors), converter errors, and the registered sizes' parameter counts."""
import numpy as np
import pytest

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from parity_utils import randomize_, relative_error  # noqa: E402
from vitjax import convert, models  # noqa: E402

CLIP_SETTINGS = dict(img_size=32, patch_size=8, embed_dim=32, vision_width=64, vision_depth=2, vision_heads=2,
                     context_length=16, vocab_size=500, text_width=48, text_depth=2, text_heads=2)
SIGLIP_SETTINGS = dict(img_size=32, patch_size=8, embed_dim=32, vision_width=32, vision_depth=2, vision_heads=2,
                       vision_mlp_ratio=2.0, context_length=12, vocab_size=300, text_width=48, text_depth=2,
                       text_heads=2, text_mlp_ratio=2.0)


def open_clip_reference(quick_gelu: bool) -> torch.nn.Module:
    """Returns a re-randomised shrunk open_clip CLIP (patch 8 at 32 px, two blocks per tower)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    torch.manual_seed(0)
    reference = CLIP(embed_dim=32, quick_gelu=quick_gelu,
                     vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32),
                     text_cfg=CLIPTextCfg(context_length=16, vocab_size=500, width=48, heads=2, layers=2)).eval()
    randomize_(reference, seed=1, std=0.15)
    return reference


def siglip_reference() -> torch.nn.Module:
    """Returns a re-randomised shrunk transformers SiglipModel."""
    config = transformers.SiglipConfig(
        text_config=dict(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=12, projection_size=32,
                         bos_token_id=None, eos_token_id=None, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8))
    torch.manual_seed(0)
    reference = transformers.SiglipModel(config).eval()
    randomize_(reference, seed=1, std=0.15)
    return reference


def inputs(context_length: int, vocab_size: int, eot: bool):
    rng = np.random.RandomState(0)
    images = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    tokens = rng.randint(1, vocab_size - 2, (2, context_length))
    if eot:  # CLIP: <start> ... <end> (the largest id) then padding 0; the second row fills the context
        tokens[0, 5:] = 0
        tokens[0, 0], tokens[0, 4] = vocab_size - 2, vocab_size - 1
        tokens[1, 0], tokens[1, -1] = vocab_size - 2, vocab_size - 1
    return images, tokens


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_open_clip_parity(quick_gelu):
    reference = open_clip_reference(quick_gelu)
    settings = dict(CLIP_SETTINGS, mlp_activation="quick_gelu" if quick_gelu else "gelu")
    variables = convert.from_open_clip(reference.state_dict(), "clip_vit_b32", **settings)
    model = models.create("clip_vit_b32", **settings)
    images, tokens = inputs(16, 500, eot=True)
    with torch.no_grad():
        image_ref = reference.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
        text_ref = reference.encode_text(torch.from_numpy(tokens)).numpy()
        scale_ref = float(reference.logit_scale.exp())
    image = model.apply(variables, images, normalize=False, method=model.encode_image)
    text = model.apply(variables, jnp.asarray(tokens, jnp.int32), normalize=False, method=model.encode_text)
    assert relative_error(image, image_ref) <= 1e-5
    assert relative_error(text, text_ref) <= 1e-5
    outputs, _ = model.apply(variables, images, jnp.asarray(tokens, jnp.int32))
    np.testing.assert_allclose(float(outputs["scale"]), scale_ref, rtol=1e-6)
    assert relative_error(outputs["image"], image_ref / np.linalg.norm(image_ref, axis=-1, keepdims=True)) <= 1e-5


def test_siglip_parity():
    reference = siglip_reference()
    variables = convert.from_transformers(reference.state_dict(), "siglip_base_patch16_224", **SIGLIP_SETTINGS)
    model = models.create("siglip_base_patch16_224", **SIGLIP_SETTINGS)
    images, tokens = inputs(12, 300, eot=False)
    pixels, ids = torch.from_numpy(images.transpose(0, 3, 1, 2)), torch.from_numpy(tokens)
    with torch.no_grad():
        out = reference(input_ids=ids, pixel_values=pixels)
        image_ref = reference.vision_model(pixel_values=pixels).pooler_output.numpy()
        text_ref = reference.text_model(input_ids=ids).pooler_output.numpy()
    image = model.apply(variables, images, normalize=False, method=model.encode_image)
    text = model.apply(variables, jnp.asarray(tokens, jnp.int32), normalize=False, method=model.encode_text)
    assert relative_error(image, image_ref) <= 1e-5
    assert relative_error(text, text_ref) <= 1e-5
    outputs, _ = model.apply(variables, images, jnp.asarray(tokens, jnp.int32))
    logits = outputs["text"] @ outputs["image"].T * outputs["scale"] + outputs["bias"]
    assert relative_error(logits, out.logits_per_text.numpy()) <= 1e-5


def test_converter_errors_name_the_key():
    state = {key: value.numpy() for key, value in open_clip_reference(False).state_dict().items()}
    missing = dict(state)
    del missing["visual.ln_pre.weight"]
    with pytest.raises(KeyError, match="visual.ln_pre.weight"):
        convert.from_open_clip(missing, "clip_vit_b32", **CLIP_SETTINGS)
    with pytest.raises(KeyError, match="visual.extra"):
        convert.from_open_clip({**state, "visual.extra": np.zeros(3)}, "clip_vit_b32", **CLIP_SETTINGS)
    with pytest.raises(ValueError, match="text/pos_embed"):  # a 16-token checkpoint into a 20-token model
        convert.from_open_clip(state, "clip_vit_b32", **dict(CLIP_SETTINGS, context_length=20))
    with pytest.raises(ValueError, match="from_transformers"):
        convert.from_open_clip(state, "siglip_base_patch16_224")
    with pytest.raises(ValueError, match="valid choices"):
        convert.from_open_clip(state, "vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="from_open_clip"):
        convert.from_timm(state, "clip_vit_b32")


def test_image_position_embedding_is_resampled():
    state = open_clip_reference(False).state_dict()
    variables = convert.from_open_clip(state, "clip_vit_b32", **dict(CLIP_SETTINGS, img_size=48))
    assert variables["params"]["visual"]["pos_embed"].shape == (1, 1 + 6 * 6, 64)


def test_registered_sizes_match_reference_parameter_counts():
    # open_clip 3.3.0's ViT-B-32 / ViT-B-16 / ViT-L-14 and transformers' SiglipConfig() (siglip-base-patch16-224),
    # counted on the meta device from their own constructors.
    from open_clip.model import CLIP
    with torch.device("meta"):
        expected = {name: sum(p.numel() for p in CLIP(**open_clip.get_model_config(config)).parameters())
                    for name, config in (("clip_vit_b32", "ViT-B-32"), ("clip_vit_l14", "ViT-L-14"))}
        expected["siglip_base_patch16_224"] = sum(
            p.numel() for p in transformers.SiglipModel(transformers.SiglipConfig()).parameters())
    for name, count in expected.items():
        model = models.create(name)
        shapes = jax.eval_shape(model.init, jax.random.key(0), *model.example_inputs(1))
        assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nn.meta.unbox(shapes["params"]))) == count, name


def test_a_clip_image_tower_fine_tunes_into_a_classifier_through_init_from(tmp_path):
    """An open_clip .pth into a 10-class ViT: the image tower loads as is, the head is re-initialised, and the
    classifier's pre-logits projected by CLIP's image projection are open_clip's image features."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from vitjax import weights
    from vitjax.convert import clip as clip_convert
    torch.manual_seed(0)
    reference = CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(layers=2, width=128, patch_size=8, image_size=32),
                     text_cfg=CLIPTextCfg(context_length=8, vocab_size=100, width=64, heads=1, layers=1)).eval()
    randomize_(reference, seed=2, std=0.1)
    torch.save(reference.state_dict(), tmp_path / "clip.pth")
    settings = clip_convert.settings_from_state_dict({k: v.numpy() for k, v in reference.state_dict().items()})
    assert (settings["vision_heads"], settings["vision_depth"], settings["img_size"], settings["text_heads"]) == \
        (2, 2, 32, 1)
    classifier_settings = models.create("clip_vit_b32", **settings).classifier_settings(num_classes=10)
    classifier = models.create("vit", **classifier_settings)
    images = np.random.RandomState(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    abstract = jax.eval_shape(classifier.init, jax.random.key(0), images)
    pretrained = weights.load(str(tmp_path / "clip.pth"), model_name="vit", model_overrides=classifier_settings)
    plan = weights.plan(nn.meta.unbox(abstract), pretrained)
    counts = plan.counts()
    # patch kernel, cls, pos, norm_pre (2), norm (2) and 12 tensors per block; the head is new.
    assert counts["re-initialised"] == 2 and counts["loaded"] == 7 + 2 * 12, plan.table()
    assert "'visual' subtree" in plan.description
    fresh = jax.tree.map(np.asarray, nn.meta.unbox(classifier.init(jax.random.key(0), images)))
    variables = plan.apply(fresh)
    logits, intermediates = classifier.apply(variables, images)
    assert logits.shape == (2, 10)
    with torch.no_grad():
        expected = reference.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    features = np.asarray(intermediates["pre_logits"]) @ reference.visual.proj.detach().numpy()
    assert relative_error(features, expected) <= 1e-5


def test_command_line_converts_open_clip(tmp_path):
    from vitjax.convert import io
    from vitjax.convert.__main__ import convert as convert_command
    state = open_clip_reference(False).state_dict()
    torch.save(state, tmp_path / "clip.pth")
    settings = dict(CLIP_SETTINGS)
    path, meta = convert_command("open_clip", str(tmp_path / "clip.pth"), str(tmp_path / "clip.msgpack"),
                                 model="clip_vit_b32", overrides=settings)
    variables, stored = io.load_variables_and_meta(path)
    expected = convert.from_open_clip(state, "clip_vit_b32", **settings)
    jax.tree.map(np.testing.assert_array_equal, variables["params"], expected["params"])
    assert stored["model_name"] == "clip_vit_b32" and stored["pretrained_cfg"]["input_size"] == [3, 32, 32]
    with pytest.raises(ValueError, match="needs --model"):
        convert_command("open_clip", str(tmp_path / "clip.pth"), str(tmp_path / "x.msgpack"))
