"""Parameter-efficient adaptation (vitjax.adapt): LoRA against peft, merge, VPT and AdaptFormer equations, errors."""
import os
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import adapt, config_utils, convert, models
from vitjax.models import layers
from vitjax.models.vit import Block, VisionTransformer
from vitjax.pytree import param_paths

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "lora_peft", "lora_peft.npz")
# The fixture's shrunk timm ViT (see tests/fixtures/lora_peft/README.md).
PEFT_VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_dim=192, num_classes=5)
PEFT_LORA = dict(method="lora", rank=4, alpha=8.0, targets=("attn/qkv", "attn/proj", "mlp/fc1"))
TINY = dict(variant="mu/4", img_size=16, in_chans=1, embed_dim=32, depth=2, num_heads=2, mlp_dim=64, num_classes=10)


def rel_error(value, reference) -> float:
    """Returns max |value - reference| / max |reference|."""
    return float(np.max(np.abs(np.asarray(value, np.float64) - reference)) / np.max(np.abs(reference)))


def peft_model_and_variables():
    """Returns (LoRA model, its variables from the fixture, images NHWC, peft's fp32 and fp64 logits)."""
    data = np.load(FIXTURE)
    state = {key[len("base/"):]: data[key] for key in data.files if key.startswith("base/")}
    variables = convert.from_timm(state, "vit_tiny_patch16_224", **PEFT_VIT)
    params = flax.core.unfreeze(variables["params"])
    for key in data.files:
        if not key.startswith("lora/"):
            continue
        # "lora/blocks.0.attn.qkv.lora_A": torch's (rank, in) A and (out, rank) B, transposed for x @ A @ B.
        *module, matrix = key[len("lora/"):].split(".")
        node = params[f"{module[0]}_{module[1]}"]
        for name in module[2:]:
            node = node[name]
        node["lora_a" if matrix == "lora_A" else "lora_b"] = data[key].T
    model = models.create("vit_tiny_patch16_224", **PEFT_VIT, adapt=PEFT_LORA)
    images = np.transpose(data["images"], (0, 2, 3, 1))
    return model, {"params": params}, images, data["logits"], data["logits64"]


def test_lora_matches_peft_on_a_rerandomised_timm_vit():
    model, variables, images, logits32, logits64 = peft_model_and_variables()
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.asarray(images)))
    assert set(param_paths(flax.linen.meta.unbox(abstract["params"]))) == set(param_paths(variables["params"]))
    assert sum("lora_" in path for path in param_paths(variables["params"])) == 12  # 3 layers x 2 blocks x (A, B)
    logits, _ = model.apply(variables, jnp.asarray(images))
    assert rel_error(logits, logits64) <= 1e-5
    assert rel_error(logits32, logits64) <= 1e-5
    # The LoRA branch matters: without it the logits are far from peft's.
    base = models.create("vit_tiny_patch16_224", **PEFT_VIT)
    plain = adapt.lora._merge_tree(variables["params"], 0.0)
    assert rel_error(base.apply({"params": plain}, jnp.asarray(images))[0], logits64) > 1e-2


def test_merge_folds_lora_into_the_kernels():
    model, variables, images, _, logits64 = peft_model_and_variables()
    merged = adapt.merge(variables, PEFT_LORA)
    assert not any("lora_" in path for path in param_paths(merged["params"]))
    base = models.create("vit_tiny_patch16_224", **PEFT_VIT)
    merged_logits, _ = base.apply(merged, jnp.asarray(images))
    unmerged_logits, _ = model.apply(variables, jnp.asarray(images))
    assert rel_error(merged_logits, np.asarray(unmerged_logits, np.float64)) <= 1e-5
    assert rel_error(merged_logits, logits64) <= 1e-5


def test_adapted_models_start_equal_to_the_base_model():
    """LoRA's B and the adapter's up-projection start at zero: the adapted model is the base model at init."""
    cases = ((dict(method="lora", rank=2, targets=("qkv", "fc2")), r"lora_b$", r"lora_a$", 4),
             (dict(method="adapter", bottleneck=4), r"adapter/up_proj/", r"adapter/down_proj/kernel", 2))
    for settings, zero, random, num_random in cases:
        params = models.create("vit", **TINY, adapt=settings).init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)))
        paths = param_paths(flax.linen.meta.unbox(params["params"]))
        zeros = [path for path in paths if re.search(zero, path)]
        assert len(zeros) == 4 and all(not np.any(np.asarray(paths[path])) for path in zeros)
        randoms = [path for path in paths if re.search(random, path)]
        assert len(randoms) == num_random and all(np.std(np.asarray(paths[path])) > 0.01 for path in randoms)


def _blocks(model: VisionTransformer, params, x):
    """Returns the tokens after applying block `index` of a plain ViT to x, for each index (a generator helper)."""
    block = Block(**{**model.block_kwargs(), "adapt_method": None})
    for index in range(model.depth):
        yield index, lambda tokens, i=index: block.apply({"params": params[f"blocks_{i}"]}, tokens)[0]


def _embed(params, images):
    """Returns the tiny ViT's tokens after patch embedding, class token and position embedding."""
    patches, _ = layers.PatchEmbed(4, 32).apply({"params": params["patch_embed"]}, images)
    cls = jnp.broadcast_to(params["cls_token"], (patches.shape[0], 1, 32))
    return jnp.concatenate([cls, patches], axis=1) + params["pos_embed"]


def _layer_norm(x, params, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * params["scale"] + params["bias"]


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_equations(deep):
    """Prompts go after the class token; deep VPT replaces them before every later block; pooling never sees them."""
    num_tokens = 3
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 1))
    model = models.create("vit", **TINY, adapt=dict(method="vpt", num_tokens=num_tokens, deep=deep))
    variables = flax.linen.meta.unbox(model.init(jax.random.PRNGKey(0), images))
    params = variables["params"]
    assert params["vpt"]["prompts"].shape == (1, num_tokens, 32)
    assert ("deep_prompts" in params["vpt"]) == deep
    if deep:
        assert params["vpt"]["deep_prompts"].shape == (TINY["depth"] - 1, num_tokens, 32)
    base = models.create("vit", **TINY)
    x = _embed(params, images)
    prompts = lambda table: jnp.broadcast_to(table, (2,) + table.shape[-2:])  # noqa: E731
    x = jnp.concatenate([x[:, :1], prompts(params["vpt"]["prompts"][0]), x[:, 1:]], axis=1)
    for index, block in _blocks(base, params, x):
        if deep and index > 0:
            x = jnp.concatenate([x[:, :1], prompts(params["vpt"]["deep_prompts"][index - 1]),
                                 x[:, 1 + num_tokens:]], axis=1)
        x = block(x)
    assert x.shape[1] == 1 + num_tokens + 16
    pooled = _layer_norm(x, params["norm"])[:, 0]
    expected = pooled @ params["head"]["kernel"] + params["head"]["bias"]
    logits, intermediates = model.apply(variables, images)
    assert rel_error(logits, np.asarray(expected, np.float64)) <= 1e-5
    assert intermediates["encoded"].shape[1] == 1 + 16  # the prompts are gone before pooling
    # The prompts act: other prompts give other logits (a random change: LayerNorm removes a constant shift).
    other = jax.tree.map(lambda leaf: leaf, variables)
    other["params"]["vpt"]["prompts"] = jax.random.normal(jax.random.PRNGKey(3), params["vpt"]["prompts"].shape)
    assert rel_error(model.apply(other, images)[0], np.asarray(logits, np.float64)) > 1e-3


def test_adaptformer_parallel_adapter_equations():
    """x = h + mlp(norm2(h)) + s * up(relu(down(h))), h the stream after attention; s = 0.1."""
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 1))
    model = models.create("vit", **TINY, adapt=dict(method="adapter", bottleneck=4, scale=0.1))
    variables = flax.linen.meta.unbox(flax.core.unfreeze(model.init(jax.random.PRNGKey(0), images)))
    params = variables["params"]
    key = jax.random.PRNGKey(2)
    for index in range(TINY["depth"]):
        up = params[f"blocks_{index}"]["adapter"]["up_proj"]
        key, sub = jax.random.split(key)
        up["kernel"] = 0.3 * jax.random.normal(sub, up["kernel"].shape)
        up["bias"] = jnp.full(up["bias"].shape, 0.05)
    base = models.create("vit", **TINY)
    x = _embed(params, images)
    attention = layers.Attention(TINY["num_heads"])
    mlp = layers.Mlp(TINY["mlp_dim"])
    for index in range(TINY["depth"]):
        block = params[f"blocks_{index}"]
        h = x + attention.apply({"params": block["attn"]}, _layer_norm(x, block["norm1"]))[0]
        adapter = block["adapter"]
        branch = jax.nn.relu(h @ adapter["down_proj"]["kernel"] + adapter["down_proj"]["bias"])
        branch = 0.1 * (branch @ adapter["up_proj"]["kernel"] + adapter["up_proj"]["bias"])
        x = h + mlp.apply({"params": block["mlp"]}, _layer_norm(h, block["norm2"])) + branch
    expected = _layer_norm(x, params["norm"])[:, 0] @ params["head"]["kernel"] + params["head"]["bias"]
    logits, _ = model.apply(variables, images)
    assert rel_error(logits, np.asarray(expected, np.float64)) <= 1e-5
    assert rel_error(logits, np.asarray(base.apply({"params": params}, images)[0], np.float64)) > 1e-3


def _abstract_init(model):
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1))))


def test_bad_settings_fail_before_compiling_naming_the_valid_choices():
    with pytest.raises(ValueError, match=r"match no Dense layer.*blocks_0/attn/qkv.*blocks_0/mlp/fc1"):
        _abstract_init(models.create("vit", **TINY, adapt=dict(method="lora", targets=("qkv", "nonexistent"))))
    with pytest.raises(ValueError, match=r"rank=40 exceeds min\(in, out\) = min\(32, 32\).*blocks_0/attn/proj"):
        _abstract_init(models.create("vit", **TINY, adapt=dict(method="lora", rank=40, targets=("proj",))))
    with pytest.raises(ValueError,
                       match=r"Unknown adaptation method 'loraa'; valid choices: \['adapter', .*'hst', 'lora', "):
        models.create("vit", **TINY, adapt=dict(method="loraa"))
    with pytest.raises(ValueError, match=r"adapt.num_tokens does not apply to method 'lora'"):
        adapt.parse(dict(adapt.SECTION_DEFAULTS, method="lora", num_tokens=5))
    with pytest.raises(ValueError, match="needs scan=False"):
        models.create("vit", **TINY, scan=True, adapt=dict(method="vpt", deep=True))
    convnext = models.create("convnext_atto", num_classes=10)
    with pytest.raises(ValueError, match=r"ConvNeXt has none. Models with it: \[\"VisionTransformer"):
        adapt.attach(convnext, dict(method="lora"))
    config = config_utils.load_config("configs/digits_vit.py:runlocal", {"adapt.method": "prompt"})
    with pytest.raises(ValueError,
                       match=r"adapt.method='prompt' is not valid; valid choices: \['adapter', .*'hst', 'lora', "):
        config_utils.validate_config(config)
    config = config_utils.load_config("configs/digits_vit.py:runlocal", {"adapt.method": "lora"})
    with pytest.raises(ValueError, match="set config.init_from to the base weights"):
        config_utils.validate_config(config)


VPT_FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "vpt_official", "vpt_official.npz")


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_matches_the_official_code(deep):
    """KMnP/vpt's PromptedVisionTransformer (MAE backbone, img_pool) on a re-randomised tiny ViT: <= 1e-5."""
    data = np.load(VPT_FIXTURE)
    tag = "deep" if deep else "shallow"
    state = {key[len("state/"):]: data[key] for key in data.files if key.startswith("state/")}
    settings = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_dim=128, num_classes=5,
                    global_pool="avg", fc_norm=True)
    params = flax.core.unfreeze(convert.from_timm(state, "vit_tiny_patch16_224", **settings)["params"])
    params["vpt"] = {"prompts": data[f"{tag}/prompt_embeddings"]}
    if deep:
        params["vpt"]["deep_prompts"] = data[f"{tag}/deep_prompt_embeddings"]
    model = models.create("vit_tiny_patch16_224", **settings, adapt=dict(method="vpt", num_tokens=3, deep=deep))
    logits, _ = model.apply({"params": params}, jnp.asarray(np.transpose(data["images"], (0, 2, 3, 1))))
    assert rel_error(logits, data[f"{tag}/logits64"]) <= 1e-5
    assert rel_error(data[f"{tag}/logits"], data[f"{tag}/logits64"]) <= 1e-5


ADAPTFORMER_FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "adaptformer_official",
                                   "adaptformer_official.npz")


def test_adapter_matches_the_official_adaptformer():
    """ShoufaChen/AdaptFormer's ViT (parallel adapter, s = 0.1, bottleneck 8) on a re-randomised tiny ViT: <= 1e-5."""
    data = np.load(ADAPTFORMER_FIXTURE)
    state = {key[len("state/"):]: data[key] for key in data.files
             if key.startswith("state/") and ".adaptmlp." not in key}
    settings = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=128, num_classes=5,
                    global_pool="avg", fc_norm=True)
    params = flax.core.unfreeze(convert.from_timm(state, "vit_tiny_patch16_224", **settings)["params"])
    for index in range(2):
        params[f"blocks_{index}"]["adapter"] = {
            layer: {"kernel": data[f"state/blocks.{index}.adaptmlp.{layer}.weight"].T,
                    "bias": data[f"state/blocks.{index}.adaptmlp.{layer}.bias"]} for layer in ("down_proj", "up_proj")}
    model = models.create("vit_tiny_patch16_224", **settings, adapt=dict(method="adapter", bottleneck=8, scale=0.1))
    logits, _ = model.apply({"params": params}, jnp.asarray(np.transpose(data["images"], (0, 2, 3, 1))))
    assert rel_error(logits, data["logits64"]) <= 1e-5
    assert rel_error(data["logits"], data["logits64"]) <= 1e-5
