"""Every message built from stored data fits gRPC's message limit, whatever mix of legal keys
and values: change batches, snapshot chunks, List pages and Scan chunks (real LMDB files)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstack import validation
from kvstack.backend.store import Store, Write
from kvstack.v1 import kv_pb2, replication_pb2

BUDGET = validation.MESSAGE_BUDGET_BYTES
BIG = validation.DEFAULT_MAX_VALUE_BYTES
KEY = validation.MAX_KEY_BYTES


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path / "db", map_size=1 << 30)
    yield opened
    opened.close()


def mixed_writes(count: int, seed: int, biggest: int = BIG) -> list[Write]:
    """Keys of 1 to 511 bytes and values of 0 to `biggest` bytes, many of them at the limits."""
    rng = random.Random(seed)  # noqa: S311 - test data, not secrets
    writes = []
    for i in range(count):
        key_len = rng.choice([KEY, KEY, rng.randint(8, KEY)])
        value_len = rng.choice([biggest, biggest, 0, rng.randint(0, biggest)])
        key = f"{i:06d}".encode().ljust(key_len, b"k")
        writes.append(Write("put", key, bytes([i % 251]) * value_len))
    return writes


def test_the_limits_leave_room_for_one_maximum_entry() -> None:
    """The largest value allowed, under the largest key, makes one message under the budget, and
    the budget is half of gRPC's limit; a larger KVSTACK_MAX_VALUE_BYTES is refused."""
    assert BUDGET * 2 == validation.GRPC_MESSAGE_LIMIT_BYTES
    key, value = b"k" * KEY, b"v" * validation.MAX_VALUE_LIMIT_BYTES
    change = replication_pb2.Change(
        seq=2**64 - 1, key=key, value=value, delete=True, committed_at=1e9
    )
    batch = replication_pb2.ChangeBatch(
        changes=[change], primary_seq=2**64 - 1, snapshot_required=True
    )
    page = kv_pb2.ListResponse(
        entries=[kv_pb2.Entry(key=key, value=value)], next_page_token=key * 2
    )
    for message in (batch, page):
        assert message.ByteSize() <= BUDGET
    # The overhead the budget assumes per entry covers protobuf's actual framing.
    framing = batch.ByteSize() - len(key) - len(value)
    assert framing - 16 <= validation.ENTRY_OVERHEAD_BYTES  # 16: the batch's own fields
    validation.check_value_limit(validation.DEFAULT_MAX_VALUE_BYTES)
    validation.check_value_limit(validation.MAX_VALUE_LIMIT_BYTES)
    with pytest.raises(ValueError, match="KVSTACK_MAX_VALUE_BYTES"):
        validation.check_value_limit(validation.MAX_VALUE_LIMIT_BYTES + 1)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_change_batches_fit_and_cover_the_log(store: Store, seed: int) -> None:
    """Batches of the log of a mix of maximum and small keys and values each serialize under the
    budget, hold at least one change, and together are the whole log in order."""
    writes = mixed_writes(40, seed)
    for i in range(0, len(writes), 8):
        store.apply(writes[i : i + 8])
    after, seen, sizes = 0, 0, []
    while changes := store.changes_after(after, 500):
        batch = replication_pb2.ChangeBatch(changes=changes, primary_seq=store.seq())
        sizes.append(batch.ByteSize())
        assert [c.seq for c in changes] == list(range(after + 1, after + 1 + len(changes)))
        after = changes[-1].seq
        seen += len(changes)
    assert seen == len(writes)
    assert max(sizes) <= BUDGET
    assert len(sizes) > 1  # the bound did cut: 40 values of up to 1 MiB never fit one message


def test_one_change_of_the_largest_value_always_goes(store: Store) -> None:
    """A change bigger than the budget would be (were the limit raised) still goes alone, so the
    stream never stalls on it; batches of small changes keep their count limit."""
    store.apply([Write("put", b"huge", b"x" * (BUDGET + 1)), Write("put", b"small", b"y")])
    assert [c.key for c in store.changes_after(0, 500)] == [b"huge"]
    assert [c.key for c in store.changes_after(1, 500)] == [b"small"]
    store.apply([Write("put", f"s{i}".encode(), b"z") for i in range(20)])
    assert len(store.changes_after(2, 5)) == 5


@pytest.mark.parametrize("seed", [4, 5])
def test_snapshot_chunks_fit(store: Store, seed: int) -> None:
    """Every snapshot chunk of maximum-size entries serializes under the budget and the chunks
    hold every entry once."""
    store.apply(mixed_writes(30, seed))
    chunks = list(store.snapshot())
    sizes = [
        replication_pb2.SnapshotChunk(
            seq=seq, entries=[kv_pb2.Entry(key=k, value=v) for k, v in entries]
        ).ByteSize()
        for seq, entries in chunks
    ]
    assert max(sizes) <= BUDGET
    assert sum(len(e) for _, e in chunks) == 30
    assert all(entries for _, entries in chunks)


@pytest.mark.parametrize("page_size", [1, 2, 3, 5, 100, 1000])
def test_list_pages_fit_and_end_short_with_a_token(store: Store, page_size: int) -> None:
    """A List page of maximum-size values holds fewer than page_size entries when they would not
    fit, says more follow, and the pages together list every entry once, in order."""
    writes = mixed_writes(12, 7)
    store.apply(writes)
    after, listed, more = b"", [], True
    while more:
        entries, more = store.list_page(b"", page_size, after)
        assert 1 <= len(entries) <= page_size
        page = kv_pb2.ListResponse(
            entries=[kv_pb2.Entry(key=k, value=v) for k, v in entries],
            next_page_token=b"t" * (2 * KEY) if more else b"",
        )
        assert page.ByteSize() <= BUDGET
        listed += [k for k, _ in entries]
        after = entries[-1][0]
    assert listed == sorted(w.key for w in writes)


def test_scan_chunks_are_bounded_by_bytes(store: Store) -> None:
    """Scan reads at most the budget per chunk (one entry when a single one is larger)."""
    store.apply(mixed_writes(10, 8))
    chunks = list(store.scan(b""))
    assert all(
        sum(validation.entry_bytes(k, v) for k, v in c) <= validation.ENTRIES_BUDGET_BYTES
        for c in chunks
    )
    assert sum(len(c) for c in chunks) == 10
