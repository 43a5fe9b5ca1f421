"""A split restricted to some classes (`input.train_classes`, `input.eval_classes`): the zero-shot class split of
deep metric learning (train on some classes, retrieve among unseen ones), e.g. digits 0-4 to train, 5-9 to test.

The kept examples' labels become their class's position in the given tuple (0..len - 1), so an objective sees
`len(classes)` classes. The split is read into host memory (source "memory") to select the examples.
"""
from typing import Any, Optional, Tuple

import numpy as np

from vitjax.data import sources


def check_classes(value: Any, name: str) -> Optional[Tuple[int, ...]]:
    """Returns `value` as a tuple of distinct class ids >= 0, or None; raises ValueError naming the setting."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)) or not value or any(
            isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0 for c in value):
        raise ValueError(f"input.{name} must be None or a non-empty tuple of class ids >= 0, e.g. (0, 1, 2, 3, 4); "
                         f"got {value!r}.")
    classes = tuple(int(c) for c in value)
    if len(set(classes)) != len(classes):
        raise ValueError(f"input.{name} names a class twice: {classes}.")
    return classes


def select_classes(source: sources.MemorySource, classes: Tuple[int, ...]) -> sources.MemorySource:
    """Returns a MemorySource of the examples of `classes`, labelled by their class's position in `classes`."""
    labels = source.fields.get("label")
    if labels is None:
        raise ValueError("input.train_classes / input.eval_classes need a label field (input.label_key)")
    present = set(np.unique(labels).tolist())
    missing = [c for c in classes if c not in present]
    if missing:
        raise ValueError(f"Classes {missing} have no example in the split; its classes: {sorted(present)}.")
    keep = np.flatnonzero(np.isin(labels, classes))
    position = {c: i for i, c in enumerate(classes)}
    new_labels = np.array([position[int(c)] for c in labels[keep]], np.int32)
    texts = source.fields.get("text")
    return sources.MemorySource(source.images[keep], new_labels, num_bad_examples=source.num_bad_examples,
                                texts=None if texts is None else texts[keep], caption_lists=source.caption_lists)
