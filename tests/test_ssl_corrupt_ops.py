"""GMML's corruption from the input pipeline: the pp op `gmml_corrupt` (per example, on the host) and the batch step
`input.gmml_replace` (on the device) run the same rules as the objectives' on-device draw, and give the same corrupted
images and masks for the same draws; GMML and SiT read them with `corruption_from="data"`; `:runlocal` trains."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax.data as data
from vitjax import config_utils, masking, objectives
from vitjax.data import mixup, ops
from vitjax.objectives import gmml
from test_train import read_metrics, run

SETTINGS = dict(mask_ratio=0.75, align=2, max_block_fraction=0.3)


def corrupt_with_op(pp, image, seed):
    """Returns the op's example and the JAX key it drew from (the pp chain folds the op's position into the seed)."""
    import tensorflow as tf
    example = data.build_preprocess(pp)({"image": tf.constant(image)}, tf.constant(seed, tf.int64))
    op_seed = tf.random.experimental.stateless_fold_in(tf.constant(seed, tf.int64), 0).numpy()
    return {name: np.asarray(value) for name, value in example.items()}, ops.jax_key(op_seed)


@pytest.mark.parametrize("corruption", ["noise", "zeros"])
def test_op_runs_the_rules_of_the_device_draw(corruption):
    image = np.random.default_rng(0).uniform(3.0, 4.0, (16, 16, 3)).astype(np.float32)
    example, key = corrupt_with_op(f"gmml_corrupt(0.75, {corruption!r}, align=2)", image, (5, 7))
    np.testing.assert_array_equal(example["image"], image)                     # the clean image stays
    mask_key, fill_key = jax.random.split(key)
    mask = masking.group_mask(mask_key, 16, 16, 0.75, align=2)
    fill = masking.corruption_fill(fill_key, image.shape, image.dtype, corruption)
    np.testing.assert_array_equal(example["corruption_mask"], mask)
    np.testing.assert_array_equal(example["image_corrupted"], masking.fill_groups(image, mask, fill))
    # The same draws as a batch of one through the objective's jitted path: the same corrupted image.
    device = jax.jit(masking.fill_groups)(jnp.asarray(image)[None], mask[None], fill[None])
    np.testing.assert_array_equal(example["image_corrupted"], np.asarray(device)[0])
    share = example["corruption_mask"].mean()
    assert 0.5 <= share <= 0.75 + 2 * 8 / 256 and 0.0 < share < 1.0       # U(0.5, 0.75), cells of 2 x 2
    corrupted = example["image_corrupted"][example["corruption_mask"] > 0]
    if corruption == "zeros":
        assert np.all(corrupted == 0)
    else:  # N(0, 1) noise where the image lies in [3, 4]
        assert abs(corrupted.mean()) < 0.2 and 0.8 < corrupted.std() < 1.2
    # Inside views each view gets its own corruption, suffixed as the view.
    views, _ = corrupt_with_op("views(2, 'gmml_corrupt(0.75, align=2)')", image, (5, 7))
    assert sorted(views) == ["corruption_mask_0", "corruption_mask_1", "image_0", "image_1",
                             "image_corrupted_0", "image_corrupted_1"]
    assert not np.array_equal(views["corruption_mask_0"], views["corruption_mask_1"])


def test_batch_step_equals_the_device_draw_for_the_same_draws():
    images = jax.random.uniform(jax.random.key(1), (8, 16, 16, 3), minval=5.0, maxval=6.0)
    rng = jax.random.key(3)
    key = jax.random.fold_in(rng, mixup.GMML_SALT)          # the batch step's key
    noise_only = gmml.corrupt(key, images, **SETTINGS)       # the per-example part, as the op would give it
    full = gmml.corrupt(key, images, replace_ratio=0.3, replace_prob=0.5, **SETTINGS)
    config = dict(config_utils.digits_input(16), pp_train="decode(channels=1)|value_range(-1, 1)|gmml_corrupt()",
                  gmml_replace=dict(ratio=0.3, prob=0.5, align=2, max_block_fraction=0.3))
    transform = data.make_batch_transform(config, 10)
    out = jax.jit(transform)(dict(image=images, image_corrupted=noise_only[0], corruption_mask=noise_only[1]), rng)
    np.testing.assert_array_equal(out["image_corrupted"], full[0])
    np.testing.assert_array_equal(out["corruption_mask"], full[1])
    np.testing.assert_array_equal(out["image"], images)
    replaced = np.asarray(out["corruption_mask"] != noise_only[1]).any(axis=(1, 2))
    assert 0 < replaced.sum() < 8                              # both branches at probability 1/2
    # Two views (SiT): replaced as one batch of 2B, the views in index order, as SiT's device path.
    view_0, view_1 = images[:4], images[4:]
    out = transform(dict(image_0=view_0, image_1=view_1, image_corrupted_0=noise_only[0][:4],
                         image_corrupted_1=noise_only[0][4:], corruption_mask_0=noise_only[1][:4],
                         corruption_mask_1=noise_only[1][4:]), rng)
    np.testing.assert_array_equal(jnp.concatenate([out["image_corrupted_0"], out["image_corrupted_1"]]), full[0])
    np.testing.assert_array_equal(jnp.concatenate([out["corruption_mask_0"], out["corruption_mask_1"]]), full[1])


def test_coverage_of_the_data_path_agrees_with_the_device_path():
    import tensorflow as tf
    image = np.zeros((16, 16, 3), np.float32)
    preprocess = data.build_preprocess("gmml_corrupt(0.75, align=2)")
    shares = np.array([preprocess({"image": tf.constant(image)}, tf.constant((s, 1), tf.int64))["corruption_mask"]
                       .numpy().mean() for s in range(150)])
    device = np.asarray(gmml.corrupt(jax.random.key(0), jnp.zeros((400, 16, 16, 3)), **SETTINGS)[1]).mean(axis=(1, 2))
    assert abs(shares.mean() - device.mean()) <= 4 * device.std() * np.sqrt(1 / 150 + 1 / 400), (shares.mean(),
                                                                                               device.mean())
    assert abs(shares.std() - device.std()) <= 0.3 * device.std(), (shares.std(), device.std())


def objective_config(name):
    config = config_utils.load_config(f"configs/{name}_vit.py:runlocal")
    config.model = dict(config.model, depth=1, embed_dim=16, num_heads=1, mlp_dim=32)
    config.objective_kwargs = dict(config.objective_kwargs, recons_blocks=(1,), corruption_from="data")
    if name == "sit":
        config.objective_kwargs.update(out_dim=8, hidden_dim=16)
    return config


@pytest.mark.parametrize("name, clean_keys, rng_parts", [("gmml", ("image",), 2), ("sit", ("image_0", "image_1"), 3)])
def test_objectives_read_the_data_fields_as_they_draw_them(name, clean_keys, rng_parts):
    config = objective_config(name)
    on_data = objectives.create(name, config)
    config.objective_kwargs = dict(config.objective_kwargs, corruption_from="device")
    on_device = objectives.create(name, config)
    assert on_device.batch_keys == clean_keys
    suffixes = [key[len("image"):] for key in clean_keys]
    assert on_data.batch_keys == (*clean_keys, *(f"image_corrupted{s}" for s in suffixes),
                                  *(f"corruption_mask{s}" for s in suffixes))
    images = jax.random.uniform(jax.random.key(0), (4 * len(clean_keys), 8, 8, 1), minval=-1.0, maxval=1.0)
    batch = dict(zip(clean_keys, jnp.split(images, len(clean_keys))))
    rng = jax.random.key(1)
    # The fields the pipeline would give for the device's own draw.
    corrupted, mask = on_device.corrupt(jax.random.split(rng, rng_parts)[0], images)
    data_batch = dict(batch, **{f"image_corrupted{s}": c for s, c in zip(suffixes, jnp.split(corrupted, len(suffixes)))},
                      **{f"corruption_mask{s}": m for s, m in zip(suffixes, jnp.split(mask, len(suffixes)))})
    assert set(data_batch) == set(on_data.batch_keys)
    variables = on_device.init_variables(jax.random.key(2), batch)
    loss_device, aux_device = jax.jit(on_device.train_loss)(variables, batch, rng)
    loss_data, aux_data = jax.jit(on_data.train_loss)(variables, data_batch, rng)
    assert float(loss_device) > 0
    # The same inputs to the model; two programs, so XLA may fuse the sums differently (1 ulp seen for SiT).
    np.testing.assert_allclose(loss_data, loss_device, rtol=1e-6)
    assert sorted(aux_data["metrics"]) == sorted(aux_device["metrics"])
    for metric, value in aux_device["metrics"].items():
        np.testing.assert_allclose(aux_data["metrics"][metric], value, rtol=1e-6)
    assert sorted(on_data.example_batch(np.zeros((1, 8, 8, 1), np.float32))) == sorted(on_data.batch_keys)


@pytest.mark.parametrize("pp, replace, message", [
    ("gmml_corrupt(1.2)", None, r"mask_ratio must be a number in the open interval \(0, 1\)"),
    ("gmml_corrupt(0.5, 'blur')", None, r"valid choices: \['noise', 'zeros'\]"),
    ("value_range(-1, 1)", dict(ratio=0.3), r"input.pp_train lacks; add gmml_corrupt"),
    ("gmml_corrupt()", dict(ratio=0.3, probability=0.5), r"valid keys: ratio, prob, align, max_block_fraction"),
])
def test_bad_settings_fail_when_the_config_is_checked(pp, replace, message):
    config = dict(config_utils.digits_input(), pp_train="decode(channels=1)|" + pp)
    if replace is not None:
        config["gmml_replace"] = replace
    with pytest.raises(ValueError, match=message):
        data.validate_input_config(config)
    bad = objective_config("gmml")
    bad.objective_kwargs = dict(bad.objective_kwargs, corruption_from="both")
    with pytest.raises(ValueError, match=r"valid choices: \['device', 'data'\]"):
        objectives.create("gmml", bad)


def test_runlocal_with_the_data_path_trains(tmp_path):
    config = config_utils.load_config("configs/gmml_vit.py:runlocal,corrupt_in=data",
                                      {"progress_bar": False, "checkpoint_async": False})
    assert config.objective_kwargs.corruption_from == "data" and "gmml_corrupt(0.6" in config.input.pp_train
    config.total_steps = 40
    config.log_every_steps = 10
    config.evals = {}
    run(config, str(tmp_path / "run"))
    records = read_metrics(str(tmp_path / "run"))
    losses = [record["train/loss"] for record in records if "train/loss" in record]
    fractions = [record["train/masked_fraction"] for record in records if "train/masked_fraction" in record]
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(0.3 <= fraction <= 0.65 for fraction in fractions), fractions
