"""The cache key: unambiguous framing, normalised texts, model identity."""

from __future__ import annotations

from shared.keys import Keys, verdict_key

IMG = b"\x89PNG fake bytes"


def test_texts_the_model_sees_identically_share_a_key():
    a = verdict_key("m", "r", IMG, "A dog -- runs/jumps!", None)
    b = verdict_key("m", "r", IMG, "...A Dog runs   jumps!", None)
    assert a == b


def test_every_input_changes_the_key():
    base = verdict_key("m", "r", IMG, "a dog", None)
    assert verdict_key("m2", "r", IMG, "a dog", None) != base
    assert verdict_key("m", "r2", IMG, "a dog", None) != base
    assert verdict_key("m", "r", IMG + b"x", "a dog", None) != base
    assert verdict_key("m", "r", IMG, "a cat", None) != base
    assert verdict_key("m", "r", IMG, "a dog", "") != base  # empty premise is not no premise
    assert verdict_key("m", "r", IMG, "a dog", "park") != base


def test_framing_is_unambiguous():
    # Moving bytes between adjacent fields must not collide.
    assert verdict_key("ab", "c", IMG, "t", None) != verdict_key("a", "bc", IMG, "t", None)
    assert verdict_key("m", "r", b"ab", "c", None) != verdict_key("m", "r", b"a", "bc", None)
    assert len(verdict_key("m", "r", IMG, "t", None)) == 64


def test_redis_names_share_one_prefix():
    k = Keys("ofa:v1:")
    names = [k.verdict("x"), k.payload("x"), k.job("j"), k.inflight("x"), k.workers("m", "r")]
    assert all(n.startswith("ofa:v1:") for n in names)
    assert len(set(names)) == len(names)
