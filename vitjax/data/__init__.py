"""The input pipeline: TFDS datasets, preprocessing ops, mixup / cutmix, device prefetch.

Importing this package does not import TensorFlow; the functions that need it do.

    import vitjax.data as data
    data.validate_input_config(config.input)     # ValueError naming the valid choices
    info = data.dataset_info(config.input)       # num_classes, num_train / num_eval examples
    counts = data.train_class_counts(config.input)  # examples per class (long-tailed: input.long_tail)
    train = data.make_train_iterator(config.input, global_batch_size=256, seed=0, start_step=0)
    batches = data.prefetch_to_device(train, 2, sharding)
    transform = data.make_batch_transform(config.input, info["num_classes"])
    ...  # in the jitted train step: batch = transform(batch, step_key)  (one-hot, mixup)
    for batch in data.make_eval_iterator(config.input, global_batch_size=256): ...

"digits" is a bundled offline dataset (scikit-learn's 8x8 digits, built into the TFDS data dir
on first use); any other name is a TFDS dataset. See `vitjax.data.ops` for the pp ops,
`vitjax.data.presets.pretrained_pp` for the pp strings that match a model's pretrained weights, and
`vitjax.data.sources` for how examples are read, sharded and ordered.
"""
from vitjax.data.mixup import make_batch_transform
from vitjax.data.ops import build_preprocess
from vitjax.data.ops import image_op
from vitjax.data.ops import parse_pp
from vitjax.data.ops import register_op
from vitjax.data.ops import valid_ops
from vitjax.data.pipeline import DataIterator
from vitjax.data.pipeline import dataset_info
from vitjax.data.pipeline import make_eval_iterator
from vitjax.data.pipeline import make_train_iterator
from vitjax.data.pipeline import train_class_counts
from vitjax.data.pipeline import validate_input_config
from vitjax.data.prefetch import prefetch_to_device
from vitjax.data.presets import pretrained_pp
from vitjax.data.sources import DatasetNotPreparedError

__all__ = [
    "DataIterator",
    "DatasetNotPreparedError",
    "build_preprocess",
    "dataset_info",
    "image_op",
    "make_batch_transform",
    "make_eval_iterator",
    "make_train_iterator",
    "parse_pp",
    "prefetch_to_device",
    "pretrained_pp",
    "register_op",
    "train_class_counts",
    "valid_ops",
    "validate_input_config",
]
