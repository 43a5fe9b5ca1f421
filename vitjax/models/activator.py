"""Activator (Abdullah & Aydin, 2024, "Activator: GLU Activation Function as the Core Component of a Vision
Transformer"), as the official Abdullah-88/Activator code (`activator.py`, `activator_only_GEGLU.py`, and the
`ACTIVATORImageClassification` of their `train.py` / `train_only_GEGLU.py`).

A strided-conv patch embedding without position embedding, then blocks in which a gated unit takes the place of
attention: LayerNorm, then `proj_3(LN(gelu(proj_1 x)) * LN(proj_2 x))` (one LayerNorm, shared by both branches)
added to the input; the full Activator follows it with the usual MLP (fc1, GELU, dropout, fc2, dropout) behind the
same block LayerNorm (the official block applies one `norm` before both sub-layers), the `only_geglu` variant has
no MLP. As in the official code, every block acts on each token alone; the tokens meet only in the final average,
which feeds the classifier (there is no final norm).

Parameter names: `patcher`, `blocks_{i}/{norm, gating/{proj_1, proj_2, norm, proj_3}, mlp/{fc1, fc2}}`, `head`.
"""
from typing import Any, Dict, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.models import layers, param_groups
from vitjax.models.registry import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD, register_model

_EPS = 1e-5  # torch's LayerNorm default, which the official code keeps


def _dense(module: nn.Module, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=layers.logical(layers.trunc_normal_init, ("embed", "mlp")),
                    bias_init=layers.logical(nn.initializers.zeros, ("mlp",)),
                    dtype=module.dtype, param_dtype=module.param_dtype, name=name)


class GatingUnit(nn.Module):
    """The Activator gated unit: proj_3(LN(gelu(proj_1 x)) * LN(proj_2 x)), one LayerNorm for both branches."""

    hidden: int
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        norm = layers.layer_norm(_EPS, self.dtype, self.param_dtype, name="norm")
        gate = norm(layers.gelu(_dense(self, self.hidden, "proj_1")(x)))
        value = norm(_dense(self, self.hidden, "proj_2")(x))
        return _dense(self, x.shape[-1], "proj_3")(gate * value)


class ActivatorBlock(nn.Module):
    """x + gating(LN x), then (unless `only_geglu`) + mlp(LN x) with the same LayerNorm; returns the same shape."""

    hidden: int
    only_geglu: bool = False
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        norm = layers.layer_norm(_EPS, self.dtype, self.param_dtype, name="norm")
        drop_path = layers.DropPath(self.drop_path_rate)
        x = x + drop_path(GatingUnit(self.hidden, self.dtype, self.param_dtype, name="gating")(norm(x)), train)
        if self.only_geglu:
            return x
        y = layers.Mlp(self.hidden, drop_rate=self.drop_rate, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="mlp")(norm(x), train)
        return x + drop_path(y, train)


class Activator(param_groups.LayerGroups, nn.Module):
    """Activator classifier; `__call__(images NHWC, train) -> (logits, intermediates)`.

    intermediates: `blocks` (per-block tokens (B, N, D)), `pre_logits` (B, D), the tokens' mean.
    """

    num_classes: int = 10
    img_size: Union[int, Tuple[int, int]] = 32
    patch_size: int = 4
    in_chans: int = 3
    embed_dim: int = 256  # the official d_model
    hidden_dim: int = 512  # the official d_ffn
    depth: int = 4
    only_geglu: bool = False
    drop_rate: float = 0.0  # the official `dropout` (its train.py: 0.5), in the MLP only
    drop_path_rate: float = 0.0  # not in the official code
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    def validate(self) -> None:
        """Raises ValueError naming the valid choices if the settings cannot build a model."""
        img = layers.to_2tuple(self.img_size)
        if self.patch_size < 1 or img[0] % self.patch_size or img[1] % self.patch_size:
            raise ValueError(f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")
        for field in ("embed_dim", "hidden_dim", "depth", "in_chans"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {self.drop_rate}")

    def group_matcher(self) -> param_groups.Matcher:
        """Returns timm-style group_matcher(coarse=False) over vitjax param paths (see param_groups)."""
        return dict(stem=r"^patcher", blocks=[(r"^blocks_(\d+)", None)])

    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns no regex: the official Adam has no weight decay; with one, the trainer's rule (no biases or
        norms) applies."""
        return ()

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (logits, intermediates) for NHWC `images`."""
        x, _ = layers.PatchEmbed(self.patch_size, self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                                 name="patcher")(images)
        blocks = []
        for index in range(self.depth):
            x = ActivatorBlock(self.hidden_dim, self.only_geglu, self.drop_rate,
                               self.drop_path_rate * index / max(self.depth - 1, 1), self.dtype, self.param_dtype,
                               name=f"blocks_{index}")(x, train)
            blocks.append(x)
        pooled = x.mean(axis=1)
        intermediates = {"blocks": blocks, "pre_logits": pooled}
        if not self.num_classes:
            return pooled, intermediates
        return nn.Dense(self.num_classes, kernel_init=layers.logical(layers.trunc_normal_init, ("embed", "classes")),
                        bias_init=layers.logical(nn.initializers.zeros, ("classes",)),
                        dtype=self.dtype, param_dtype=self.param_dtype, name="head")(pooled), intermediates


# --- registry: the official train.py / train_only_GEGLU.py models (CIFAR-10, 32 px; the paper's only setting) ----
_PRETRAINED = dict(mean=IMAGENET_INCEPTION_MEAN, std=IMAGENET_INCEPTION_STD, crop_pct=1.0)  # Normalize(0.5, 0.5)
OFFICIAL_NAMES = {"activator": "ACTIVATORImageClassification (activator.py)",
                  "activator_only_geglu": "ACTIVATORImageClassification (activator_only_GEGLU.py)"}
for _name, _only in (("activator", False), ("activator_only_geglu", True)):
    register_model(_name, Activator, family="activator", only_geglu=_only, img_size=32, pretrained_cfg=_PRETRAINED)
