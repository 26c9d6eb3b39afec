"""The LMDB key/value store, and group commit: many concurrent writes, one transaction, one fsync.

LMDB is opened with sync on, so a committed transaction is on disk when commit() returns; a write
is acknowledged only after that, so a `kill -9` never loses an acknowledged write.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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


class GroupCommitter:
    """Queues writes from many concurrent calls and commits them in batches on one thread.

    A batch holds every write waiting when the previous commit finished (up to max_batch), so
    under load many writes share one fsync, and a lone write waits for no one.
    """

    def __init__(self, store: Store, max_batch: int) -> None:
        self.store = store
        self.max_batch = max(1, max_batch)
        # None is the stop marker: everything queued before it is committed first.
        self._queue: asyncio.Queue[tuple[Write, asyncio.Future[bool]] | None] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmdb-writer")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="group-commit")

    async def submit(self, write: Write) -> bool:
        if self._task is None or self._task.done():
            raise RuntimeError("the writer is not running")
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((write, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            batch: list[tuple[Write, asyncio.Future[bool]]] = []
            item = await self._queue.get()
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
                results = await loop.run_in_executor(
                    self._executor, self.store.apply, [w for w, _ in batch]
                )
            except Exception as err:  # an I/O error fails this batch, not the writer
                log.exception("commit failed")
                results = [err] * len(batch)
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():  # the caller went away (deadline, cancellation)
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    async def stop(self) -> None:
        """Finish every queued write, then stop the writer."""
        if self._task is not None:
            self._queue.put_nowait(None)
            await self._task
        self._executor.shutdown(wait=True)
