"""CLIP (Radford et al. 2021) and SigLIP (Zhai et al. 2023): an image tower and a text tower in one embedding.

    model = vitjax.models.create("clip_vit_tiny_digits")
    out, intermediates = model.apply(variables, images, tokens)     # tokens: int32 (B, context_length)
    out["image"], out["text"]   # (B, embed_dim) unit-norm features
    out["scale"], out["bias"]   # exp(logit_scale); SigLIP's logit bias (None for CLIP)
    model.apply(variables, images, method=model.encode_image)       # (B, embed_dim)

The image tower is the registered `VisionTransformer` (params under "visual"), so a CLIP image tower
fine-tunes into a classifier by a plain sub-tree copy (`vitjax.weights`). CLIP (open_clip) pools the class
token after the final norm and projects it without bias; its text tower is causal and pools the
end-of-text token, the largest id of each row. SigLIP (transformers' SiglipModel) pools the image with an
attention head (MAP) and no projection; its text tower is bidirectional, pools the last position and
projects with a bias.
"""
import math
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import layers, param_groups
from vitjax.models.registry import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD, OPENAI_CLIP_MEAN, \
    OPENAI_CLIP_STD, register_model
from vitjax.models.vit import VisionTransformer

TEXT_POOLS = ("argmax", "last")
IMAGE_POOLS = ("token", "map")
CLIP_VOCAB_SIZE = 49408  # open_clip's BPE: 49152 merges + 256 bytes, <start_of_text>, <end_of_text>


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Returns `x` divided by its L2 norm over the last axis (at least `eps`), as torch's F.normalize."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


class TextBlock(nn.Module):
    """Pre-norm transformer block with an attention bias (the causal mask); param names as `vit.Block`."""

    num_heads: int
    mlp_dim: int
    norm_eps: float = 1e-5
    mlp_activation: str = "gelu"
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: Optional[jax.Array], train: bool = False) -> jax.Array:
        norm = lambda name: layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, name)  # noqa: E731
        y, _ = layers.Attention(self.num_heads, norm_eps=self.norm_eps, attention_impl=self.attention_impl,
                                dtype=self.dtype, param_dtype=self.param_dtype, name="attn")(
            norm("norm1")(x), bias=bias, train=train)
        x = x + y
        y = layers.Mlp(self.mlp_dim, activation=layers.activation(self.mlp_activation), dtype=self.dtype,
                       param_dtype=self.param_dtype, name="mlp")(norm("norm2")(x), train)
        return layers.constrain(x + y, ("batch", "length", "embed"))


class TextTransformer(nn.Module):
    """The text tower; returns (features (B, output_dim), intermediates) for int token ids (B, L <= context).

    pool "argmax": the position of each row's largest id (CLIP's end-of-text token; open_clip's argmax pool),
    "last": the last position (SigLIP, whose texts are padded to the full context).
    """

    vocab_size: int = CLIP_VOCAB_SIZE
    context_length: int = 77
    width: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_ratio: float = 4.0
    output_dim: int = 512
    causal: bool = True
    pool: str = "argmax"
    proj_bias: bool = False
    norm_eps: float = 1e-5
    mlp_activation: str = "gelu"
    remat: bool = False
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
        length = tokens.shape[1]
        x = nn.Embed(self.vocab_size, self.width, embedding_init=layers.logical(
            nn.initializers.normal(0.02), ("vocab", "embed")), dtype=self.dtype, param_dtype=self.param_dtype,
            name="token_embed")(tokens)
        posemb = self.param("pos_embed", layers.logical(nn.initializers.normal(0.01), (None, "embed")),
                            (self.context_length, self.width), self.param_dtype)
        x = layers.constrain(x + posemb[:length].astype(x.dtype)[None], ("batch", "length", "embed"))
        bias = None
        if self.causal:
            # -inf above the diagonal: every row keeps its own position, so no row is all -inf.
            bias = jnp.asarray(np.triu(np.full((length, length), -np.inf, np.float32), 1))[None, None]
        block_cls = nn.remat(TextBlock, static_argnums=(3,)) if self.remat else TextBlock
        blocks = []
        for index in range(self.depth):
            x = block_cls(self.num_heads, int(self.width * self.mlp_ratio), norm_eps=self.norm_eps,
                          mlp_activation=self.mlp_activation, attention_impl=self.attention_impl,
                          dtype=self.dtype, param_dtype=self.param_dtype, name=f"blocks_{index}")(x, bias, train)
            blocks.append(x)
        x = layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, name="norm")(x)
        if self.pool == "argmax":
            pooled = x[jnp.arange(x.shape[0]), jnp.argmax(tokens, axis=-1)]
        else:
            pooled = x[:, -1]
        features = nn.Dense(self.output_dim, use_bias=self.proj_bias,
                            kernel_init=layers.logical(nn.initializers.normal(self.width ** -0.5), ("embed", "mlp")),
                            dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(pooled)
        return features, {"blocks": blocks, "encoded": x, "pre_logits": pooled}


class CLIP(param_groups.LayerGroups, nn.Module):
    """Two towers and a learnable temperature (and SigLIP's bias); `__call__` returns (outputs, intermediates).

    outputs: image (B, E) and text (B, E) unit-norm float32 features, scale = exp(logit_scale) and bias
    (None without `init_logit_bias`). Image pool "token" is CLIP's (class token, `pre_norm`, no patch bias,
    projection without bias), "map" SigLIP's (attention pooling of the patches, no projection: the image
    width must equal `embed_dim`). Text pool and causality as `TextTransformer`.
    """

    embed_dim: int = 512
    # The image tower.
    img_size: int = 224
    patch_size: int = 32
    in_chans: int = 3
    vision_width: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    vision_mlp_ratio: float = 4.0
    image_pool: str = "token"
    # The text tower.
    vocab_size: int = CLIP_VOCAB_SIZE
    context_length: int = 77
    text_width: int = 512
    text_depth: int = 12
    text_heads: int = 8
    text_mlp_ratio: float = 4.0
    text_pool: str = "argmax"
    text_causal: bool = True
    text_proj_bias: bool = False
    # Both.
    mlp_activation: str = "gelu"
    norm_eps: float = 1e-5
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: Optional[float] = None
    drop_path_rate: float = 0.0
    remat: bool = False
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    def validate(self) -> None:
        """Raises ValueError naming the valid choices if the settings cannot build a model."""
        for field, valid in dict(image_pool=IMAGE_POOLS, text_pool=TEXT_POOLS,
                                 mlp_activation=tuple(layers.ACTIVATIONS)).items():
            if getattr(self, field) not in valid:
                raise ValueError(f"Unknown {field} {getattr(self, field)!r}; valid choices: {list(valid)}")
        if self.image_pool == "map" and self.vision_width != self.embed_dim:
            raise ValueError(f"image_pool='map' has no projection, so vision_width ({self.vision_width}) must equal "
                             f"embed_dim ({self.embed_dim})")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width {self.text_width} is not divisible by text_heads {self.text_heads}")
        if self.context_length < 1 or self.vocab_size < 2:
            raise ValueError(f"context_length ({self.context_length}) and vocab_size ({self.vocab_size}) must be "
                             "positive")
        self.image_tower(parent=None).validate()

    def image_tower(self, **module_kwargs) -> VisionTransformer:
        """Returns the image tower: a `VisionTransformer` without classifier (its features are pre-projection).

        `module_kwargs` (name, parent) place it; `parent=None` builds it unbound (a classifier to fine-tune).
        """
        clip_style = self.image_pool == "token"
        return VisionTransformer(
            num_classes=0, img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans,
            embed_dim=self.vision_width, depth=self.vision_depth, num_heads=self.vision_heads,
            mlp_ratio=self.vision_mlp_ratio, class_token=clip_style, global_pool=self.image_pool,
            pre_norm=clip_style, norm_eps=self.norm_eps, mlp_activation=self.mlp_activation,
            drop_path_rate=self.drop_path_rate, remat=self.remat, attention_impl=self.attention_impl,
            dtype=self.dtype, param_dtype=self.param_dtype, **module_kwargs)

    def classifier_settings(self, num_classes: int) -> Dict[str, Any]:
        """Returns `vitjax.models.create("vit", **settings)` overrides of a classifier with this image tower.

        Its params take the CLIP params' "visual" subtree as they are (`config.init_from` does this).
        """
        tower = self.image_tower(parent=None)
        names = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "class_token",
                 "global_pool", "pre_norm", "norm_eps", "mlp_activation")
        return dict({name: getattr(tower, name) for name in names}, num_classes=num_classes, mlp_dim=None)

    def setup(self):
        self.visual = self.image_tower()
        if self.image_pool == "token":
            self.image_proj = nn.Dense(
                self.embed_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=layers.logical(nn.initializers.normal(self.vision_width ** -0.5), ("embed", "mlp")))
        self.text = TextTransformer(
            vocab_size=self.vocab_size, context_length=self.context_length, width=self.text_width,
            depth=self.text_depth, num_heads=self.text_heads, mlp_ratio=self.text_mlp_ratio,
            output_dim=self.embed_dim, causal=self.text_causal, pool=self.text_pool, proj_bias=self.text_proj_bias,
            norm_eps=self.norm_eps, mlp_activation=self.mlp_activation, remat=self.remat,
            attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(self.init_logit_scale), (),
                                      jnp.float32)
        if self.init_logit_bias is not None:
            self.logit_bias = self.param("logit_bias", nn.initializers.constant(self.init_logit_bias), (),
                                         jnp.float32)

    def check_images(self, images: jax.Array) -> None:
        """Raises ValueError unless `images` is (B, img_size, img_size, in_chans)."""
        expected = (self.img_size, self.img_size, self.in_chans)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be (batch, {expected[0]}, {expected[1]}, {expected[2]}) (NHWC), "
                             f"got shape {tuple(images.shape)}")

    def check_tokens(self, tokens: jax.Array) -> None:
        """Raises ValueError unless `tokens` is an integer (B, L) array with L <= context_length."""
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer ids of shape (batch, length), got {tokens.dtype} "
                             f"{tuple(tokens.shape)}; vitjax.text.tokenizer(...) makes them")
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"tokens have length {tokens.shape[1]} > context_length {self.context_length}")

    def encode_image(self, images: jax.Array, normalize: bool = True, train: bool = False) -> jax.Array:
        """Returns the (B, embed_dim) float32 image features, unit-norm when `normalize`."""
        return self._image(images, normalize, train)[0]

    def encode_text(self, tokens: jax.Array, normalize: bool = True, train: bool = False) -> jax.Array:
        """Returns the (B, embed_dim) float32 text features, unit-norm when `normalize`."""
        return self._text(tokens, normalize, train)[0]

    def _image(self, images, normalize, train):
        self.check_images(images)
        pooled, intermediates = self.visual(images, train=train)
        features = self.image_proj(pooled) if self.image_pool == "token" else pooled
        features = features.astype(jnp.float32)
        return (l2_normalize(features) if normalize else features), intermediates

    def _text(self, tokens, normalize, train):
        self.check_tokens(tokens)
        features, intermediates = self.text(tokens, train=train)
        features = features.astype(jnp.float32)
        return (l2_normalize(features) if normalize else features), intermediates

    def __call__(self, images: jax.Array, tokens: jax.Array, train: bool = False
                 ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """Returns (dict(image, text, scale, bias), dict(image=..., text=...) of each tower's intermediates)."""
        if images.shape[0] != tokens.shape[0]:
            raise ValueError(f"images and tokens must have the same batch size (one caption per image), got "
                             f"{images.shape[0]} images and {tokens.shape[0]} texts")
        image, image_intermediates = self._image(images, True, train)
        text, text_intermediates = self._text(tokens, True, train)
        bias = self.logit_bias if self.init_logit_bias is not None else None
        outputs = dict(image=image, text=text, scale=jnp.exp(self.logit_scale), bias=bias)
        return outputs, dict(image=image_intermediates, text=text_intermediates)

    def example_inputs(self, batch: int = 1) -> Tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
        """Returns (images, tokens) shape structs of a batch at the model's native sizes, for init/eval_shape."""
        return (jax.ShapeDtypeStruct((batch, self.img_size, self.img_size, self.in_chans), jnp.float32),
                jax.ShapeDtypeStruct((batch, self.context_length), jnp.int32))

    def group_matcher(self) -> param_groups.Matcher:
        """Returns the layer groups: both towers' embeddings, then block i of either tower, then the rest."""
        return dict(
            stem=r"^(?:visual/(?:cls_token|pos_embed|patch_embed|norm_pre)|text/(?:token_embed|pos_embed))",
            blocks=[(r"^(?:visual|text)/blocks_(\d+)", None),
                    (r"^(?:visual/(?:norm|attn_pool)|text/norm)", (param_groups.MERGE_WITH_PREVIOUS,))])

    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns regexes of the param paths not weight-decayed: tokens, position embeddings, temperature, bias."""
        return (r"^(?:visual/(?:pos_embed|cls_token)|text/pos_embed|logit_scale|logit_bias)$",)


# --- registry: open_clip's and transformers' names ---------------------------------------------------------------

_CLIP_PRETRAINED = dict(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, crop_pct=1.0, interpolation="bicubic")
_SIGLIP_PRETRAINED = dict(mean=IMAGENET_INCEPTION_MEAN, std=IMAGENET_INCEPTION_STD, crop_pct=1.0,
                          interpolation="bicubic")
# open_clip's ViT-B-32 / ViT-B-16 / ViT-L-14 (model_configs/*.json; heads = width / 64, GELU, LayerNorm 1e-5).
_B_VISION = dict(vision_width=768, vision_depth=12, vision_heads=12)
_B_TEXT = dict(text_width=512, text_depth=12, text_heads=8)
# transformers' SiglipConfig defaults (google/siglip-base-patch16-224): vocabulary 32000, 64 positions,
# tanh-GELU, LayerNorm 1e-6; the logit scale and bias start at log(10) and -10 (SigLIP paper, Sec. 3.4).
_SIGLIP_BASE = dict(embed_dim=768, patch_size=16, vision_width=768, vision_depth=12, vision_heads=12,
                    image_pool="map", vocab_size=32000, context_length=64, text_width=768, text_depth=12,
                    text_heads=12, text_pool="last", text_causal=False, text_proj_bias=True,
                    mlp_activation="gelu_tanh", norm_eps=1e-6, init_logit_scale=math.log(10.0),
                    init_logit_bias=-10.0)

_VARIANTS = {
    "clip_vit_b32": (dict(embed_dim=512, patch_size=32, **_B_VISION, **_B_TEXT), _CLIP_PRETRAINED),
    "clip_vit_b16": (dict(embed_dim=512, patch_size=16, **_B_VISION, **_B_TEXT), _CLIP_PRETRAINED),
    "clip_vit_l14": (dict(embed_dim=768, patch_size=14, vision_width=1024, vision_depth=24, vision_heads=16,
                          text_width=768, text_depth=12, text_heads=12), _CLIP_PRETRAINED),
    "siglip_base_patch16_224": (_SIGLIP_BASE, _SIGLIP_PRETRAINED),
    # A CPU-sized CLIP for tests and the digits run (8x8 digits upsampled to 16x16, patch 2).
    "clip_vit_tiny_digits": (dict(embed_dim=64, img_size=16, patch_size=2, vision_width=64, vision_depth=2,
                                  vision_heads=2, context_length=16, text_width=64, text_depth=2, text_heads=2),
                             dict(_CLIP_PRETRAINED, input_size=(3, 16, 16))),
}
for _name, (_settings, _pretrained) in _VARIANTS.items():
    register_model(_name, CLIP, family="clip", pretrained_cfg=_pretrained, **_settings)
