"""Tokenizers: CLIP's BPE equal to open_clip's, SentencePiece equal to transformers' SiglipTokenizer on a tiny
trained model, over-long texts truncated or refused, unknown names refused."""
import os
import warnings

import numpy as np
import pytest

from vitjax import text

CORPUS = [
    "a photo of a cat", "A Photo of THE Number Seven!!", "  spaces\tand\nnewlines  ", "naïve café — déjà vu",
    "日本語のテキスト", "emoji 😀🐍 and ✨ sparkles", "&amp; html &lt;b&gt; entities", "don't we'll they're I'd",
    "numbers 1234567 and 3.14159", "<start_of_text> inside <end_of_text>", "mojibake: cafÃ©", "",
    "Ελληνικά και русский текст", "العربية", "x" * 300, " ".join(["word"] * 100), "½ ² ³ ① Ⅻ",
    "A  bird's-eye view of the Eiffel Tower, at dusk (2019)", "zero-shot CLIP; ViT-B/32 @ 224px",
]


def test_clip_bpe_known_ids():
    tokenize = text.tokenizer("clip", context_length=8)
    # Ids of open_clip's tokenizer ("a"=320, "photo"=1125, "of"=539, "cat"=2368; 49406/49407 start/end).
    np.testing.assert_array_equal(tokenize(["a photo of a cat"]),
                                  [[49406, 320, 1125, 539, 320, 2368, 49407, 0]])
    assert tokenize(["x"]).dtype == np.int32 and tokenize.vocab_size == 49408
    assert text.tokenizer("clip").decode(tokenize.encode("Naïve  CAFÉ, déjà vu!")) == "naïve café , déjà vu !"


def test_clip_bpe_equals_open_clip():
    open_clip = pytest.importorskip("open_clip")
    ours = text.tokenizer("clip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = ours(CORPUS)
    theirs = open_clip.get_tokenizer("ViT-B-32")(CORPUS).numpy()
    assert ids.shape == theirs.shape == (len(CORPUS), 77)
    mismatched = [CORPUS[row] for row in range(len(CORPUS)) if not np.array_equal(ids[row], theirs[row])]
    assert not mismatched
    # The long texts fill the context and end with <end_of_text>.
    assert ids[CORPUS.index(" ".join(["word"] * 100)), -1] == 49407


def test_over_long_texts_truncate_with_a_warning_or_raise():
    long_text = "one two three four five six seven"
    with pytest.warns(UserWarning, match="truncated"):
        ids = text.tokenizer("clip", context_length=5)([long_text, "one"])
    assert list(ids[0]) == [49406, 637, 1237, 2097, 49407] and list(ids[1]) == [49406, 637, 49407, 0, 0]
    with pytest.raises(ValueError, match="more than the context_length 5"):
        text.tokenizer("clip", context_length=5, truncate=False)([long_text])


def test_unknown_tokenizer_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"Valid choices: \['clip', 'sentencepiece'\]"):
        text.tokenizer("bpe")
    with pytest.raises(FileNotFoundError, match="SentencePiece model"):
        text.tokenizer("sentencepiece", model_file="/nonexistent.model")


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    directory = tmp_path_factory.mktemp("spm")
    numbers = "zero one two three four five six seven eight nine".split()
    lines = [f"a photo of the number {word}" for word in numbers] * 5
    lines += ["the quick brown fox jumps over the lazy dog", "an image of a cat sitting on a mat"] * 5
    (directory / "corpus.txt").write_text("\n".join(lines))
    # SigLIP's layout: no bos, </s> = 1, <unk> = 2; transformers pads with </s>.
    spm.SentencePieceTrainer.train(input=str(directory / "corpus.txt"), model_prefix=str(directory / "tiny"),
                                   vocab_size=40, model_type="unigram", pad_id=-1, eos_id=1, unk_id=2, bos_id=-1,
                                   minloglevel=2)
    return str(directory / "tiny.model")


def test_sentencepiece_equals_transformers_siglip(sentencepiece_model):
    transformers = pytest.importorskip("transformers")
    texts = ["A photo of the number SEVEN!", "hello, world...", "  the   lazy dog ", "unknown zebra words ü", "",
             "one " * 40]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = text.tokenizer("sentencepiece", model_file=sentencepiece_model, context_length=16)(texts)
    reference = transformers.SiglipTokenizer(vocab_file=sentencepiece_model)
    theirs = np.array(reference(texts, padding="max_length", max_length=16, truncation=True)["input_ids"])
    np.testing.assert_array_equal(ours, theirs)
    assert ours.dtype == np.int32 and (ours[:, -1] == 1).all()   # every row ends in </s> (eos or padding)
    with pytest.raises(ValueError, match="context_length 16"):
        text.tokenizer("sentencepiece", model_file=sentencepiece_model, context_length=16, truncate=False)(texts)


def test_vitjax_text_imports_no_torch_or_tensorflow():
    import subprocess
    import sys
    code = ("import sys, vitjax.text; t = vitjax.text.tokenizer('clip'); t(['a cat']); "
            "print(sorted(m for m in ('torch', 'tensorflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
    assert out.stdout.strip() == "[]"
