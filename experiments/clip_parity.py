"""CLIP / SigLIP parity: vitjax's tokenizers and converted models against open_clip and transformers.

    python experiments/clip_parity.py            # -> experiments/out/clip_parity.{md,json}, about 2 minutes on a CPU

Weights are re-randomised (norm scales 1 + N(0, 0.1), every other tensor N(0, std)), so the comparison does
not hinge on the reference's init. Shrunk models are built through the references' own constructors
(open_clip's CLIP with CLIPVisionCfg / CLIPTextCfg; transformers' SiglipModel with a SiglipConfig); the full
sizes are open_clip's ViT-B-32 and transformers' default SiglipConfig (siglip-base-patch16-224). Relative
error = max |ours - reference| / max |reference|, fp32.
"""
import argparse
import os
import sys
import time

import torch  # noqa: F401  (before TensorFlow, which vitjax.data would import; see tests/conftest.py)
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from experiment_io import write_outputs  # noqa: E402
from vitjax import convert, models, text  # noqa: E402

CORPUS = [
    "a photo of a cat", "A Photo of THE Number Seven!!", "  spaces\tand\nnewlines  ", "naïve café — déjà vu",
    "日本語のテキスト", "emoji 😀🐍 and ✨ sparkles", "&amp; html &lt;b&gt; entities", "don't we'll they're I'd",
    "numbers 1234567 and 3.14159", "<start_of_text> inside <end_of_text>", "mojibake: cafÃ©", "",
    "Ελληνικά και русский текст", "العربية", "x" * 300, " ".join(["word"] * 100), "½ ² ³ ① Ⅻ",
    "A  bird's-eye view of the Eiffel Tower, at dusk (2019)", "zero-shot CLIP; ViT-B/32 @ 224px",
]


def randomize(module: torch.nn.Module, seed: int, std: float) -> None:
    """Redraws every float tensor of `module` in place: LayerNorm scales near 1, everything else N(0, std)."""
    scales = {f"{name}.weight" for name, sub in module.named_modules() if isinstance(sub, torch.nn.LayerNorm)}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator)
                tensor.copy_(1 + 0.1 * noise if key in scales else std * noise)


def relative_error(ours, reference) -> float:
    """Returns max |ours - reference| / max |reference|."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def features(model, variables, images, tokens):
    """Returns (image, text) unnormalised features of a vitjax CLIP."""
    image = jax.jit(lambda v, x: model.apply(v, x, normalize=False, method=model.encode_image))(variables, images)
    txt = jax.jit(lambda v, t: model.apply(v, t, normalize=False, method=model.encode_text))(
        variables, jnp.asarray(tokens, jnp.int32))
    return np.asarray(image), np.asarray(txt)


def open_clip_row(reference, name: str, settings: dict, image_size: int, tokens: np.ndarray) -> dict:
    """Returns the image and text feature errors of open_clip `reference` converted to `name` with `settings`."""
    images = np.random.RandomState(0).standard_normal((2, image_size, image_size, 3)).astype(np.float32)
    variables = convert.from_open_clip(reference.state_dict(), name, **settings)
    image, txt = features(models.create(name, **settings), variables, images, tokens)
    with torch.no_grad():
        image_ref = reference.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
        text_ref = reference.encode_text(torch.from_numpy(tokens.astype(np.int64))).numpy()
    return dict(image=relative_error(image, image_ref), text=relative_error(txt, text_ref))


def siglip_row(reference, settings: dict, image_size: int, tokens: np.ndarray) -> dict:
    """Returns the image, text and logit errors of transformers SiglipModel `reference` converted to vitjax."""
    name = "siglip_base_patch16_224"
    images = np.random.RandomState(0).standard_normal((2, image_size, image_size, 3)).astype(np.float32)
    model = models.create(name, **settings)
    variables = convert.from_transformers(reference.state_dict(), name, **settings)
    image, txt = features(model, variables, images, tokens)
    outputs, _ = jax.jit(model.apply)(variables, images, jnp.asarray(tokens, jnp.int32))
    logits = outputs["text"] @ outputs["image"].T * outputs["scale"] + outputs["bias"]
    pixels, ids = torch.from_numpy(images.transpose(0, 3, 1, 2)), torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        out = reference(input_ids=ids, pixel_values=pixels)
        image_ref = reference.vision_model(pixel_values=pixels).pooler_output.numpy()
        text_ref = reference.text_model(input_ids=ids).pooler_output.numpy()
    return dict(image=relative_error(image, image_ref), text=relative_error(txt, text_ref),
                logits=relative_error(logits, out.logits_per_text.numpy()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    args = parser.parse_args()
    import open_clip
    import transformers
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    start = time.time()
    results = {"versions": dict(jax=jax.__version__, open_clip=open_clip.__version__,
                                transformers=transformers.__version__, torch=torch.__version__)}

    ours = text.tokenizer("clip")(CORPUS)
    theirs = open_clip.get_tokenizer("ViT-B-32")(CORPUS).numpy()
    results["clip_tokenizer"] = dict(texts=len(CORPUS), identical=int(np.sum(np.all(ours == theirs, axis=1))))

    tokens = np.random.RandomState(1).randint(1, 498, (2, 16))
    tokens[0, 5:] = 0
    tokens[:, 0], tokens[0, 4], tokens[1, -1] = 498, 499, 499   # start ... end (the largest id), padding
    shrunk = dict(img_size=32, patch_size=8, embed_dim=32, vision_width=64, vision_depth=2, vision_heads=2,
                  context_length=16, vocab_size=500, text_width=48, text_depth=2, text_heads=2)
    for quick_gelu in (False, True):
        torch.manual_seed(0)
        reference = CLIP(embed_dim=32, quick_gelu=quick_gelu,
                         vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32),
                         text_cfg=CLIPTextCfg(context_length=16, vocab_size=500, width=48, heads=2, layers=2)).eval()
        randomize(reference, seed=1, std=0.15)
        activation = "quick_gelu" if quick_gelu else "gelu"
        results[f"open_clip shrunk ({activation})"] = open_clip_row(
            reference, "clip_vit_b32", dict(shrunk, mlp_activation=activation), 32, tokens)

    torch.manual_seed(0)
    reference = CLIP(**open_clip.get_model_config("ViT-B-32")).eval()
    randomize(reference, seed=3, std=0.02)
    clip_tokens = text.tokenizer("clip")(["a photo of a cat", "a diagram of the number seven, drawn in ink"])
    results["open_clip ViT-B-32 (std 0.02)"] = open_clip_row(reference, "clip_vit_b32", {}, 224, clip_tokens)

    config = transformers.SiglipConfig(
        text_config=dict(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=12, projection_size=32,
                         bos_token_id=None, eos_token_id=None, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8))
    torch.manual_seed(0)
    reference = transformers.SiglipModel(config).eval()
    randomize(reference, seed=1, std=0.15)
    siglip_shrunk = dict(img_size=32, patch_size=8, embed_dim=32, vision_width=32, vision_depth=2, vision_heads=2,
                         vision_mlp_ratio=2.0, context_length=12, vocab_size=300, text_width=48, text_depth=2,
                         text_heads=2, text_mlp_ratio=2.0)
    siglip_tokens = np.random.RandomState(2).randint(0, 300, (2, 12))
    results["SigLIP shrunk"] = siglip_row(reference, siglip_shrunk, 32, siglip_tokens)

    torch.manual_seed(0)
    reference = transformers.SiglipModel(transformers.SiglipConfig()).eval()
    randomize(reference, seed=3, std=0.02)
    results["SigLIP base (std 0.02)"] = siglip_row(reference, {}, 224,
                                                   np.random.RandomState(2).randint(0, 32000, (2, 64)))
    results["seconds"] = time.time() - start

    lines = ["| check | image | text | logits |", "|---|---:|---:|---:|"]
    for key, row in results.items():
        if isinstance(row, dict) and "image" in row:
            logits = f"{row['logits']:.1e}" if "logits" in row else ""
            lines.append(f"| {key} | {row['image']:.1e} | {row['text']:.1e} | {logits} |")
    tokenizer = results["clip_tokenizer"]
    table = "\n".join(lines) + (f"\n\nCLIP BPE tokenizer vs open_clip {open_clip.__version__}: "
                                f"{tokenizer['identical']} of {tokenizer['texts']} texts give identical ids.")
    write_outputs(args.out, "clip_parity", table, results)
    print(table)
    print(f"({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
