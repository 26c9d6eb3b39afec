"""The server's calls to one backend over one long-lived stream (kvstack.v1.Batch, batch.proto),
as TiKV's batch commands carry TiDB's: Put, Get, Delete and List travel as items of a few large
messages instead of one unary call each, and the backend answers each item as it completes.

Why: each unary call costs its own HTTP/2 stream (headers, trailers, a round of the event loop
on both sides); under load most of a forwarded call's time went there, not into the store. On
one stream, whatever queued while the previous message was being written goes together in the
next one. There is no timer: a lone call is written at once, so batching costs an idle system
nothing and grows with the load.

Each call keeps what a unary call had: its own deadline (DEADLINE_EXCEEDED when it passes, the
stream itself having none), its cancellation (the answer of a caller who left is dropped), and
its status code, message and trailing metadata, raised as a grpc.aio.AioRpcError so the
server's retry logic reads it as before. A stream that breaks (UNAVAILABLE, the backend
stopping, the connection lost) has every call waiting on it sent once more on a new stream, as
gRPC's retry policy sent a unary call again; a call whose second stream breaks too fails
UNAVAILABLE (the server sends it again, to this backend or another). A stream the backend ended
over a message it refused (REFUSED) is not retried: its calls fail INTERNAL. A backend of
a release before the stream (UNIMPLEMENTED) gets unary calls. The backend's side is
kvstack.backend.BatchServicer; both use `Outbox`.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import grpc
from grpc import aio

from kvstack import validation
from kvstack.v1 import batch_pb2, batch_pb2_grpc, kv_pb2_grpc

log = logging.getLogger("kvstack.batching")
# A message of more than one item is at most this (its ByteSize, protobuf's framing of each
# item included); one item always goes, alone if need be. The same 2 MiB budget as every
# message kvstack builds, so a 1 MiB value with a 511-byte key, or the largest List page, goes
# alone.
MESSAGE_BYTES = validation.MESSAGE_BUDGET_BYTES
# The KeyValue method of each item's oneof field, and back.
FIELDS = {"Put": "put", "Get": "get", "Delete": "delete", "List": "list"}
METHODS = {field: method for method, field in FIELDS.items()}
CODES = {code.value[0]: code for code in grpc.StatusCode}
# A backend of a release before the batch stream answers it UNIMPLEMENTED (a rollback, or a
# rollout half-way): its calls then go one unary KeyValue call each, and the stream is tried
# again after this long, in case the backend was replaced by one that has it.
UNARY_FOR_S = 10.0
# The codes with which a backend ends a stream over a message it refused (one it could not
# read, one over its size limit): its calls are not sent again, which would break the next
# stream too. After any other end (the connection lost, the backend stopping) they are, as
# gRPC's retry policy retries UNAVAILABLE (server.channel_options). INTERNAL is among those
# retried: grpc.aio reports a write that meets the call's end as "Internal error from Core"
# and loses the call's real status, UNIMPLEMENTED included (grpc/grpc#36066).
REFUSED = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED})


def rpc_error(
    code: grpc.StatusCode, details: str, trailers: Sequence[tuple[str, str]] = ()
) -> aio.AioRpcError:
    """What a unary call that ended with `code` would have raised."""
    return aio.AioRpcError(code, aio.Metadata(), aio.Metadata(*trailers), details)


def framed_size(item_bytes: int) -> int:
    """What an item of `item_bytes` adds to its message: protobuf frames each element of a
    repeated message field (`items`, `answers`: field 1 of BatchRequest and BatchResponse) with
    a one-byte tag and its length as a varint. So a message's ByteSize() is the sum of its
    items' framed sizes."""
    return 1 + max(1, (item_bytes.bit_length() + 6) // 7) + item_bytes


class Outbox:
    """The messages one side writes on a stream. An item is written at once when no write is in
    progress; items that arrive during a write go together in the next message (at least one,
    and more only while the whole message, framing included, stays within MESSAGE_BYTES). One
    task writes: gRPC's asyncio API wants a stream's reads, and its writes, serialized ("Read
    operations must be serialized when called from multiple coroutines", grpc.aio
    StreamStreamCall.read)."""

    def __init__(self, write: Callable[[list[Any]], Awaitable[None]], name: str) -> None:
        self._write = write
        self._queue: collections.deque[Any] = collections.deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.closed = False
        self.task = asyncio.create_task(self._run(), name=name)

    def put(self, item: Any) -> None:
        if self.closed or self.task.done():
            # The stream ended, or its writer failed (its owner ends the stream): nobody
            # writes or reads this item any more.
            return
        self._queue.append(item)
        self._idle.clear()
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                items: list[Any] = []
                size = 0
                while self._queue:
                    cost = framed_size(self._queue[0].ByteSize())
                    if items and size + cost > MESSAGE_BYTES:
                        break
                    items.append(self._queue.popleft())
                    size += cost
                await self._write(items)
            self._idle.set()

    async def flush(self) -> None:
        """Wait until every item put so far is written (or the writer failed)."""
        idle = asyncio.create_task(self._idle.wait())
        await asyncio.wait({idle, self.task}, return_when=asyncio.FIRST_COMPLETED)
        idle.cancel()

    def close(self) -> None:
        self.closed = True
        self._queue.clear()
        self.task.cancel()


class _Broken(Exception):
    """The stream a call was on ended before the call's answer came (`message` says why), with
    `code` when the backend ended it (None for a local failure or a lost connection)."""

    def __init__(self, message: str, code: grpc.StatusCode | None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class _Stream:
    """One Batch.Stream call and the calls waiting for their answers on it."""

    def __init__(
        self, stub: batch_pb2_grpc.BatchAsyncStub, address: str, ended: Callable[[], None]
    ) -> None:
        self.address = address
        self._ended = ended
        # No timeout: the stream outlives every call on it, each of which keeps its own.
        self.call = stub.Stream()
        self.pending: dict[int, tuple[asyncio.Future[Any], str]] = {}
        self.broken = False
        self.outbox = Outbox(self._send, f"batch-write {address}")
        self.outbox.task.add_done_callback(self._writer_done)
        self.reader = asyncio.create_task(self._read(), name=f"batch-read {address}")

    async def _send(self, items: list[batch_pb2.BatchRequest.Item]) -> None:
        # An item whose caller gave up while it queued (a backend frozen, its stream's window
        # full) is not sent: nobody waits for its answer, and a write should not land late.
        items = [item for item in items if item.id in self.pending]
        if items:
            await self.call.write(batch_pb2.BatchRequest(items=items))

    def _writer_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or (error := task.exception()) is None:
            return
        why = f"writing to it failed: {error!r}"
        if isinstance(error, (aio.AioRpcError, asyncio.InvalidStateError)):
            # The call has ended, and this write's error is not why ("Internal error from
            # Core", or "RPC already finished"): the status the reader gets is (UNIMPLEMENTED
            # from a backend of the release before, say). Failed here only if the reader has
            # not within 1 s.
            asyncio.get_running_loop().call_later(1.0, self.fail, why)
        else:
            self.fail(why)

    async def _read(self) -> None:
        code: grpc.StatusCode | None = None
        try:
            while True:
                message = await self.call.read()
                if message is aio.EOF:  # grpc.aio: the call ended OK (else read() raises)
                    break
                for answer in cast(batch_pb2.BatchResponse, message).answers:
                    self._answer(answer)
            code, why = grpc.StatusCode.OK, "the backend ended it (it is stopping)"
        except aio.AioRpcError as err:
            code, why = err.code(), f"{err.code().name}: {err.details()}"
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # fail() or close() ended this stream
            why = "its channel closed (the backend left)"  # grpc.aio cancels the call
        except Exception as err:  # noqa: BLE001 - whatever broke the stream fails its calls
            why = repr(err)
        self.fail(why, code)

    def _answer(self, answer: batch_pb2.BatchResponse.Answer) -> None:
        waiting = self.pending.pop(answer.id, None)
        if waiting is None or waiting[0].done():
            return  # its caller gave up (deadline, cancellation)
        future, field = waiting
        if answer.code == grpc.StatusCode.OK.value[0]:
            future.set_result(getattr(answer, field))
            return
        code = CODES.get(answer.code, grpc.StatusCode.UNKNOWN)
        trailers = [(t.key, t.value) for t in answer.trailers]
        future.set_exception(rpc_error(code, answer.message, trailers))

    def fail(self, why: str, code: grpc.StatusCode | None = None) -> None:
        """End this stream: every call still waiting on it fails (with _Broken)."""
        if self.broken:
            return
        self.broken = True
        self._ended()
        error = f"the batch stream to the backend at {self.address} broke: {why}"
        for future, _ in self.pending.values():
            if not future.done():
                future.set_exception(_Broken(error, code))
        self.pending.clear()
        self.outbox.close()
        self.call.cancel()
        if self.reader is not asyncio.current_task():
            self.reader.cancel()
        log.info("batch stream ended", extra={"fields": {"backend": self.address, "why": why}})


class Batcher:
    """The server's one stream to one backend (directory.Member.batch), opened by the first call
    and again by the first call after it broke."""

    def __init__(self, channel: aio.Channel, address: str) -> None:
        self._stub = batch_pb2_grpc.BatchStub(channel)
        self._kv = kv_pb2_grpc.KeyValueStub(channel)
        self.address = address
        self._ids = itertools.count(1)
        self._stream: _Stream | None = None
        self._closed = False
        self._unary_until = 0.0  # time.monotonic() before which calls go unary

    def _ended(self) -> None:
        self._stream = None

    async def call(self, method: str, request: Any, timeout: float) -> Any:
        """`method` ("Put", "Get", "Delete" or "List") of kvstack.v1.KeyValue on this backend:
        its reply, or the aio.AioRpcError the unary call would have raised. A call whose stream
        broke (not REFUSED) before it was answered is sent once more, on a new stream, as gRPC's
        retry policy sent a unary call again (server.channel_options), if its deadline leaves
        time; every call may be: reads change nothing, and a write's request_id (which the
        server gives every write, FrontEnd._write) is applied once."""
        if self._closed:
            raise rpc_error(
                grpc.StatusCode.UNAVAILABLE, f"the channel to the backend at {self.address} closed"
            )
        deadline = time.monotonic() + timeout
        for attempt in (1, 2):
            if time.monotonic() < self._unary_until:
                return await self._unary(method, request, deadline - time.monotonic())
            try:
                return await self._on_stream(method, request, deadline - time.monotonic())
            except _Broken as broken:
                if broken.code == grpc.StatusCode.UNIMPLEMENTED:
                    self._go_unary()
                    continue  # the last attempt goes unary: the stream was never there
                if broken.code in REFUSED:
                    raise rpc_error(
                        grpc.StatusCode.INTERNAL,
                        f"{broken.message}. The backend refused a message of the server's, so "
                        "the call is not sent again: report this with both services' logs (a "
                        "server and a backend of releases that disagree on kvstack.v1.Batch?)",
                    ) from None
                if attempt == 2:
                    why = " (the second stream this call was sent on; the first broke too)"
                elif deadline <= time.monotonic():
                    why = " (no time was left to send the call again)"
                elif self._closed:
                    why = ""  # the message says the channel closed
                else:
                    continue
                raise rpc_error(grpc.StatusCode.UNAVAILABLE, broken.message + why) from None
        return await self._unary(method, request, deadline - time.monotonic())

    def _go_unary(self) -> None:
        if time.monotonic() >= self._unary_until:  # logged once per switch, not per call
            log.warning(
                "backend has no batch stream (a release before it): calls go one unary call "
                f"each, and the stream is tried again in {UNARY_FOR_S:.0f} s",
                extra={"fields": {"backend": self.address}},
            )
        self._unary_until = time.monotonic() + UNARY_FOR_S

    async def _on_stream(self, method: str, request: Any, timeout: float) -> Any:
        if timeout <= 0:  # nothing is sent that nobody would wait for (a write landing late)
            raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        if self._stream is None:
            self._stream = _Stream(self._stub, self.address, self._ended)
        stream, field, ident = self._stream, FIELDS[method], next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        stream.pending[ident] = (future, field)
        stream.outbox.put(batch_pb2.BatchRequest.Item(id=ident, **{field: request}))
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        finally:
            stream.pending.pop(ident, None)  # a late answer is then dropped

    async def _unary(self, method: str, request: Any, timeout: float) -> Any:
        try:
            return await getattr(self._kv, method)(request, timeout=max(timeout, 0.0))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the caller itself was cancelled (its client left, or shutdown)
            # grpc.aio cancels a call whose channel closes (the backend left); the server would
            # pass CANCELLED on, which clients do not retry.
            raise rpc_error(
                grpc.StatusCode.UNAVAILABLE,
                f"the channel to the backend at {self.address} closed during the call",
            ) from None

    async def close(self) -> None:
        self._closed = True
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.fail("its channel closed")
            await asyncio.gather(stream.reader, stream.outbox.task, return_exceptions=True)
