"""The backend: the KeyValue API over an LMDB database, with durable, group-committed writes,
replicated from the primary (ordinal 0) to read replicas (see kvstack.backend.replication)."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc import aio
from prometheus_client import Histogram

from kvstack import defaults, runtime, validation, wire
from kvstack.backend.backup import INCOMING, BackupServicer
from kvstack.backend.replication import Follower, PrimaryState, ReplicationServicer
from kvstack.backend.store import Applied, GroupCommitter, Store, StoreFull, Write
from kvstack.batching import METHODS, Outbox
from kvstack.directory import Directory
from kvstack.runtime import setting
from kvstack.v1 import backup_pb2, batch_pb2, batch_pb2_grpc, kv_pb2, kv_pb2_grpc, replication_pb2

NAME = "backend"
Context = aio.ServicerContext[Any, Any]
KEYVALUE = kv_pb2.DESCRIPTOR.services_by_name["KeyValue"].full_name
REPLICATION = replication_pb2.DESCRIPTOR.services_by_name["Replication"].full_name
BACKUP = backup_pb2.DESCRIPTOR.services_by_name["Backup"].full_name
BATCH = batch_pb2.DESCRIPTOR.services_by_name["Batch"].full_name


@dataclass(frozen=True)
class BackendConfig:
    data_dir: str = setting(
        "KVSTACK_DATA_DIR",
        defaults.DATA_DIR,
        "directory of the LMDB files (a local volume: never a network or shared file system)",
    )
    map_size: int = setting(
        "KVSTACK_MAP_SIZE",
        1 << 30,
        "LMDB map size: the most the database "
        "can hold (e.g. 1GiB); raise it when writes fail as full",
    )
    max_value_bytes: int = setting(
        "KVSTACK_MAX_VALUE_BYTES", validation.DEFAULT_MAX_VALUE_BYTES, "largest value accepted"
    )
    group_commit_max: int = setting(
        "KVSTACK_GROUP_COMMIT_MAX",
        256,
        "most writes committed in one transaction (1 turns group commit off)",
    )
    ordinal: int = setting(
        "KVSTACK_ORDINAL",
        -1,
        "this backend's index among its replicas; -1 reads it from the host name's -N suffix "
        "(a StatefulSet pod's), or 0 when there is none",
    )
    primary_ordinal: int = setting(
        "KVSTACK_PRIMARY_ORDINAL", 0, "the ordinal of the primary, which takes the writes"
    )
    peers: str = setting(
        "KVSTACK_BACKEND_TARGET",
        defaults.target(NAME),
        "where a replica finds the primary: a name resolving to every backend (or host:port,...)",
    )
    semisync_timeout: float = setting(
        "KVSTACK_SEMISYNC_TIMEOUT",
        1.0,
        "seconds the primary waits for a replica to acknowledge a write before acknowledging "
        "alone (and saying so) until a replica catches up",
    )
    max_lag: int = setting(
        "KVSTACK_MAX_LAG",
        validation.DEFAULT_MAX_LAG,
        "changes a replica may be behind and still answer reads; further behind it reports "
        "NOT_SERVING for kvstack.v1.KeyValue until it catches up",
    )
    max_staleness: float = setting(
        "KVSTACK_MAX_STALENESS",
        3.0,
        "seconds a replica may go without a message from its primary (which sends one each "
        "second when idle) and still answer reads; longer, it reports NOT_SERVING for "
        "kvstack.v1.KeyValue and refuses reads with UNAVAILABLE",
    )
    log_retain: int = setting(
        "KVSTACK_LOG_RETAIN",
        100_000,
        "changes the primary keeps in its log for replicas; one further behind copies a snapshot",
    )
    log_retain_bytes: int = setting(
        "KVSTACK_LOG_RETAIN_BYTES",
        0,
        "most bytes of changes the primary keeps in its log (0: a quarter of KVSTACK_MAP_SIZE), "
        "so the log never holds the room that deleting values frees",
    )


def ordinal_from(hostname: str) -> int:
    """A StatefulSet pod's ordinal from its host name (backend-2 -> 2); 0 when there is none."""
    match = re.search(r"-(\d+)$", hostname)
    return int(match[1]) if match else 0


class _Starting(Exception):
    """A call that arrived before the database was open (health still says NOT_SERVING)."""


class _Replica(Exception):
    """A write sent to a read replica."""


class _Restoring(Exception):
    """A write while a restore replaces the primary's data."""


class _Draining(Exception):
    """A write that reached a primary which is stopping."""


class Refused(Exception):
    """A call the backend answers with a status other than OK: what the unary servicer aborts
    with and the batch servicer puts in the item's answer."""

    def __init__(
        self, code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(details)
        self.code, self.details, self.trailers = code, details, trailers


def _refusal(err: Exception) -> Refused:
    if isinstance(err, _Starting):
        return Refused(
            grpc.StatusCode.UNAVAILABLE,
            "the backend is starting and its database is not open yet; retry",
        )
    if isinstance(err, _Stale):
        return Refused(grpc.StatusCode.UNAVAILABLE, str(err), NO_RETRY)
    if isinstance(err, _Replica):
        return Refused(grpc.StatusCode.FAILED_PRECONDITION, str(err))
    if isinstance(err, _Draining):
        # With the pushback trailer: gRPC's own retry would only send it back here.
        return Refused(
            grpc.StatusCode.UNAVAILABLE,
            "the primary is stopping (a restart or a move) and takes no more writes; retry "
            "through the server, which holds the write until the next primary answers",
            NO_RETRY,
        )
    if isinstance(err, _Restoring):
        return Refused(
            grpc.StatusCode.UNAVAILABLE,
            "a restore from a backup is replacing the primary's data; writes are refused until "
            "it ends (tens of seconds for 100k keys): retry",
        )
    if isinstance(err, validation.Invalid):
        return Refused(grpc.StatusCode.INVALID_ARGUMENT, str(err))
    if isinstance(err, StoreFull):
        return Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
    raise err


async def _refuse(context: Context, err: Exception) -> None:
    """A refusal as the unary call's status."""
    refused = err if isinstance(err, Refused) else _refusal(err)
    await context.abort(refused.code, refused.details, trailing_metadata=refused.trailers)


class _Stale(Exception):
    """A read on a replica that is not demonstrably following its primary."""


# Trailing metadata that tells a gRPC client not to retry this call on the same channel
# (gRFC A6 server pushback): the server should try another backend at once instead.
NO_RETRY = (("grpc-retry-pushback-ms", "-1"),)


class KeyValueServicer(kv_pb2_grpc.KeyValueServicer):
    """The API over the store. Writes are taken on the primary only; any backend reads."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.config = backend.config

    @property
    def store(self) -> Store:
        if self.backend.store is None:
            raise _Starting
        return self.backend.store

    @property
    def reader(self) -> Store:
        """The store, for a read: refused (_Stale) on a replica that may not answer reads."""
        store = self.store
        follower = self.backend.follower
        if follower is not None and not follower.readable_now():
            raise _Stale(
                f"backend ordinal {self.backend.ordinal} is a read replica that is not following "
                f"its primary closely enough (a message from it within "
                f"{self.config.max_staleness}s, at most {self.config.max_lag} changes behind); "
                "read from another backend or retry"
            )
        return store

    async def _write(self, write: Write) -> Applied:
        backend = self.backend
        if backend.store is None:
            raise _Starting
        if backend.writer is None or backend.primary is None:
            raise _Replica(
                f"backend ordinal {backend.ordinal} is a read replica; writes go to the primary "
                f"(ordinal {self.config.primary_ordinal}). Call the server, which routes them"
            )
        if backend.draining:
            raise _Draining
        if backend.writes_stopped:
            raise _Restoring
        backend.writes_in_flight += 1
        try:
            applied = await backend.writer.submit(write)
            await backend.primary.replicated(applied.seq)
        finally:
            backend.writes_in_flight -= 1
        return applied

    # The calls without a gRPC context, shared by the unary methods below and BatchServicer:
    # each returns its reply or raises Refused.

    async def put(self, request: kv_pb2.PutRequest) -> kv_pb2.PutResponse:
        try:
            validation.check_key(request.key)
            validation.check_value(request.value, self.config.max_value_bytes)
            applied = await self._write(
                Write("put", request.key, request.value, request_id(request.request_id))
            )
        except (validation.Invalid, StoreFull, _Starting, _Replica, _Restoring, _Draining) as err:
            raise _refusal(err) from None
        return kv_pb2.PutResponse(created=applied.changed)

    async def get(self, request: kv_pb2.GetRequest) -> kv_pb2.GetResponse:
        try:
            validation.check_key(request.key)
            value = self.reader.get(request.key)
        except (validation.Invalid, _Starting, _Stale) as err:
            raise _refusal(err) from None
        if value is None:
            raise Refused(
                grpc.StatusCode.NOT_FOUND, f"no value for key {runtime.printable(request.key)!r}"
            )
        return kv_pb2.GetResponse(value=value)

    async def delete(self, request: kv_pb2.DeleteRequest) -> kv_pb2.DeleteResponse:
        try:
            validation.check_key(request.key)
            applied = await self._write(
                Write("delete", request.key, request_id=request_id(request.request_id))
            )
        except (validation.Invalid, StoreFull, _Starting, _Replica, _Restoring, _Draining) as err:
            raise _refusal(err) from None
        if not applied.changed:
            raise Refused(
                grpc.StatusCode.NOT_FOUND,
                f"no value for key {runtime.printable(request.key)!r}; nothing was deleted",
            )
        return kv_pb2.DeleteResponse()

    async def list(self, request: kv_pb2.ListRequest) -> kv_pb2.ListResponse:
        try:
            limit = validation.page_size(request.page_size)
            after = validation.resume_after(request.prefix, request.page_token)
            # A page ends short of `limit` when the next entry would not fit one message.
            entries, more = self.reader.list_page(request.prefix, limit, after)
        except (validation.Invalid, _Starting, _Stale) as err:
            raise _refusal(err) from None
        return kv_pb2.ListResponse(
            entries=[kv_pb2.Entry(key=k, value=v) for k, v in entries],
            next_page_token=validation.page_token(request.prefix, entries[-1][0]) if more else b"",
        )

    async def Put(self, request: kv_pb2.PutRequest, context: Context) -> kv_pb2.PutResponse:
        reply: kv_pb2.PutResponse = await _unary(context, self.put(request))
        return reply

    async def Get(self, request: kv_pb2.GetRequest, context: Context) -> kv_pb2.GetResponse:
        reply: kv_pb2.GetResponse = await _unary(context, self.get(request))
        return reply

    async def Delete(
        self, request: kv_pb2.DeleteRequest, context: Context
    ) -> kv_pb2.DeleteResponse:
        reply: kv_pb2.DeleteResponse = await _unary(context, self.delete(request))
        return reply

    async def List(self, request: kv_pb2.ListRequest, context: Context) -> kv_pb2.ListResponse:
        reply: kv_pb2.ListResponse = await _unary(context, self.list(request))
        return reply

    async def Scan(
        self, request: kv_pb2.ScanRequest, context: Context
    ) -> AsyncIterator[kv_pb2.Entry]:
        try:
            store = self.reader
        except (_Starting, _Stale) as err:
            await _refuse(context, err)
        for chunk in store.scan(request.prefix):
            for key, value in chunk:
                yield kv_pb2.Entry(key=key, value=value)
            await asyncio.sleep(0)  # let other calls in between chunks


async def _unary(context: Context, call: Awaitable[Any]) -> Any:
    try:
        return await call
    except Refused as refused:
        await _refuse(context, refused)


# Recording one batched item as the call it stands for (runtime.ObservingInterceptor.record).
Record = Callable[[str, grpc.StatusCode, float], None]
STOPPING = Refused(
    grpc.StatusCode.UNAVAILABLE,
    "the backend is stopping (a restart or a move) and takes no more calls on this stream; "
    "retry through the server, which sends the call to a backend that answers",
    NO_RETRY,
)

# How much batching happens: items per message this backend received (requests) and sent
# (answers) on its batch streams. 1 everywhere means no call ever waited for another's write.
# Here, not in kvstack.batching, which the server imports too: only a backend registers it.
ITEMS = Histogram(
    "kvstack_backend_batch_items",
    "Items per message on the batch stream, by direction (requests received, answers sent)",
    ["direction"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)


class BatchServicer(batch_pb2_grpc.BatchServicer):
    """kvstack.v1.Batch: the server's Put, Get, Delete and List as items of one stream
    (kvstack.batching). Each item runs as its own task, so the writes of one message reach the
    GroupCommitter together and commit in one transaction, and a read never waits behind a
    write; each answer goes out as soon as it is ready. Each item is counted and logged as the
    KeyValue call it stands for."""

    def __init__(self, kv: KeyValueServicer, record: Callable[[], Record]) -> None:
        self.kv = kv
        self._record = record
        self.stopping = asyncio.Event()
        self.streams = 0

    # A coroutine that writes with context.write (gRPC's reader/writer API), not the generated
    # base's async iterator: answers go out from the Outbox's task as items complete.
    async def Stream(  # type: ignore[override]
        self, request_iterator: AsyncIterator[batch_pb2.BatchRequest], context: Context
    ) -> None:
        outbox = Outbox(lambda answers: self._send(context, answers), "batch-answers")
        running: set[asyncio.Task[None]] = set()

        async def take() -> None:
            async for message in request_iterator:
                ITEMS.labels("requests").observe(len(message.items))
                for item in message.items:
                    task = asyncio.create_task(self._run(item, outbox))
                    running.add(task)
                    task.add_done_callback(running.discard)

        self.streams += 1
        taking = asyncio.create_task(take())
        stopping = asyncio.create_task(self.stopping.wait())
        try:
            await asyncio.wait({taking, stopping, outbox.task}, return_when=asyncio.FIRST_COMPLETED)
            unread = taking.exception() if taking.done() and not taking.cancelled() else None
            # The server closed its end, or this backend drains, or its messages could not be
            # read: answer what runs, then end the stream (a drain would otherwise wait its
            # whole grace period for it). Or an answer could not be written: end it at once.
            taking.cancel()
            while running and not outbox.task.done():  # an answer unwritable: end it then
                await asyncio.wait({*running, outbox.task}, return_when=asyncio.FIRST_COMPLETED)
            await outbox.flush()
            if outbox.task.done():
                await self._unwritable(context, outbox.task)
            if unread is not None:
                await self._unreadable(context, unread)
        finally:
            taking.cancel()
            stopping.cancel()
            outbox.close()
            # Cancelled (the server went away, or this backend stops past its grace): no item
            # may outlive its stream, answering nobody or reading a store that then closes. A
            # write already with the GroupCommitter still commits, counted in its `pending`;
            # KeyValueServicer._write counts it out of writes_in_flight on the way out, once.
            items = list(running)
            for task in items:
                task.cancel()
            try:
                if items:
                    await asyncio.wait(items)
            finally:
                self.streams -= 1

    async def _unreadable(self, context: Context, error: BaseException) -> None:
        """End, with an error status, a stream whose next message could not be read. Ending OK
        would say that the server closed its end: the server would fail the calls it sent after
        that message as if this backend were stopping, and nobody would learn that a message
        was lost."""
        if isinstance(error, DecodeError):
            code = grpc.StatusCode.INVALID_ARGUMENT
            name = batch_pb2.BatchRequest.DESCRIPTOR.full_name
            why = str(error).removeprefix(f"Error parsing message with type '{name}': ")
            what = f"a message on it is not a valid {name} ({why})"
        else:
            code = grpc.StatusCode.UNKNOWN
            what = f"reading its next message failed ({error!r})"
        runtime.log.warning(
            "batch stream ended: a message could not be read",
            extra=runtime.fields(error=repr(error), code=code.name),
        )
        await context.abort(
            code,
            f"the backend ended this batch stream because {what}; the items before it were "
            "answered, no later one was read: send those again on a new stream",
        )

    async def _unwritable(self, context: Context, writer: asyncio.Task[None]) -> None:
        """End, with an error status, a stream whose answers can no longer be written (the
        Outbox's writer task failed): its calls would otherwise wait until their deadlines."""
        error = None if writer.cancelled() else writer.exception()
        runtime.log.warning(
            "batch stream ended: an answer could not be written",
            extra=runtime.fields(error=repr(error)),
        )
        await context.abort(
            grpc.StatusCode.UNKNOWN,
            f"the backend ended this batch stream because writing an answer on it failed "
            f"({error!r}); the items not answered yet never will be on it: send them again on "
            "a new stream (a put or delete among them may have been applied: send it with the "
            "same request_id)",
        )

    async def _send(self, context: Context, answers: list[batch_pb2.BatchResponse.Answer]) -> None:
        ITEMS.labels("answers").observe(len(answers))
        await context.write(batch_pb2.BatchResponse(answers=answers))

    async def _run(self, item: batch_pb2.BatchRequest.Item, outbox: Outbox) -> None:
        started = time.perf_counter()
        field = item.WhichOneof("request")
        answer = batch_pb2.BatchResponse.Answer(id=item.id)
        code = grpc.StatusCode.OK
        try:
            reply = await self._reply(item, field)
            getattr(answer, field).CopyFrom(reply)
            getattr(answer, field).SetInParent()  # an empty reply (Delete's) is still one
        except Refused as refused:
            code = refused.code
            answer.code, answer.message = code.value[0], refused.details
            answer.trailers.extend(
                batch_pb2.BatchResponse.Trailer(key=k, value=v) for k, v in refused.trailers
            )
        except Exception:  # noqa: BLE001 - as gRPC answers a handler's error: UNKNOWN, logged
            runtime.log.exception("a batched call failed", extra=runtime.fields(item=field))
            code = grpc.StatusCode.UNKNOWN
            answer.code, answer.message = code.value[0], "Unexpected error in the backend"
        method = METHODS.get(field or "", "Unknown")
        self._record()(f"/{KEYVALUE}/{method}", code, time.perf_counter() - started)
        outbox.put(answer)

    async def _reply(self, item: batch_pb2.BatchRequest.Item, field: str | None) -> Any:
        if field is None:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                "the batch item holds no request: set put, get, delete or list",
            )
        if self.stopping.is_set():
            raise STOPPING
        return await getattr(self.kv, field)(getattr(item, field))

    async def drain(self, timeout: float) -> None:
        """Take no more items, and wait (at most `timeout`) for every stream to answer the
        items it runs and end."""
        self.stopping.set()
        deadline = time.monotonic() + timeout
        while self.streams and time.monotonic() < deadline:
            await asyncio.sleep(0.02)


def request_id(text: str) -> bytes:
    """A request id as the store keeps it (validation.check_request_id has bounded it)."""
    validation.check_request_id(text)
    return text.encode()


class Backend:
    name = NAME
    # No KVSTACK_MAX_CONNECTION_AGE here: the server and the replicas find every backend through
    # the Directory's DNS polling, so there is nothing to re-balance, and recycling cut each
    # replica's Stream every 30 s (the primary acknowledged writes alone until it reconnected).
    recycle_connections = False

    def __init__(
        self,
        config: BackendConfig,
        max_receive_bytes: int = validation.GRPC_MESSAGE_LIMIT_BYTES,
    ) -> None:
        """`max_receive_bytes`: the process's KVSTACK_MAX_RECEIVE_BYTES (runtime.RuntimeConfig),
        which gRPC applies to the messages this backend receives and sends."""
        try:
            validation.check_value_limit(config.max_value_bytes)
            validation.check_backend_receive_limit(max_receive_bytes)
        except ValueError as err:
            raise runtime.ConfigError(str(err)) from None
        self.config = config
        self.ordinal = (
            config.ordinal if config.ordinal >= 0 else ordinal_from(os.environ.get("HOSTNAME", ""))
        )
        self.is_primary = self.ordinal == config.primary_ordinal
        self.store: Store | None = None
        self.writer: GroupCommitter | None = None
        self.primary: PrimaryState | None = None
        self.follower: Follower | None = None
        self.directory: Directory | None = None
        self._set_serving: Callable[[str, bool], None] = lambda name, serving: None
        self.writes_in_flight = 0
        self.restoring = False  # a restore is arriving or loading (one at a time)
        self.writes_stopped = False  # a restore is loading: writes are refused
        self.draining = False  # the primary is stopping: writes are refused
        self._record: Record = lambda method, code, seconds: None
        self.kv = KeyValueServicer(self)
        self.batch = BatchServicer(self.kv, lambda: self._record)

    def outstanding_writes(self) -> tuple[int, int]:
        """(in flight, queued): the writes a caller still waits for (counted by
        KeyValueServicer._write, through their replication), and those submitted to the
        GroupCommitter whose outcome has not reached the event loop. A caller that went away
        (a unary call cancelled, a batch stream ended) no longer counts its write in flight,
        but the write is still queued and commits. A write can be in both. Once both are 0
        and writes are refused (draining, or a restore's writes_stopped), no write can commit
        any more: the drain and the restore wait for that, and only that."""
        return self.writes_in_flight, self.writer.pending if self.writer is not None else 0

    def bind_observer(self, record: Record) -> None:
        self._record = record

    def bind_health(self, set_serving: Callable[[str, bool], None]) -> None:
        self._set_serving = set_serving

    async def drain(self, grace: float) -> None:
        """On a primary: once the writes in flight are done (they still get their replica
        acknowledgement), end the replication streams, which would otherwise hold the drain
        open for its whole grace period. On every backend: the batch streams take no more
        items, answer the ones they run, and end, for the same reason."""
        if self.primary is None or self.store is None or self.writer is None:
            await self.batch.drain(grace / 2)
            return
        # From here a write is refused (UNAVAILABLE: the server sends it again to the primary
        # once one answers), even one the gRPC server had accepted before it began to stop.
        self.draining = True
        ending = asyncio.create_task(self.batch.drain(grace / 2))
        deadline = time.monotonic() + grace / 2
        while any(self.outstanding_writes()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # With no write in flight or queued and no restore loading, no write can commit any
        # more: the position is final, and the replicas are told so.
        final = not any(self.outstanding_writes()) and not self.restoring
        self.primary.drain(self.store.seq() if final else None)
        await ending

    def register(self, server: aio.Server) -> list[str]:
        # wire.add_servicer, not the generated add_*_to_server: a request that is not a valid
        # message gets INVALID_ARGUMENT with a sentence, not UNKNOWN.
        wire.add_servicer(self.kv, kv_pb2.DESCRIPTOR.services_by_name["KeyValue"], server)
        wire.add_servicer(self.batch, batch_pb2.DESCRIPTOR.services_by_name["Batch"], server)
        wire.add_servicer(
            ReplicationServicer(self),
            replication_pb2.DESCRIPTOR.services_by_name["Replication"],
            server,
        )
        wire.add_servicer(
            BackupServicer(self), backup_pb2.DESCRIPTOR.services_by_name["Backup"], server
        )
        return [KEYVALUE, BATCH, REPLICATION, BACKUP]

    async def start(self) -> None:
        store = Store(
            Path(self.config.data_dir),
            self.config.map_size,
            self.config.log_retain,
            self.config.log_retain_bytes,
        )
        (store.path / INCOMING).unlink(missing_ok=True)  # a restore cut short by a restart
        role = "primary" if self.is_primary else "replica"
        runtime.log.info(
            "database open",
            extra=runtime.fields(
                path=str(store.path), role=role, ordinal=self.ordinal, **store.stats()
            ),
        )
        if self.is_primary:
            self.primary = PrimaryState(store.seq(), self.config.semisync_timeout)
            self.writer = GroupCommitter(
                store, self.config.group_commit_max, on_commit=self.primary.committed
            )
            self.writer.start()
        else:
            # Reads wait until this replica has caught up with the primary.
            self._set_serving(KEYVALUE, False)
            self.directory = Directory(self.config.peers)
            self.directory.start()
            self.follower = Follower(
                store,
                self.directory,
                name=f"{NAME}-{self.ordinal}",
                max_lag=self.config.max_lag,
                on_readable=lambda readable: self._set_serving(KEYVALUE, readable),
                max_staleness=self.config.max_staleness,
            )
            self.follower.start()
        self.store = store

    async def stop(self) -> None:
        if self.follower is not None:
            await self.follower.stop()
        if self.directory is not None:
            await self.directory.close()
        if self.writer is not None:
            await self.writer.stop()
        if self.store is not None:
            self.store.close()


def main(argv: list[str]) -> int:
    def build() -> Backend:
        receive = runtime.load(runtime.RuntimeConfig).max_receive_bytes
        return Backend(runtime.load(BackendConfig), receive)

    return runtime.run(NAME, argv, build, BackendConfig)
