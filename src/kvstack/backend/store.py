"""The LMDB key/value store, and group commit: many concurrent writes, one transaction, one fsync.

LMDB is opened with sync on, so a committed transaction is on disk when commit() returns; a write
is acknowledged only after that, so a `kill -9` never loses an acknowledged write.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lmdb
from prometheus_client import Counter, Histogram

from kvstack import validation
from kvstack.runtime import fields, printable
from kvstack.v1.replication_pb2 import Change

COMMITS = Counter("kvstack_backend_commits_total", "LMDB write transactions committed")
BATCH = Histogram(
    "kvstack_backend_commit_writes",
    "writes per committed transaction",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)

log = logging.getLogger("kvstack.backend.store")


class StoreFull(Exception):
    """The LMDB map is full; the message names the setting to raise."""


class LogGap(Exception):
    """A replica's next change is not available in order: the primary trimmed it from its log,
    or a batch does not follow the replica's position. The replica must copy a snapshot."""


@dataclass(frozen=True)
class Write:
    op: Literal["put", "delete"]
    key: bytes
    value: bytes = b""
    # The caller's identity for this write, the same on every attempt (kv.proto's request_id):
    # a repeat is answered as the first attempt was and applied no second time. b"": none.
    request_id: bytes = b""


# How many of the latest changes keep their request ids: a retry of a write this recent (the
# client's and the server's retries are seconds apart) is recognised, an older one is not.
REQUESTS_KEPT = 100_000


@dataclass(frozen=True)
class Applied:
    """What a write did: whether it changed something (put: the key was new; delete: the key
    existed), and the change log position of the transaction that holds it."""

    changed: bool
    seq: int


_SEQ = b"seq"  # meta: the last change written (primary) or applied (replica)
_LOG_BYTES = b"log_bytes"  # meta: bytes the change log holds
# meta: the history the data belongs to. Empty until the first restore; each restore begins a
# new one (16 random bytes), so a replica can tell that its position, from the old history,
# means nothing on this primary (see can_stream_from).
_HISTORY = b"history"


class NotEmpty(Exception):
    """A restore refused because the store holds keys and it was not forced."""

    def __init__(self, counts: RestoreCounts) -> None:
        super().__init__(f"the primary holds {counts.before} keys")
        self.counts = counts


@dataclass(frozen=True)
class RestoreCounts:
    """What a restore does: keys held before, of them replaced (also in the backup) and lost
    (not in it), and the keys held after (the backup's)."""

    before: int
    replaced: int
    lost: int
    after: int


# The most keys one "saved" line names. A commit holds up to KVSTACK_GROUP_COMMIT_MAX writes
# (256 by default) of keys up to 511 bytes: listing them all could make a line of hundreds of KB.
# Under load a commit holds a few writes (docs/benchmarks.md), so nearly every line names all
# of its keys; a larger commit names its first SAVED_KEYS_LISTED and counts the rest.
SAVED_KEYS_LISTED = 32


def saved_fields(writes: list[Write], seq: int) -> dict[str, Any]:
    """The fields of a commit's one "saved" line: how many writes, the log position after it,
    the value bytes written, and the keys put and deleted, in order (the first
    SAVED_KEYS_LISTED of them; `unlisted` counts the others)."""
    listed = writes[:SAVED_KEYS_LISTED]
    return {
        "writes": len(writes),
        "seq": seq,
        "bytes": sum(len(w.value) for w in writes),
        "put": [printable(w.key) for w in listed if w.op == "put"],
        "deleted": [printable(w.key) for w in listed if w.op == "delete"],
        "unlisted": len(writes) - len(listed),
    }


def _pack(seq: int) -> bytes:
    return seq.to_bytes(8, "big")  # big-endian: LMDB's byte order is the log's order


def _unpack(raw: bytes | None) -> int:
    return int.from_bytes(raw, "big") if raw else 0


class Store:
    """One LMDB environment in `path` with three databases:

    - `kv`: the keys and values;
    - `log`: the change log, by sequence number, written in the same transaction as the change
      (the primary keeps the last `log_retain` changes, and at most `log_retain_bytes` of them,
      for its replicas: so the log never holds deleted values for long, and deleting frees room);
    - `meta`: the last sequence number written (primary) or applied (replica).

    Reads may run on any thread; writes go through apply() (primary) or apply_changes() and
    load_snapshot() (replica), from one thread at a time.
    """

    def __init__(
        self, path: Path, map_size: int, log_retain: int = 100_000, log_retain_bytes: int = 0
    ) -> None:
        try:
            path.mkdir(parents=True, exist_ok=True)
            self.env = lmdb.open(
                str(path), map_size=map_size, sync=True, metasync=True, max_dbs=5, readahead=False
            )
            self.kv = self.env.open_db(b"kv")
            self.log = self.env.open_db(b"log")
            self.meta = self.env.open_db(b"meta")
            # request id -> (seq, changed) of the write it made; seq + id -> b"", to trim by age
            self.requests = self.env.open_db(b"requests")
            self.request_order = self.env.open_db(b"request_order")
        except (OSError, lmdb.Error) as err:
            raise OSError(
                f"cannot open the LMDB database in {path}: {err}. Mount a writable "
                "volume there or set KVSTACK_DATA_DIR to a writable directory"
            ) from err
        self.path = path
        self.map_size = map_size
        self.log_retain = max(1, log_retain)
        # 0: a quarter of the map, so the log can never take the room that deletes free.
        self.log_retain_bytes = log_retain_bytes or map_size // 4
        self._log_bytes = self._count_log_bytes()
        self.commits = 0

    def close(self) -> None:
        self.env.close()

    # -- the primary's writes ------------------------------------------------------------------

    def apply(self, writes: list[Write], now: float | None = None) -> list[Applied | Exception]:
        """Apply writes in one transaction (one fsync), each change recorded in the log in the
        same transaction; return, per write, what it did or the error that stopped it.

        When the batch does not fit the map, each write is retried in a transaction of its own,
        so the writes that fit still succeed and only the others report StoreFull.
        """
        committed_at = time.time() if now is None else now
        try:
            with self.env.begin(write=True) as txn:
                seq = _unpack(txn.get(_SEQ, db=self.meta))
                log_bytes = _unpack(txn.get(_LOG_BYTES, db=self.meta))
                results: list[Applied | Exception] = []
                for write in writes:
                    if write.request_id and (done := txn.get(write.request_id, db=self.requests)):
                        # A repeat of a write already made (its answer was lost): the first
                        # answer again, and nothing applied twice.
                        results.append(Applied(done[8:] == b"\x01", _unpack(done[:8])))
                        continue
                    changed = self._one(txn, write)
                    if changed or write.op == "put":
                        seq += 1
                        change = Change(
                            seq=seq,
                            key=write.key,
                            value=write.value,
                            delete=write.op == "delete",
                            committed_at=committed_at,
                        )
                        raw = change.SerializeToString()
                        txn.put(_pack(seq), raw, db=self.log)
                        log_bytes += len(raw)
                    if write.request_id:
                        flag = b"\x01" if changed else b"\x00"
                        txn.put(write.request_id, _pack(seq) + flag, db=self.requests)
                        txn.put(_pack(seq) + write.request_id, b"", db=self.request_order)
                    results.append(Applied(changed, seq))
                txn.put(_SEQ, _pack(seq), db=self.meta)
                log_bytes = self._trim(txn, seq, log_bytes, budget=2 * len(writes) + 16)
                self._forget_requests(txn, seq, budget=2 * len(writes) + 16)
                txn.put(_LOG_BYTES, _pack(log_bytes), db=self.meta)
        except lmdb.MapFullError:
            if len(writes) == 1:
                return [self._full()]
            return [self.apply([w], committed_at)[0] for w in writes]
        self._log_bytes = log_bytes
        self._committed(len(writes))
        if log.isEnabledFor(logging.INFO):
            log.info("saved", extra=fields(**saved_fields(writes, seq)))
        return results

    def _trim(self, txn: lmdb.Transaction, seq: int, log_bytes: int, budget: int) -> int:
        """Drop the oldest log entries while the log holds more than log_retain changes or
        log_retain_bytes bytes, a bounded number per transaction, never the newest change (a
        replica one change behind streams it). Return the bytes the log holds after."""
        cursor = txn.cursor(db=self.log)
        keep_from = seq - self.log_retain + 1
        while budget > 0 and cursor.first():
            first = _unpack(bytes(cursor.key()))
            if first >= seq or (first >= keep_from and log_bytes <= self.log_retain_bytes):
                break
            log_bytes -= len(cursor.value())
            cursor.delete()
            budget -= 1
        return max(0, log_bytes)

    def _forget_requests(self, txn: lmdb.Transaction, seq: int, budget: int) -> None:
        """Forget the request ids of writes older than the last REQUESTS_KEPT changes, a
        bounded number per transaction."""
        cursor = txn.cursor(db=self.request_order)
        while budget > 0 and cursor.first():
            key = bytes(cursor.key())
            if _unpack(key[:8]) > seq - REQUESTS_KEPT:
                break
            txn.delete(key[8:], db=self.requests)
            cursor.delete()
            budget -= 1

    def _count_log_bytes(self) -> int:
        """The log's size in bytes, kept in meta (counted once for a database from before)."""
        with self.env.begin(write=True) as txn:
            raw = txn.get(_LOG_BYTES, db=self.meta)
            if raw is not None:
                return _unpack(raw)
            total = sum(len(value) for _, value in txn.cursor(db=self.log))
            txn.put(_LOG_BYTES, _pack(total), db=self.meta)
            return total

    def log_bytes(self) -> int:
        """Bytes the change log holds (the changes' encoded size)."""
        return self._log_bytes

    def _committed(self, writes: int) -> None:
        self.commits += 1
        COMMITS.inc()
        BATCH.observe(writes)

    def _full(self) -> StoreFull:
        return StoreFull(
            f"the LMDB map is full ({self.map_size} bytes): raise KVSTACK_MAP_SIZE "
            "on the backend and restart it, or delete unused keys"
        )

    def _one(self, txn: lmdb.Transaction, write: Write) -> bool:
        if write.op == "put":
            return txn.replace(write.key, write.value, db=self.kv) is None
        return bool(txn.delete(write.key, db=self.kv))

    # -- the log, for replicas -----------------------------------------------------------------

    def seq(self) -> int:
        """The last change written (primary) or applied (replica)."""
        with self.env.begin() as txn:
            return _unpack(txn.get(_SEQ, db=self.meta))

    def first_logged(self) -> int:
        """The oldest change still in the log, or 0 when the log is empty."""
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self.log)
            return _unpack(bytes(cursor.key())) if cursor.first() else 0

    def history(self) -> bytes:
        """The history this store's data belongs to (b"" before any restore)."""
        with self.env.begin() as txn:
            return bytes(txn.get(_HISTORY, b"", db=self.meta))

    def can_stream_from(self, after: int, history: bytes = b"") -> bool:
        """Whether a replica at position `after` of `history` can catch up from the log alone
        (never from another history: after a restore its positions mean nothing here)."""
        with self.env.begin() as txn:
            if bytes(txn.get(_HISTORY, b"", db=self.meta)) != history:
                return False
            last = _unpack(txn.get(_SEQ, db=self.meta))
            if after > last:
                return False  # the replica is ahead: this primary's data is not its origin
            if after == last:
                return True
            cursor = txn.cursor(db=self.log)
            return cursor.first() and _unpack(bytes(cursor.key())) <= after + 1

    def changes_after(
        self, after: int, limit: int, max_bytes: int = validation.ENTRIES_BUDGET_BYTES
    ) -> list[Change]:
        """Logged changes after position `after`, in order: up to `limit` of them and, but for
        the first, only while they fit in `max_bytes` (validation.py), so a batch of them
        fits one gRPC message. Raises LogGap when the change right after `after` has been
        trimmed from the log (a replica this far behind would otherwise skip changes silently)."""
        changes: list[Change] = []
        used = 0
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self.log)
            if not cursor.set_range(_pack(after + 1)):
                return changes
            first = _unpack(bytes(cursor.key()))
            if first != after + 1:
                raise LogGap(f"changes {after + 1}..{first - 1} are no longer in the log")
            for _, raw in cursor:
                cost = len(raw) + validation.ENTRY_OVERHEAD_BYTES
                if changes and used + cost > max_bytes:
                    break
                changes.append(Change.FromString(raw))
                used += cost
                if len(changes) >= limit:
                    break
        return changes

    def snapshot(
        self,
        chunk: int = 1000,
        max_bytes: int = validation.ENTRIES_BUDGET_BYTES,
        history: list[bytes] | None = None,
    ) -> Iterator[tuple[int, list[tuple[bytes, bytes]]]]:
        """Every entry, in chunks of at most `chunk` entries and (but for a chunk of one)
        `max_bytes`, read in ONE transaction (a consistent copy), each chunk with the log
        position the copy corresponds to. The copy's history is appended to `history`."""
        with self.env.begin() as txn:
            seq = _unpack(txn.get(_SEQ, db=self.meta))
            if history is not None:
                history.append(bytes(txn.get(_HISTORY, b"", db=self.meta)))
            entries: list[tuple[bytes, bytes]] = []
            used = 0
            for key, value in txn.cursor(db=self.kv):
                cost = validation.entry_bytes(key, value)
                if entries and (len(entries) >= chunk or used + cost > max_bytes):
                    yield seq, entries
                    entries, used = [], 0
                entries.append((key, value))
                used += cost
            yield seq, entries

    # -- a replica's writes --------------------------------------------------------------------

    def apply_changes(self, changes: list[Change]) -> int:
        """Apply the primary's changes and the new position in one transaction; changes at or
        before the current position are skipped, so each applies exactly once. Return the new
        position. A change that does not follow the position (a gap) raises LogGap and
        nothing of the batch is applied."""
        with self.env.begin(write=True) as txn:
            seq = _unpack(txn.get(_SEQ, db=self.meta))
            for change in changes:
                if change.seq <= seq:
                    continue
                if change.seq != seq + 1:
                    raise LogGap(f"change {change.seq} does not follow position {seq}")
                if change.delete:
                    txn.delete(change.key, db=self.kv)
                else:
                    txn.put(change.key, change.value, db=self.kv)
                seq = change.seq
            txn.put(_SEQ, _pack(seq), db=self.meta)
        self._committed(len(changes))
        return seq

    def load_snapshot(
        self,
        chunks: Iterable[tuple[int, list[tuple[bytes, bytes]]]],
        history: Callable[[], bytes] = lambda: b"",
    ) -> int:
        """Replace every entry with a snapshot that arrives in chunks (each with the position
        the copy corresponds to), written as it arrives into ONE transaction: readers see the
        old contents until it commits, and a copy cut short (the iterator raises) changes
        nothing. Only one chunk is in memory at a time. Returns the number of entries.
        `history()`, asked once every chunk has arrived, is the primary's history it is of."""
        count = 0
        with self.env.begin(write=True) as txn:
            txn.drop(self.kv, delete=False)
            txn.drop(self.log, delete=False)
            txn.put(_LOG_BYTES, _pack(0), db=self.meta)
            seq: int | None = None
            for chunk_seq, entries in chunks:
                seq = chunk_seq
                for key, value in entries:
                    txn.put(key, value, db=self.kv)
                count += len(entries)
            if seq is None:
                raise LogGap("the snapshot ended before its first chunk; copy it again")
            txn.put(_SEQ, _pack(seq), db=self.meta)
            txn.put(_HISTORY, history(), db=self.meta)
        self._log_bytes = 0
        self._committed(count)
        return count

    # -- restoring a backup (the primary) ------------------------------------------------------

    def restore_from(self, source: lmdb.Environment, seq: int, force: bool) -> RestoreCounts:
        """Replace every entry with those of `source` (a backup's LMDB environment, checked by
        kvstack.backup.check_copy) in ONE write transaction, continuing from position `seq`
        in a new history, with an empty change log and no remembered request ids (they
        belong to the old history). When the store holds keys and `force` is false, raise
        NotEmpty with the counts and change nothing."""
        source_kv = source.open_db(b"kv", create=False)
        with self.env.begin(write=True) as txn, source.begin() as src:
            before = replaced = 0
            for key in txn.cursor(db=self.kv).iternext(keys=True, values=False):
                before += 1
                if src.get(key, db=source_kv) is not None:
                    replaced += 1
            after = int(src.stat(source_kv)["entries"])
            counts = RestoreCounts(before, replaced, before - replaced, after)
            if before and not force:
                raise NotEmpty(counts)  # leaving the block aborts the transaction
            for db in (self.kv, self.log, self.requests, self.request_order):
                txn.drop(db, delete=False)
            cursor = txn.cursor(db=self.kv)
            cursor.putmulti(src.cursor(db=source_kv).iternext(), append=True)
            txn.put(_SEQ, _pack(seq), db=self.meta)
            txn.put(_LOG_BYTES, _pack(0), db=self.meta)
            txn.put(_HISTORY, os.urandom(16), db=self.meta)
        self._log_bytes = 0
        self._committed(after)
        return counts

    # -- reads ---------------------------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        with self.env.begin() as txn:
            value: bytes | None = txn.get(key, db=self.kv)
            return value

    def page(
        self,
        prefix: bytes,
        limit: int,
        after: bytes = b"",
        max_bytes: int = validation.ENTRIES_BUDGET_BYTES,
    ) -> list[tuple[bytes, bytes]]:
        """Up to `limit` entries with `prefix`, in key order, starting after key `after`; but
        for the first, only while they fit in `max_bytes` (validation.entry_bytes)."""
        return self.list_page(prefix, limit, after, max_bytes)[0]

    def list_page(
        self,
        prefix: bytes,
        limit: int,
        after: bytes = b"",
        max_bytes: int = validation.ENTRIES_BUDGET_BYTES,
    ) -> tuple[list[tuple[bytes, bytes]], bool]:
        """page(), and whether more entries with `prefix` follow it: a page may end short of
        `limit` when the next entry would not fit in `max_bytes`."""
        entries: list[tuple[bytes, bytes]] = []
        used = 0
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self.kv)
            if not cursor.set_range(after or prefix):
                return entries, False
            if after and cursor.key() == after and not cursor.next():
                return entries, False
            for key, value in cursor:
                if not key.startswith(prefix):
                    return entries, False
                cost = validation.entry_bytes(key, value)
                if len(entries) >= limit or (entries and used + cost > max_bytes):
                    return entries, True
                entries.append((key, value))
                used += cost
        return entries, False

    def scan(
        self, prefix: bytes, chunk: int = 256, max_bytes: int = validation.ENTRIES_BUDGET_BYTES
    ) -> Iterator[list[tuple[bytes, bytes]]]:
        """Every entry with prefix, in chunks of at most `chunk` entries and `max_bytes` (but
        for a chunk of one); each chunk is read in a short transaction so a slow reader never
        pins old pages, and holds a bounded amount of memory."""
        after = b""
        while entries := self.page(prefix, chunk, after, max_bytes):
            yield entries
            after = entries[-1][0]

    def stats(self) -> dict[str, int]:
        info = self.env.info()
        with self.env.begin() as txn:
            entries = txn.stat(self.kv)["entries"]
            seq = _unpack(txn.get(_SEQ, db=self.meta))
        return {"entries": int(entries), "map_size": int(info["map_size"]), "seq": seq}


# A queued write: what to write, whom to tell, and on which event loop.
_Pending = tuple[Write, "asyncio.Future[Applied]", asyncio.AbstractEventLoop]


class GroupCommitter:
    """Queues writes from many concurrent calls and commits them in batches on one thread.

    The writer thread takes every write waiting when its previous commit finished (up to
    max_batch), commits them in one transaction, and hands all the results back to the event
    loop in one callback. Commits run back to back without waiting for the event loop's next
    turn, so under load many writes share one fsync, and a lone write waits for no one.
    """

    def __init__(
        self, store: Store, max_batch: int, on_commit: Callable[[int], None] | None = None
    ) -> None:
        self.store = store
        self.max_batch = max(1, max_batch)
        # Called on the event loop with the batch's last log position after each commit.
        self.on_commit = on_commit
        # None is the stop marker: everything queued before it is committed first.
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="lmdb-writer", daemon=True)
        # Writes submitted whose outcome has not reached the event loop yet (committed or
        # failed), counted on the loop: a caller that went away does not take its write out.
        self.pending = 0

    def start(self) -> None:
        self._thread.start()

    async def submit(self, write: Write) -> Applied:
        if not self._thread.is_alive():
            raise RuntimeError("the writer is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Applied] = loop.create_future()
        self.pending += 1
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
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Applied], Any]]] = {}
            for (_, future, loop), result in zip(batch, results, strict=True):
                by_loop.setdefault(loop, []).append((future, result))
            for loop, outcomes in by_loop.items():
                loop.call_soon_threadsafe(self._resolve, outcomes)
            seqs = [r.seq for r in results if isinstance(r, Applied)]
            if seqs and self.on_commit is not None:
                batch[0][2].call_soon_threadsafe(self.on_commit, max(seqs))

    async def stop(self) -> None:
        """Commit every queued write, then stop the writer thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            await asyncio.to_thread(self._thread.join)

    def _resolve(self, outcomes: list[tuple[asyncio.Future[Applied], Any]]) -> None:
        self.pending -= len(outcomes)
        for future, result in outcomes:
            if future.done():  # the caller went away (deadline, cancellation)
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
