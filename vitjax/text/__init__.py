"""Tokenizers behind one call, all offline: `tokenizer(name, **kwargs)` -> texts -> int32 (batch, context) ids.

    tokenize = vitjax.text.tokenizer("clip", context_length=77)          # CLIP's BPE, bundled merges
    tokenize = vitjax.text.tokenizer("sentencepiece", model_file="spiece.model", context_length=64)  # SigLIP
    ids = tokenize(["a photo of a cat", "a dog"])                        # np.int32, shape (2, context)

`truncate=True` cuts texts longer than the context (with a warning), False refuses them with a ValueError.
"""
import difflib
from typing import Callable, Sequence

import numpy as np

TOKENIZERS = ("clip", "sentencepiece")


def tokenizer(name: str, **kwargs) -> Callable[[Sequence[str]], np.ndarray]:
    """Returns the tokenizer `name` built with `kwargs`; an unknown name raises ValueError listing the valid ones."""
    if name == "clip":
        from vitjax.text.bpe import ClipTokenizer
        return ClipTokenizer(**kwargs)
    if name == "sentencepiece":
        from vitjax.text.spiece import SentencePieceTokenizer
        return SentencePieceTokenizer(**kwargs)
    close = difflib.get_close_matches(str(name), TOKENIZERS, n=2, cutoff=0.5)
    hint = f" Did you mean {close}?" if close else ""
    raise ValueError(f"Unknown tokenizer {name!r}.{hint} Valid choices: {list(TOKENIZERS)}")


__all__ = ["TOKENIZERS", "tokenizer"]
