"""SentencePiece tokenizer for SigLIP, from a user-given model file (nothing is downloaded).

As transformers' SiglipTokenizer (and big_vision's SigLIP prompts): the text is lower-cased, ASCII
punctuation is removed and whitespace collapsed, the pieces are followed by the end-of-sequence id, and the
row is padded to the context with `pad_id` (SigLIP pads with its end-of-sequence token, "</s>").
"""
import os
import re
import string
import warnings
from typing import List, Optional, Sequence, Union

import numpy as np

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def canonicalize_text(text: str, lower: bool = True) -> str:
    """Returns `text` lower-cased (if `lower`), without ASCII punctuation, whitespace runs collapsed."""
    text = text.lower() if lower else text
    return re.sub(r"\s+", " ", text.translate(_PUNCTUATION)).strip()


class SentencePieceTokenizer:
    """Callable: list of strings -> int32 (batch, context_length): pieces, end-of-sequence id, padding.

    A text longer than the context is cut (its last id stays end-of-sequence) with a warning when
    `truncate` is True, and refused with a ValueError otherwise. `pad_id` defaults to the end-of-sequence id.
    """

    def __init__(self, model_file: str, context_length: int = 64, truncate: bool = True, lower: bool = True,
                 canonicalize: bool = True, add_eos: bool = True, pad_id: Optional[int] = None):
        if not model_file or not os.path.exists(os.fspath(model_file)):
            raise FileNotFoundError(f"No SentencePiece model at {model_file!r}; pass model_file=<path to a .model> "
                                    "(nothing is downloaded; SigLIP's is big_vision's c4_en spiece.model, 32,000 "
                                    "pieces: configs/siglip_b16.py takes it as spm=PATH)")
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        import sentencepiece  # only this tokenizer needs it
        self.processor = sentencepiece.SentencePieceProcessor(model_file=os.fspath(model_file))
        self.context_length = int(context_length)
        self.truncate, self.lower, self.canonicalize, self.add_eos = bool(truncate), lower, canonicalize, add_eos
        self.vocab_size = self.processor.get_piece_size()
        self.eos_id = self.processor.eos_id()
        if add_eos and self.eos_id < 0:
            raise ValueError(f"The SentencePiece model {model_file!r} has no end-of-sequence piece; pass add_eos=False")
        self.pad_id = self.eos_id if pad_id is None else int(pad_id)
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"pad_id {self.pad_id} is not an id of the model (vocabulary of {self.vocab_size})")

    def encode(self, text: str) -> List[int]:
        """Returns the piece ids of `text`, without end-of-sequence or padding."""
        if self.canonicalize:
            text = canonicalize_text(text, self.lower)
        elif self.lower:
            text = text.lower()
        return list(self.processor.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        """Returns the text of `ids`, end-of-sequence and padding dropped."""
        return self.processor.decode([int(index) for index in ids if int(index) not in (self.eos_id, self.pad_id)])

    def __call__(self, texts: Union[str, Sequence[str]]) -> np.ndarray:
        """Returns int32 (len(texts), context_length) ids; raises or truncates over-long texts (see the class)."""
        if isinstance(texts, str):
            texts = [texts]
        result = np.full((len(texts), self.context_length), self.pad_id, np.int32)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts must be strings, got {type(text).__name__} at index {row}")
            ids = self.encode(text) + ([self.eos_id] if self.add_eos else [])
            if len(ids) > self.context_length:
                if not self.truncate:
                    raise ValueError(f"Text {row} has {len(ids)} tokens, more than the context_length "
                                     f"{self.context_length}: {text[:60]!r}...; shorten it or pass truncate=True")
                warnings.warn(f"A text of {len(ids)} tokens was truncated to context_length {self.context_length}",
                              stacklevel=2)
                ids = ids[:self.context_length - 1] + ids[-1:] if self.add_eos else ids[:self.context_length]
            result[row, :len(ids)] = ids
        return result
