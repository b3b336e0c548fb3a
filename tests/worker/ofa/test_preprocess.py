"""Tokenizer and prompt building against ModelScope's ``OFATokenizer`` and preprocessor."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.errors import BadTextError
from shared.text import pre_caption
from tests import reference as R
from worker.ofa.config import TaskConfig
from worker.ofa.preprocess import VOCAB_DIR, TextEncoder

TEXTS = [
    "there are two birds.",
    ' does the image describe " there are two birds. "?',
    "Café déjà vu — naïve façade, 東京タワー, emoji 🐦🐦 and ﬁ ligatures",
    "Punctuation!!! ?? ... (brackets) [square] {curly} 'quotes' \"double\" it's we'll",
    "tabs\tand\nnewlines   and    spaces",
    "numbers 3.14159 1,000,000 42nd 2026-11-21",
    "<code_12> and <bin_7> spelled out, <person> too",
    "a " + "very long sentence with many words " * 60,
    "",
    " leading space",
    "UPPER lower MiXeD",
]


@pytest.fixture(scope="module")
def ref_tokenizer():
    tok = R.OFATokenizer.from_pretrained(str(VOCAB_DIR))
    tok.add_tokens([f"<code_{i}>" for i in range(8192)])
    tok.add_tokens([f"<bin_{i}>" for i in range(1000)])
    return tok


@pytest.fixture(scope="module")
def ours() -> TextEncoder:
    return TextEncoder(VOCAB_DIR / "vocab.json", VOCAB_DIR / "merges.txt", TaskConfig())


def test_known_ids(ours: TextEncoder):
    assert ours.encode(" yes") == [4420]
    assert ours.encode(" no") == [117]
    assert ours.encode(" maybe") == [2085]
    assert ours.encode(' does the image describe " there are two birds. "?') == [
        473,
        5,
        2274,
        6190,
        22,
        89,
        32,
        80,
        7723,
        4,
        22,
        116,
    ]
    assert ours.vocab_size == 59457


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_reference(ours: TextEncoder, ref_tokenizer, text: str):
    expected = ref_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ours.encode(text) == expected


@pytest.mark.parametrize("text", TEXTS)
def test_pre_caption_matches_reference(text: str):
    from modelscope.preprocessors.ofa.base import OfaBasePreprocessor

    for max_words in (None, 5, 256):
        assert pre_caption(text, max_words) == OfaBasePreprocessor.pre_caption(text, max_words)


@pytest.mark.parametrize("premise", [None, "A man sits on a bench; it is sunny."])
@pytest.mark.parametrize("text", TEXTS[:8])
def test_source_ids_match_preprocessor(tiny_dir: Path, text: str, premise: str | None):
    from tests.helpers import photo
    from worker.ofa.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tiny_dir)
    pre = R.reference_preprocessor(tiny_dir)
    data = {"image": photo("coffee"), "text": text}
    if premise is not None:
        data["text2"] = premise
    if not text.strip():
        with pytest.raises(BadTextError):
            ckpt.text.source_ids(text, premise)
        return
    sample = pre(data)
    source = ckpt.text.source_ids(text, premise)
    assert source == sample["source"].tolist()
    assert ckpt.text.decoder_prompt(source) == sample["decoder_prompt"].tolist()


def test_texts_tokenised_together_match_each_alone(tiny_dir: Path):
    """A group's texts go through the tokenizer's batch encoding in one call: the same
    ids as one at a time, an empty text refused in its place, long texts cut alike."""
    from worker.ofa.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tiny_dir)
    pairs = [(t, p) for t in [*TEXTS, "word " * 5000] for p in (None, "A man sits on a bench.")]
    together = ckpt.text.source_ids_many(pairs)
    assert len(together) == len(pairs)
    for (text, premise), got in zip(pairs, together, strict=True):
        if not text.strip():
            assert isinstance(got, BadTextError)
            with pytest.raises(BadTextError):
                ckpt.text.source_ids(text, premise)
        else:
            assert got == ckpt.text.source_ids(text, premise)
    assert ckpt.text.source_ids_many([]) == []


def test_long_text_is_truncated_not_refused(tiny_dir: Path):
    from worker.ofa.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tiny_dir)
    source = ckpt.text.source_ids("word " * 5000)
    assert len(source) == ckpt.task.max_src_length + 2
    assert source[0] == 0 and source[-1] == 2


def test_prompt_override(tiny_dir: Path):
    task = TaskConfig(prompt=' is " {} " true?')
    enc = TextEncoder(tiny_dir / "vocab.json", tiny_dir / "merges.txt", task)
    assert enc.prompt("A Dog") == ' is " a dog " true?'
