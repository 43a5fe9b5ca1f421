"""CLIP's byte-level BPE tokenizer (Radford et al. 2021), offline, with the merges bundled as package data.

Text is cleaned as open_clip's default ("lower"): ftfy's fix_text, HTML entities unescaped twice, runs of
whitespace collapsed, lower-cased. It is split into words (letters, single digits, runs of other symbols,
English contractions, and the literal special tokens), each word's UTF-8 bytes are mapped to printable
characters, the last one marked with "</w>", and the ranked merges are applied to each word.
"""
import functools
import gzip
import html
import os
import warnings
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np

MERGES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_bpe_merges.txt.gz")
START_OF_TEXT = "<start_of_text>"
END_OF_TEXT = "<end_of_text>"
NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 256 bytes, 256 word-final bytes, these merges, 2 specials


@functools.lru_cache(maxsize=None)
def byte_alphabet() -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """Returns (the byte characters in vocabulary order, the character of each byte 0..255): GPT-2's byte map."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    # Bytes that are not printable (controls, space, soft hyphen) take code points from 256 up, in byte order.
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    # The vocabulary lists the printable bytes first, then the others: keep that order for the ids.
    order = printable + [byte for byte in range(256) if byte not in printable]
    return tuple(table[byte] for byte in order), tuple(table[byte] for byte in range(256))


@functools.lru_cache(maxsize=2)
def _load_vocabulary(path: str) -> Tuple[Dict[str, int], Dict[Tuple[str, str], int]]:
    """Returns ({piece: id}, {(left, right): merge rank}) from a merges file."""
    with gzip.open(path, "rt", encoding="utf-8") as file:
        lines = file.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]  # line 0 is a version header
    if len(merges) != NUM_MERGES or any(len(pair) != 2 for pair in merges):
        raise ValueError(f"{path} does not hold CLIP's {NUM_MERGES} BPE merges")
    ordered_bytes, _ = byte_alphabet()
    pieces = list(ordered_bytes) + [char + "</w>" for char in ordered_bytes]
    pieces += [left + right for left, right in merges] + [START_OF_TEXT, END_OF_TEXT]
    return {piece: index for index, piece in enumerate(pieces)}, {pair: rank for rank, pair in enumerate(merges)}


def clean_text(text: str) -> str:
    """Returns `text` as CLIP's tokenizer sees it: mojibake fixed, HTML unescaped, whitespace collapsed, lower case."""
    import ftfy  # CLIP's tokenizer repairs broken unicode with it; a small pure-Python dependency.
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """Callable: list of strings -> int32 (batch, context_length) ids: <start_of_text> text <end_of_text> 0 ...

    A text with more tokens than the context is cut to the context and its last id set to <end_of_text>
    (open_clip's behaviour) with a warning when `truncate` is True, and refused with a ValueError otherwise.
    """

    def __init__(self, context_length: int = 77, truncate: bool = True, merges_file: str = MERGES_FILE):
        import regex  # `re` has no \p{L} / \p{N} classes, which CLIP's word split uses.
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (<start_of_text> and <end_of_text>), got {context_length}")
        self.context_length = int(context_length)
        self.truncate = bool(truncate)
        self.encoder, self.ranks = _load_vocabulary(merges_file)
        self.decoder = {index: piece for piece, index in self.encoder.items()}
        self.vocab_size = len(self.encoder)
        self.start_id, self.end_id = self.encoder[START_OF_TEXT], self.encoder[END_OF_TEXT]
        self.pad_id = 0
        _, self._byte_chars = byte_alphabet()
        self._char_bytes = {char: byte for byte, char in enumerate(self._byte_chars)}
        specials = "|".join(regex.escape(token) for token in (START_OF_TEXT, END_OF_TEXT))
        self._words = regex.compile(specials + r"|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
                                    regex.IGNORECASE)
        self._cache: Dict[str, Tuple[int, ...]] = {}

    def _word_ids(self, word: str) -> Tuple[int, ...]:
        """Returns the ids of one word after BPE merging (cached: captions repeat their words)."""
        if word in self._cache:
            return self._cache[word]
        if word in (START_OF_TEXT, END_OF_TEXT):
            ids = (self.encoder[word],)
        else:
            symbols = [self._byte_chars[byte] for byte in word.encode("utf-8")]
            symbols[-1] += "</w>"
            while len(symbols) > 1:
                left, right = min(zip(symbols[:-1], symbols[1:]), key=lambda pair: self.ranks.get(pair, NUM_MERGES))
                if (left, right) not in self.ranks:
                    break
                merged, index = [], 0
                # Merge every occurrence of the best pair, left to right, never overlapping.
                while index < len(symbols):
                    if index + 1 < len(symbols) and symbols[index] == left and symbols[index + 1] == right:
                        merged.append(left + right)
                        index += 2
                    else:
                        merged.append(symbols[index])
                        index += 1
                symbols = merged
            ids = tuple(self.encoder[symbol] for symbol in symbols)
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> List[int]:
        """Returns the ids of `text` without start/end tokens or padding."""
        return [index for word in self._words.findall(clean_text(text)) for index in self._word_ids(word)]

    def decode(self, ids: Sequence[int]) -> str:
        """Returns the text of `ids` (start/end tokens and padding dropped), words separated by spaces."""
        skip = {self.start_id, self.end_id}
        data = bytearray()
        for index in (int(index) for index in ids if int(index) not in skip and int(index) != self.pad_id):
            piece = self.decoder[index]
            word_end = piece.endswith("</w>")
            data.extend(self._char_bytes[char] for char in (piece[:-4] if word_end else piece))
            if word_end:
                data.extend(b" ")
        return data.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: Union[str, Sequence[str]]) -> np.ndarray:
        """Returns int32 (len(texts), context_length) ids; raises or truncates over-long texts (see the class)."""
        if isinstance(texts, str):
            texts = [texts]
        result = np.zeros((len(texts), self.context_length), np.int32)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts must be strings, got {type(text).__name__} at index {row}")
            ids = [self.start_id, *self.encode(text), self.end_id]
            if len(ids) > self.context_length:
                if not self.truncate:
                    raise ValueError(f"Text {row} has {len(ids)} tokens (with start and end), more than the "
                                     f"context_length {self.context_length}: {text[:60]!r}...; shorten it or "
                                     "pass truncate=True")
                warnings.warn(f"A text of {len(ids)} tokens was truncated to context_length {self.context_length}",
                              stacklevel=2)
                ids = ids[:self.context_length - 1] + [self.end_id]
            result[row, :len(ids)] = ids
        return result
