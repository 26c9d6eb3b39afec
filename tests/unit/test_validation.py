"""Request validation: the limits and the messages a person reads."""

from __future__ import annotations

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
    validation.check_page_token(b"a/", b"a/9")
    validation.check_page_token(b"a/", b"")
    with pytest.raises(Invalid, match="prefix"):
        validation.check_page_token(b"a/", b"b/1")
