"""Text preprocessing ops for pp strings: captions from class labels, tokenization, pad / truncate.

List "vitjax.text.ops" in `input.pp_modules` (the CLIP configs do) and use them like the image ops:

    pp = ("decode|resize(16)|gray_to_rgb|value_range(-1, 1)"
          "|label_caption('digits', 'digits')|tokenize('clip', context_length=16)")

- `label_caption(classnames, templates, template=None, key="label", outkey="text")`: the caption of
  an int class label, a template filled with the class name (`vitjax.text.templates`: set names such
  as "digits" / "imagenet", or lists of strings). `template=None` draws a template per example from
  the op's seed (a new draw every epoch, the same again after a resume); an int picks that template.
- `tokenize(tokenizer="clip", key="text", outkey=None, **tokenizer_kwargs)`: a string field to
  int32 (context_length,) ids with `vitjax.text.tokenizer(tokenizer, **tokenizer_kwargs)`
  (e.g. `context_length=16`, `truncate=False` to refuse over-long texts, SentencePiece's
  `model_file`); the tokenizer is built when the pp string is parsed, so a bad name or a missing
  model file fails then, before anything runs.
- `pad_truncate(length, pad_id=0, end_id=None, key="text", outkey=None)`: an int id sequence cut or
  padded with `pad_id` to `length`; with `end_id`, a cut sequence ends with it (CLIP's end-of-text
  token, which its text tower pools).
"""
import functools
from typing import Any, Dict, Tuple

import numpy as np

from vitjax.data import register_op
from vitjax.data.ops import DETERMINISTIC, RANDOM, import_tensorflow
from vitjax.text import templates as templates_lib


def _int_or_none(value: Any, name: str, low: int):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be None or an int >= {low}, got {value!r}")
    return value


def _field(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a field name (a non-empty string), got {value!r}")
    return value


@register_op("label_caption", RANDOM)
def label_caption(classnames="digits", templates="digits", template=None, *, key="label", outkey="text"):
    """Returns an op writing the caption of the int class label `key` (a template filled with its class name)."""
    table = templates_lib.captions(classnames, templates)
    num_classes, num_templates = len(table), len(table[0])
    template = _int_or_none(template, "template", 0)
    if template is not None and template >= num_templates:
        raise ValueError(f"template={template}, but there are only {num_templates} templates")
    key, outkey = _field(key, "key"), _field(outkey, "outkey")
    flat = [caption for row in table for caption in row]

    def apply(example, seed):
        tf = import_tensorflow()
        label = tf.cast(example[key], tf.int32)
        tf.debugging.assert_less(label, num_classes, message=f"label_caption: a label is >= {num_classes}, the "
                                 "number of class names")
        if template is None:
            index = tf.random.stateless_uniform([], seed, 0, num_templates, dtype=tf.int32)
        else:
            index = tf.constant(template, tf.int32)
        return {**example, outkey: tf.gather(tf.constant(flat), label * num_templates + index)}
    return apply


@functools.lru_cache(maxsize=16)
def _cached_tokenizer(name: str, frozen_kwargs: Tuple[Tuple[str, Any], ...]):
    import vitjax.text as text  # pylint: disable=g-import-not-at-top
    return text.tokenizer(name, **dict(frozen_kwargs))


def _freeze(kwargs: Dict[str, Any]) -> Tuple[Tuple[str, Any], ...]:
    return tuple(sorted((name, tuple(value) if isinstance(value, list) else value) for name, value in kwargs.items()))


@register_op("tokenize", DETERMINISTIC)
def tokenize(tokenizer="clip", *, key="text", outkey=None, **tokenizer_kwargs):
    """Returns an op replacing the string field `key` by its int32 (context_length,) token ids."""
    if not isinstance(tokenizer, str):
        raise ValueError(f"tokenizer must be a tokenizer name such as 'clip' or 'sentencepiece', got {tokenizer!r}")
    key = _field(key, "key")
    outkey = _field(key if outkey is None else outkey, "outkey")
    frozen = _freeze(tokenizer_kwargs)
    encode = _cached_tokenizer(tokenizer, frozen)
    context_length = int(np.asarray(encode([""])).shape[-1])
    # Captions repeat (templates x classes): each distinct one is tokenized once per process.
    seen: Dict[bytes, np.ndarray] = {}

    def encode_one(text) -> np.ndarray:
        if isinstance(text, np.ndarray):  # a 0-d string array in eager mode, bytes inside tf.data
            text = text.item()
        text = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        if text not in seen:
            seen[text] = np.asarray(encode([text.decode("utf-8")]), np.int32)[0]
        return seen[text]

    def apply(example, seed):
        del seed
        tf = import_tensorflow()
        ids = tf.numpy_function(encode_one, [example[key]], tf.int32, stateful=False)
        return {**example, outkey: tf.ensure_shape(ids, [context_length])}
    return apply


@register_op("pad_truncate", DETERMINISTIC)
def pad_truncate(length, pad_id=0, end_id=None, *, key="text", outkey=None):
    """Returns an op cutting or padding the int id sequence `key` to `length` (a cut one ending with `end_id`)."""
    if _int_or_none(length, "length", 1) is None or _int_or_none(pad_id, "pad_id", 0) is None:
        raise ValueError(f"length and pad_id must be ints, got {length!r} and {pad_id!r}")
    _int_or_none(end_id, "end_id", 0)
    key = _field(key, "key")
    outkey = _field(key if outkey is None else outkey, "outkey")

    def apply(example, seed):
        del seed
        tf = import_tensorflow()
        ids = tf.reshape(tf.cast(example[key], tf.int32), [-1])
        kept = ids[:length]
        if end_id is not None:
            cut = tf.shape(ids)[0] > length
            kept = tf.where(cut & tf.equal(tf.range(tf.shape(kept)[0]), length - 1), end_id, kept)
        padded = tf.pad(kept, [[0, length - tf.shape(kept)[0]]], constant_values=pad_id)
        return {**example, outkey: tf.ensure_shape(padded, [length])}
    return apply
