"""Every registered model builds with timm's parameter count; one small variant per family runs a forward and
a backward pass with finite values."""
import json
import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import models, optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each family compiles one small model: a persistent compilation cache makes reruns lookups (as test_train).
if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "vitjax_jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

with open(os.path.join(REPO, "experiments", "out", "model_table.json")) as _file:
    # params_m has 6 decimals: the exact count, which experiments/model_table.py checked against timm's.
    PARAMS = {name: round(row["params_m"] * 1e6) for name, row in json.load(_file)["rows"].items()}
# "vit" builds a variant string, "B/16" by default: timm's vit_base_patch16_224.
PARAMS["vit"] = PARAMS["vit_base_patch16_224"]


def native_inputs(model) -> tuple:
    """Returns the batch-1 inputs of `model` at its registered sizes: (images,), or (images, tokens) for CLIP."""
    if hasattr(model, "example_inputs"):
        return tuple(model.example_inputs(1))
    size = getattr(model, "img_size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return (jax.ShapeDtypeStruct((1, height, width, getattr(model, "in_chans", 3)), jnp.float32),)


def test_every_registered_model_is_in_the_table():
    assert set(models.list_models()) == set(PARAMS)
    assert len(PARAMS) >= 130


@pytest.mark.parametrize("name", models.list_models())
def test_parameter_count_matches_timm(name):
    model = models.create(name)
    shapes = jax.eval_shape(model.init, {"params": jax.random.key(0)}, *native_inputs(model))
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nn.meta.unbox(shapes["params"])))
    assert count == PARAMS[name]


# One small variant per family: (registered name, overrides, image size), about as small as the family
# allows (every stride divides the image; CrossViT's two patch sizes need 120 px).
SMALL = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, num_classes=10), 32),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, embed_dim=16, depths=(1, 2), num_heads=(1, 2),
                                                   window_size=4, num_classes=10), 32),
    "convnext": ("convnext_atto", dict(img_size=32, depths=(1, 1, 1, 1), dims=(16, 24, 32, 40), num_classes=10), 32),
    "cvt": ("cvt_13", dict(img_size=32, embed_dims=(16, 32, 48), depths=(1, 1, 1), num_heads=(1, 2, 3),
                           num_classes=10), 32),
    "crossvit": ("crossvit_tiny_240", dict(img_size=120, embed_dim=(24, 48), num_heads=(2, 4),
                                           depth=((1, 1, 0),), num_classes=10), 120),
    "tnt": ("tnt_s_patch16_224", dict(img_size=32, embed_dim=48, inner_dim=8, depth=2, num_heads_outer=3,
                                      num_heads_inner=2, num_classes=10), 32),
    "convit": ("convit_tiny", dict(img_size=32, patch_size=8, depth=3, local_up_to_layer=2, num_classes=10), 32),
    "metaformer": ("caformer_s18", dict(img_size=32, depths=(1, 1, 1, 1), dims=(16, 32, 64, 96),
                                        num_classes=10), 32),
    "tiny_vit": ("tiny_vit_5m_224", dict(img_size=64, embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1),
                                         num_heads=(1, 2, 3, 4), window_sizes=(7, 8, 3, 2), num_classes=10), 64),
    "levit": ("levit_128s", dict(img_size=64, embed_dim=(32, 48, 64), depth=(1, 1, 1), num_heads=(2, 3, 4),
                                 num_classes=10), 64),
    # Two towers: the "head" is the pair of (B, embed_dim) features (see `model_inputs`).
    "clip": ("clip_vit_tiny_digits", dict(embed_dim=10, vision_width=32, text_width=32, vocab_size=100,
                                          context_length=8), 16),
    "resnet": ("resnet26d", dict(img_size=32, depths=(1, 1, 1, 1), widths=(8, 8, 16, 16), num_classes=10), 32),
    "lookupvit": ("lookupvit_base_patch16_224_7x7", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                                         compressed_grid=(2, 2), num_classes=10), 32),
    "t2t_vit": ("t2t_vit_7", dict(img_size=32, embed_dim=32, depth=2, num_heads=2, token_dim=16, num_classes=10), 32),
    "hornet": ("hornet_tiny_gf", dict(img_size=32, base_dim=8, depths=(1, 1, 1, 1), num_classes=10), 32),
    "crossformer": ("crossformer_tiny", dict(img_size=16, embed_dim=16, depths=(2, 1), num_heads=(1, 2),
                                             group_sizes=(3, 2), intervals=(1, 1), merge_sizes=((2, 4),),
                                             num_classes=10), 16),
    "rmt": ("rmt_b", dict(img_size=16, embed_dims=(16, 16), depths=(1, 1), num_heads=(2, 2), init_values=(2, 2),
                          heads_ranges=(4, 6), mlp_ratios=(2, 2), decomposed=(True, False), layer_scales=(False, True),
                          projection=16, num_classes=10), 16),
    "spectformer": ("spectformer-xs", dict(img_size=32, patch_size=8, embed_dim=16, depth=2, spectral_depth=1,
                                           num_heads=2, num_classes=10), 32),
    "hyena_nd": ("hyena2dattn_deit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                                                           filter_order=8, num_classes=10), 32),
    "fcaformer": ("fcaformer_l1", dict(img_size=32, embed_dims=(8, 8, 16, 16), depths=(1, 1, 2, 2),
                                       num_heads=(0, 0, 2, 2), num_classes=10), 32),
    # 56 px: a 14x14 first stage, the smallest map the official sr 4 merge lengths fit; two stages.
    "sgformer": ("sgformer_s", dict(img_size=56, embed_dims=(8, 16), depths=(2, 1), num_heads=(2, 2), mlp_ratios=(4, 4),
                                    sr_ratios=(4, 1), num_classes=10), 56),
    "channelvit": ("hcs_channelvit_tiny", dict(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                                               num_classes=10), 16),
    "activator": ("activator", dict(img_size=16, embed_dim=16, hidden_dim=24, depth=2, num_classes=10), 16),
    "regnet": ("regnety_002", dict(img_size=32, w0=8, wa=8.0, wm=2.0, depth=6, group_size=8, num_classes=10), 32),
    # Stitch 2: the small anchor's first block, a LoRA stitching layer, the large anchor's second block and head.
    "snnet": ("snnetv2_deit3_s_b", dict(img_size=16, anchor_options=(
        dict(variant="mu/4", embed_dim=16, depth=2, num_heads=2, mlp_dim=32, init_values=1e-4, no_embed_class=True),
        dict(variant="mu/4", embed_dim=24, depth=2, num_heads=2, mlp_dim=48, init_values=1e-4, no_embed_class=True)),
        lora_rank=2, default_stitch=2, num_classes=10), 16),
}


def model_inputs(model, images):
    """Returns the apply inputs of a small model: the images, and for a two-tower model tokens too."""
    if not hasattr(model, "context_length"):
        return (images,)
    tokens = jnp.asarray(np.arange(images.shape[0] * model.context_length).reshape(images.shape[0], -1)
                         % model.vocab_size, jnp.int32)
    return images, tokens


def model_heads(output):
    """Returns the (B, 10) outputs a small model's test loss reads: logits (two for DeiT), or CLIP's per-dimension
    scaled similarities (every parameter reaches them; unit-norm features alone would give a constant loss)."""
    if isinstance(output, dict):
        return (output["image"] * output["text"] * output["scale"],)
    return output if isinstance(output, (tuple, list)) else (output,)


def random_variables(model, images):
    """Returns variables of `model` shaped as its init's, filled from numpy: compiling the real init (one
    truncated-normal initialiser per param) takes longer than compiling the forward and backward."""
    rng = np.random.RandomState(0)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        # Norm scales, layer scales and running variances near 1, everything else near 0.
        center = 1.0 if name in ("scale", "gamma", "var") else 0.0
        return jnp.asarray(center + 0.05 * rng.standard_normal(leaf.shape), leaf.dtype)

    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, *model_inputs(model, images)))
    return jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(shapes))


def test_every_family_has_a_small_variant():
    assert {models.model_family(name) for name in models.list_models()} == set(SMALL)


@pytest.mark.parametrize("family", sorted(SMALL))
def test_forward_and_backward_are_finite(family):
    name, overrides, size = SMALL[family]
    assert models.model_family(name) == family
    model = models.create(name, **overrides)
    images = jax.random.normal(jax.random.key(1), (2, size, size, 3))
    variables = random_variables(model, images)
    params = variables["params"]
    state = {key: value for key, value in variables.items() if key != "params"}

    @jax.jit
    def forward_backward(params, images, rng):
        def loss(params):
            dropout_rng, drop_path_rng = jax.random.split(rng)
            (output, _), _ = model.apply({"params": params, **state}, *model_inputs(model, images), train=True,
                                         mutable=list(state), rngs={"dropout": dropout_rng, "drop_path": drop_path_rng})
            heads = model_heads(output)
            return sum(jnp.mean(jnp.square(head)) for head in heads), heads
        return jax.value_and_grad(loss, has_aux=True)(params)

    (value, heads), grads = forward_backward(params, images, jax.random.key(2))
    assert all(head.shape == (2, 10) for head in heads)
    assert all(bool(jnp.all(jnp.isfinite(head))) for head in heads) and np.isfinite(float(value))
    grads = {path: np.asarray(grad) for path, grad in optim.param_paths(grads).items()}
    assert all(np.all(np.isfinite(grad)) for grad in grads.values())
    # The gradient reaches every layer group, stem to head. (Not every tensor: at these sizes some are
    # structurally idle, e.g. a 1x1 LeViT stage's attention bias, or the patch queries of CvT's last block.)
    ids, num_layers = model.layer_ids(params)
    reached = {layer_id for path, layer_id in ids.items() for layer_id in np.ravel(layer_id) if np.any(grads[path])}
    assert reached == set(range(num_layers + 2))
