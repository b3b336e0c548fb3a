"""Text normalisation and the caller's text fields (``shared/text.py``). (Against OFA's
own ``pre_caption``: ``tests/worker/ofa/test_preprocess.py``.)"""

from __future__ import annotations

import pytest

from shared.errors import BadTextError
from shared.text import check_text, pre_caption


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("A Dog", "a dog"),
        ("...!?a dog", "a dog"),
        ("well-known/famous", "well known famous"),
        ("<person> smiles", "person smiles"),
        ("a   dog\t\tbarks\n", "a dog barks"),
        ("  a dog  ", "a dog"),
        ("", ""),
    ],
)
def test_pre_caption(raw: str, normal: str):
    assert pre_caption(raw) == normal


def test_pre_caption_keeps_at_most_max_words():
    assert pre_caption("one two three four", max_words=2) == "one two"
    assert pre_caption("one two", max_words=5) == "one two"


def test_texts_that_normalise_alike_are_one_question():
    assert pre_caption("A DOG -- barks!") == pre_caption("a dog barks!")


def test_a_text_field_is_a_non_empty_string_within_its_limit():
    assert check_text("a dog", "text", 10, required=True) == "a dog"
    assert check_text(None, "premise", 10, required=False) is None
    assert check_text("   ", "premise", 10, required=False) is None  # blank optional: absent
    for value, why in (
        (None, "missing text"),
        ("  ", "text is empty"),
        (5, "text must be a string"),
        ("x" * 11, "text is 11 characters; the limit is 10"),
    ):
        with pytest.raises(BadTextError) as err:
            check_text(value, "text", 10, required=True)
        assert err.value.detail == why
    with pytest.raises(BadTextError, match="premise must be a string"):
        check_text(7, "premise", 10, required=False)
