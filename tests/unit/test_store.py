"""The LMDB store and group commit, on real LMDB files in a temporary directory."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstack.backend.store import GroupCommitter, Store, StoreFull, Write


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path / "db", map_size=16 << 20)
    yield opened
    opened.close()


def test_put_reports_created_then_updated(store: Store) -> None:
    """A first put creates the key, a second replaces the value and says so."""
    assert store.apply([Write("put", b"k", b"v1")]) == [True]
    assert store.apply([Write("put", b"k", b"v2")]) == [False]
    assert store.get(b"k") == b"v2"


def test_delete_reports_whether_the_key_existed(store: Store) -> None:
    """Deleting an existing key removes it; deleting a missing key changes nothing."""
    store.apply([Write("put", b"k", b"v")])
    assert store.apply([Write("delete", b"k")]) == [True]
    assert store.apply([Write("delete", b"k")]) == [False]
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
    assert results[0] is True
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
        assert all(results)

    asyncio.run(scenario())
    assert len(store.page(b"g/", 1000)) == 500
    assert store.commits < 100


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

    async def scenario() -> list[asyncio.Task[bool]]:
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
    assert all(t.result() for t in tasks)
    assert len(store.page(b"q/", 100)) == 40
