"""Request checks shared by the server (which rejects bad input before forwarding) and the
backend (which must never trust its callers). Each failure says what was wrong and what to do."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

MAX_KEY_BYTES = 511  # LMDB's compiled-in key limit (mdb_env_get_maxkeysize)
DEFAULT_MAX_VALUE_BYTES = 1 << 20
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# Changes a replica may be behind its primary and still answer reads (KVSTACK_MAX_LAG).
DEFAULT_MAX_LAG = 1000

# Message sizes: the one place every size limit of the API and of replication comes from (see
# docs/architecture.md, "Limits"). gRPC refuses a message over 4 MiB by default
# (KVSTACK_MAX_RECEIVE_BYTES); every message a kvstack process builds from stored data (a List
# page, a Scan entry, a change batch, a snapshot chunk) holds entries while they fit in
# MESSAGE_BUDGET_BYTES, half of that, and at least one entry, which always fits because a value
# may be at most MAX_VALUE_LIMIT_BYTES.
GRPC_MESSAGE_LIMIT_BYTES = 4 << 20
MESSAGE_BUDGET_BYTES = GRPC_MESSAGE_LIMIT_BYTES // 2
# Room kept in every message for what is not entries: a page token (a key and a checksum), the
# message's other fields and protobuf's framing.
MESSAGE_RESERVE_BYTES = 4096
# protobuf's framing of one entry or change beyond its key and value (tags, lengths, sequence
# number, flags, timestamp: 35 bytes at most, measured in tests/unit/test_validation.py).
ENTRY_OVERHEAD_BYTES = 64
ENTRIES_BUDGET_BYTES = MESSAGE_BUDGET_BYTES - MESSAGE_RESERVE_BYTES
# A backup travels as raw bytes of its LMDB copy, in messages of at most this much (half the
# budget: well inside gRPC's limit, and a few of them in flight hold little memory).
BACKUP_CHUNK_BYTES = MESSAGE_BUDGET_BYTES // 2
# The largest KVSTACK_MAX_VALUE_BYTES a service accepts: one entry of a maximum key and value
# fills ENTRIES_BUDGET_BYTES at most.
MAX_VALUE_LIMIT_BYTES = ENTRIES_BUDGET_BYTES - MAX_KEY_BYTES - ENTRY_OVERHEAD_BYTES
# The smallest KVSTACK_MAX_RECEIVE_BYTES a backend accepts (gRPC applies it to what it sends
# too): the server sends it calls over kvstack.v1.Batch in messages of up to
# MESSAGE_BUDGET_BYTES, protobuf's framing included (one item goes alone, and the largest legal
# item fits that budget), and the backend answers in messages as large. Below it one large
# batch would be refused whole and break the stream for every call on it.
MIN_BACKEND_RECEIVE_BYTES = MESSAGE_BUDGET_BYTES


def entry_bytes(key: bytes, value: bytes) -> int:
    """What one entry (or change) costs in a message, framing included (an upper bound)."""
    return len(key) + len(value) + ENTRY_OVERHEAD_BYTES


def check_value_limit(max_value_bytes: int) -> None:
    """Refuse (ValueError) a KVSTACK_MAX_VALUE_BYTES whose values could not fit one message."""
    if not 0 < max_value_bytes <= MAX_VALUE_LIMIT_BYTES:
        raise ValueError(
            f"KVSTACK_MAX_VALUE_BYTES={max_value_bytes} is invalid: give 1 to "
            f"{MAX_VALUE_LIMIT_BYTES} bytes, so that one entry of the largest value always fits "
            f"in one gRPC message of at most {MESSAGE_BUDGET_BYTES} bytes"
        )


def check_backend_receive_limit(max_receive_bytes: int) -> None:
    """Refuse (ValueError) a backend's KVSTACK_MAX_RECEIVE_BYTES below the server's batches."""
    if max_receive_bytes < MIN_BACKEND_RECEIVE_BYTES:
        raise ValueError(
            f"KVSTACK_MAX_RECEIVE_BYTES={max_receive_bytes} is too small for a backend: give at "
            f"least {MIN_BACKEND_RECEIVE_BYTES} bytes (2MiB), or leave it unset (4MiB), because "
            f"the server sends a backend its calls in batch messages of up to "
            f"{MIN_BACKEND_RECEIVE_BYTES} bytes (kvstack.v1.Batch) and the backend answers in "
            "messages as large; with a smaller limit one such message would be refused and every "
            "call on its stream would fail"
        )


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


MAX_REQUEST_ID_CHARS = 64


def check_request_id(request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise Invalid(
            f"request_id is {len(request_id)} characters, over the limit of "
            f"{MAX_REQUEST_ID_CHARS}: use a random id (a UUID is 36)"
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


# Page tokens are opaque and check themselves: a version byte, the last key of the page, and a
# checksum over the listing's prefix and both, so a token cut short, altered, made up or taken
# from a listing of another prefix is refused instead of silently restarting (or skewing) the
# listing. The checksum is not a secret (a forged token can only start a listing at a key of the
# caller's choosing, which it may ask for anyway); any backend checks any backend's tokens.
_TOKEN_VERSION = b"\x01"
_TOKEN_CHECK_BYTES = 8
_TOKEN_PERSON = b"kvstack.v1.List"


def _token_check(prefix: bytes, body: bytes) -> bytes:
    framed = len(prefix).to_bytes(2, "big") + prefix + body
    return hashlib.blake2b(framed, digest_size=_TOKEN_CHECK_BYTES, person=_TOKEN_PERSON).digest()


def page_token(prefix: bytes, last_key: bytes) -> bytes:
    """The next_page_token of a page of the listing of `prefix` that ended at `last_key`."""
    body = _TOKEN_VERSION + last_key
    return body + _token_check(prefix, body)


def resume_after(prefix: bytes, token: bytes) -> bytes:
    """The key after which a List with this page_token resumes (b"" for the first page).
    Raises Invalid when the token is not one the service issued for this prefix."""
    if not token:
        return b""
    body, check = token[:-_TOKEN_CHECK_BYTES], token[-_TOKEN_CHECK_BYTES:]
    last_key = body[len(_TOKEN_VERSION) :]
    if (
        len(token) < len(_TOKEN_VERSION) + 1 + _TOKEN_CHECK_BYTES
        or not body.startswith(_TOKEN_VERSION)
        or not hmac.compare_digest(check, _token_check(prefix, body))
        or not last_key.startswith(prefix)
    ):
        raise Invalid(
            "page_token is not one this service issued for this prefix (cut short, altered, or "
            "from a List with another prefix): pass next_page_token exactly as the previous "
            "List call with the same prefix returned it, or an empty page_token to start over"
        )
    return last_key


def check_page_token(prefix: bytes, token: bytes) -> None:
    """Refuse (Invalid) a page_token the service did not issue for this prefix."""
    resume_after(prefix, token)
