"""Request checks shared by the server (which rejects bad input before forwarding) and the
backend (which must never trust its callers). Each failure says what was wrong and what to do."""

from __future__ import annotations

from dataclasses import dataclass

MAX_KEY_BYTES = 511  # LMDB's compiled-in key limit (mdb_env_get_maxkeysize)
DEFAULT_MAX_VALUE_BYTES = 1 << 20
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# Changes a replica may be behind its primary and still answer reads (KVSTACK_MAX_LAG).
DEFAULT_MAX_LAG = 1000


@dataclass(frozen=True)
class Invalid(Exception):
    """A request that must be refused with INVALID_ARGUMENT; `message` is for a person."""

    message: str

    def __str__(self) -> str:
        return self.message


def check_key(key: bytes) -> None:
    if not key:
        raise Invalid("key is empty: give a key of 1 to 511 bytes")
    if len(key) > MAX_KEY_BYTES:
        raise Invalid(
            f"key is {len(key)} bytes, over the limit of {MAX_KEY_BYTES}: "
            "use a shorter key (hash long identifiers)"
        )


def check_value(value: bytes, max_value_bytes: int) -> None:
    if len(value) > max_value_bytes:
        raise Invalid(
            f"value is {len(value)} bytes, over the limit of {max_value_bytes} "
            "(KVSTACK_MAX_VALUE_BYTES): store large objects elsewhere and keep a "
            "reference here"
        )


def page_size(requested: int) -> int:
    """The effective page size of a List request (0 means the default)."""
    if requested > MAX_PAGE_SIZE:
        raise Invalid(
            f"page_size {requested} is over the limit of {MAX_PAGE_SIZE}: ask for "
            "fewer entries and follow next_page_token"
        )
    return requested or DEFAULT_PAGE_SIZE


def check_page_token(prefix: bytes, token: bytes) -> None:
    if token and not token.startswith(prefix):
        raise Invalid(
            "page_token does not belong to this prefix: pass the next_page_token "
            "returned by the previous List call with the same prefix"
        )
