"""ChannelViT (Bao et al., ICLR 2024, "Channel Vision Transformers: An Image Is Worth 1 x 16 x 16 Words"), written
from the paper; the official insitro/ChannelViT code (CC-BY-NC) was only run, for the parity fixture.

Every input channel is cut into patches on its own by one patch projection shared across channels (a 1-channel
conv); each channel's tokens get that channel's learned embedding and the spatial position embedding shared by all
channels. The class token and all channel-patch tokens (channel-major: channel 0's patches, then channel 1's, ...)
go through plain ViT blocks (`vit.Block`); the class token's final LayerNorm output feeds the classifier.

`channels` (a `__call__` argument) names which of the `in_chans` trained channels the input holds, so a model can
be evaluated on any subset. Hierarchical channel sampling (HCS, the paper's Section 3.2; `channel_sampling=True`,
the official `hcs_*` models) trains on a random subset per batch: a count m uniform in 1..C, then m distinct
channels. Dropping tokens would change the sequence length, which jit cannot; here the left-out channels' tokens
stay in the sequence but are hidden from every attention by a key bias, which gives the class token exactly what
dropping them gives. The draw comes from the `channels` rng when given, else from `dropout`.

The official code (DINO's `interpolate_pos_encoding`) resamples the spatial position embedding bicubically with
scale factor (g + 0.1) / g on a g x g grid whenever the sequence is longer than the table, i.e. whenever more than
one channel is present; its weights were trained that way, so `dino_pos_resample=True` (default) does the same.
"""
import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models import layers, param_groups, vit
from vitjax.models.registry import register_model
from vitjax.tokens import base as token_base


def _cubic_weights(t: float, a: float = -0.75) -> np.ndarray:
    """Returns the four cubic-convolution weights (torch's bicubic, A = -0.75) of offsets -1, 0, 1, 2 at fraction t."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.array([far(t + 1), near(t), near(1 - t), far(2 - t)])


def dino_resample_matrix(size: int) -> np.ndarray:
    """Returns the (size, size) float64 matrix of torch's bicubic interpolation (align_corners=False) with scale
    factor (size + 0.1) / size, the resampling DINO-style position embeddings get at their own size."""
    scale = size / (size + 0.1)  # torch maps output i to input (i + 0.5) / factor - 0.5
    matrix = np.zeros((size, size))
    for out in range(size):
        source = (out + 0.5) * scale - 0.5
        base = math.floor(source)
        for offset, weight in zip(range(-1, 3), _cubic_weights(source - base)):
            matrix[out, min(max(base + offset, 0), size - 1)] += weight
    return matrix


class ChannelViT(param_groups.LayerGroups, nn.Module):
    """ChannelViT classifier; `__call__(images NHWC, train, channels) -> (logits, intermediates)`.

    `channels`: the trained channel index of each input channel, (C_in,) or per example (B, C_in); None means
    0..C_in-1 (then C_in must be `in_chans`). intermediates: `blocks` (per-block tokens), `pre_logits` (B, D),
    `channels_kept` ((C_in,) bool: the channels HCS kept, all True outside HCS training).
    """

    num_classes: int = 1000
    img_size: Union[int, Tuple[int, int]] = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    channel_sampling: bool = False  # HCS in training (the official `enable_sample` of the hcs_* models)
    dino_pos_resample: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attention_impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    def validate(self) -> None:
        """Raises ValueError naming the valid choices if the settings cannot build a model."""
        img = layers.to_2tuple(self.img_size)
        if self.patch_size < 1 or img[0] % self.patch_size or img[1] % self.patch_size:
            raise ValueError(f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")
        if self.in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {self.in_chans}")
        if self.depth < 1 or self.num_heads < 1 or self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} must split into num_heads {self.num_heads} heads and depth "
                             f"{self.depth} must be >= 1")
        layers.check_attention_impl(self.attention_impl)

    @property
    def grid_size(self) -> Tuple[int, int]:
        """Returns the patch grid (h, w) of one channel at `img_size`."""
        img = layers.to_2tuple(self.img_size)
        return img[0] // self.patch_size, img[1] // self.patch_size

    def group_matcher(self) -> param_groups.Matcher:
        """Returns timm-style group_matcher(coarse=False) over vitjax param paths (see param_groups)."""
        return dict(stem=r"^(?:cls_token|pos_embed|channel_embed|patch_embed)",
                    blocks=[(r"^blocks_(\d+)", None), (r"^norm", (param_groups.MERGE_WITH_PREVIOUS,))])

    def no_weight_decay(self) -> Tuple[str, ...]:
        """Returns no regex: the official (DINO) optimizer decays every param of 2 or more dimensions, embeddings
        included, and no bias or norm, which is the trainer's own rule."""
        return ()

    def _channel_indices(self, channels: Any, num_inputs: int) -> jax.Array:
        if channels is None:
            if num_inputs != self.in_chans:
                raise ValueError(f"The images have {num_inputs} channels, the model {self.in_chans}: pass `channels`, "
                                 f"the trained channel index (0..{self.in_chans - 1}) of each input channel")
            return jnp.arange(num_inputs)
        if isinstance(channels, (list, tuple, np.ndarray)):
            values = np.asarray(channels)
            if values.size and (values.min() < 0 or values.max() >= self.in_chans):
                raise ValueError(f"channels {values.tolist()} must lie in 0..{self.in_chans - 1} (in_chans)")
        channels = jnp.asarray(channels, jnp.int32)
        if channels.ndim not in (1, 2) or channels.shape[-1] != num_inputs:
            raise ValueError(f"channels must be (C_in,) or (B, C_in) with C_in = {num_inputs} (the images' channels); "
                             f"got shape {channels.shape}")
        return channels

    def _position_embedding(self, table: jax.Array, resample: jax.Array) -> jax.Array:
        """Returns the (N, D) spatial table, resampled as the official code does where `resample` (a bool)."""
        if not self.dino_pos_resample:
            return table
        grid_h, grid_w = self.grid_size
        rows, cols = (jnp.asarray(dino_resample_matrix(size), table.dtype) for size in (grid_h, grid_w))
        resampled = jnp.einsum("ij,kl,jld->ikd", rows, cols, table.reshape(grid_h, grid_w, -1),
                               precision=jax.lax.Precision.HIGHEST).reshape(table.shape)
        return jnp.where(resample, resampled, table)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False,
                 channels: Optional[Union[Sequence[int], jax.Array]] = None) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (logits, intermediates) for NHWC `images` whose channels are `channels` of the trained ones."""
        batch, height, width, num_inputs = images.shape
        index = self._channel_indices(channels, num_inputs)
        # One shared 1-channel projection: every channel becomes a separate image.
        per_channel = jnp.moveaxis(images, -1, 1).reshape(batch * num_inputs, height, width, 1)
        x, grid = layers.PatchEmbed(self.patch_size, self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                                    name="patch_embed")(per_channel)
        if grid != self.grid_size:
            raise ValueError(f"Input grid {grid} does not match the model's {self.grid_size} "
                             f"(img_size={self.img_size})")
        patches = grid[0] * grid[1]
        x = x.reshape(batch, num_inputs, patches, self.embed_dim)
        # jnp.asarray: restored params may be numpy arrays, which a traced `channels` cannot index.
        channel_table = jnp.asarray(self.param("channel_embed", layers.logical(layers.trunc_normal_init,
                                                                               (None, "embed")),
                                               (self.in_chans, self.embed_dim), self.param_dtype), x.dtype)
        channel_embed = channel_table[index]  # (C_in, D) or (B, C_in, D)
        x = x + (channel_embed[None, :, None] if index.ndim == 1 else channel_embed[:, :, None])

        kept = jnp.ones((num_inputs,), bool)
        resample = jnp.asarray(num_inputs > 1)
        if train and self.channel_sampling and num_inputs > 1:
            rng = self.make_rng("channels") if self.has_rng("channels") else self.make_rng("dropout")
            count_rng, order_rng = jax.random.split(rng)
            count = jax.random.randint(count_rng, (), 1, num_inputs + 1)
            rank = jnp.argsort(jax.random.permutation(order_rng, num_inputs))  # each channel's place in the draw
            kept = rank < count
            resample = count > 1

        pos_embed = self.param("pos_embed", layers.logical(layers.trunc_normal_init, (None, None, "embed")),
                               (1, 1 + patches, self.embed_dim), self.param_dtype).astype(x.dtype)
        spatial = self._position_embedding(pos_embed[0, 1:], resample)
        x = (x + spatial[None, None]).reshape(batch, num_inputs * patches, self.embed_dim)
        cls = self.param("cls_token", layers.logical(layers.trunc_normal_init, (None, None, "embed")),
                         (1, 1, self.embed_dim), self.param_dtype).astype(x.dtype)
        cls = jnp.broadcast_to(cls + pos_embed[:, :1], (batch, 1, self.embed_dim))
        x = jnp.concatenate([cls, x], axis=1)
        x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
        x = layers.constrain(x, ("batch", "length", "embed"))

        sampling = train and self.channel_sampling and num_inputs > 1
        state = None
        if sampling:
            visible = jnp.concatenate([jnp.ones((1,), bool), jnp.repeat(kept, patches)])
            state = {"key_bias": jnp.broadcast_to(token_base.mask_key_bias(visible), (batch, visible.shape[0]))}
        rates = np.linspace(0.0, self.drop_path_rate, self.depth)
        block_tokens = []
        for depth in range(self.depth):
            x, aux = vit.Block(
                self.num_heads, int(self.embed_dim * self.mlp_ratio), qkv_bias=self.qkv_bias,
                proj_drop_rate=self.drop_rate, attn_drop_rate=self.attn_drop_rate, drop_path_rate=float(rates[depth]),
                norm_eps=self.norm_eps, attention_impl=self.attention_impl, dtype=self.dtype,
                param_dtype=self.param_dtype, token_reducer=token_base.KeepAll() if sampling else None,
                name=f"blocks_{depth}")(x, train, False, None, state)
            block_tokens.append(aux["tokens"])
        x = layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, name="norm")(x)
        pooled = x[:, 0]
        intermediates = {"blocks": block_tokens, "pre_logits": pooled, "channels_kept": kept}
        if not self.num_classes:
            return pooled, intermediates
        return nn.Dense(self.num_classes, kernel_init=layers.logical(layers.trunc_normal_init, ("embed", "classes")),
                        bias_init=layers.logical(nn.initializers.zeros, ("classes",)),
                        dtype=self.dtype, param_dtype=self.param_dtype, name="head")(pooled), intermediates


# --- registry: the official channelvit/backbone/{channel_vit,hcs_channel_vit}.py constructors ---------------------
# Sizes as the official constructors (DeiT-Ti / S / B widths, qkv bias, LayerNorm eps 1e-6); patch size 16 by default
# (the released JUMP-CP, So2Sat and Camelyon models use patch_size=8).
_SIZES = {"tiny": dict(embed_dim=192, num_heads=3), "small": dict(embed_dim=384, num_heads=6),
          "base": dict(embed_dim=768, num_heads=12)}
OFFICIAL_NAMES = {}
for _size, _settings in _SIZES.items():
    for _prefix, _sampling in (("", False), ("hcs_", True)):
        _name = f"{_prefix}channelvit_{_size}"
        OFFICIAL_NAMES[_name] = _name
        register_model(_name, ChannelViT, family="channelvit", depth=12, patch_size=16, channel_sampling=_sampling,
                       **_settings)
