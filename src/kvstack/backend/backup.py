"""kvstack.v1.Backup on the primary: stream a copy of its LMDB environment, restore one.

Backup: one read transaction (LMDB readers never block the writer, so writes go on) gives the
position and the number of keys, and mdb_env_copyfd2 (compacting) writes the copy of exactly
that transaction into a pipe, which is streamed in chunks of BACKUP_CHUNK_BYTES; the manifest,
with the SHA-256 of every byte sent, comes last.

Restore: the manifest, then the bytes, written to a file in the data directory and checked
(size, SHA-256, LMDB contents) before anything changes; then writes are refused (UNAVAILABLE,
which callers retry) until the entries are loaded in one write transaction in a new history
(kvstack.backend.store.Store.restore_from), and every replica stream ends telling its replica
to copy a snapshot, as a new replica does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import lmdb
from grpc import aio

from kvstack import backup, validation
from kvstack.backend.store import NotEmpty, RestoreCounts, Store
from kvstack.runtime import fields
from kvstack.v1 import backup_pb2, backup_pb2_grpc

log = logging.getLogger("kvstack.backend.backup")
Context = aio.ServicerContext[Any, Any]
INCOMING = "restore-incoming.mdb"  # in the data directory, while a restore arrives
DRAIN_S = 30.0  # how long a restore waits for the writes in flight or queued to finish


def _read_chunk(fd: int, size: int) -> bytes:
    """Up to `size` bytes from a pipe: less only at its end."""
    parts: list[bytes] = []
    got = 0
    while got < size:
        block = os.read(fd, size - got)
        if not block:
            break
        parts.append(block)
        got += len(block)
    return b"".join(parts)


class BackupServicer(backup_pb2_grpc.BackupServicer):
    def __init__(self, backend: Any) -> None:
        # The backend (kvstack.backend.Backend): its store and primary state, once started.
        self.backend = backend

    async def _primary(self, context: Context) -> Store:
        backend = self.backend
        if backend.store is None or backend.primary is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"backend ordinal {backend.ordinal} is not the primary (or not open yet): "
                "backups are taken from, and restored onto, the primary",
            )
        store: Store = backend.store
        return store

    async def Backup(
        self, request: backup_pb2.BackupRequest, context: Context
    ) -> AsyncIterator[backup_pb2.BackupChunk]:
        store = await self._primary(context)
        info = store.env.info()
        estimate = (int(info["last_pgno"]) + 1) * int(store.env.stat()["psize"])
        read_fd, write_fd = os.pipe()
        taken: dict[str, int] = {}

        def copy() -> None:
            try:
                with store.env.begin() as txn:
                    raw = txn.get(b"seq", db=store.meta)
                    taken["seq"] = int.from_bytes(raw, "big") if raw else 0
                    taken["keys"] = int(txn.stat(store.kv)["entries"])
                    store.env.copyfd(write_fd, compact=True, txn=txn)
            finally:
                os.close(write_fd)

        started = time.monotonic()
        copier = asyncio.ensure_future(asyncio.to_thread(copy))
        digest = hashlib.sha256()
        size = 0
        reading: asyncio.Future[bytes] | None = None
        try:
            while True:
                reading = asyncio.ensure_future(
                    asyncio.to_thread(_read_chunk, read_fd, validation.BACKUP_CHUNK_BYTES)
                )
                # Shielded: a caller that leaves cancels this wait, not the read in its thread.
                data = await asyncio.shield(reading)
                if not data:
                    break
                digest.update(data)
                yield backup_pb2.BackupChunk(data=data, estimated_bytes=estimate if not size else 0)
                size += len(data)
            await copier  # the copy's own error, if it failed
        finally:
            # The pipe is closed only once no thread reads it: closed under a read, the read's
            # next os.read would take whatever file reused the number. The read ends: the copy
            # writes until its end, or closes its side when it fails.
            if reading is not None:
                await asyncio.gather(reading, return_exceptions=True)
            os.close(read_fd)  # a copy still writing (the caller went away) ends with EPIPE
            await asyncio.gather(copier, return_exceptions=True)
        manifest = backup.Manifest(
            seq=taken["seq"],
            keys=taken["keys"],
            bytes=size,
            sha256=digest.hexdigest(),
            kvstack_version=backup.kvstack_version(),
            created_at=backup.now(),
        )
        log.info(
            "backup taken",
            extra=fields(
                seq=manifest.seq,
                keys=manifest.keys,
                bytes=size,
                seconds=round(time.monotonic() - started, 3),
            ),
        )
        yield backup_pb2.BackupChunk(manifest=manifest.to_json())

    async def Restore(
        self, request_iterator: AsyncIterator[backup_pb2.RestoreChunk], context: Context
    ) -> backup_pb2.RestoreResponse:
        store = await self._primary(context)
        backend = self.backend
        if backend.restoring:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "another restore is running on this primary; wait for it to end",
            )
        backend.restoring = True  # before any await: one restore at a time
        try:
            return await self._restore(store, request_iterator, context)
        finally:
            backend.restoring = False

    async def _restore(
        self,
        store: Store,
        request_iterator: AsyncIterator[backup_pb2.RestoreChunk],
        context: Context,
    ) -> backup_pb2.RestoreResponse:
        backend = self.backend
        requests = aiter(request_iterator)
        try:
            first = await anext(requests)
            manifest = backup.Manifest.parse(first.manifest, "the restore's manifest")
        except StopAsyncIteration:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the restore sent nothing")
        except backup.BadBackup as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{err}; nothing was changed")
        incoming = store.path / INCOMING
        free = shutil.disk_usage(store.path).free
        if free < manifest.bytes + (64 << 20):
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the primary's data volume has {free} bytes free; the backup needs "
                f"{manifest.bytes} (plus 64 MiB) to arrive: grow the volume; nothing was changed",
            )
        writes_stopped = False  # writes go on while the file arrives and is checked
        try:
            with incoming.open("wb") as file:
                size = 0
                async for chunk in requests:
                    size += len(chunk.data)
                    if size > manifest.bytes:
                        await context.abort(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            f"the backup sent is longer than the {manifest.bytes} bytes its "
                            "manifest gives: not the file it describes; nothing was changed",
                        )
                    await asyncio.to_thread(file.write, chunk.data)
            try:
                await asyncio.to_thread(backup.check_copy, incoming, manifest, "the backup sent")
            except backup.BadBackup as err:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            backend.writes_stopped = writes_stopped = True
            log.warning("restore: writes stopped", extra=fields(seq=manifest.seq))
            # Not only the writes whose caller waits: one whose caller went away is still
            # queued in the writer and would commit during or after the load, leaving data
            # the backup does not hold.
            deadline = time.monotonic() + DRAIN_S
            while any(backend.outstanding_writes()) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            in_flight, queued = backend.outstanding_writes()
            if in_flight or queued:
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"after {DRAIN_S} s, {in_flight} writes were still in flight and {queued} "
                    "still queued to commit (a write can be both); nothing was changed: "
                    "retry the restore",
                )
            source = backup.open_copy(incoming)

            async def load() -> RestoreCounts:
                try:
                    loaded = await asyncio.to_thread(
                        store.restore_from, source, manifest.seq, first.force
                    )
                finally:
                    source.close()  # only once the thread reading it has returned
                backend.primary.restored(manifest.seq)
                return loaded

            # The load runs to its end even if the caller goes away (Ctrl-C, a dropped
            # port-forward): a cancelled await would close the copy under the thread still
            # reading it, skip telling the replicas, and let writes in before the commit.
            loading = asyncio.create_task(load())
            try:
                counts = await asyncio.shield(loading)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await loading
                raise
            except NotEmpty as refused:
                c = refused.counts
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"the primary holds {c.before} keys: restoring this backup would replace "
                    f"{c.replaced} of them (also in the backup) and lose {c.lost} (not in it). "
                    "Nothing was changed. Restore with force (`kvstack restore TARGET FILE "
                    "--force`) if you mean to, or take a backup of the current data first",
                )
            except lmdb.MapFullError:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the backup's {manifest.keys} keys do not fit this primary's LMDB map "
                    f"({store.map_size} bytes): raise KVSTACK_MAP_SIZE on every backend and "
                    "restart them, then restore again; nothing was changed",
                )
        finally:
            if writes_stopped:
                backend.writes_stopped = False
                log.warning("restore: writes resumed")
            with contextlib.suppress(OSError):
                incoming.unlink()
        log.warning(
            "restored from a backup",
            extra=fields(
                seq=manifest.seq,
                keys=counts.after,
                replaced=counts.replaced,
                lost=counts.lost,
                taken_at=manifest.created_at,
            ),
        )
        return backup_pb2.RestoreResponse(
            keys=counts.after, replaced=counts.replaced, lost=counts.lost, seq=manifest.seq
        )
