"""The photometric ops of self-supervised views: color_jitter, random_grayscale, gaussian_blur, solarize."""
import numpy as np
import pytest

import vitjax.data as data

RGB = np.random.default_rng(0).integers(0, 256, (12, 10, 3)).astype(np.uint8)


def apply(pp, image=RGB, seed=(1, 2)):
    import tensorflow as tf
    output = data.build_preprocess(pp)({"image": tf.constant(image)}, tf.constant(seed, tf.int64))
    return np.asarray(output["image"])


def test_color_jitter():
    assert np.array_equal(apply("color_jitter(0, 0, 0, 0, probability=1.0)"), RGB)      # no strength: identity
    assert np.array_equal(apply("color_jitter(probability=0.0)"), RGB)                  # never applied
    jittered = [apply("color_jitter(0.4, 0.4, 0.2, 0.1, probability=1.0)", seed=(s, 0)) for s in range(4)]
    assert all(j.dtype == np.uint8 and not np.array_equal(j, RGB) for j in jittered)
    assert not np.array_equal(jittered[0], jittered[1])                                  # the seed decides
    np.testing.assert_array_equal(jittered[2], apply("color_jitter(0.4, 0.4, 0.2, 0.1, probability=1.0)",
                                                     seed=(2, 0)))
    # Brightness alone scales every pixel by one factor in [0.6, 1.4] (before clipping).
    bright = apply("color_jitter(0.4, 0, 0, 0, probability=1.0)", image=RGB.astype(np.float32) / 2)
    ratio = bright / np.maximum(RGB.astype(np.float32) / 2, 1e-6)
    assert 0.6 <= ratio[RGB > 10].min() and np.ptp(ratio[RGB > 10]) < 1e-4


def test_grayscale_and_solarize():
    gray = apply("random_grayscale(1.0)").astype(np.float32)
    assert np.all(gray[..., 0] == gray[..., 1]) and np.all(gray[..., 1] == gray[..., 2])
    luma = RGB.astype(np.float32) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(gray[..., 0] - luma).max() <= 0.5
    solarized = apply("solarize(1.0, threshold=128)")
    np.testing.assert_array_equal(solarized, np.where(RGB >= 128, 255 - RGB, RGB))


def test_gaussian_blur_keeps_a_constant_image_and_smooths_noise():
    constant = np.full((12, 10, 3), 77, np.uint8)
    np.testing.assert_array_equal(apply("gaussian_blur(1.0, 0.5, 2.0)", image=constant), constant)
    blurred = apply("gaussian_blur(1.0, 1.5, 2.0)", image=RGB.astype(np.float32))
    assert blurred.std() < 0.6 * RGB.std() and abs(blurred.mean() - RGB.mean()) < 8
    assert np.array_equal(apply("gaussian_blur(0.0)"), RGB)


@pytest.mark.parametrize("pp, message", [
    ("color_jitter(hue=0.7)", r"hue must be a number in \[0, 0.5\]"),
    ("gaussian_blur(1.0, 2.0, 1.0)", r"0 < sigma_min <= sigma_max"),
    ("solarize(1.5)", r"probability must be a number in \[0, 1\]"),
])
def test_bad_arguments_fail_when_the_pp_is_built(pp, message):
    with pytest.raises(ValueError, match=message):
        data.build_preprocess(pp)
