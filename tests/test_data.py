"""Tests of the input pipeline (vitjax.data), offline, on the bundled digits dataset."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest

import vitjax.data as data

_DIGITS_PP = "gray_to_rgb|resize(16)|value_range(0, 1)"


def _config(data_dir, **overrides):
    config = dict(dataset="digits", data_dir=data_dir, pp_train=_DIGITS_PP, pp_eval=_DIGITS_PP)
    config.update(overrides)
    return config


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _digits_arrays(data_dir, split):
    from vitjax.data import digits
    builder = digits.prepare(data_dir)
    examples = builder.as_dataset(split=split, batch_size=-1)
    return examples["image"].numpy(), examples["label"].numpy()


# ---------------------------------------------------------------------------------------------
# Config validation (no TensorFlow).
# ---------------------------------------------------------------------------------------------

def test_import_and_validation_need_no_tensorflow():
    code = (
        "import sys, vitjax.data as data\n"
        "data.validate_input_config(dict(dataset='digits', pp_train='decode|flip_lr',"
        " pp_eval='resize(8)'))\n"
        "try:\n"
        "    data.validate_input_config(dict(dataset='digits', pp_train='decode|blur(3)'))\n"
        "except ValueError as error:\n"
        "    print(error)\n"
        "import jax, jax.numpy as jnp\n"
        "transform = data.make_batch_transform(dict(dataset='digits', pp_train='decode',"
        " label_smoothing=0.1, mixup=dict(mixup_alpha=0.8)), num_classes=10)\n"
        "batch = transform(dict(image=jnp.ones((2, 4, 4, 3)), label=jnp.array([1, 2])),"
        " jax.random.key(0))\n"
        "print(batch['label'].shape, float(batch['label'].sum()))\n"
        "print('tensorflow' in sys.modules, 'tensorflow_datasets' in sys.modules,"
        " 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=120)
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "False False False"
    assert lines[-2] == "(2, 10) 2.0"
    assert "Unknown op 'blur'" in lines[0] and "inception_crop" in lines[0]


@pytest.mark.parametrize("overrides, message", [
    (dict(pp_train="decode|random_resized_crop(224)"), "valid ops: central_crop, color_jitter, copy, decode"),
    (dict(pp_train="decode|resize(0)"), "op 'resize'"),
    (dict(pp_train="decode|resize(32, 64, 1, 2)"), "too many positional arguments"),
    (dict(pp_train="decode|flip_lr(probability=2)"), "op 'flip_lr'"),
    (dict(pp_train="decode|inception_crop(224, scale=(0.5, 0.1))"), "scale"),
    (dict(pp_train="resize(32)|decode"), "must come first"),
    (dict(pp_train="decode||flip_lr"), "Empty op"),
    (dict(pp_train="decode|resize(size=x)"), "Python literals"),
    (dict(dataset="Image Net"), "TFDS name"),
    (dict(train_split="train[:50%"), "TFDS split"),
    (dict(mixup=dict(alpha=0.8)), "valid keys: mixup_alpha, cutmix_alpha, prob, switch_prob"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(source="disk"), "auto, memory, random_access, stream"),
    (dict(batch_size=8), "valid keys:"),
    (dict(random_erasing=0.25, pp_train="decode|random_erasing(0.5)"), "asked twice"),
    (dict(pp_modules="my_ops"), "must be a tuple of module names"),
    (dict(pp_modules=("vitjax_no_such_ops",)),
     "input.pp_modules: importing module 'vitjax_no_such_ops' failed: ModuleNotFoundError"),
    (dict(pp_train="decode|views(2, 'flip_lr|blur(3)')"), "in a view's pp: Unknown op 'blur'"),
    (dict(pp_train="views(2, 'decode|flip_lr')"), "cannot decode: put the decode op before"),
    (dict(pp_train="decode|views(2)"), "views takes (num_views, pp) pairs"),
    (dict(pp_train="decode|views(0, 'flip_lr')"), "num_views must be an int >= 1"),
    (dict(pp_train="decode|views(2, 'flip_lr')", mixup=dict(cutmix_alpha=1.0)),
     "mixup / cutmix with several views is not supported"),
    (dict(pp_train="decode|views(2, 'flip_lr')", random_erasing=0.25), "in each view's pp"),
    (dict(pp_train="decode|flip_lr(key='')"), "key must be a field name"),
    (dict(pp_train="decode|keep()"), "keep needs at least one field name"),
    (dict(pp_train="decode|label_map({0: 'cat'})"), "new labels must be ints"),
    (dict(pp_train="decode|onehot(10, smoothing=1.0)"), "smoothing must be in [0, 1)"),
])
def test_validation_errors_name_valid_choices(overrides, message):
    with pytest.raises(ValueError, match=None) as error:
        data.validate_input_config(_config(None, **overrides))
    assert message in str(error.value)


def test_validation_accepts_config_dict_and_fills_defaults():
    import ml_collections
    config = ml_collections.ConfigDict(_config(None, mixup=dict(mixup_alpha=0.8)))
    validated = data.validate_input_config(config)
    assert validated["mixup"] == dict(mixup_alpha=0.8, cutmix_alpha=0.0, prob=1.0, switch_prob=0.5)
    assert validated["train_split"] == "train" and validated["eval_split"] == "test"


# ---------------------------------------------------------------------------------------------
# The bundled digits dataset.
# ---------------------------------------------------------------------------------------------

def test_digits_builds_offline_with_disjoint_stratified_splits(data_dir):
    from sklearn.datasets import load_digits
    from vitjax.data import digits
    train_indices, test_indices = digits.split_indices()
    assert (len(train_indices), len(test_indices)) == (1437, 360)
    assert not set(train_indices) & set(test_indices)
    assert data.dataset_info(_config(data_dir)) == dict(
        num_classes=10, num_train_examples=1437, num_eval_examples=360)

    train_images, train_labels = _digits_arrays(data_dir, "train")
    test_images, test_labels = _digits_arrays(data_dir, "test")
    assert train_images.shape == (1437, 8, 8, 1) and test_images.shape == (360, 8, 8, 1)
    assert train_images.dtype == np.uint8 and train_images.max() == 255
    # sklearn's 1,797 images are pairwise distinct, so no shared image means no shared example.
    train_set = {image.tobytes() for image in train_images}
    assert len(train_set) == 1437
    assert not train_set & {image.tobytes() for image in test_images}
    # Together the splits are exactly sklearn's dataset, labels included.
    sklearn_digits = load_digits()
    expected = sorted(
        (np.round(image * 255 / 16).astype(np.uint8)[..., None].tobytes(), int(label))
        for image, label in zip(sklearn_digits.images, sklearn_digits.target))
    built = sorted([(image.tobytes(), int(label)) for image, label in zip(
        np.concatenate([train_images, test_images]), np.concatenate([train_labels, test_labels]))])
    assert built == expected
    # Stratified: every class has 20% (+-1) of its examples in test.
    class_counts = np.bincount(sklearn_digits.target)
    assert np.all(np.abs(np.bincount(test_labels, minlength=10) - class_counts * 0.2) <= 1)
    # Preparing again finds it built.
    assert digits.prepare(data_dir).info.splits["train"].num_examples == 1437


def test_unprepared_manual_dataset_says_where_to_put_files(tmp_path):
    from vitjax.data import sources
    with pytest.raises(data.DatasetNotPreparedError) as error:
        sources.get_builder("imagenet2012", str(tmp_path))
    message = str(error.value)
    assert os.path.join(str(tmp_path), "downloads", "manual") in message
    assert "tfds build imagenet2012" in message


def test_unknown_split_lists_valid_splits(data_dir):
    with pytest.raises(ValueError, match="splits: test, train"):
        data.dataset_info(_config(data_dir, eval_split="validation"))


# ---------------------------------------------------------------------------------------------
# Train batches: determinism, resume, sharding over processes.
# ---------------------------------------------------------------------------------------------

def test_train_batches_depend_only_on_seed_and_step(data_dir):
    import jax
    config = _config(
        data_dir, label_smoothing=0.1, random_erasing=0.5,
        pp_train=("gray_to_rgb|resize(16)|flip_lr|randaug(1, 9, magnitude_std=0.5)|"
                  "value_range(-1, 1)"),
        mixup=dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5))
    run = _take(data.make_train_iterator(config, global_batch_size=4, seed=3, process_index=0,
                                         process_count=1), 4)
    resumed = _take(data.make_train_iterator(config, global_batch_size=4, seed=3, start_step=2,
                                             process_index=0, process_count=1), 2)
    # One-hot, smoothing and mixup run on the device, as the trainer runs them: jitted, keyed
    # by the step.
    transform = jax.jit(data.make_batch_transform(config, num_classes=10))
    key = jax.random.key(3)
    for step, batch in enumerate(run):
        assert set(batch) == {"image", "label"}
        assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
        assert 0 <= batch["label"].min() and batch["label"].max() < 10
        labels = np.asarray(transform(batch, jax.random.fold_in(key, step))["label"])
        assert labels.shape == (4, 10) and labels.dtype == np.float32
        np.testing.assert_allclose(labels.sum(axis=1), 1.0, atol=1e-5)
        assert labels.min() >= 0.01 - 1e-6  # Smoothing 0.1 over 10 classes.
    for expected, actual in zip(run[2:], resumed):
        np.testing.assert_array_equal(expected["image"], actual["image"])
        np.testing.assert_array_equal(expected["label"], actual["label"])
    assert not np.array_equal(run[0]["image"], run[1]["image"])


def test_process_slices_partition_the_global_batch(data_dir):
    config = _config(data_dir, pp_train="gray_to_rgb|random_crop(8, padding=2)|flip_lr|"
                                        "value_range(0, 1)")
    single = _take(data.make_train_iterator(config, global_batch_size=6, seed=0, start_step=5,
                                            process_index=0, process_count=1), 2)
    other_seed = next(data.make_train_iterator(config, global_batch_size=6, seed=1, start_step=5,
                                               process_index=0, process_count=1))
    assert not np.array_equal(single[0]["image"], other_seed["image"])
    slices = [_take(data.make_train_iterator(config, global_batch_size=6, seed=0, start_step=5,
                                             process_index=index, process_count=2), 2)
              for index in range(2)]
    for step in range(2):
        assert slices[0][step]["image"].shape == (3, 8, 8, 3)
        for name in ("image", "label"):
            np.testing.assert_array_equal(
                np.concatenate([slices[0][step][name], slices[1][step][name]]),
                single[step][name])


def test_an_epoch_visits_each_kept_example_once(data_dir):
    # train_fraction keeps the first 1% of the train split: 14 examples, i.e. 7 steps of 2.
    config = _config(data_dir, pp_train="value_range(0, 255)", train_fraction=0.01)
    assert data.dataset_info(config)["num_train_examples"] == 14
    batches = _take(data.make_train_iterator(config, global_batch_size=2, seed=0, process_index=0,
                                             process_count=1), 14)
    epochs = [[image.tobytes() for batch in batches[start:start + 7] for image in batch["image"]]
              for start in (0, 7)]
    train_images, _ = _digits_arrays(data_dir, "train")
    kept = sorted(image.astype(np.float32).tobytes() for image in train_images[:14])
    assert sorted(epochs[0]) == kept and sorted(epochs[1]) == kept
    assert epochs[0] != epochs[1]  # Each epoch has its own order.


@pytest.mark.parametrize("source", ["memory", "stream"])
def test_repeated_augmentation_gives_each_example_three_differently_augmented_views(data_dir, source):
    """DeiT's repeated augmentation: 3 copies of each example in a row; an epoch holds 1/3 of the examples."""
    plain = "decode(channels=1)|value_range(0, 255)" if source == "stream" else "value_range(0, 255)"
    flipped = plain.replace("value_range", "flip_lr|random_crop(8, padding=2)|value_range")
    kwargs = dict(data_dir=data_dir, source=source, train_fraction=0.01, shuffle_buffer=64)  # 14 examples
    def batches(pp, repeats, count, start_step=0):
        config = _config(pp_train=pp, repeated_augmentation=repeats, **kwargs)
        return _take(data.make_train_iterator(config, global_batch_size=6, seed=0, start_step=start_step,
                                              process_index=0, process_count=1), count)
    views = np.concatenate([batch["image"] for batch in batches(plain, 3, 7)])  # 42 elements = 3 epochs
    labels = np.concatenate([batch["label"] for batch in batches(plain, 3, 7)])
    for group in range(14):
        for copy in (1, 2):
            np.testing.assert_array_equal(views[3 * group + copy], views[3 * group])
            np.testing.assert_array_equal(labels[3 * group + copy], labels[3 * group])
    train_images, _ = _digits_arrays(data_dir, "train")
    kept = sorted(image.astype(np.float32).tobytes() for image in train_images[:14])
    assert sorted(view.tobytes() for view in views[::3]) == kept  # 14 distinct, each 3 times
    augmented = np.concatenate([batch["image"] for batch in batches(flipped, 3, 2)])
    assert not all(np.array_equal(augmented[3 * g], augmented[3 * g + c]) for g in range(4) for c in (1, 2))
    resumed = batches(flipped, 3, 1, start_step=1)[0]["image"]  # a resume replays the same views
    np.testing.assert_array_equal(resumed, augmented[6:])
    with pytest.raises(ValueError, match="repeated_augmentation must be an int >= 1"):
        data.validate_input_config(_config(repeated_augmentation=0, **kwargs))


# ---------------------------------------------------------------------------------------------
# Eval batches.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_example_once(data_dir, process_count):
    config = _config(data_dir, pp_eval="value_range(0, 255)")
    test_images, test_labels = _digits_arrays(data_dir, "test")
    seen, num_padding, num_steps = [], 0, []
    for process_index in range(process_count):
        iterator = data.make_eval_iterator(config, global_batch_size=64,
                                           process_index=process_index,
                                           process_count=process_count)
        batches = list(iterator)
        num_steps.append(len(batches))
        for batch in batches:
            assert batch["image"].shape == (64 // process_count, 8, 8, 1)
            assert batch["label"].dtype == np.int32 and batch["mask"].dtype == bool
            mask = batch["mask"]
            seen += [(image.astype(np.uint8).tobytes(), int(label))
                     for image, label in zip(batch["image"][mask], batch["label"][mask])]
            num_padding += int((~mask).sum())
    assert num_steps == [6] * process_count  # ceil(360 / 64) on every host.
    assert num_padding == 6 * 64 - 360
    assert sorted(seen) == sorted((image.tobytes(), int(label))
                                  for image, label in zip(test_images, test_labels))


# ---------------------------------------------------------------------------------------------
# The other sources read the same data in the same step-keyed way.
# ---------------------------------------------------------------------------------------------

def test_random_access_source_matches_memory_source(tmp_path):
    pytest.importorskip("array_record")
    from vitjax.data import digits
    array_record_dir = str(tmp_path / "array_record")
    digits.prepare(array_record_dir, file_format="array_record")
    batches = {}
    for source in ("memory", "random_access"):
        config = _config(array_record_dir, source=source,
                         pp_eval="decode(channels=1)|value_range(0, 255)",
                         pp_train="decode(channels=1)|gray_to_rgb|flip_lr|value_range(0, 1)")
        batches[source] = _take(data.make_train_iterator(
            config, global_batch_size=4, seed=1, start_step=400, process_index=0,
            process_count=1), 2) + [list(data.make_eval_iterator(
                config, global_batch_size=128, process_index=0, process_count=1))[-1]]
    for memory_batch, random_access_batch in zip(batches["memory"], batches["random_access"]):
        for name in memory_batch:
            np.testing.assert_array_equal(memory_batch[name], random_access_batch[name])


def test_stream_source_resumes_and_covers_eval(data_dir):
    config = _config(data_dir, source="stream", shuffle_buffer=64,
                     pp_train="decode|gray_to_rgb|flip_lr|value_range(0, 1)",
                     pp_eval="decode(channels=1)|value_range(0, 255)")
    run = _take(data.make_train_iterator(config, global_batch_size=4, seed=0, start_step=358,
                                         process_index=0, process_count=1), 4)
    resumed = _take(data.make_train_iterator(config, global_batch_size=4, seed=0, start_step=360,
                                             process_index=0, process_count=1), 2)
    # Steps 358..361 cross the end of the first epoch (1,437 examples, 359.25 steps of 4).
    for expected, actual in zip(run[2:], resumed):
        np.testing.assert_array_equal(expected["image"], actual["image"])
    test_images, _ = _digits_arrays(data_dir, "test")
    seen = []
    for process_index in range(2):
        for batch in data.make_eval_iterator(config, global_batch_size=100,
                                             process_index=process_index, process_count=2):
            seen += [image.astype(np.uint8).tobytes() for image in batch["image"][batch["mask"]]]
    assert sorted(seen) == sorted(image.tobytes() for image in test_images)


# ---------------------------------------------------------------------------------------------
# Bad encodings are skipped and counted.
# ---------------------------------------------------------------------------------------------

def _png(image):
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_encodings_are_skipped_and_counted():
    from vitjax.data import ops, pipeline, sources
    images = [np.full((4, 4), 10 * index, np.uint8) for index in range(6)]
    encoded = np.array([_png(image) for image in images], dtype=object)
    encoded[2] = b"\x89PNG this is not an image"
    source = sources.MemorySource(encoded, np.arange(6))
    preprocess = ops.build_preprocess("decode(channels=1)|value_range(0, 255)")
    train = pipeline.build_train_dataset(
        source, preprocess, global_batch_size=3, seed=0, start_step=0, process_index=0,
        process_count=1)
    iterator = pipeline.DataIterator(train, first_step=0, num_steps=None, num_bad_examples=0,
                                     description="test")
    batches = _take(iterator, 4)  # Two epochs of 6: the bad image comes twice.
    assert iterator.num_bad_examples == 2
    labels = np.concatenate([batch["label"] for batch in batches])
    assert len(labels) == 12 and 2 not in labels
    for batch in batches:  # A filled slot repeats a good image with its own label.
        np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], 10 * batch["label"])

    evaluation, num_steps = pipeline.build_eval_dataset(
        source, preprocess, global_batch_size=4, process_index=0, process_count=1)
    iterator = pipeline.DataIterator(evaluation, first_step=0, num_steps=num_steps,
                                     num_bad_examples=0, description="test eval")
    batches = list(iterator)
    assert iterator.num_bad_examples == 1
    mask = np.concatenate([batch["mask"] for batch in batches])
    labels = np.concatenate([batch["label"] for batch in batches])
    assert mask.tolist() == [True, True, False, True, True, True, False, False]
    assert sorted(labels[mask]) == [0, 1, 3, 4, 5]


# ---------------------------------------------------------------------------------------------
# The ops.
# ---------------------------------------------------------------------------------------------

# name: (pp, input image, output field, output shape, output dtype); the example also has label 3.
_OP_CASES = {
    "decode": ("decode", "encoded", "image", (8, 8, 3), np.uint8),
    "decode_jpeg_and_inception_crop": ("decode_jpeg_and_inception_crop(6, scale=(0.5, 1.0))",
                                       "jpeg", "image", (6, 6, 3), np.uint8),
    "inception_crop": ("inception_crop((6, 5))", "rgb", "image", (6, 5, 3), np.uint8),
    "resize": ("resize(12, method='bicubic')", "gray", "image", (12, 12, 1), np.uint8),
    "resize_small": ("resize_small(4)", "wide", "image", (4, 8, 3), np.uint8),
    "central_crop": ("central_crop((4, 6))", "rgb", "image", (4, 6, 3), np.uint8),
    "random_crop": ("random_crop(8, padding=2)", "rgb", "image", (8, 8, 3), np.uint8),
    "flip_lr": ("flip_lr(1.0)", "rgb", "image", (8, 8, 3), np.uint8),
    "gray_to_rgb": ("gray_to_rgb", "gray", "image", (8, 8, 3), np.uint8),
    "randaug": ("randaug(3, 10, magnitude_std=0.5, probability=1.0)", "gray", "image", (8, 8, 1),
                np.uint8),
    "value_range": ("value_range(-1, 1)", "rgb", "image", (8, 8, 3), np.float32),
    "normalize": ("normalize", "rgb", "image", (8, 8, 3), np.float32),
    "random_erasing": ("value_range|random_erasing(1.0, mode='rand')", "rgb", "image", (8, 8, 3),
                       np.float32),
    "views": ("views(2, 'resize(4)', 1, 'resize(2)')", "rgb", "image_2", (2, 2, 3), np.uint8),
    "copy": ("copy('image', 'original')", "rgb", "original", (8, 8, 3), np.uint8),
    "rename": ("rename('label', 'target')", "rgb", "target", (), np.int32),
    "keep": ("keep('label')", "rgb", "label", (), np.int32),
    "drop": ("drop('label')", "rgb", "image", (8, 8, 3), np.uint8),
    "label_map": ("label_map((0, 0, 0, 7))", "rgb", "label", (), np.int32),
    "onehot": ("onehot(5)", "rgb", "label", (5,), np.float32),
    "color_jitter": ("color_jitter(probability=1.0)", "rgb", "image", (8, 8, 3), np.uint8),
    "random_grayscale": ("random_grayscale(1.0)", "rgb", "image", (8, 8, 3), np.uint8),
    "gaussian_blur": ("gaussian_blur(1.0)", "rgb", "image", (8, 8, 3), np.uint8),
    "solarize": ("solarize(1.0)", "rgb", "image", (8, 8, 3), np.uint8),
    "gmml_corrupt": ("value_range(0, 1)|gmml_corrupt(0.5)", "rgb", "image_corrupted", (8, 8, 3), np.float32),
    "select_bands": ("select_bands(drop=(1,))", "rgb", "image", (8, 8, 2), np.uint8),
    "sentinel_normalize": ("sentinel_normalize(mean=(9, 9, 9), std=(64, 64, 64))", "rgb", "image", (8, 8, 3),
                           np.float32),
    "synthetic_bands": ("synthetic_bands(4)", "gray", "image", (8, 8, 4), np.float32),
}


def _apply(pp, image, seed=(0, 0), label=3):
    """Returns the numpy fields of pp applied to the example {image, label}."""
    import tensorflow as tf
    from vitjax.data import ops
    example = dict(image=tf.constant(image), label=tf.constant(label, tf.int32))
    output = ops.build_preprocess(pp)(example, tf.constant(seed, tf.int64))
    return {name: value.numpy() for name, value in output.items()}


def test_each_op_runs_on_a_tiny_image():
    import tensorflow as tf
    from vitjax.data import ops
    # Ops registered by other modules (vitjax.text.ops, once a CLIP config or test imported it) are not cases here.
    built_in = {name for name, spec in ops._OPS.items() if spec.builder.__module__ == ops.__name__}
    assert set(_OP_CASES) == built_in
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (8, 8, 3), np.uint8)
    inputs = dict(rgb=rgb, gray=rgb[..., :1], wide=rng.integers(0, 256, (6, 12, 3), np.uint8),
                  encoded=_png(rgb), jpeg=tf.io.encode_jpeg(rgb).numpy())
    for name, (pp, image_name, field, shape, dtype) in _OP_CASES.items():
        output = _apply(pp, inputs[image_name], seed=(1, 2))[field]
        assert output.shape == shape and output.dtype == dtype, name
    np.testing.assert_array_equal(_apply("flip_lr(1.0)", rgb)["image"], rgb[:, ::-1])
    np.testing.assert_allclose(_apply("normalize", rgb)["image"], (rgb / 255 - ops.IMAGENET_MEAN)
                               / np.array(ops.IMAGENET_STD), rtol=1e-5, atol=1e-5)
    for method in ops.RESIZE_METHODS:  # every method keeps uint8 (nearest returns it unconverted)
        resized = _apply(f"resize(4, method={method!r})", rgb)["image"]
        assert resized.dtype == np.uint8 and resized.shape == (4, 4, 3), method
    nearest = _apply("resize(4, method='nearest')", rgb)["image"]
    np.testing.assert_array_equal(nearest, rgb[1::2, 1::2])  # half-pixel centres
    with pytest.raises(ValueError, match="gray_to_rgb"):  # 3-channel stats on a gray image.
        _apply("normalize", rgb[..., :1])


def test_rand_augment_ops_match_timm_within_one_grey_level(monkeypatch):
    import tensorflow as tf
    from PIL import Image
    from timm.data import auto_augment
    from vitjax.data import augment
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (12, 10, 3), np.uint8)
    image[:4] = rng.integers(60, 180, (4, 10, 3))  # Uneven histogram for equalize/autocontrast.
    fill = (124, 116, 104)
    level = 7.0
    for increasing in (True, False):
        hparams = dict(translate_pct=0.45, img_mean=fill, interpolation=Image.BILINEAR)
        names = (auto_augment._RAND_INCREASING_TRANSFORMS if increasing
                 else auto_augment._RAND_TRANSFORMS)
        assert len(names) == len(augment.RAND_AUGMENT_OPS)
        for timm_name, ours in zip(names, augment.RAND_AUGMENT_OPS.values()):
            op = auto_augment.AugmentOp(timm_name, prob=1.0, magnitude=level, hparams=hparams)
            for negate in (False, True):
                # timm negates when random() > 0.5.
                monkeypatch.setattr(auto_augment.random, "random",
                                    lambda negate=negate: 0.9 if negate else 0.1)
                expected = np.asarray(op(Image.fromarray(image))).astype(int)
                actual = ours(tf.constant(image), tf.constant(level), tf.constant(negate),
                              tf.constant(fill, tf.float32), increasing).numpy().astype(int)
                assert np.abs(actual - expected).max() <= 1, (timm_name, negate)


def test_rand_augment_is_deterministic_per_seed():
    import tensorflow as tf
    from vitjax.data import ops
    image = tf.constant(np.random.default_rng(1).integers(0, 256, (8, 8, 3), np.uint8))
    preprocess = ops.build_preprocess("randaug(2, 9, magnitude_std=0.5)")
    outputs = [preprocess(dict(image=image), tf.constant(seed, tf.int64))["image"].numpy()
               for seed in ([0, 1], [0, 1], [0, 2], [0, 3], [0, 4])]
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert any(not np.array_equal(outputs[0], other) for other in outputs[2:])


def test_random_erasing_box_has_timm_area_bounds():
    import tensorflow as tf
    from vitjax.data import augment
    image = tf.fill([20, 20, 3], 5.0)
    areas = []
    for index in range(20):
        erased = augment.random_erasing(image, tf.constant([index, 7], tf.int64), probability=1.0,
                                        mode="const", min_area=0.02, max_area=1 / 3,
                                        min_aspect=0.3).numpy()
        areas.append(np.mean(erased[..., 0] == 0.0))
    assert min(areas) >= 0.02 - 0.02 and max(areas) <= 1 / 3 + 0.05 and min(areas) > 0
    untouched = augment.random_erasing(image, tf.constant([0, 7], tf.int64), probability=0.0,
                                       mode="pixel", min_area=0.02, max_area=1 / 3, min_aspect=0.3)
    np.testing.assert_array_equal(untouched.numpy(), image.numpy())


# ---------------------------------------------------------------------------------------------
# Mixup / cutmix.
# ---------------------------------------------------------------------------------------------

def test_mixup_and_cutmix_match_timm_and_labels_sum_to_one():
    import jax
    import torch
    from timm.data import mixup as timm_mixup
    from vitjax.data import mixup
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 6, 8, 3)).astype(np.float32)
    labels = np.array([0, 3, 3, 1])
    uses = set()
    for seed in range(12):
        params = mixup.sample_mix_params(jax.random.key(seed), 6, 8, mixup_alpha=0.8,
                                         cutmix_alpha=1.0, prob=0.9, switch_prob=0.5)
        mixed_images, mixed_labels = mixup.apply_mix(
            images, mixup.one_hot(labels, 5, 0.1), params)
        mixed_images, mixed_labels = np.asarray(mixed_images), np.asarray(mixed_labels)
        lam, use_cutmix = float(params["lam"]), bool(params["use_cutmix"])
        uses.add(use_cutmix if lam < 1 else None)
        np.testing.assert_allclose(mixed_labels.sum(axis=1), 1.0, atol=1e-6)
        assert mixed_images.shape == images.shape and mixed_labels.shape == (4, 5)

        # timm's Mixup(mode="batch") with the same draws (its box comes from np.random).
        mixer = timm_mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.9, switch_prob=0.5,
                                 label_smoothing=0.1, num_classes=5)
        top, bottom, left, right = (int(value) for value in np.asarray(params["box"]))
        mixer._params_per_batch = lambda: (lam if not use_cutmix else 0.5, use_cutmix)
        original = timm_mixup.cutmix_bbox_and_lam
        timm_mixup.cutmix_bbox_and_lam = lambda *args, **kwargs: ((top, bottom, left, right), lam)
        try:
            expected_images, expected_labels = mixer(
                torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.from_numpy(labels))
        finally:
            timm_mixup.cutmix_bbox_and_lam = original
        np.testing.assert_allclose(mixed_images, expected_images.numpy().transpose(0, 2, 3, 1),
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(mixed_labels, expected_labels.numpy(), rtol=1e-6, atol=1e-6)
        if use_cutmix:  # Lambda is the share of pixels kept, after clipping the box.
            kept = np.mean(np.all(mixed_images == images, axis=(0, 3)))
            assert abs(kept - lam) < 1e-6
    assert {True, False} <= uses  # Both cutmix and mixup were exercised.
    # timm's one-hot smoothing, bit for bit.
    np.testing.assert_array_equal(
        np.asarray(mixup.one_hot(labels, 5, 0.1)),
        timm_mixup.mixup_target(torch.from_numpy(labels), 5, 1.0, 0.1).numpy())


def test_cutmix_box_is_timms_rand_bbox(monkeypatch):
    from timm.data import mixup as timm_mixup
    from vitjax.data import mixup
    rng = np.random.default_rng(1)
    for _ in range(200):
        height, width = (int(v) for v in rng.integers(1, 40, 2))
        lam = float(rng.choice([rng.uniform(), 0.0, 1.0, 0.5]))
        center = (int(rng.integers(0, height)), int(rng.integers(0, width)))
        draws = iter(center)
        monkeypatch.setattr(timm_mixup.np.random, "randint", lambda *args, **kwargs: next(draws))
        expected_box, expected_lam = timm_mixup.cutmix_bbox_and_lam((2, 3, height, width), lam)
        box, corrected = mixup.cutmix_box(np.float32(lam), *center, height, width)
        assert tuple(int(v) for v in box) == tuple(int(v) for v in expected_box), (height, width,
                                                                                   lam, center)
        assert abs(float(corrected) - expected_lam) < 1e-6


def test_mix_draws_follow_their_distributions():
    import jax
    from vitjax.data import mixup
    sample = jax.jit(jax.vmap(lambda key: mixup.sample_mix_params(
        key, 32, 32, mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.9, switch_prob=0.3)))
    params = jax.tree.map(np.asarray, sample(jax.random.split(jax.random.key(0), 8000)))
    lam, use_cutmix = params["lam"], params["use_cutmix"]
    applied = use_cutmix | (lam < 1)  # Not applied: lam 1 without cutmix.
    assert abs(applied.mean() - 0.9) < 0.015  # prob
    assert abs(use_cutmix[applied].mean() - 0.3) < 0.02  # switch_prob
    mixup_lam = lam[applied & ~use_cutmix]
    # Beta(0.8, 0.8): mean 1/2, variance 1 / (4 (2 alpha + 1)) = 0.0962.
    assert abs(mixup_lam.mean() - 0.5) < 0.015
    assert abs(mixup_lam.var() - 1 / (4 * 2.6)) < 0.006
    box = params["box"][use_cutmix]
    kept = 1 - (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2]) / 32**2
    np.testing.assert_allclose(lam[use_cutmix], kept, atol=1e-6)  # corrected lambda


def test_batch_transform_one_hots_and_mixes_the_global_batch():
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    config = _config(None, label_smoothing=0.2, mixup=dict(mixup_alpha=0.8))
    rng = np.random.default_rng(0)
    batch = dict(image=rng.normal(size=(8, 4, 4, 3)).astype(np.float32),
                 label=np.array([0, 1, 2, 3, 4, 0, 1, 2], np.int32), other=np.arange(8))
    key = jax.random.key(5)
    plain = data.make_batch_transform(_config(None, label_smoothing=0.2), 5)(batch, key)
    np.testing.assert_array_equal(plain["image"], batch["image"])
    np.testing.assert_allclose(np.asarray(plain["label"])[1], [0.04, 0.84, 0.04, 0.04, 0.04],
                               rtol=1e-6)

    transform = data.make_batch_transform(config, 5)
    mixed = jax.tree.map(np.asarray, transform(batch, key))
    # Example i is mixed with example 7 - i of the global batch, by one lambda, read off the
    # class-0 target of example 0 (label 0; example 7 has label 2).
    one_hot, flipped_labels = np.asarray(plain["label"]), np.asarray(plain["label"])[::-1]
    lam = (mixed["label"][0, 0] - 0.04) / (0.84 - 0.04)
    assert 0.01 < lam < 0.99
    np.testing.assert_allclose(mixed["image"], lam * batch["image"]
                               + (1 - lam) * batch["image"][::-1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mixed["label"], lam * one_hot + (1 - lam) * flipped_labels,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(mixed["other"], batch["other"])

    # Jitted on a batch sharded over 8 devices, as in the train step: the same numbers.
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
    sharded = jax.device_put(batch, sharding)
    jitted = jax.tree.map(np.asarray, jax.jit(transform)(sharded, key))
    for name in batch:
        np.testing.assert_allclose(jitted[name], mixed[name], rtol=1e-6, atol=1e-6)

    with pytest.raises(ValueError, match="mixes the fields 'image' and 'label'.*only: image"):
        transform(dict(image=batch["image"]), key)
    with pytest.raises(ValueError, match="already float"):
        transform(dict(batch, label=np.asarray(plain["label"])), key)
    with pytest.raises(ValueError, match="even batch"):
        transform(dict(image=batch["image"][:3], label=batch["label"][:3]), key)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        data.make_batch_transform(config, 0)


# ---------------------------------------------------------------------------------------------
# Device prefetch.
# ---------------------------------------------------------------------------------------------

def test_prefetch_to_device_shards_batches_and_reraises():
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    count = len(jax.devices())
    batches = [dict(image=np.full((count, 2, 2, 1), step, np.float32),
                    label=np.arange(count) + step) for step in range(3)]
    outputs = list(data.prefetch_to_device(iter(batches), 2, sharding))
    assert len(outputs) == 3
    for batch, output in zip(batches, outputs):
        assert output["image"].sharding == sharding
        assert len(output["image"].addressable_shards) == count
        np.testing.assert_array_equal(np.asarray(output["image"]), batch["image"])
        np.testing.assert_array_equal(np.asarray(output["label"]), batch["label"])

    def failing():
        yield batches[0]
        raise OSError("disk gone")
    iterator = data.prefetch_to_device(failing(), 1, sharding)
    next(iterator)
    with pytest.raises(OSError, match="disk gone"):
        next(iterator)
