"""The shared FFT token mixers against direct sums in float64: the spectral gate is a circular convolution with the
filter's inverse transform, fft_conv2d the zero-padded one; a filter of the wrong grid is rejected."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax.models import fft_mixer


def _direct_conv(u, kernel, circular):
    """out[b, i, j, c] = sum_{a, d} u[b, a, d, c] kernel[i - a, j - d, c], indices wrapped or out of range dropped."""
    height, width = u.shape[1:3]
    out = np.zeros(u.shape, np.float64)
    for i in range(height):
        for j in range(width):
            for a in range(height):
                for d in range(width):
                    di, dj = i - a, j - d
                    if circular:
                        di, dj = di % height, dj % width
                    elif di < 0 or dj < 0:
                        continue
                    out[:, i, j] += u[:, a, d] * kernel[di, dj]
    return out


@jax.jit
def _mixers(u, kernel, spectrum):
    return fft_mixer.fft_conv2d(u, kernel), fft_mixer.spectral_gate(u, spectrum)


def test_fft_conv2d_and_spectral_gate_equal_direct_convolutions():
    rng = np.random.default_rng(0)
    u = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
    kernel = rng.normal(size=(5, 6, 3)).astype(np.float32)
    # the gate's filter: the ortho rfft2 of a real kernel, times sqrt(H W) (ortho on both sides)
    spectrum = np.fft.rfft2(kernel, axes=(0, 1), norm="ortho") * np.sqrt(30)
    linear, gated = _mixers(jnp.asarray(u), jnp.asarray(kernel), jnp.asarray(spectrum.astype(np.complex64)))
    expected_linear = _direct_conv(u.astype(np.float64), kernel.astype(np.float64), circular=False)
    expected_circular = _direct_conv(u.astype(np.float64), kernel.astype(np.float64), circular=True)
    assert np.abs(np.asarray(linear) - expected_linear).max() / np.abs(expected_linear).max() <= 1e-5
    assert np.abs(np.asarray(gated) - expected_circular).max() / np.abs(expected_circular).max() <= 1e-5
    assert np.abs(expected_linear - expected_circular).max() > 1.0  # the two differ: the test can tell them apart


def test_global_filter_stores_the_official_layout_and_rejects_other_grids():
    x = jnp.ones((1, 4, 6, 8))
    shapes = nn.meta.unbox(jax.eval_shape(fft_mixer.GlobalFilter((4, 4)).init, jax.random.key(0), x))
    assert shapes["params"]["complex_weight"].shape == (4, 4, 8, 2)  # (h, w, C, real / imaginary), as SpectFormer
    with pytest.raises(ValueError, match=r"grid \(4, 4\) does not match the rfft2 grid \(4, 3\) of a 4x4"):
        jax.eval_shape(fft_mixer.GlobalFilter((4, 4)).init, jax.random.key(0), jnp.ones((1, 4, 4, 8)))
    with pytest.raises(ValueError, match="kernel of the token grid"):
        fft_mixer.fft_conv2d(x, jnp.ones((3, 6, 8)))
