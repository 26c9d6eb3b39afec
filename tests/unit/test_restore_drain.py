"""A restore onto a real in-process primary (tests.inprocess, real LMDB) while a write whose
caller went away is still queued in the writer: the restore loads only once no write is in
flight or queued, so nothing commits during or after the load that the backup does not hold.

What these cannot show: the write is held by patching Store.apply to wait before its write
transaction begins (not a slow disk, and not a write held inside LMDB's own commit); one
backend, no replica (tests/integration/test_backup.py restores onto a primary and a replica
in their own processes); and "not loaded yet" is seen over 0.3 s, not proved for ever (what the
store holds after the restore is what shows the held write did not land after it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from kvstack.backend import Backend
from kvstack.backend import backup as backend_backup
from kvstack.backend.store import Store
from kvstack.v1 import backup_pb2, backup_pb2_grpc, batch_pb2, batch_pb2_grpc, kv_pb2, kv_pb2_grpc
from tests.inprocess import commits_held, serving_backend, until

HOW = ["a unary put cancelled", "a batch stream cancelled"]


async def take_backup(channel: aio.Channel) -> tuple[str, bytes]:
    """The manifest and bytes of a backup, as `kvstack backup` receives them."""
    manifest, data = "", bytearray()
    async for chunk in backup_pb2_grpc.BackupStub(channel).Backup(backup_pb2.BackupRequest()):
        data += chunk.data
        manifest = chunk.manifest or manifest
    assert manifest, "the backup ended without its manifest"
    return manifest, bytes(data)


async def restore(channel: aio.Channel, manifest: str, data: bytes) -> backup_pb2.RestoreResponse:
    """Send a backup to Restore (forced: the primary holds keys), as `kvstack restore` does."""

    async def requests() -> AsyncIterator[backup_pb2.RestoreChunk]:
        yield backup_pb2.RestoreChunk(manifest=manifest, force=True)
        for i in range(0, len(data), 1 << 20):
            yield backup_pb2.RestoreChunk(data=data[i : i + (1 << 20)])

    reply: backup_pb2.RestoreResponse = await backup_pb2_grpc.BackupStub(channel).Restore(
        requests(), timeout=30
    )
    return reply


async def abandon_a_write(backend: Backend, channel: aio.Channel, how: str) -> None:
    """Put b"held" (the writer is held inside its commit), then cancel its caller: the write is
    no longer in flight, but still queued in the writer."""
    assert backend.writer is not None
    writer = backend.writer
    put = kv_pb2.PutRequest(key=b"held", value=b"late")
    if how == "a unary put cancelled":
        call: aio.Call = kv_pb2_grpc.KeyValueStub(channel).Put(put)
    else:
        stream = batch_pb2_grpc.BatchStub(channel).Stream()
        await stream.write(
            batch_pb2.BatchRequest(items=[batch_pb2.BatchRequest.Item(id=1, put=put)])
        )
        call = stream
    await until(lambda: writer.pending == 1, "the put reaches the writer")
    assert backend.writes_in_flight == 1
    call.cancel()
    await until(lambda: backend.writes_in_flight == 0, "the cancelled write leaves the count")
    assert writer.pending == 1


def entries(store: Store) -> dict[bytes, bytes]:
    with store.env.begin() as txn:
        return {bytes(k): bytes(v) for k, v in txn.cursor(db=store.kv)}


@pytest.mark.parametrize("how", HOW)
def test_a_restore_loads_only_once_a_write_whose_caller_left_has_committed(
    tmp_path: Path, how: str
) -> None:
    """A backup holding b"kept"; then a write whose caller went away, held in the writer; then
    a restore of that backup. While the write is held the restore stops writes but does not
    load; released, the write commits first, then the load replaces it: the primary holds
    exactly the backup, and the held write does not reappear after the restore."""

    async def main() -> tuple[bool, bool, int, dict[bytes, bytes]]:
        async with serving_backend(tmp_path) as (backend, channel, _):
            assert backend.store is not None
            assert backend.writer is not None
            store, writer = backend.store, backend.writer
            kv = kv_pb2_grpc.KeyValueStub(channel)
            await kv.Put(kv_pb2.PutRequest(key=b"kept", value=b"v"), timeout=10)
            manifest, data = await take_backup(channel)
            with commits_held(store) as release:
                await abandon_a_write(backend, channel, how)
                restoring = asyncio.ensure_future(restore(channel, manifest, data))
                await until(
                    lambda: backend.writes_stopped or restoring.done(), "the restore stops writes"
                )
                await asyncio.sleep(0.3)
                loaded_while_held = restoring.done()
                stopped_while_held = backend.writes_stopped
                release.set()
                reply = await restoring
            await until(lambda: writer.pending == 0, "the held write commits")
            await asyncio.sleep(0.1)  # room for a write committing late, after the load
            return loaded_while_held, stopped_while_held, reply.keys, entries(store)

    loaded_while_held, stopped_while_held, keys, held = asyncio.run(main())
    assert not loaded_while_held, "the restore loaded while a write was still queued"
    assert stopped_while_held
    assert keys == 1
    assert held == {b"kept": b"v"}, "the store holds what the backup does not"


@pytest.mark.parametrize("how", HOW)
def test_a_restore_refuses_when_a_write_whose_caller_left_stays_queued(
    tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same held write, kept held past DRAIN_S (0.3 s here): the restore ends UNAVAILABLE
    saying what it saw (none in flight, one queued) and that nothing was changed; writes are
    taken again, and the held write, released, commits over the data the restore left alone."""
    monkeypatch.setattr(backend_backup, "DRAIN_S", 0.3)

    async def main() -> tuple[grpc.StatusCode, str, bool, dict[bytes, bytes]]:
        async with serving_backend(tmp_path) as (backend, channel, _):
            assert backend.store is not None
            assert backend.writer is not None
            store, writer = backend.store, backend.writer
            kv = kv_pb2_grpc.KeyValueStub(channel)
            await kv.Put(kv_pb2.PutRequest(key=b"kept", value=b"v"), timeout=10)
            manifest, data = await take_backup(channel)
            await kv.Put(kv_pb2.PutRequest(key=b"after", value=b"v"), timeout=10)
            with commits_held(store):
                await abandon_a_write(backend, channel, how)
                try:
                    await restore(channel, manifest, data)
                except aio.AioRpcError as err:
                    code, details = err.code(), err.details() or ""
                else:
                    code, details = grpc.StatusCode.OK, "the restore loaded"
                stopped_after = backend.writes_stopped
            await until(lambda: writer.pending == 0, "the held write commits")
            return code, details, stopped_after, entries(store)

    code, details, stopped_after, held = asyncio.run(main())
    assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
    assert "0 writes were still in flight and 1 still queued" in details, details
    assert "nothing was changed" in details, details
    assert not stopped_after, "writes must be taken again after a refused restore"
    assert held == {b"kept": b"v", b"after": b"v", b"held": b"late"}
