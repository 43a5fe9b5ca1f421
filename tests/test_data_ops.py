"""Tests of the pp ops on example dicts: field and label ops, multi-view, user ops (pp_modules)."""
import os
import sys

import numpy as np
import pytest

import vitjax.data as data

_RGB = np.random.default_rng(0).integers(0, 256, (8, 8, 3), np.uint8)


def _config(data_dir, **overrides):
    config = dict(dataset="digits", data_dir=data_dir, pp_train="value_range(0, 255)",
                  pp_eval="value_range(0, 255)")
    config.update(overrides)
    return config


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _apply(pp, image=_RGB, seed=(0, 0), label=3):
    """Returns the numpy fields of pp applied to the example {image, label}."""
    import tensorflow as tf
    example = dict(image=tf.constant(image), label=tf.constant(label, tf.int32))
    output = data.build_preprocess(pp)(example, tf.constant(seed, tf.int64))
    return {name: np.asarray(value) for name, value in output.items()}


@pytest.fixture
def restore_registry():
    """Yields; then removes the ops and the modules a test registered or imported."""
    from vitjax.data import ops
    registered, modules = dict(ops._OPS), set(sys.modules)
    yield
    ops._OPS.clear()
    ops._OPS.update(registered)
    for name in set(sys.modules) - modules:
        if name.startswith("data_ops_plugin"):
            del sys.modules[name]


# ---------------------------------------------------------------------------------------------
# Field and label ops.
# ---------------------------------------------------------------------------------------------

def test_field_ops_and_key_outkey():
    out = _apply('copy("image", "original")|flip_lr(1.0)|rename("label", "target")')
    assert set(out) == {"image", "original", "target"}
    np.testing.assert_array_equal(out["original"], _RGB)
    np.testing.assert_array_equal(out["image"], _RGB[:, ::-1])
    assert out["target"] == 3

    out = _apply('flip_lr(1.0, outkey="flipped")|resize(4, key="flipped", outkey="small")')
    assert set(out) == {"image", "flipped", "small", "label"}
    np.testing.assert_array_equal(out["image"], _RGB)  # outkey leaves the input alone.
    np.testing.assert_array_equal(out["flipped"], _RGB[:, ::-1])
    assert out["small"].shape == (4, 4, 3)

    assert set(_apply('keep("label")')) == {"label"}
    assert set(_apply('drop("image")')) == {"label"}
    for pp in ('keep("image", "caption")', 'drop("caption")', 'flip_lr(key="caption")'):
        with pytest.raises(ValueError, match=r"reads the field 'caption', which the example does "
                                             r"not have; its fields: image, label"):
            _apply(pp)


def test_label_map_and_onehot():
    import tensorflow as tf
    assert _apply("label_map((5, 4, 3, 2))", label=1)["label"] == 4
    assert _apply("label_map({0: 1, 1: 0}, default=-1)", label=3)["label"] == -1
    assert _apply("label_map({0: 1, 1: 0}, default=-1)", label=0)["label"] == 1
    mapped = _apply("label_map((0, 1, 0, 1), outkey='odd')")
    assert (mapped["label"], mapped["odd"], mapped["odd"].dtype) == (3, 1, np.int32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="not in the mapping"):
        _apply("label_map({0: 1, 1: 0})", label=2)
    np.testing.assert_allclose(_apply("onehot(4, smoothing=0.2)", label=1)["label"],
                               [0.05, 0.85, 0.05, 0.05], rtol=1e-6)


def test_eval_batches_carry_every_field_and_pad_them_all(data_dir):
    # Digit parity as the label, the digit kept beside it.
    config = _config(data_dir, pp_eval='copy("label", "digit")|label_map((0, 1, 0, 1, 0, 1, 0, 1, '
                                       '0, 1))|value_range(0, 1)')
    batches = list(data.make_eval_iterator(config, global_batch_size=128, process_index=0,
                                           process_count=1))
    assert [set(batch) for batch in batches] == [{"image", "label", "digit", "mask"}] * 3
    digit = np.concatenate([batch["digit"] for batch in batches])
    label = np.concatenate([batch["label"] for batch in batches])
    mask = np.concatenate([batch["mask"] for batch in batches])
    image = np.concatenate([batch["image"] for batch in batches])
    assert digit.dtype == label.dtype == np.int32 and mask.sum() == 360 and len(mask) == 384
    np.testing.assert_array_equal(label, digit % 2)  # The padding too: a repeated example.
    assert np.bincount(digit[mask], minlength=10).min() >= 35  # All ten digits, ~36 each.
    assert image.shape == (384, 8, 8, 1) and 0 <= image.min() and image.max() == 1
    with pytest.raises(ValueError, match="makes a field 'mask', the name of the eval batches'"):
        next(data.make_eval_iterator(_config(data_dir, pp_eval='copy("label", "mask")'),
                                     global_batch_size=128, process_index=0, process_count=1))


# ---------------------------------------------------------------------------------------------
# Multi-view.
# ---------------------------------------------------------------------------------------------

def test_views_groups_outkey_and_view_fields():
    out = _apply("views(2, 'resize(6)', 3, 'resize(4)')")
    assert set(out) == {"label", "image_0", "image_1", "image_2", "image_3", "image_4"}
    assert [out[f"image_{i}"].shape[0] for i in range(5)] == [6, 6, 4, 4, 4]

    out = _apply("views(2, 'flip_lr(1.0)', outkey='crop')")
    assert set(out) == {"label", "crop_0", "crop_1"}
    np.testing.assert_array_equal(out["crop_1"], _RGB[:, ::-1])

    # Fields a view's pp adds get the view's suffix; its changes to other fields are dropped.
    out = _apply("views(2, 'copy(\"image\", \"raw\")|random_crop(8, padding=3)|label_map((9, 9, 9, "
                 "9))')", seed=(4, 2))
    assert set(out) == {"label", "image_0", "image_1", "raw_0", "raw_1"}
    assert out["label"] == 3
    np.testing.assert_array_equal(out["raw_0"], _RGB)
    np.testing.assert_array_equal(out["raw_1"], _RGB)
    assert not np.array_equal(out["image_0"], out["image_1"])  # Each view its own seed.
    again = _apply("views(2, 'copy(\"image\", \"raw\")|random_crop(8, padding=3)')", seed=(4, 2))
    np.testing.assert_array_equal(again["image_1"], out["image_1"])


def _shifted(image, dy, dx):
    """Returns `image` moved by (dy, dx) pixels with zeros coming in."""
    height, width = image.shape[:2]
    padded = np.pad(image, ((2, 2), (2, 2), (0, 0)))
    return padded[2 - dy:2 - dy + height, 2 - dx:2 - dx + width]


def test_two_views_through_the_train_iterator_differ_and_resume_exactly(data_dir):
    config = _config(data_dir, pp_train='copy("image", "original")|'
                                        'views(2, "random_crop(8, padding=2)|flip_lr")')
    run = _take(data.make_train_iterator(config, global_batch_size=4, seed=7, process_index=0,
                                         process_count=1), 4)
    resumed = _take(data.make_train_iterator(config, global_batch_size=4, seed=7, start_step=2,
                                             process_index=0, process_count=1), 2)
    num_different = 0
    for batch in run:
        assert set(batch) == {"original", "image_0", "image_1", "label"}
        assert batch["image_0"].shape == (4, 8, 8, 1) and batch["image_0"].dtype == np.float32
        for index, original in enumerate(batch["original"]):
            for view in ("image_0", "image_1"):
                # Each view is the image shifted by up to 2 pixels, maybe mirrored.
                candidates = [_shifted(image, dy, dx) for image in (original, original[:, ::-1])
                              for dy in range(-2, 3) for dx in range(-2, 3)]
                assert any(np.array_equal(batch[view][index], candidate)
                           for candidate in candidates), (view, index)
            num_different += not np.array_equal(batch["image_0"][index], batch["image_1"][index])
    assert num_different >= 14  # Of 16: the two views draw their own shifts and flips.
    for expected, actual in zip(run[2:], resumed):
        assert set(expected) == set(actual)
        for name in expected:
            np.testing.assert_array_equal(expected[name], actual[name])


# ---------------------------------------------------------------------------------------------
# Registering ops.
# ---------------------------------------------------------------------------------------------

def test_user_ops_from_pp_modules(data_dir, monkeypatch, restore_registry):
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    plain = _config(data_dir)
    assert "invert" not in data.valid_ops()
    with pytest.raises(ValueError, match="Unknown op 'invert'"):
        data.validate_input_config(_config(data_dir, pp_train="invert|value_range(0, 255)"))
    config = _config(data_dir, pp_modules=("data_ops_plugin",),
                     pp_train="invert|parity|value_range(0, 255)")
    assert data.validate_input_config(config)["pp_modules"] == ("data_ops_plugin",)
    assert {"invert", "parity"} <= set(data.valid_ops())
    kwargs = dict(global_batch_size=6, seed=0, start_step=3, process_index=0, process_count=1)
    expected = next(data.make_train_iterator(plain, **kwargs))
    batch = next(data.make_train_iterator(config, **kwargs))
    assert set(batch) == {"image", "label", "parity"}
    np.testing.assert_array_equal(batch["image"], 255 - expected["image"])
    np.testing.assert_array_equal(batch["parity"], expected["label"] % 2)
    with pytest.raises(ValueError, match=r"Bad arguments for op 'invert'.*maximum must be"):
        data.validate_input_config(dict(config, pp_train="invert(300)"))


def test_register_op_checks_name_kind_and_clashes(restore_registry):
    with pytest.raises(ValueError, match="kind must be one of deterministic, random, decode"):
        data.register_op("blur", kind="stochastic")
    with pytest.raises(ValueError, match="Python identifier"):
        data.register_op("my-op")
    with pytest.raises(ValueError, match=r"'flip_lr' is already registered by "
                                         r"vitjax\.data\.ops\.flip_lr"):
        data.register_op("flip_lr", kind="random")(lambda: None)

    @data.register_op("tag")
    def tag(value=1):
        """Returns an op writing `value` to the field 'tag'."""
        return lambda example, seed: {**example, "tag": value}

    assert _apply("tag(5)")["tag"] == 5
    data.register_op("untagged")(lambda: lambda example, seed: example["image"])
    with pytest.raises(TypeError, match="returned a .*Tensor; an op returns the example dict"):
        _apply("untagged")
    with pytest.raises(TypeError, match="already has a key or outkey"):
        data.image_op(lambda size, key="image": None)
