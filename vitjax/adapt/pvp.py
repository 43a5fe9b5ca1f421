"""PVP (Song et al. 2023, "Pre-trained Visual Parameter-Efficient Tuning"): pre-train the prompts, then transfer.

PVP is a recipe over VPT-deep (`vitjax.adapt.vpt`), not a new module:

    # stage 1: prompts + head on a source task, backbone frozen (configs/pvp_digits.py:stage=source)
    python -m vitjax.main --config=configs/pvp_digits.py:stage=source --config.init_from=ENCODER --workdir=/tmp/pvp1
    # stage 2: the target task's prompts start from stage 1's, the head re-initialised
    python -m vitjax.main --config=configs/pvp_digits.py:stage=target --config.init_from=/tmp/pvp1 --workdir=/tmp/pvp2

Stage 2 needs no new code: `init_from` of an adapted run's workdir loads base + trained params
(`vitjax.weights.load`), so `vpt/prompts` and `vpt/deep_prompts` are "loaded" from stage 1 and the backbone
is the same frozen one; `init_from_skip=("^head/",)` re-initialises the head (and a source head of another
class count is re-initialised anyway). Stage 1's checkpoint refers to ENCODER, so stage 2's rebuilds through it
(a resumed stage 2 is not tested).

What the paper fixes: stage 1 pre-trains the parameter-efficient modules (prompts of VPT-deep among them)
with the transformer backbone frozen, on a large labelled upstream set (ImageNet in the paper), then
uses them as the initialisation of the downstream tuning, which is aimed at low-data (few-shot) tasks.
What it leaves open (our choices): whether the source head is kept (we drop it: the target's label set
differs); whether stage 1 uses the target's prompt count and depth (we require equal shapes: a mismatch
fails in the init_from plan); the stage 1 schedule (a run config of its own); here, with no ImageNet
offline, the source task is the digits with a coarser, different label set (`relabel`: class // 2, 5
classes, the head kept 10 wide) on the training images the target does not use; stage 1 runs once (seed 0)
and every target seed starts from it.

This module holds only the source task's label op: list it in `input.pp_modules` to use `relabel` in a pp.
"""
from typing import Sequence

from vitjax.data.ops import import_tensorflow, register_op


@register_op("relabel")
def relabel(mapping: Sequence[int], key: str = "label"):
    """Returns an op replacing int label y by mapping[y] (a new label set for a source task)."""
    if (not isinstance(mapping, (tuple, list)) or not mapping
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in mapping)):
        raise ValueError(f"relabel's mapping must be a non-empty tuple of ints >= 0 (new label per old one), "
                         f"got {mapping!r}")
    if not isinstance(key, str) or not key:
        raise ValueError(f"relabel's key must be a field name, got {key!r}")
    table = tuple(int(v) for v in mapping)

    def apply(example, seed):
        del seed
        tf = import_tensorflow()
        label = tf.gather(tf.constant(table, tf.int64), tf.cast(example[key], tf.int64))
        return {**example, key: tf.cast(label, example[key].dtype)}
    return apply


# Digits source task: 5 classes {0,1} {2,3} {4,5} {6,7} {8,9}.
DIGITS_SOURCE_MAPPING = (0, 0, 1, 1, 2, 2, 3, 3, 4, 4)
