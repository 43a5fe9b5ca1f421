"""Where examples come from: a TFDS split as batches of raw examples, keyed by step.

Three readers, picked by `input.source` ("auto": the first that applies, in this order):

- "memory": the whole split decoded into host memory as numpy and indexed directly. Used for
  small fixed-shape datasets (digits, cifar10, mnist: at most `MEMORY_LIMIT_BYTES` decoded) or
  when `input.cache=True` (variable-shape images are then held encoded). Every host holds the
  whole split.
- "random_access": a split prepared in ArrayRecord format, read by index with TFDS's data
  source (`tfds build NAME --file_format=array_record`); a host reads only its own examples.
- "stream": a TFRecord split (TFDS's default format, e.g. imagenet2012), read sequentially.

"memory" and "random_access" give an exact, global order: element i of the infinite stream is
example perm_e(i mod n) of epoch e = i div n, where perm_e is a pseudo-random permutation keyed
by (seed, e) (`tf.random.experimental.index_shuffle`, nothing materialised). Global batch s is
elements [s B, (s + 1) B) and host p takes the p-th contiguous slice of b = B / P, so a batch
depends only on (seed, s), and resuming at step s reads exactly the examples it needs.

"stream" cannot index: each host reads its own contiguous part of the split
(`tfds.split_for_jax_process`), one epoch after another; epoch e visits the shards in an order
keyed by (seed, e) and then shuffles through a `shuffle_buffer` seeded by (seed, e). Batches are
a function of (seed, step, process count), but the shuffle is weaker (shard order plus buffer)
and a resume at step s re-reads, without decoding, the records of the current epoch up to that
position. Prepare the dataset as ArrayRecord to get the exact behaviour.

Repeated augmentation (`repeats` R > 1, DeiT's RASampler): element i reads the example that element
i div R would have read without repeats, so every example comes R times in a row, each copy with
its own augmentation (augmentations are keyed by the element index). An epoch of steps then holds
n / R distinct examples, R views each, as in DeiT, where an epoch keeps its length.

Each source hands out per-step raw batches: dicts with image (encoded bytes or uint8), label
(int32; absent without a label key), text (a string; absent without a text key), element_id (int64,
the global element index that keys per-example randomness) and step; eval batches add valid (False
for padding), slot and num_valid. Keys name features by path ("captions/text" for a field of a
Sequence). A text feature holding several strings per example (a Sequence of captions) travels
joined by CAPTION_SEPARATOR, so every source keeps fixed-shape batches; the pipeline picks one per
example (`caption_lists` says so).
"""
import dataclasses
import difflib
import math
import os

import numpy as np

from vitjax.data._tf import import_tensorflow

MEMORY_LIMIT_BYTES = 1 << 30
SOURCES = ("auto", "memory", "random_access", "stream")

# Salts separate the random streams drawn from one run seed (3 was host-side mixup's).
SALT_SHUFFLE, SALT_ELEMENT, SALT_FILES, SALT_BUFFER, SALT_CAPTION = 1, 2, 4, 5, 6
# Joins the captions of one example: a real caption never holds a NUL character.
CAPTION_SEPARATOR = "\x00"


class DatasetNotPreparedError(RuntimeError):
    """A TFDS dataset is not in the data dir and cannot be built here without the user's help."""


def resolve_data_dir(data_dir: str | None) -> str:
    """Returns the TFDS data dir: the given one, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return os.path.abspath(os.path.expanduser(data_dir))


def key(seed: int, salt: int):
    """Returns a stateless seed pair (int64 [2]) for one random stream of a run seed."""
    tf = import_tensorflow()
    return tf.random.experimental.stateless_fold_in(tf.constant([seed, 0], tf.int64), salt)


def scalar_seed(seed_pair):
    """Returns an int64 scalar hashed from a seed pair (for ops taking a single seed)."""
    tf = import_tensorflow()
    return tf.random.stateless_uniform([], seed_pair, minval=None, maxval=None, dtype=tf.int64)


# ---------------------------------------------------------------------------------------------
# Builders: find, prepare, or explain how to prepare.
# ---------------------------------------------------------------------------------------------

def _manual_message(name: str, data_dir: str, builder) -> str:
    manual_dir = os.path.join(data_dir, "downloads", "manual")
    present = os.listdir(manual_dir) if os.path.isdir(manual_dir) else []
    state = (f"Found {len(present)} file(s) in {manual_dir}; prepare the dataset with the command "
             "below." if present else f"Put the files in {manual_dir}/ as the dataset asks:")
    instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", "") or ""
    return (
        f"TFDS dataset {name!r} is not prepared in {data_dir} and needs a manual download.\n"
        f"{state}\n{instructions.strip()}\n"
        "Then prepare it once (hours for a large dataset):\n"
        f"  tfds build {name} --data_dir={data_dir}\n"
        f"or: python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
        f"data_dir='{data_dir}').download_and_prepare()\"\n"
        "Add --file_format=array_record to `tfds build` to read it by index (exact resume).")


def get_builder(name: str, data_dir: str, download: bool = True):
    """Returns the prepared TFDS builder; raises DatasetNotPreparedError with how to prepare it."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    import_tensorflow()
    if name.split(":")[0] == "digits":
        from vitjax.data import digits  # pylint: disable=g-import-not-at-top
        return digits.prepare(data_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        close = difflib.get_close_matches(name.split("/")[0].split(":")[0],
                                          sorted(set(tfds.list_builders())), 5)
        raise ValueError(f"Unknown dataset {name!r}: neither 'digits' nor a TFDS dataset; close "
                         f"TFDS names: {', '.join(close) or 'none'} (see "
                         "tfds.list_builders()).") from None
    if builder.is_prepared():
        return builder
    if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
        raise DatasetNotPreparedError(_manual_message(name, data_dir, builder))
    if not download:
        raise DatasetNotPreparedError(
            f"TFDS dataset {name!r} is not prepared in {data_dir} and input.download is False; "
            f"prepare it with: tfds build {name} --data_dir={data_dir}")
    try:
        builder.download_and_prepare()
    except Exception as error:  # TFDS raises AssertionError or others for a missing manual dir.
        if "manual" in str(error).lower():
            raise DatasetNotPreparedError(_manual_message(name, data_dir, builder)) from error
        raise
    return builder


def check_split(builder, split: str, role: str) -> int:
    """Returns the number of examples of `split`; raises ValueError listing the valid splits."""
    try:
        return builder.info.splits[split].num_examples
    except (KeyError, ValueError, AssertionError) as error:
        raise ValueError(f"Bad {role} {split!r} for dataset {builder.name!r} ({error}); splits: "
                         f"{', '.join(sorted(builder.info.splits.keys()))} (slicing such as "
                         "'train[:90%]' allowed).") from None


def fraction_count(num_examples: int, fraction: float) -> int:
    """Returns how many examples a label fraction keeps (at least one)."""
    return max(1, int(round(num_examples * fraction)))


# ---------------------------------------------------------------------------------------------
# Sources.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Keys:
    image: str
    label: str | None = None
    text: str | None = None
    text_is_list: bool = False

    def fields(self) -> dict:
        """Returns {example field: feature path} of the fields read."""
        return {name: path for name, path in (("image", self.image), ("label", self.label),
                                              ("text", self.text)) if path is not None}


def feature_paths(builder) -> dict:
    """Returns {feature path ("captions/text" for nested ones): TensorInfo} of a TFDS builder."""
    paths = {}

    def walk(info, prefix):
        for name, value in info.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{name}/")
            else:
                paths[prefix + name] = value
    walk(builder.info.features.get_tensor_info(), "")
    return paths


def check_keys(builder, image_key: str, label_key: str | None = None,
               text_key: str | None = None) -> _Keys:
    """Returns the checked feature keys; raises ValueError naming the dataset's features."""
    paths = feature_paths(builder)
    listing = ", ".join(f"{path} {info.tf_dtype.name}{list(info.shape)}"
                        for path, info in paths.items())
    for role, path in (("input.image_key", image_key), ("input.label_key", label_key),
                       ("input.text_key", text_key)):
        if path is not None and path not in paths:
            raise ValueError(f"{role}={path!r} is not a feature of {builder.name!r}; features: "
                             f"{listing}.")
    text_is_list = False
    if text_key is not None:
        info = paths[text_key]
        if info.tf_dtype.name != "string" or len(info.shape) > 1:
            raise ValueError(f"input.text_key={text_key!r} must name a text feature (a string or a "
                             f"list of strings); features: {listing}.")
        text_is_list = len(info.shape) == 1
    return _Keys(image_key, label_key, text_key, text_is_list)


def _get(example, path: str):
    for part in path.split("/"):
        example = example[part]
    return example


def _joined_text(value) -> bytes:
    """Returns a numpy text feature (bytes, or an array of them) as bytes, several joined."""
    def as_bytes(text):
        return text.encode("utf-8") if isinstance(text, str) else bytes(text)
    if isinstance(value, (bytes, str)) or np.ndim(value) == 0:
        return as_bytes(value.item() if isinstance(value, np.ndarray) else value)
    return CAPTION_SEPARATOR.encode().join(as_bytes(text) for text in value)


def _tf_fields(example, keys: _Keys) -> dict:
    """Returns the read fields of a TFDS example (in TF): label int32, several captions joined."""
    tf = import_tensorflow()
    fields = {name: _get(example, path) for name, path in keys.fields().items()}
    if "label" in fields:
        fields["label"] = tf.cast(fields["label"], tf.int32)
    if keys.text_is_list:
        fields["text"] = tf.strings.reduce_join(fields["text"], separator=CAPTION_SEPARATOR)
    return fields


class IndexedSource:
    """A split read by example index: the exact, global, step-keyed order described above."""

    num_examples: int
    num_bad_examples: int = 0
    caption_lists: bool = False

    def fetch(self, indices):
        """Returns dict(image, label int32, text) (those read) for an int64 vector of indices (in TF)."""
        raise NotImplementedError

    def _shuffled(self, element_ids, seed: int, local_batch_size: int):
        """Returns the example index of each element id under the per-epoch permutations."""
        tf = import_tensorflow()
        n = self.num_examples
        epochs, positions = element_ids // n, element_ids % n
        shuffle_key = key(seed, SALT_SHUFFLE)
        first_epoch = epochs[0]
        examples = tf.zeros_like(element_ids)
        # A step spans at most this many epochs; index_shuffle takes one seed per call.
        for offset in range(local_batch_size // n + 2):
            epoch = first_epoch + offset
            permuted = tf.random.experimental.index_shuffle(
                positions, seed=tf.random.experimental.stateless_fold_in(shuffle_key, epoch),
                max_index=n - 1)
            examples = tf.where(epochs == epoch, permuted, examples)
        return examples

    def train_batches(self, *, seed: int, start_step: int, global_batch_size: int,
                      process_index: int, process_count: int, repeats: int = 1):
        """Returns the infinite dataset of this host's raw batches from `start_step` on."""
        tf = import_tensorflow()
        local_batch_size = global_batch_size // process_count

        @tf.autograph.experimental.do_not_convert
        def raw_step(step):
            element_ids = (step * global_batch_size + process_index * local_batch_size
                           + tf.range(local_batch_size, dtype=tf.int64))
            batch = self.fetch(self._shuffled(element_ids // repeats, seed, local_batch_size))
            return dict(batch, element_id=element_ids, step=step)

        return tf.data.Dataset.counter(start_step, dtype=tf.int64).map(
            raw_step, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def eval_batches(self, *, global_batch_size: int, process_index: int, process_count: int):
        """Returns (dataset of this host's padded raw eval batches, number of steps)."""
        tf = import_tensorflow()
        local_batch_size = global_batch_size // process_count
        num_steps = math.ceil(self.num_examples / global_batch_size)

        @tf.autograph.experimental.do_not_convert
        def raw_step(step):
            element_ids = (step * global_batch_size + process_index * local_batch_size
                           + tf.range(local_batch_size, dtype=tf.int64))
            valid = element_ids < self.num_examples
            batch = self.fetch(tf.where(valid, element_ids, 0))  # Padding repeats example 0.
            return dict(batch, element_id=element_ids, step=step, valid=valid,
                        slot=tf.range(local_batch_size, dtype=tf.int32),
                        num_valid=tf.reduce_sum(tf.cast(valid, tf.int32)))

        dataset = tf.data.Dataset.range(num_steps).map(
            raw_step, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return dataset, num_steps


class MemorySource(IndexedSource):
    """A split held in host memory: uint8 images (N, H, W, C), or encoded bytes (N,); labels and
    texts (bytes (N,), several captions joined by CAPTION_SEPARATOR) where the split has them."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None,
                 num_bad_examples: int = 0, texts: np.ndarray | None = None,
                 caption_lists: bool = False):
        self.fields = dict(image=images)
        if labels is not None:
            self.fields["label"] = np.asarray(labels, np.int32)
        if texts is not None:
            self.fields["text"] = np.asarray(texts, object)
        counts = {name: len(values) for name, values in self.fields.items()}
        if len(set(counts.values())) != 1 or not len(images):
            raise ValueError(f"Need as many examples of every field, and some; got {counts}.")
        self.images = images
        self.num_examples = len(images)
        self.num_bad_examples = num_bad_examples
        self.encoded = images.dtype == object
        self.caption_lists = caption_lists
        self._tensors = None

    def fetch(self, indices):
        tf = import_tensorflow()
        if self._tensors is None:
            with tf.init_scope():  # Eager constants, reusable by every pipeline built later.
                self._tensors = {
                    name: (tf.constant(list(values), tf.string) if values.dtype == object
                           else tf.constant(values))
                    for name, values in self.fields.items()}
        return {name: tf.gather(values, indices) for name, values in self._tensors.items()}


def long_tail_counts(available: np.ndarray, imbalance: float) -> np.ndarray:
    """Returns the per-class counts of the exponential long-tailed split (CIFAR-LT, Cao et al. 2019).

    Class c keeps int(n_max x imbalance^(-c / (C - 1))) examples with n_max = (split size) / C, as the
    DeiT-LT and LDAM code build CIFAR-10/100-LT; a class holding fewer keeps what it has.
    """
    available = np.asarray(available, np.int64)
    num_classes = len(available)
    n_max = available.sum() / num_classes
    exponents = np.arange(num_classes) / max(num_classes - 1, 1)
    wanted = np.array([int(n_max * float(imbalance) ** -exponent) for exponent in exponents], np.int64)
    return np.minimum(wanted, available)


def long_tail_indices(labels: np.ndarray, num_classes: int, imbalance: float, seed: int) -> np.ndarray:
    """Returns the sorted example indices of the long-tailed subset of a split with these labels.

    Each class's examples are shuffled by numpy's RandomState(seed), one class after another in class
    order (the DeiT-LT / LDAM CIFAR-LT code's draw), and the first `long_tail_counts` of them kept.
    Raises ValueError if a class would keep no example.
    """
    labels = np.asarray(labels)
    available = np.bincount(labels, minlength=num_classes)[:num_classes]
    counts = long_tail_counts(available, imbalance)
    if counts.min() < 1:
        empty = [int(c) for c in np.flatnonzero(counts < 1)]
        raise ValueError(f"input.long_tail.imbalance={imbalance} leaves classes {empty} without an example "
                         f"(per-class counts {counts.tolist()} of {len(labels)} examples); choose a smaller "
                         "imbalance.")
    state = np.random.RandomState(seed)
    kept = []
    for label, count in enumerate(counts):
        members = np.flatnonzero(labels == label)
        state.shuffle(members)
        kept.append(members[:count])
    return np.sort(np.concatenate(kept))


class SubsetSource(IndexedSource):
    """The examples `indices` of another indexed source, re-indexed 0 .. len(indices) - 1."""

    def __init__(self, base: IndexedSource, indices: np.ndarray, labels: np.ndarray | None = None):
        self.base = base
        self.indices = np.asarray(indices, np.int64)
        self.num_examples = len(self.indices)
        self.num_bad_examples = base.num_bad_examples
        self.caption_lists = base.caption_lists
        self.encoded = getattr(base, "encoded", False)
        self.labels = None if labels is None else np.asarray(labels)[self.indices]

    def fetch(self, indices):
        tf = import_tensorflow()
        return self.base.fetch(tf.gather(tf.constant(self.indices), indices))


def load_memory_source(builder, split: str, keys: _Keys, fraction: float = 1.0,
                       encoded: bool = False) -> MemorySource:
    """Returns a MemorySource with the split's first examples (all, or `fraction` of them)."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    expected = builder.info.splits[split].num_examples
    decoders = {keys.image: tfds.decode.SkipDecoding()} if encoded else None
    if tfds.core.file_adapters.FileFormat.TFRECORD in builder.info.available_file_formats():
        dataset = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
        # A bad encoding fails TFDS's decoding of that one example: drop it, count it.
        dataset = dataset.map(lambda example: _tf_fields(example, keys))
        batches = list(dataset.ignore_errors().batch(4096).as_numpy_iterator())
    else:  # ArrayRecord has no tf.data reader in TFDS: read it by index.
        batches = list(_read_data_source(builder.as_data_source(split, decoders=decoders), keys))
    if not batches:
        raise ValueError(f"Split {split!r} of {builder.name!r} has no readable example.")
    fields = {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}
    num_read = len(fields["image"])
    keep = fraction_count(num_read, fraction)
    fields = {name: values[:keep] for name, values in fields.items()}
    return MemorySource(fields["image"], fields.get("label"), num_bad_examples=expected - num_read,
                        texts=fields.get("text"), caption_lists=keys.text_is_list)


def _numpy_fields(examples, keys: _Keys) -> dict:
    """Returns the read fields of TFDS data-source examples, stacked: images, labels, texts."""
    images = [_get(example, keys.image) for example in examples]
    fields = dict(image=np.array(images, dtype=object) if isinstance(images[0], bytes)
                  else np.stack(images))
    if keys.label is not None:
        fields["label"] = np.array([_get(example, keys.label) for example in examples], np.int32)
    if keys.text is not None:
        fields["text"] = np.array([_joined_text(_get(example, keys.text)) for example in examples],
                                  object)
    return fields


def _read_data_source(data_source, keys: _Keys, chunk: int = 1024):
    """Yields field-dict chunks of a TFDS data source, skipping examples that fail."""
    def stack(examples):
        return _numpy_fields(examples, keys)

    for start in range(0, len(data_source), chunk):
        indices = list(range(start, min(start + chunk, len(data_source))))
        try:
            examples = data_source.__getitems__(indices)
        except Exception:  # pylint: disable=broad-except
            examples = []  # A bad encoding fails its chunk: retry one by one to keep the rest.
            for index in indices:
                try:
                    examples.append(data_source[index])
                except Exception:  # pylint: disable=broad-except
                    pass
        if examples:
            yield stack(examples)


class RandomAccessSource(IndexedSource):
    """A split in ArrayRecord format, read by index with TFDS's data source."""

    def __init__(self, builder, split: str, keys: _Keys, fraction: float = 1.0):
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
        feature = builder.info.features[keys.image]
        self.encoded = isinstance(feature, tfds.features.Image)
        decoders = {keys.image: tfds.decode.SkipDecoding()} if self.encoded else None
        self._data_source = builder.as_data_source(split, decoders=decoders)
        self._keys = keys
        self.caption_lists = keys.text_is_list
        self.num_examples = fraction_count(len(self._data_source), fraction)
        self._image_shape = None if self.encoded else tuple(feature.shape)

    def _read(self, indices: np.ndarray):
        examples = self._data_source.__getitems__([int(i) for i in indices])
        return tuple(_numpy_fields(examples, self._keys).values())

    def fetch(self, indices):
        tf = import_tensorflow()
        dtypes = dict(image=tf.string if self.encoded else tf.uint8, label=tf.int32, text=tf.string)
        names = list(self._keys.fields())
        values = tf.numpy_function(self._read, [indices], [dtypes[name] for name in names],
                                   stateful=False)
        fields = dict(zip(names, values))
        for name, value in fields.items():
            value.set_shape([None] + ([] if name != "image" or self.encoded
                                      else list(self._image_shape)))
        return fields


class StreamSource:
    """A TFRecord split read sequentially, each host its own part (see the module doc)."""

    encoded = True
    num_bad_examples = 0

    def __init__(self, builder, split: str, keys: _Keys, fraction: float = 1.0,
                 shuffle_buffer: int = 10_000):
        num_examples = builder.info.splits[split].num_examples
        if fraction < 1.0:
            if "[" in split or "+" in split:
                raise ValueError(f"input.train_fraction < 1 with source 'stream' needs a plain "
                                 f"split name, got {split!r}; slice the split instead.")
            split = f"{split}[:{fraction_count(num_examples, fraction)}]"
        self._builder, self._split, self._keys = builder, split, keys
        self.caption_lists = keys.text_is_list
        self.num_examples = builder.info.splits[split].num_examples
        self._shuffle_buffer = shuffle_buffer

    def _host_split(self, process_index: int, process_count: int):
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
        return tfds.split_for_jax_process(self._split, process_index=process_index,
                                          process_count=process_count)

    def _read(self, host_split, seed=None, epoch=None):
        """Returns one pass over a host split as dicts of the read fields (image as bytes)."""
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
        tf = import_tensorflow()
        instructions = self._builder.info.splits[host_split].file_instructions
        files = tf.data.Dataset.from_tensor_slices((
            [instruction.filename for instruction in instructions],
            np.array([instruction.skip for instruction in instructions], np.int64),
            np.array([instruction.take for instruction in instructions], np.int64)))
        shuffled = seed is not None
        if shuffled:
            epoch_key = tf.random.experimental.stateless_fold_in(key(seed, SALT_FILES), epoch)
            files = files.shuffle(len(instructions), seed=scalar_seed(epoch_key))
        records = files.interleave(
            lambda filename, skip, take: tf.data.TFRecordDataset(filename).skip(skip).take(take),
            cycle_length=min(16, len(instructions)) if shuffled else 1,
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if shuffled and self._shuffle_buffer > 1:
            buffer_key = tf.random.experimental.stateless_fold_in(key(seed, SALT_BUFFER), epoch)
            records = records.shuffle(self._shuffle_buffer, seed=scalar_seed(buffer_key))
        features = self._builder.info.features
        decoders = {self._keys.image: tfds.decode.SkipDecoding()}

        @tf.autograph.experimental.do_not_convert
        def parse(serialized):
            return _tf_fields(features.deserialize_example(serialized, decoders=decoders),
                              self._keys)
        return records.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def train_batches(self, *, seed: int, start_step: int, global_batch_size: int,
                      process_index: int, process_count: int, repeats: int = 1):
        """Returns the infinite dataset of this host's raw batches from `start_step` on."""
        tf = import_tensorflow()
        local_batch_size = global_batch_size // process_count
        host_split = self._host_split(process_index, process_count)
        host_examples = self._builder.info.splits[host_split].num_examples
        first_epoch, offset = divmod(start_step * local_batch_size, host_examples * repeats)

        def read_epoch(epoch):
            records = self._read(host_split, seed, epoch)
            if repeats > 1:
                records = records.flat_map(
                    lambda example: tf.data.Dataset.from_tensors(example).repeat(repeats))
            return records
        # Skipping reads the records of the current epoch but decodes none of them.
        records = tf.data.Dataset.counter(first_epoch, dtype=tf.int64).flat_map(read_epoch).skip(offset)
        records = records.batch(local_batch_size, drop_remainder=True)
        steps = tf.data.Dataset.counter(start_step, dtype=tf.int64)

        @tf.autograph.experimental.do_not_convert
        def raw_step(step, batch):
            element_ids = (step * global_batch_size + process_index * local_batch_size
                           + tf.range(local_batch_size, dtype=tf.int64))
            return dict(batch, element_id=element_ids, step=step)
        return tf.data.Dataset.zip((steps, records)).map(raw_step)

    def eval_batches(self, *, global_batch_size: int, process_index: int, process_count: int):
        """Returns (dataset of this host's padded raw eval batches, number of steps)."""
        tf = import_tensorflow()
        local_batch_size = global_batch_size // process_count
        host_counts = [self._builder.info.splits[self._host_split(p, process_count)].num_examples
                       for p in range(process_count)]
        if min(host_counts) == 0:
            raise ValueError(f"Eval split {self._split!r} has fewer examples ({self.num_examples}) "
                             f"than processes ({process_count}).")
        num_steps = math.ceil(max(host_counts) / local_batch_size)
        records = self._read(self._host_split(process_index, process_count)).map(
            lambda example: dict(example, valid=True))
        # Every host runs the same number of steps; padding repeats the first example, masked.
        padding = records.take(1).map(lambda example: dict(example, valid=False)).repeat(
            num_steps * local_batch_size - host_counts[process_index])
        records = records.concatenate(padding).batch(local_batch_size)

        @tf.autograph.experimental.do_not_convert
        def raw_step(step, batch):
            batch = dict(batch)
            valid = batch.pop("valid")
            element_ids = (step * global_batch_size + process_index * local_batch_size
                           + tf.range(local_batch_size, dtype=tf.int64))
            return dict(batch, element_id=element_ids, step=step, valid=valid,
                        slot=tf.range(local_batch_size, dtype=tf.int32),
                        num_valid=tf.reduce_sum(tf.cast(valid, tf.int32)))
        steps = tf.data.Dataset.range(num_steps)
        return tf.data.Dataset.zip((steps, records)).map(raw_step), num_steps


def open_source(builder, split: str, *, kind: str, image_key: str, label_key: str | None,
                fraction: float = 1.0, cache: bool = False, shuffle_buffer: int = 10_000,
                text_key: str | None = None):
    """Returns the source reading `split` (kind "auto" picks one as the module doc says)."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    keys = check_keys(builder, image_key, label_key, text_key)
    features = builder.info.features
    num_examples = builder.info.splits[split].num_examples
    image_feature = features[image_key]
    fixed_shape = all(dim is not None for dim in image_feature.shape)
    if kind == "auto":
        decoded_bytes = num_examples * (math.prod(image_feature.shape) if fixed_shape else 0)
        random_access = set(builder.info.available_file_formats()) & set(
            tfds.core.file_adapters.FileFormat.with_random_access())
        if cache or (fixed_shape and decoded_bytes <= MEMORY_LIMIT_BYTES):
            kind = "memory"
        elif random_access:
            kind = "random_access"
        else:
            kind = "stream"
    if kind == "memory":
        return load_memory_source(builder, split, keys, fraction, encoded=not fixed_shape)
    if kind == "random_access":
        return RandomAccessSource(builder, split, keys, fraction)
    if kind == "stream":
        return StreamSource(builder, split, keys, fraction, shuffle_buffer)
    raise ValueError(f"Unknown source {kind!r}; valid: {', '.join(SOURCES)}.")
