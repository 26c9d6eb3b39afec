"""The LMDB store and group commit, on real LMDB files in a temporary directory."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstack.backend.store import (
    SAVED_KEYS_LISTED,
    Applied,
    GroupCommitter,
    LogGap,
    Store,
    StoreFull,
    Write,
)
from kvstack.v1.replication_pb2 import Change


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path / "db", map_size=16 << 20)
    yield opened
    opened.close()


def test_put_reports_created_then_updated(store: Store) -> None:
    """A first put creates the key, a second replaces the value and says so."""
    assert store.apply([Write("put", b"k", b"v1")]) == [Applied(changed=True, seq=1)]
    assert store.apply([Write("put", b"k", b"v2")]) == [Applied(changed=False, seq=2)]
    assert store.get(b"k") == b"v2"


def test_delete_reports_whether_the_key_existed(store: Store) -> None:
    """Deleting an existing key removes it; deleting a missing key changes nothing."""
    store.apply([Write("put", b"k", b"v")])
    assert store.apply([Write("delete", b"k")]) == [Applied(changed=True, seq=2)]
    # Deleting nothing changes nothing, so it adds nothing to the log either.
    assert store.apply([Write("delete", b"k")]) == [Applied(changed=False, seq=2)]
    assert store.get(b"k") is None


def test_page_follows_prefix_and_token(store: Store) -> None:
    """Pages hold only keys with the prefix, in order, and resume after the given key."""
    store.apply([Write("put", k, b"x") for k in (b"a/1", b"a/2", b"a/3", b"b/1", b"a")])
    assert [k for k, _ in store.page(b"a/", 2)] == [b"a/1", b"a/2"]
    assert [k for k, _ in store.page(b"a/", 2, after=b"a/2")] == [b"a/3"]
    assert store.page(b"a/", 2, after=b"a/3") == []
    assert store.page(b"zzz", 10) == []


def test_scan_returns_everything_in_chunks(store: Store) -> None:
    """Scan yields every entry under the prefix exactly once across its chunks."""
    keys = [f"s/{i:04d}".encode() for i in range(1000)]
    store.apply([Write("put", k, k) for k in keys])
    chunks = list(store.scan(b"s/", chunk=64))
    assert [k for chunk in chunks for k, _ in chunk] == keys
    assert max(len(c) for c in chunks) == 64


def test_data_survives_reopening(tmp_path: Path) -> None:
    """What one Store committed is there when the files are opened again."""
    first = Store(tmp_path / "db", map_size=1 << 20)
    first.apply([Write("put", b"durable", b"yes")])
    first.close()
    second = Store(tmp_path / "db", map_size=1 << 20)
    assert second.get(b"durable") == b"yes"
    second.close()


def test_full_map_fails_only_the_writes_that_do_not_fit(tmp_path: Path) -> None:
    """A full map names the setting to raise; the small writes in the same batch still land."""
    store = Store(tmp_path / "db", map_size=256 << 10)
    results = store.apply([Write("put", b"small", b"s"), Write("put", b"big", b"x" * (1 << 20))])
    assert results[0] == Applied(changed=True, seq=1)
    assert isinstance(results[1], StoreFull)
    assert "KVSTACK_MAP_SIZE" in str(results[1])
    assert store.get(b"small") == b"s"
    assert store.get(b"big") is None
    store.close()


def test_unwritable_directory_says_what_to_do(tmp_path: Path) -> None:
    """Opening a path that cannot hold a database points at KVSTACK_DATA_DIR."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="KVSTACK_DATA_DIR"):
        Store(blocker / "db", map_size=1 << 20)


def test_group_commit_shares_transactions(store: Store) -> None:
    """Concurrent writes share commits: far fewer transactions than writes, none lost."""

    async def scenario() -> None:
        writer = GroupCommitter(store, max_batch=256)
        writer.start()
        results = await asyncio.gather(
            *(writer.submit(Write("put", f"g/{i}".encode(), b"v")) for i in range(500))
        )
        await writer.stop()
        assert all(r.changed for r in results)
        assert sorted(r.seq for r in results) == list(range(1, 501))

    asyncio.run(scenario())
    assert len(store.page(b"g/", 1000)) == 500
    assert store.commits < 100


def _saved(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    """The fields of every "saved" line the store logged."""
    return [
        r.fields  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "kvstack.backend.store" and r.getMessage() == "saved"
    ]


def test_one_saved_line_per_commit_names_its_keys(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """A commit of several writes logs one "saved" line at INFO that names every key it put
    and deleted, in order, with the log position and the value bytes."""
    store.apply([Write("put", b"gone", b"x")])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kvstack.backend.store"):
        store.apply(
            [Write("put", b"a", b"12"), Write("delete", b"gone"), Write("put", b"\xff", b"345")]
        )
    assert _saved(caplog) == [
        {"writes": 3, "seq": 4, "bytes": 5, "put": ["a", "\\xff"], "deleted": ["gone"],
         "unlisted": 0}
    ]  # fmt: skip


def test_a_large_commit_names_its_first_keys_and_counts_the_rest(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """A commit larger than SAVED_KEYS_LISTED names that many keys, its first, and says how
    many it did not name: the line stays bounded whatever the batch."""
    keys = [f"big/{i:03d}".encode() for i in range(SAVED_KEYS_LISTED + 8)]
    with caplog.at_level(logging.INFO, logger="kvstack.backend.store"):
        store.apply([Write("put", k, b"v") for k in keys])
    (line,) = _saved(caplog)
    assert line["put"] == [k.decode() for k in keys[:SAVED_KEYS_LISTED]]
    assert (line["writes"], line["unlisted"]) == (len(keys), 8)
    # The bound docs/configuration.md gives is this one.
    doc = " ".join((Path(__file__).parents[2] / "docs" / "configuration.md").read_text().split())
    n = SAVED_KEYS_LISTED
    assert f"a commit of more than {n} writes names its first {n} keys" in doc


def test_group_commit_logs_once_per_commit(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    """Through the writer thread, as the backend runs it: as many "saved" lines as commits,
    and between them every write, each listed or counted once."""

    async def scenario() -> None:
        writer = GroupCommitter(store, max_batch=256)
        writer.start()
        await asyncio.gather(
            *(writer.submit(Write("put", f"l/{i}".encode(), b"v")) for i in range(300))
        )
        await writer.stop()

    with caplog.at_level(logging.INFO, logger="kvstack.backend.store"):
        asyncio.run(scenario())
    lines = _saved(caplog)
    assert len(lines) == store.commits < 300
    listed = [k for line in lines for k in line["put"]]  # type: ignore[attr-defined]
    assert len(listed) == len(set(listed))
    assert len(listed) + sum(line["unlisted"] for line in lines) == 300  # type: ignore[misc]


def test_a_write_whose_caller_left_stays_pending_until_it_commits(store: Store) -> None:
    """A write whose caller went away (deadline, cancellation) still commits, and the writer
    counts it as pending until it has: a draining primary waits for pending == 0 before it
    tells its replicas its last position."""

    async def scenario() -> None:
        writer = GroupCommitter(store, max_batch=256)
        writer.start()
        callers = [
            asyncio.ensure_future(writer.submit(Write("put", f"left/{i}".encode(), b"v")))
            for i in range(50)
        ]
        await asyncio.sleep(0)  # every write is queued
        for caller in callers:
            caller.cancel()
        assert writer.pending == 50
        for _ in range(500):  # 5 s at most
            if not writer.pending:
                break
            await asyncio.sleep(0.01)
        assert writer.pending == 0
        assert store.seq() == 50  # every write committed, none left behind the count
        await writer.stop()

    asyncio.run(scenario())


def test_group_commit_off_commits_each_write(store: Store) -> None:
    """With max_batch 1 (group commit off) every write is its own transaction."""

    async def scenario() -> None:
        writer = GroupCommitter(store, max_batch=1)
        writer.start()
        await asyncio.gather(
            *(writer.submit(Write("put", f"g/{i}".encode(), b"v")) for i in range(50))
        )
        await writer.stop()

    asyncio.run(scenario())
    assert store.commits == 50


def test_stop_commits_what_was_queued(store: Store) -> None:
    """Stopping the writer commits every write already submitted before it ends."""

    async def scenario() -> list[asyncio.Task[Applied]]:
        writer = GroupCommitter(store, max_batch=8)
        writer.start()
        tasks = [
            asyncio.create_task(writer.submit(Write("put", f"q/{i}".encode(), b"v")))
            for i in range(40)
        ]
        await asyncio.sleep(0)  # let every submit enqueue
        await writer.stop()
        return tasks

    tasks = asyncio.run(scenario())
    assert all(t.result().changed for t in tasks)
    assert len(store.page(b"q/", 100)) == 40


def test_every_change_is_logged_in_order(store: Store) -> None:
    """Each change gets the next sequence number, in the log, in the same transaction."""
    store.apply([Write("put", b"a", b"1"), Write("put", b"b", b"2")])
    store.apply([Write("delete", b"a")])
    changes = store.changes_after(0, 10)
    assert [(c.seq, c.key, c.value, c.delete) for c in changes] == [
        (1, b"a", b"1", False),
        (2, b"b", b"2", False),
        (3, b"a", b"", True),
    ]
    assert [c.seq for c in store.changes_after(2, 10)] == [3]
    assert store.seq() == 3


def test_log_is_trimmed_to_what_replicas_may_need(tmp_path: Path) -> None:
    """The log keeps the last log_retain changes; a position before that needs a snapshot."""
    store = Store(tmp_path / "db", map_size=16 << 20, log_retain=10)
    for i in range(30):
        store.apply([Write("put", f"k{i}".encode(), b"v")])
    assert store.first_logged() == 21
    assert store.can_stream_from(20)
    assert not store.can_stream_from(5)  # trimmed: snapshot first
    assert not store.can_stream_from(31)  # ahead of the primary: not its history
    assert store.can_stream_from(30)
    store.close()


def test_changes_trimmed_while_streaming_are_never_skipped(tmp_path: Path) -> None:
    """A streaming replica whose next change was trimmed meanwhile gets LogGap (and so a
    snapshot), not the changes after the hole."""
    store = Store(tmp_path / "db", map_size=16 << 20, log_retain=10)
    for i in range(30):
        store.apply([Write("put", f"k{i}".encode(), b"v")])
    with pytest.raises(LogGap, match=r"6\.\.20 are no longer in the log"):
        store.changes_after(5, 10)
    assert [c.seq for c in store.changes_after(20, 3)] == [21, 22, 23]
    assert store.changes_after(30, 10) == []
    store.close()


def test_replica_refuses_a_batch_with_a_gap(tmp_path: Path) -> None:
    """A batch that does not follow the replica's position changes nothing and says why."""
    replica = Store(tmp_path / "replica", map_size=1 << 20)
    replica.apply_changes([Change(seq=1, key=b"a", value=b"1")])
    gap = [Change(seq=2, key=b"a", value=b"2"), Change(seq=4, key=b"b", value=b"4")]
    with pytest.raises(LogGap, match="change 4 does not follow position 2"):
        replica.apply_changes(gap)
    assert (replica.seq(), replica.get(b"a"), replica.get(b"b")) == (1, b"1", None)
    replica.close()


def test_replica_applies_each_change_exactly_once(tmp_path: Path) -> None:
    """Changes at or before the replica's position are skipped, so a batch sent again after a
    crash (or overlapping the last one) changes nothing twice."""
    replica = Store(tmp_path / "replica", map_size=1 << 20)
    batch = [Change(seq=1, key=b"a", value=b"1"), Change(seq=2, key=b"a", delete=True)]
    assert replica.apply_changes(batch) == 2
    assert replica.apply_changes([*batch, Change(seq=3, key=b"a", value=b"3")]) == 3
    assert replica.get(b"a") == b"3"
    assert replica.apply_changes(batch) == 3
    assert replica.get(b"a") == b"3"
    replica.close()


def test_snapshot_copies_a_consistent_state(store: Store, tmp_path: Path) -> None:
    """A snapshot taken in one transaction, loaded into a replica, gives the same entries and
    the position to stream from; what the replica held before is replaced."""
    store.apply([Write("put", f"s{i:03d}".encode(), b"v") for i in range(250)])
    chunks = list(store.snapshot(chunk=100))
    assert {seq for seq, _ in chunks} == {250}
    replica = Store(tmp_path / "replica", map_size=16 << 20)
    replica.apply_changes([Change(seq=1, key=b"stale", value=b"x")])
    assert replica.load_snapshot(iter(chunks)) == 250
    assert replica.seq() == 250
    assert replica.get(b"stale") is None
    assert replica.page(b"", 1000) == store.page(b"", 1000)
    replica.close()


def test_snapshot_cut_short_changes_nothing(store: Store, tmp_path: Path) -> None:
    """A copy that fails half-way (the primary went away) leaves the replica as it was."""
    store.apply([Write("put", f"s{i:03d}".encode(), b"v") for i in range(250)])
    replica = Store(tmp_path / "replica", map_size=16 << 20)
    replica.apply_changes([Change(seq=1, key=b"kept", value=b"x")])

    def cut_short() -> Iterator[tuple[int, list[tuple[bytes, bytes]]]]:
        chunks = store.snapshot(chunk=100)
        yield next(chunks)
        raise ConnectionError("the primary went away")

    with pytest.raises(ConnectionError):
        replica.load_snapshot(cut_short())
    assert (replica.seq(), replica.page(b"", 1000)) == (1, [(b"kept", b"x")])
    with pytest.raises(LogGap, match="before its first chunk"):
        replica.load_snapshot(iter([]))
    assert replica.seq() == 1
    replica.close()


def test_commit_hook_reports_the_last_position(store: Store) -> None:
    """After each commit the writer tells the event loop the batch's last position."""
    seen: list[int] = []

    async def scenario() -> None:
        writer = GroupCommitter(store, max_batch=64, on_commit=seen.append)
        writer.start()
        await asyncio.gather(
            *(writer.submit(Write("put", f"h{i}".encode(), b"v")) for i in range(20))
        )
        await writer.stop()

    asyncio.run(scenario())
    assert seen
    assert seen[-1] == 20
    assert seen == sorted(seen)


def test_the_log_is_bounded_by_bytes_so_deleting_frees_room(tmp_path: Path) -> None:
    """With the change log bounded by bytes, a map filled with large values, emptied by deletes,
    takes as many again: the log no longer keeps every deleted value. The bound holds (but for
    the newest change), and the byte count survives a restart."""
    store = Store(tmp_path / "db", map_size=24 << 20, log_retain_bytes=3 << 20)
    value = b"x" * (1 << 20)
    most = 0
    for round_ in range(3):
        for i in range(12):
            assert isinstance(store.apply([Write("put", f"k{i}".encode(), value)])[0], Applied), (
                round_,
                i,
            )
            most = max(most, store.log_bytes())
        for i in range(12):
            store.apply([Write("delete", f"k{i}".encode())])
    assert store.stats()["entries"] == 0
    assert most <= (3 << 20) + len(value) + 64
    logged = store.log_bytes()
    seq = store.seq()
    store.close()
    reopened = Store(tmp_path / "db", map_size=24 << 20, log_retain_bytes=3 << 20)
    assert reopened.log_bytes() == logged
    assert reopened.can_stream_from(seq - 1)  # the newest changes are still there to stream
    reopened.close()


def test_a_request_id_is_applied_once_until_it_ages_out(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write repeated with its request id, in the same batch or later, gets the first answer
    and adds no change; ids older than the last REQUESTS_KEPT changes are forgotten (so the
    table stays bounded), after which the id is a new write."""
    from kvstack.backend import store as store_module

    monkeypatch.setattr(store_module, "REQUESTS_KEPT", 3)
    first, again = store.apply(
        [Write("put", b"k", b"v1", b"id-1"), Write("put", b"k", b"v1", b"id-1")]
    )
    assert first == again == Applied(True, 1)
    assert store.apply([Write("put", b"k", b"v1", b"id-1")]) == [Applied(True, 1)]
    assert store.seq() == 1
    for i in range(4):
        store.apply([Write("put", f"o{i}".encode(), b"x", f"other-{i}".encode())])
    assert store.seq() == 5
    assert store.apply([Write("put", b"k", b"v1", b"id-1")]) == [Applied(False, 6)]  # forgotten
