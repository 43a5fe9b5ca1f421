"""Image-text pairs from a TFDS caption feature: all three sources, the caption pick, exact resume, the trainer."""
import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from vitjax import checkpoint, data, parallel, train
from vitjax.data import digits

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import clip_digits  # noqa: E402

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTIONS = ("a photo of the number {}.", "the digit {}.", "a drawing of a {}.")
NUM_TRAIN, NUM_TEST = 24, 8


def captions_of(index: int):
    """Returns the captions of example `index` (three per image, all naming its digit)."""
    label = int(digits.load_arrays()[1][index])
    return [template.format(NAMES[label]) for template in CAPTIONS]


class _TinyBuilder(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None  # Nothing to download, no checksums file (as vitjax.data.digits).

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(range(NUM_TRAIN)),
                "test": self._generate_examples(range(NUM_TRAIN, NUM_TRAIN + NUM_TEST))}


class TinyCaptions(_TinyBuilder):
    """Digits images with one caption each, no label."""

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1)), "caption": tfds.features.Text()}))

    def _generate_examples(self, indices):
        images = digits.load_arrays()[0]
        for index in indices:
            yield index, {"image": images[index], "caption": captions_of(index)[0]}


class TinyCaptionLists(_TinyBuilder):
    """Digits images with a list of captions each (COCO's layout: captions/text), no label."""

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1)),
            "captions": tfds.features.Sequence({"id": np.int64, "text": tfds.features.Text()})}))

    def _generate_examples(self, indices):
        images = digits.load_arrays()[0]
        for index in indices:
            yield index, {"image": images[index],
                          "captions": [{"id": 10 * index + k, "text": text}
                                       for k, text in enumerate(captions_of(index))]}


@pytest.fixture(scope="module")
def caption_dirs(tmp_path_factory):
    """Returns {file format: TFDS data dir} with both tiny caption datasets prepared in it."""
    dirs = {}
    for file_format in ("tfrecord", "array_record"):
        data_dir = str(tmp_path_factory.mktemp(file_format))
        for builder_class in (TinyCaptions, TinyCaptionLists):
            builder_class(data_dir=data_dir, file_format=file_format).download_and_prepare(
                file_format=file_format)
        dirs[file_format] = data_dir
    return dirs


def pp(train_pp: bool) -> str:
    """Returns clip_digits' pp without the label caption: the dataset's caption is the text."""
    image = "decode(channels=1)|resize(16)" + ("|random_crop(16, padding=1)" if train_pp else "")
    return f"{image}|gray_to_rgb|value_range(-1, 1)|tokenize('clip', context_length=16)"


def caption_input(data_dir, dataset="tiny_caption_lists", text_key="captions/text", **kwargs):
    """Returns an input config reading (image, caption) pairs of a tiny caption dataset."""
    return dict(dict(dataset=dataset, data_dir=data_dir, train_split="train", eval_split="test",
                     pp_train=pp(True), pp_eval=pp(False), label_key=None, text_key=text_key,
                     pp_modules=("vitjax.text.ops",)), **kwargs)


def take(iterator, count):
    """Returns the next `count` batches of an iterator."""
    return [next(iterator) for _ in range(count)]


@pytest.mark.parametrize("source,file_format", [("memory", "tfrecord"), ("random_access", "array_record"),
                                                 ("stream", "tfrecord")])
def test_caption_lists_in_every_source_resume_exactly(caption_dirs, source, file_format):
    """Each example gets one of its own captions, drawn per element; batches after a restart equal the unbroken run's."""
    import vitjax.text as text
    config = caption_input(caption_dirs[file_format], source=source)
    assert data.dataset_info(config) == dict(num_classes=None, num_train_examples=NUM_TRAIN,
                                             num_eval_examples=NUM_TEST)
    unbroken = take(data.make_train_iterator(config, global_batch_size=8, seed=3), 9)
    resumed = take(data.make_train_iterator(config, global_batch_size=8, seed=3, start_step=5), 4)
    for want, got in zip(unbroken[5:], resumed):
        assert sorted(got) == ["image", "text"] and got["text"].dtype == np.int32
        np.testing.assert_array_equal(got["text"], want["text"])
        np.testing.assert_array_equal(got["image"], want["image"])
    # Which captions each image got: compare the drawn tokens with every image's own captions.
    tokenizer = text.tokenizer("clip", context_length=16)
    own = {index: {tuple(row) for row in tokenizer(captions_of(index))} for index in range(NUM_TRAIN)}
    image_of = {}
    eval_batch = next(data.make_eval_iterator(config, global_batch_size=NUM_TEST))
    assert eval_batch["text"].shape == (NUM_TEST, 16) and eval_batch["mask"].all()
    plain = take(data.make_train_iterator(dict(config, pp_train="decode(channels=1)|tokenize('clip', "
                                               "context_length=16)"), global_batch_size=8, seed=3), 9)
    images = digits.load_arrays()[0]
    for batch in plain:
        for image, tokens in zip(batch["image"], batch["text"]):
            index = next(i for i in range(NUM_TRAIN) if np.array_equal(images[i], image.astype(np.uint8)))
            assert tuple(tokens) in own[index]
            image_of.setdefault(index, set()).add(tuple(tokens))
    # 72 draws over 24 images, three epochs: most images see more than one of their three captions.
    assert sum(len(drawn) > 1 for drawn in image_of.values()) >= NUM_TRAIN // 2


def test_single_caption_and_bad_keys(caption_dirs):
    """A plain string feature is the text as is; a wrong key fails before any compile, naming the features."""
    import vitjax.text as text
    config = caption_input(caption_dirs["tfrecord"], dataset="tiny_captions", text_key="caption",
                           pp_train="decode(channels=1)|tokenize('clip', context_length=16)")
    batch = next(data.make_train_iterator(config, global_batch_size=4, seed=0))
    tokenizer = text.tokenizer("clip", context_length=16)
    images = digits.load_arrays()[0]
    for image, tokens in zip(batch["image"], batch["text"]):
        index = next(i for i in range(NUM_TRAIN) if np.array_equal(images[i], image.astype(np.uint8)))
        np.testing.assert_array_equal(tokens, tokenizer(captions_of(index)[:1])[0])
    with pytest.raises(ValueError, match=r"input.text_key='captions/txt' is not a feature.*captions/text string"):
        data.dataset_info(caption_input(caption_dirs["tfrecord"], text_key="captions/txt"))
    with pytest.raises(ValueError, match=r"input.text_key='image' must name a text feature"):
        data.dataset_info(caption_input(caption_dirs["tfrecord"], text_key="image"))
    with pytest.raises(ValueError, match=r"input.label_key='label' is not a feature.*image uint8"):
        data.dataset_info(caption_input(caption_dirs["tfrecord"], label_key="label"))
    with pytest.raises(ValueError, match="input.text_key must be a feature name or None"):
        data.validate_input_config(caption_input(caption_dirs["tfrecord"], text_key=""))


def read_losses(workdir):
    """Returns {step: train loss} of WORKDIR/metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {record["step"]: record["train/loss"] for record in records if "train/loss" in record}


def test_tiny_clip_trains_on_caption_lists_and_resumes_exactly(caption_dirs, tmp_path):
    """The tiny CLIP trains from captions/text through the trainer; restarted from its step-2 checkpoint it repeats steps 3-4 exactly."""
    config = clip_digits.get_config("runlocal")
    config.input = caption_input(caption_dirs["tfrecord"])
    config.evals = dict(retrieval=dict(kind="retrieval"))
    config.update(batch_size=8, eval_batch_size=8, total_steps=4, log_every_steps=1,
                  checkpoint_every_steps=2, keep_checkpoints=2)
    config.model.update(vision_depth=1, text_depth=1)
    mesh = parallel.create_mesh(dict(data=1, fsdp=1, model=1), devices=jax.devices()[:1])
    unbroken, restarted = tmp_path / "unbroken", tmp_path / "restarted"
    final = train.train_and_evaluate(config, str(unbroken), mesh=mesh)
    assert final["step"] == 4 and final["retrieval/num_examples"] == NUM_TEST
    losses = read_losses(unbroken)
    assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(list(losses.values())))
    # A run killed after its step-2 checkpoint: the workdir without the step-4 one.
    shutil.copytree(unbroken, restarted)
    assert checkpoint.complete_steps(str(restarted / "checkpoints")) == (2, 4)
    shutil.rmtree(restarted / "checkpoints" / "4")
    resumed = train.train_and_evaluate(config, str(restarted), mesh=mesh)
    assert resumed["step"] == 4
    assert read_losses(restarted) == losses  # the same batches after the restart: bit-equal losses
    for k in (1, 5, 10):
        key = f"retrieval/image_to_text_recall@{k}"
        assert resumed[key] == final[key]


def test_clip_configs_caption_option():
    """clip_b32 / siglip_b16 with text_key read the caption feature (no label, no templates) and evaluate retrieval."""
    import clip_b32
    import siglip_b16
    for config in (clip_b32.get_config("dataset=coco_captions,text_key=captions/text,eval_split=val"),
                   siglip_b16.get_config("spm=/tmp/spiece.model,dataset=coco_captions,text_key=captions/text,"
                                         "eval_split=val")):
        inputs = config.input.to_dict()  # siglip's pp names a model file not here: not parsed
        assert (inputs["dataset"], inputs["label_key"], inputs["text_key"], inputs["eval_split"]) == (
            "coco_captions", None, "captions/text", "val")
        for pp_string in (inputs["pp_train"], inputs["pp_eval"]):
            assert "label_caption" not in pp_string and "normalize(" in pp_string and "|tokenize(" in pp_string
        assert config.evals.to_dict() == {"retrieval": {"kind": "retrieval"}}
    checked = data.validate_input_config(clip_b32.get_config("dataset=coco_captions,text_key=captions/text").input)
    assert checked["text_key"] == "captions/text" and checked["label_key"] is None
    templated = clip_b32.get_config()
    assert templated.input.get("text_key") is None and "label_caption('imagenet'" in templated.input.pp_train
    assert "zeroshot" in templated.evals
