"""Request validation: the limits and the messages a person reads."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstack import validation
from kvstack.validation import Invalid


@given(st.binary(min_size=1, max_size=511))
def test_keys_of_1_to_511_bytes_are_accepted(key: bytes) -> None:
    """Every key LMDB can hold passes."""
    validation.check_key(key)


@pytest.mark.parametrize(("key", "words"), [(b"", "empty"), (b"k" * 512, "512 bytes")])
def test_bad_keys_are_refused_with_a_reason(key: bytes, words: str) -> None:
    """Empty and 512-byte keys are refused, and the message says why and what to do."""
    with pytest.raises(Invalid, match=words) as raised:
        validation.check_key(key)
    assert "1 to 511" in str(raised.value) or "shorter" in str(raised.value)


def test_value_limit() -> None:
    """A value at the limit passes, one byte more is refused naming the setting."""
    validation.check_value(b"x" * 10, 10)
    with pytest.raises(Invalid, match="KVSTACK_MAX_VALUE_BYTES"):
        validation.check_value(b"x" * 11, 10)


def test_page_size() -> None:
    """0 means the default page; over the cap is refused."""
    assert validation.page_size(0) == validation.DEFAULT_PAGE_SIZE
    assert validation.page_size(7) == 7
    with pytest.raises(Invalid, match="next_page_token"):
        validation.page_size(validation.MAX_PAGE_SIZE + 1)


def test_page_token_must_match_prefix() -> None:
    """A token from another listing is refused instead of returning the wrong keys."""
    validation.check_page_token(b"a/", validation.page_token(b"a/", b"a/9"))
    validation.check_page_token(b"a/", b"")
    with pytest.raises(Invalid, match="prefix"):
        validation.check_page_token(b"a/", validation.page_token(b"b/", b"b/1"))
    with pytest.raises(Invalid, match="prefix"):
        validation.check_page_token(b"", validation.page_token(b"a/", b"a/1"))


@given(st.binary(max_size=40), st.binary(min_size=1, max_size=511))
def test_page_tokens_round_trip(prefix: bytes, rest: bytes) -> None:
    """A token the service issued gives back the key the page ended at."""
    key = prefix + rest
    assert validation.resume_after(prefix, validation.page_token(prefix, key)) == key


@pytest.mark.parametrize(
    "damage",
    [
        lambda t: t[:-1],  # cut short
        lambda t: t[: len(t) // 2],
        lambda t: t[:1],
        lambda t: t[:-9] + bytes([t[-9] ^ 1]) + t[-8:],  # the key altered
        lambda t: bytes([t[0] + 1]) + t[1:],  # another version
        lambda t: b"p/0001",  # a raw key, as tokens used to be
        lambda t: t + b"x",
    ],
    ids=["cut-1", "cut-half", "cut-to-1", "altered", "version", "raw-key", "appended"],
)
def test_page_tokens_not_issued_are_refused(damage: Callable[[bytes], bytes]) -> None:
    """Any token but the one issued is refused with a sentence saying what to pass, instead of
    silently restarting the listing (a truncated raw-key token used to start it over)."""
    token = validation.page_token(b"p/", b"p/0001")
    with pytest.raises(Invalid, match="next_page_token exactly") as raised:
        validation.resume_after(b"p/", damage(token))
    assert "empty page_token" in str(raised.value)
