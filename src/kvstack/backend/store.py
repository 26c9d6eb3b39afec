"""The LMDB key/value store, and group commit: many concurrent writes, one transaction, one fsync.

LMDB is opened with sync on, so a committed transaction is on disk when commit() returns; a write
is acknowledged only after that, so a `kill -9` never loses an acknowledged write.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lmdb
from prometheus_client import Counter, Histogram

from kvstack.runtime import fields, printable

COMMITS = Counter("kvstack_backend_commits_total", "LMDB write transactions committed")
BATCH = Histogram(
    "kvstack_backend_commit_writes",
    "writes per committed transaction",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)

log = logging.getLogger("kvstack.backend.store")


class StoreFull(Exception):
    """The LMDB map is full; the message names the setting to raise."""


@dataclass(frozen=True)
class Write:
    op: Literal["put", "delete"]
    key: bytes
    value: bytes = b""


class Store:
    """One LMDB environment in `path`. Reads may run on any thread; writes go through apply()."""

    def __init__(self, path: Path, map_size: int) -> None:
        try:
            path.mkdir(parents=True, exist_ok=True)
            self.env = lmdb.open(
                str(path), map_size=map_size, sync=True, metasync=True, max_dbs=0, readahead=False
            )
        except (OSError, lmdb.Error) as err:
            raise OSError(
                f"cannot open the LMDB database in {path}: {err}. Mount a writable "
                "volume there or set KVSTACK_DATA_DIR to a writable directory"
            ) from err
        self.path = path
        self.map_size = map_size
        self.commits = 0

    def close(self) -> None:
        self.env.close()

    def apply(self, writes: list[Write]) -> list[bool | Exception]:
        """Apply writes in one transaction (one fsync); return, per write, whether it changed
        something (put: the key was new; delete: the key existed) or the error that stopped it.

        When the batch does not fit the map, each write is retried in a transaction of its own,
        so the writes that fit still succeed and only the others report StoreFull.
        """
        try:
            with self.env.begin(write=True) as txn:
                results: list[bool | Exception] = [self._one(txn, w) for w in writes]
        except lmdb.MapFullError:
            if len(writes) == 1:
                return [self._full()]
            return [self.apply([w])[0] for w in writes]
        self.commits += 1
        COMMITS.inc()
        BATCH.observe(len(writes))
        for write in writes:
            log.info(
                "saved", extra=fields(op=write.op, key=printable(write.key), bytes=len(write.value))
            )
        return results

    def _full(self) -> StoreFull:
        return StoreFull(
            f"the LMDB map is full ({self.map_size} bytes): raise KVSTACK_MAP_SIZE "
            "on the backend and restart it, or delete unused keys"
        )

    @staticmethod
    def _one(txn: lmdb.Transaction, write: Write) -> bool:
        if write.op == "put":
            return txn.replace(write.key, write.value) is None
        return bool(txn.delete(write.key))

    def get(self, key: bytes) -> bytes | None:
        with self.env.begin() as txn:
            value: bytes | None = txn.get(key)
            return value

    def page(self, prefix: bytes, limit: int, after: bytes = b"") -> list[tuple[bytes, bytes]]:
        """Up to `limit` entries with `prefix`, in key order, starting after key `after`."""
        entries: list[tuple[bytes, bytes]] = []
        with self.env.begin() as txn:
            cursor = txn.cursor()
            if not cursor.set_range(after or prefix):
                return entries
            if after and cursor.key() == after and not cursor.next():
                return entries
            for key, value in cursor:
                if not key.startswith(prefix) or len(entries) >= limit:
                    break
                entries.append((key, value))
        return entries

    def scan(self, prefix: bytes, chunk: int = 256) -> Iterator[list[tuple[bytes, bytes]]]:
        """Every entry with prefix, in chunks; each chunk is read in a short transaction so a
        slow reader never pins old pages."""
        after = b""
        while entries := self.page(prefix, chunk, after):
            yield entries
            after = entries[-1][0]

    def stats(self) -> dict[str, int]:
        info = self.env.info()
        stat = self.env.stat()
        return {
            "entries": int(stat["entries"]),
            "map_size": int(info["map_size"]),
            "last_pgno": int(info["last_pgno"]),
            "psize": int(stat["psize"]),
        }


# A queued write: what to write, whom to tell, and on which event loop.
_Pending = tuple[Write, "asyncio.Future[bool]", asyncio.AbstractEventLoop]


class GroupCommitter:
    """Queues writes from many concurrent calls and commits them in batches on one thread.

    The writer thread takes every write waiting when its previous commit finished (up to
    max_batch), commits them in one transaction, and hands all the results back to the event
    loop in one callback. Commits run back to back without waiting for the event loop's next
    turn, so under load many writes share one fsync, and a lone write waits for no one.
    """

    def __init__(self, store: Store, max_batch: int) -> None:
        self.store = store
        self.max_batch = max(1, max_batch)
        # None is the stop marker: everything queued before it is committed first.
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="lmdb-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    async def submit(self, write: Write) -> bool:
        if not self._thread.is_alive():
            raise RuntimeError("the writer is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._queue.put((write, future, loop))
        return await future

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch: list[_Pending] = []
            item = self._queue.get()
            while True:
                if item is None:
                    stopping = True
                else:
                    batch.append(item)
                if stopping or len(batch) >= self.max_batch or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            if not batch:
                continue
            try:
                results = self.store.apply([write for write, _, _ in batch])
            except Exception as err:  # an I/O error fails this batch, not the writer
                log.exception("commit failed")
                results = [err] * len(batch)
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[bool], Any]]] = {}
            for (_, future, loop), result in zip(batch, results, strict=True):
                by_loop.setdefault(loop, []).append((future, result))
            for loop, outcomes in by_loop.items():
                loop.call_soon_threadsafe(_resolve, outcomes)

    async def stop(self) -> None:
        """Commit every queued write, then stop the writer thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            await asyncio.to_thread(self._thread.join)


def _resolve(outcomes: list[tuple[asyncio.Future[bool], Any]]) -> None:
    for future, result in outcomes:
        if future.done():  # the caller went away (deadline, cancellation)
            continue
        if isinstance(result, Exception):
            future.set_exception(result)
        else:
            future.set_result(result)
