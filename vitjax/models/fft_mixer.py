"""FFT token mixers shared by the spectral families: GFNet-style global filters (SpectFormer's spectral gating,
HorNet's global-local filter) and long 2-D convolutions by FFT (Hyena N-D).

Tokens are NHWC grids `(B, H, W, C)`; every transform runs over the two grid axes. The FFTs run in float32 whatever
the model's dtype (as the references, which cast to float32 before `torch.fft`), and the result goes back to the
input's dtype.

- `spectral_gate`: `irfft2(rfft2(x) * weight)` with `norm="ortho"` on both sides, `weight` a complex
  `(H, W // 2 + 1, C)` filter: a circular convolution of the grid with a learned global kernel.
- `GlobalFilter`: that gate with the learned filter stored as SpectFormer / GFNet store it, `(h, w, C, 2)` real
  and imaginary parts.
- `fft_conv2d`: the non-circular (zero-padded) convolution `y[i, j] = sum_{a <= i, b <= j} u[a, b] k[i - a, j - b]`
  of a grid with a kernel of the same size, through FFTs of twice the grid in each axis; the output keeps the
  input's grid (the first H x W outputs: each position sees the tokens above and to its left).
"""
from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.models import layers

_GRID_AXES = (1, 2)


def rfft_grid(height: int, width: int) -> Tuple[int, int]:
    """Returns the (rows, cols) of rfft2 over an H x W grid: (H, W // 2 + 1)."""
    return height, width // 2 + 1


def as_complex(weight: jax.Array) -> jax.Array:
    """Returns the complex array of a real `(..., 2)` array of real and imaginary parts (torch.view_as_complex)."""
    return jax.lax.complex(weight[..., 0].astype(jnp.float32), weight[..., 1].astype(jnp.float32))


def spectral_gate(x: jax.Array, weight: jax.Array) -> jax.Array:
    """Returns irfft2(rfft2(x) * weight) over the grid axes of NHWC `x` (ortho norm), in x's dtype.

    `weight` is complex and broadcasts against the (B, H, W // 2 + 1, C) spectrum, e.g. (H, W // 2 + 1, C).
    """
    height, width = x.shape[1:3]
    expected = rfft_grid(height, width)
    if tuple(weight.shape[-3:-1]) != expected:
        raise ValueError(f"The spectral filter's grid {tuple(weight.shape[-3:-1])} does not match the rfft2 grid "
                         f"{expected} of a {height}x{width} token map")
    spectrum = jnp.fft.rfft2(x.astype(jnp.float32), axes=_GRID_AXES, norm="ortho")
    out = jnp.fft.irfft2(spectrum * weight, s=(height, width), axes=_GRID_AXES, norm="ortho")
    return out.astype(x.dtype)


def fft_conv2d(u: jax.Array, kernel: jax.Array) -> jax.Array:
    """Returns the zero-padded (non-circular) 2-D convolution of NHWC `u` with a per-channel `kernel` (H, W, C),
    cropped to u's first H x W outputs, in u's dtype; computed by FFTs over a (2H, 2W) grid."""
    height, width = u.shape[1:3]
    if tuple(kernel.shape[:2]) != (height, width) or kernel.shape[-1] != u.shape[-1]:
        raise ValueError(f"fft_conv2d needs a kernel of the token grid and width (H, W, C) = "
                         f"{(height, width, u.shape[-1])}; got {tuple(kernel.shape)}")
    size = (2 * height, 2 * width)
    u_f = jnp.fft.rfft2(u.astype(jnp.float32), s=size, axes=_GRID_AXES)
    k_f = jnp.fft.rfft2(kernel.astype(jnp.float32), s=size, axes=(0, 1))
    out = jnp.fft.irfft2(u_f * k_f, s=size, axes=_GRID_AXES)[:, :height, :width]
    return out.astype(u.dtype)


class GlobalFilter(nn.Module):
    """SpectFormer's / GFNet's spectral gating network on NHWC `x`: a learned complex filter `complex_weight`
    (h, w, C, 2) multiplies the ortho rfft2 of the token map; returns the same shape."""

    filter_size: Tuple[int, int]  # (H, W // 2 + 1) of the token grid it was built for
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        weight = self.param("complex_weight",
                            layers.logical(nn.initializers.normal(self.init_std), (None, None, "embed", None)),
                            (*self.filter_size, channels, 2), jnp.float32)
        return spectral_gate(x, as_complex(weight))
