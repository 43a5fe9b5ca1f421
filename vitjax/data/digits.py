"""The bundled offline dataset: scikit-learn's 1,797 handwritten 8x8 digits as a TFDS builder.

scikit-learn ships the images inside its wheel, so `prepare(data_dir)` builds the TFDS dataset
"digits" without any network: image (8, 8, 1) uint8, scaled from sklearn's 0..16 to 0..255,
and label (10 classes). The "train" (1,437) and "test" (360) splits are a fixed stratified split
of sklearn's order (`split_indices`); they never overlap.

Imported lazily (it imports tensorflow_datasets); importing it registers the builder name
"digits" with TFDS, after which `tfds.builder("digits", data_dir=...)` works too.
"""
import contextlib
import fcntl
import functools
import os

import numpy as np
import tensorflow_datasets as tfds

NUM_TEST_EXAMPLES = 360
_SPLIT_SEED = 0  # Part of the dataset's definition: changing it changes the splits.


@functools.cache
def load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Returns sklearn's digits as (images uint8 (1797, 8, 8, 1) in 0..255, labels int64)."""
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int64)


def split_indices() -> tuple[np.ndarray, np.ndarray]:
    """Returns sorted (train, test) indices into sklearn's digits: disjoint, stratified."""
    _, labels = load_arrays()
    classes, counts = np.unique(labels, return_counts=True)
    # Largest-remainder allocation, so the class quotas sum exactly to NUM_TEST_EXAMPLES.
    quotas = counts * NUM_TEST_EXAMPLES / len(labels)
    per_class = np.floor(quotas).astype(int)
    shortfall = NUM_TEST_EXAMPLES - per_class.sum()
    per_class[np.argsort(-(quotas - per_class), kind="stable")[:shortfall]] += 1
    # The legacy RandomState stream is frozen by numpy's compatibility policy.
    rng = np.random.RandomState(_SPLIT_SEED)
    test = np.concatenate([rng.permutation(np.flatnonzero(labels == label))[:count]
                           for label, count in zip(classes, per_class)])
    test = np.sort(test)
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits (UCI optdigits test set), offline."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "1,437 train / 360 test, stratified with a fixed seed."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS looks for a checksums file beside the code; there is nothing to download, and its
        # lookup imports `importlib_resources`, which TFDS does not install on Python >= 3.9.
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=("1,797 grayscale 8x8 images of handwritten digits 0-9, shipped inside "
                         "scikit-learn (sklearn.datasets.load_digits), pixel values scaled from "
                         "0..16 to 0..255."),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 1)),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
            homepage=("https://archive.ics.uci.edu/dataset/80/"
                      "optical+recognition+of+handwritten+digits"),
            license="CC BY 4.0",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        train, test = split_indices()
        return {"train": self._generate_examples(train), "test": self._generate_examples(test)}

    def _generate_examples(self, indices):
        images, labels = load_arrays()
        for index in indices:
            yield int(index), {"image": images[index], "label": int(labels[index])}


@contextlib.contextmanager
def _file_lock(path: str):
    with open(path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def prepare(data_dir: str, file_format: str | None = None) -> Digits:
    """Returns the digits builder, first building it under `data_dir` if it is not there."""
    builder = Digits(data_dir=data_dir, file_format=file_format)
    if builder.is_prepared():
        return builder
    os.makedirs(data_dir, exist_ok=True)
    # TFDS writes into a temporary directory and renames it, but two processes finishing
    # together would collide on the rename: the lock makes the second one find it built.
    with _file_lock(os.path.join(data_dir, ".digits.lock")):
        builder = Digits(data_dir=data_dir, file_format=file_format)
        if not builder.is_prepared():
            builder.download_and_prepare(file_format=file_format)
    return Digits(data_dir=data_dir, file_format=file_format)
