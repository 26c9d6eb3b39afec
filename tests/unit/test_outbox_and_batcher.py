"""kvstack.batching on its own: the Outbox's coalescing, and a Batcher against a real in-process
grpc.aio server whose Batch servicer answers as the test says."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from kvstack import batching, validation
from kvstack.batching import Batcher, Outbox
from kvstack.v1 import batch_pb2, batch_pb2_grpc, kv_pb2
from tests.inprocess import commits_held, serving_backend, until

Item = batch_pb2.BatchRequest.Item


def test_a_lone_item_goes_at_once_and_items_queued_meanwhile_go_together() -> None:
    """No timer: the first item is written alone as soon as it is put; the ones put while that
    write is in progress go in the next message, split where 2 MiB of items would be passed."""

    async def main() -> list[list[int]]:
        sent: list[list[int]] = []
        writing = asyncio.Event()
        release = asyncio.Event()

        async def write(items: list[Any]) -> None:
            sent.append([item.id for item in items])
            writing.set()
            await release.wait()

        outbox = Outbox(write, "test")
        outbox.put(Item(id=1))
        await writing.wait()
        assert sent == [[1]]
        for ident in range(2, 6):
            outbox.put(Item(id=ident))
        # One of these with its key (1,049,100 bytes) fits beside the small items; two
        # (2,098,200 bytes) are over 2 MiB (2,097,152), so each further one goes alone.
        big = b"x" * (1 << 20)
        for ident in range(6, 9):
            outbox.put(Item(id=ident, put=kv_pb2.PutRequest(key=b"k" * 511, value=big)))
        release.set()
        await outbox.flush()
        outbox.close()
        return sent

    assert asyncio.run(main()) == [[1], [2, 3, 4, 5, 6], [7], [8]]


class Scripted(batch_pb2_grpc.BatchServicer):
    """Answers a Get with the key as its value; the key b"refuse" with UNAVAILABLE and a
    pushback trailer; the key b"hold" never; the key b"break" by ending the stream
    UNAVAILABLE, and b"break-once" so the first time only; the key b"bad-message" by ending it
    INVALID_ARGUMENT, as a backend does a message it cannot read. `seen` holds every key
    received."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    async def Stream(
        self, request_iterator: AsyncIterator[batch_pb2.BatchRequest], context: Any
    ) -> AsyncIterator[batch_pb2.BatchResponse]:
        async for message in request_iterator:
            answers = []
            for item in message.items:
                key = item.get.key
                self.seen.append(key)
                if key == b"hold":
                    continue
                if key == b"break" or (key == b"break-once" and self.seen.count(key) == 1):
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "broken on purpose")
                if key == b"bad-message":
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "refused on purpose")
                answer = batch_pb2.BatchResponse.Answer(id=item.id)
                if key == b"refuse":
                    answer.code = grpc.StatusCode.UNAVAILABLE.value[0]
                    answer.message = "go elsewhere"
                    answer.trailers.add(key="grpc-retry-pushback-ms", value="-1")
                else:
                    answer.get.value = key
                answers.append(answer)
            yield batch_pb2.BatchResponse(answers=answers[::-1])  # out of order on purpose


async def with_server(body: Any, servicer: Scripted | None = None) -> Any:
    server = aio.server()
    batch_pb2_grpc.add_BatchServicer_to_server(servicer or Scripted(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = aio.insecure_channel(f"127.0.0.1:{port}")
    batcher = Batcher(channel, f"127.0.0.1:{port}")
    try:
        return await body(batcher)
    finally:
        await batcher.close()
        await channel.close()
        await server.stop(None)


async def outcome(call: Any) -> Any:
    try:
        return await call
    except aio.AioRpcError as err:
        return err


def get(batcher: Batcher, key: bytes, timeout: float = 5) -> Any:
    return outcome(batcher.call("Get", kv_pb2.GetRequest(key=key), timeout))


def test_each_call_gets_its_own_answer_status_and_trailers() -> None:
    """Answers out of order reach their own callers; a refusal is an AioRpcError with the
    backend's code, message and trailing metadata; a call with no answer ends with
    DEADLINE_EXCEEDED at its own deadline, the others unaffected."""

    async def body(batcher: Batcher) -> list[Any]:
        return list(
            await asyncio.gather(
                *(get(batcher, b"k%d" % i) for i in range(50)),
                get(batcher, b"refuse"),
                get(batcher, b"hold", timeout=0.3),
            )
        )

    *values, refused, held = asyncio.run(with_server(body))
    assert [v.value for v in values] == [b"k%d" % i for i in range(50)]
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    assert refused.details() == "go elsewhere"
    assert tuple(refused.trailing_metadata()) == (("grpc-retry-pushback-ms", "-1"),)
    assert held.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_stream_that_breaks_twice_fails_its_calls_unavailable_and_the_next_opens_another() -> (
    None
):
    """The stream ended by an error: every call waiting on it is sent once more, on a new
    stream; when that one breaks too, each fails UNAVAILABLE saying why (not at its deadline).
    The next call is answered on a third stream."""
    servicer = Scripted()

    async def body(batcher: Batcher) -> tuple[Any, Any, Any]:
        held = asyncio.create_task(get(batcher, b"hold", timeout=30))
        await asyncio.sleep(0.1)
        broken = await get(batcher, b"break", timeout=30)
        return await held, broken, await get(batcher, b"after")

    held, broken, after = asyncio.run(with_server(body, servicer))
    for failed in (held, broken):
        assert failed.code() == grpc.StatusCode.UNAVAILABLE
        assert "broken on purpose" in failed.details()
        assert "the first broke too" in failed.details()
    assert after.value == b"after"
    assert collections.Counter(servicer.seen) == {b"hold": 2, b"break": 2, b"after": 1}


def test_a_call_whose_stream_broke_once_is_answered_on_the_next() -> None:
    """A stream broken once (as by a backend that stops with calls on it): the calls waiting
    on it, and the one that broke it, are answered on a new stream, as gRPC's retry policy
    answered a unary call whose connection dropped."""
    servicer = Scripted()

    async def body(batcher: Batcher) -> list[Any]:
        held = asyncio.create_task(get(batcher, b"k1"))
        return [await get(batcher, b"break-once"), await held]

    assert [reply.value for reply in asyncio.run(with_server(body, servicer))] == [
        b"break-once",
        b"k1",
    ]
    assert collections.Counter(servicer.seen) == {b"break-once": 2, b"k1": 1}


def test_a_stream_the_backend_refused_a_message_on_fails_its_calls_once_internal() -> None:
    """The backend ends the stream INVALID_ARGUMENT (a message it could not read): the calls on
    it fail INTERNAL, saying so and what to do, and are not sent again (each would break the
    next stream too); the next call opens a new stream and is answered."""
    servicer = Scripted()

    async def body(batcher: Batcher) -> tuple[Any, Any, Any]:
        held = asyncio.create_task(get(batcher, b"hold", timeout=30))
        await asyncio.sleep(0.1)
        refused = await get(batcher, b"bad-message", timeout=30)
        return await held, refused, await get(batcher, b"after")

    held, refused, after = asyncio.run(with_server(body, servicer))
    for failed in (held, refused):
        assert failed.code() == grpc.StatusCode.INTERNAL
        assert "INVALID_ARGUMENT: refused on purpose" in failed.details()
        assert "not sent again: report this" in failed.details()
    assert after.value == b"after"
    assert collections.Counter(servicer.seen) == {b"hold": 1, b"bad-message": 1, b"after": 1}


def test_a_call_with_no_time_left_is_not_sent() -> None:
    """A call whose deadline has passed when it would be queued (timeout 0, or its retry after
    its time ran out) fails DEADLINE_EXCEEDED without being written: the backend never sees it,
    so a write cannot land after its caller was told it failed."""
    servicer = Scripted()

    async def body(batcher: Batcher) -> tuple[Any, Any]:
        late = await get(batcher, b"late", timeout=0)
        return late, await get(batcher, b"after")

    late, after = asyncio.run(with_server(body, servicer))
    assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert after.value == b"after"
    assert servicer.seen == [b"after"]


async def unary_get(request: kv_pb2.GetRequest, context: Any) -> kv_pb2.GetResponse:
    return kv_pb2.GetResponse(value=b"unary:" + request.key)


# A backend of a release before the batch stream: KeyValue only (Get answers its key).
UNARY = grpc.method_handlers_generic_handler(
    "kvstack.v1.KeyValue",
    {
        "Get": grpc.unary_unary_rpc_method_handler(
            unary_get, kv_pb2.GetRequest.FromString, kv_pb2.GetResponse.SerializeToString
        )
    },
)


def test_calls_go_unary_to_a_backend_without_the_stream_and_back_once_it_has_it(
    monkeypatch: Any,
) -> None:
    """A backend that answers the stream UNIMPLEMENTED (the release before it, during a
    rollback): the call and those after it go as unary KeyValue calls. Once that backend is
    replaced at the same address by one with the stream, calls go back to the stream after
    UNARY_FOR_S (shortened here). What this cannot show: the real previous release
    (tests/integration/test_batching_across_releases.py runs it)."""
    monkeypatch.setattr(batching, "UNARY_FOR_S", 0.3)

    async def main() -> tuple[list[bytes], list[bytes], list[bytes]]:
        old = aio.server()
        old.add_generic_rpc_handlers((UNARY,))
        port = old.add_insecure_port("127.0.0.1:0")
        await old.start()
        channel = aio.insecure_channel(f"127.0.0.1:{port}")
        batcher = Batcher(channel, f"127.0.0.1:{port}")
        try:
            before = [(await get(batcher, b"k%d" % i)).value for i in range(3)]
            await old.stop(None)
            servicer = Scripted()
            new = aio.server()
            batch_pb2_grpc.add_BatchServicer_to_server(servicer, new)
            new.add_generic_rpc_handlers((UNARY,))
            assert new.add_insecure_port(f"127.0.0.1:{port}") == port
            await new.start()
            await asyncio.sleep(0.4)
            after = [(await get(batcher, b"k%d" % i)).value for i in range(3)]
            await new.stop(None)
            return before, after, servicer.seen
        finally:
            await batcher.close()
            await channel.close()

    before, after, seen = asyncio.run(main())
    assert before == [b"unary:k0", b"unary:k1", b"unary:k2"]
    assert after == [b"k0", b"k1", b"k2"]
    assert seen == [b"k0", b"k1", b"k2"]


def test_a_call_given_up_before_its_message_was_written_is_never_sent() -> None:
    """While a write to the stream is held (as when the backend's flow-control window is
    full), a call that times out in the queue is dropped from the next message: the backend
    never sees it, and the call queued beside it is still sent and answered."""
    servicer = Scripted()

    async def body(batcher: Batcher) -> tuple[Any, Any, Any]:
        await get(batcher, b"open")
        stream = batcher._stream
        assert stream is not None
        writing, release = asyncio.Event(), asyncio.Event()
        write = stream.call.write

        async def held(message: Any) -> None:
            writing.set()
            await release.wait()
            await write(message)

        stream.call.write = held  # type: ignore[method-assign,assignment]
        first = asyncio.create_task(get(batcher, b"first"))
        await writing.wait()  # its message is being written (held)
        late = await get(batcher, b"late", timeout=0.2)
        kept = asyncio.create_task(get(batcher, b"kept"))
        await asyncio.sleep(0.05)
        release.set()
        return await first, late, await kept

    first, late, kept = asyncio.run(with_server(body, servicer))
    assert (first.value, kept.value) == (b"first", b"kept")
    assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert servicer.seen == [b"open", b"first", b"kept"]


def test_the_message_budget_holds_the_largest_put() -> None:
    """A message holding one put of a 511-byte key, the largest value KVSTACK_MAX_VALUE_BYTES
    may allow, the longest request id and the largest item id fits the budget, framing
    included, and so gRPC's default limit: a put never needs a message larger than any other.
    framed_size counts exactly what the message adds around an item, at each varint length."""
    item = Item(
        id=2**64 - 1,
        put=kv_pb2.PutRequest(
            key=b"k" * 511, value=b"v" * validation.MAX_VALUE_LIMIT_BYTES, request_id="r" * 64
        ),
    )
    message = batch_pb2.BatchRequest(items=[item])
    assert message.ByteSize() <= batching.MESSAGE_BYTES
    assert message.ByteSize() < validation.GRPC_MESSAGE_LIMIT_BYTES
    for size in (0, 1, 127, 128, 16383, 16384, 2_097_151, 2_097_152):
        sized = Item(get=kv_pb2.GetRequest(key=b"k" * size))
        framed = batch_pb2.BatchRequest(items=[sized]).ByteSize()
        assert framed == batching.framed_size(sized.ByteSize()), size


def test_every_message_of_many_tiny_items_fits_the_budget_framing_included() -> None:
    """200,000 Get items of about 38 bytes each put at once: every message written holds more
    than one item and, as the BatchRequest it becomes, at most MESSAGE_BYTES, counting the 2
    bytes of protobuf framing per item (a tag and a length) that the items' own ByteSize()
    leaves out (5% here: summing only the items' sizes overfills each message). Each message
    but the last is also full to within one item, so the budget is not met by sending less."""

    async def main() -> list[list[Any]]:
        sent: list[list[Any]] = []

        async def write(items: list[Any]) -> None:
            sent.append(items)
            await asyncio.sleep(0)

        outbox = Outbox(write, "test")
        for ident in range(200_000):
            outbox.put(Item(id=ident, get=kv_pb2.GetRequest(key=b"key/%026d" % ident)))
        await outbox.flush()
        outbox.close()
        return sent

    sent = asyncio.run(main())
    sizes = [batch_pb2.BatchRequest(items=items).ByteSize() for items in sent]
    assert sum(len(items) for items in sent) == 200_000
    assert len(sent) > 2
    assert all(len(items) > 1 for items in sent)
    assert max(sizes) <= batching.MESSAGE_BYTES, sizes
    assert min(sizes[1:-1]) > batching.MESSAGE_BYTES - 40, sizes


# The backend's side (kvstack.backend.BatchServicer): a real Backend (a primary on LMDB in a
# temporary directory) served in-process over loopback (tests.inprocess), its streams opened
# directly.


async def read_all(call: Any) -> list[batch_pb2.BatchResponse.Answer]:
    """Every answer on `call` until it ends, whatever its status (at most 5 s)."""
    answers: list[batch_pb2.BatchResponse.Answer] = []
    async with asyncio.timeout(5):
        with contextlib.suppress(aio.AioRpcError):
            while (message := await call.read()) is not aio.EOF:
                answers.extend(message.answers)
    return answers


def test_a_batch_stream_that_cannot_be_read_ends_with_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A put, then bytes that are not a BatchRequest: the put is still answered (and stored),
    then the call ends INVALID_ARGUMENT saying the message was not valid, and the backend logs
    a WARNING. Ending OK would tell the server its stream ended normally, when calls sent on it
    may never have been read."""

    async def main() -> tuple[list[Any], grpc.StatusCode, str, bytes | None]:
        async with serving_backend(tmp_path) as (backend, channel, _):
            # Raw bytes out, so that one message can be one that is not a BatchRequest.
            call: Any = channel.stream_stream(
                f"/{batch_pb2.DESCRIPTOR.services_by_name['Batch'].full_name}/Stream",
                request_serializer=None,
                response_deserializer=batch_pb2.BatchResponse.FromString,
            )()
            put = Item(id=1, put=kv_pb2.PutRequest(key=b"k", value=b"v"))
            await call.write(batch_pb2.BatchRequest(items=[put]).SerializeToString())
            await call.write(b"\xff\xff\xff")
            answers = await read_all(call)
            assert backend.store is not None
            return answers, await call.code(), await call.details(), backend.store.get(b"k")

    caplog.set_level(logging.WARNING)
    answers, code, details, stored = asyncio.run(main())
    assert [(a.id, a.code, a.put.created) for a in answers] == [(1, 0, True)]
    assert stored == b"v"
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "not a valid kvstack.v1.BatchRequest" in details
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("batch stream" in r.getMessage() for r in warnings), caplog.records


def item_tasks() -> list[asyncio.Task[Any]]:
    """The BatchServicer's per-item tasks now on the loop."""
    return [
        t
        for t in asyncio.all_tasks()
        if getattr(t.get_coro(), "__qualname__", "") == "BatchServicer._run"
    ]


@pytest.mark.parametrize("ending", ["the client cancels", "the server stops"])
def test_a_cancelled_batch_stream_leaves_no_item_running_and_counts_its_write_once(
    tmp_path: Path, ending: str
) -> None:
    """A put handed to the writer thread (held inside its commit), then the stream's handler is
    cancelled: by the time it has ended no item task of it still runs, and the write is no
    longer counted in flight (it is still counted, once, as pending in the GroupCommitter).
    Released, the write commits as it would have anyway, and neither count goes below 0.
    An item left running would answer into a stream that is gone, or touch the store after
    the backend closed it."""

    async def main() -> tuple[list[bool], int, int, int, int, bytes | None]:
        async with serving_backend(tmp_path) as (backend, channel, server):
            assert backend.writer is not None
            assert backend.store is not None
            writer, store = backend.writer, backend.store
            with commits_held(store):
                call = batch_pb2_grpc.BatchStub(channel).Stream()
                put = Item(id=1, put=kv_pb2.PutRequest(key=b"held", value=b"v"))
                await call.write(batch_pb2.BatchRequest(items=[put]))
                await until(lambda: writer.pending == 1, "the put reaches the writer")
                assert backend.writes_in_flight == 1
                items = item_tasks()
                assert len(items) == 1
                if ending == "the client cancels":
                    call.cancel()
                else:
                    await server.stop(None)
                await until(lambda: backend.batch.streams == 0, "the handler ends")
                done = [t.done() for t in items]
                in_flight, pending = backend.writes_in_flight, writer.pending
            await until(lambda: writer.pending == 0, "the write commits")
            await asyncio.sleep(0.05)  # room for a late, second count down
            after = backend.writes_in_flight, writer.pending
            return done, in_flight, pending, *after, store.get(b"held")

    done, in_flight, pending, in_flight_after, pending_after, stored = asyncio.run(main())
    assert done == [True]
    assert (in_flight, pending) == (0, 1)
    assert (in_flight_after, pending_after) == (0, 0)
    assert stored == b"v"


def test_an_outbox_whose_writer_failed_drops_what_is_put_after() -> None:
    """The write raised, so the writer task ended: an item put after that is dropped, not
    queued for a writer that will never take it (a stream's queue growing with every answer)
    and not raised into the task that puts it; flush() returns at once."""

    async def main() -> tuple[list[int], int]:
        written: list[int] = []

        async def write(items: list[Any]) -> None:
            written.extend(item.id for item in items)
            raise ConnectionError("the peer went away")

        outbox = Outbox(write, "test")
        outbox.put(Item(id=1))
        with contextlib.suppress(ConnectionError):
            await outbox.task
        for ident in range(2, 100):
            outbox.put(Item(id=ident))
        async with asyncio.timeout(1):
            await outbox.flush()
        queued = len(outbox._queue)
        outbox.close()
        return written, queued

    assert asyncio.run(main()) == ([1], 0)


def test_a_batch_stream_whose_answers_cannot_be_written_ends(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Writing an answer to the server raises (injected in BatchServicer._send): the backend
    ends the stream at once with an error status saying so, and logs a WARNING, while the
    server keeps its end open. Otherwise it would wait for the server's next message with
    nobody to write its answers, and the calls on the stream would wait until their
    deadlines."""

    async def main() -> tuple[grpc.StatusCode, str, int]:
        async with serving_backend(tmp_path) as (backend, channel, _):

            async def broken(context: Any, answers: Any) -> None:
                raise ConnectionError("the write failed on purpose")

            backend.batch._send = broken  # type: ignore[method-assign]
            call = batch_pb2_grpc.BatchStub(channel).Stream()
            get = Item(id=1, get=kv_pb2.GetRequest(key=b"missing"))
            await call.write(batch_pb2.BatchRequest(items=[get]))
            await read_all(call)  # never done_writing: the server's end stays open
            await until(lambda: backend.batch.streams == 0, "the handler ends")
            return await call.code(), await call.details(), len(item_tasks())

    caplog.set_level(logging.WARNING)
    code, details, left = asyncio.run(main())
    assert code == grpc.StatusCode.UNKNOWN, (code, details)
    assert "writing an answer" in details
    assert "the write failed on purpose" in details
    assert left == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("could not be written" in r.getMessage() for r in warnings), caplog.records


def test_a_batch_stream_whose_answers_cannot_be_written_ends_with_an_item_still_running(
    tmp_path: Path,
) -> None:
    """The server closed its end after a Get and a Put, the Put held in its commit: when the
    Get's answer cannot be written, the stream ends then (UNKNOWN), not once the Put's commit
    is done, which could be a replica's acknowledgement or a slow disk away. The Put still
    commits, as a write whose caller left does."""

    async def main() -> tuple[grpc.StatusCode, Any, bytes | None]:
        async with serving_backend(tmp_path) as (backend, channel, _):
            assert backend.store is not None
            assert backend.writer is not None
            store, writer = backend.store, backend.writer

            async def broken(context: Any, answers: Any) -> None:
                await asyncio.sleep(0.2)  # the handler has seen the end of the server's side
                raise ConnectionError("the write failed on purpose")

            backend.batch._send = broken  # type: ignore[method-assign]
            with commits_held(store) as release:
                call = batch_pb2_grpc.BatchStub(channel).Stream()
                put = Item(id=1, put=kv_pb2.PutRequest(key=b"held", value=b"v"))
                get = Item(id=2, get=kv_pb2.GetRequest(key=b"missing"))
                await call.write(batch_pb2.BatchRequest(items=[put, get]))
                await call.done_writing()
                await until(lambda: writer.pending == 1, "the put reaches the writer")
                await until(lambda: backend.batch.streams == 0, "the handler ends")
                held = (release.is_set(), writer.pending)
            await until(lambda: writer.pending == 0, "the put commits")
            return await call.code(), held, store.get(b"held")

    code, held, stored = asyncio.run(main())
    assert code == grpc.StatusCode.UNKNOWN
    assert held == (False, 1), "the stream ended only once the put was released"
    assert stored == b"v"


def test_a_server_stream_whose_write_fails_fails_its_calls_and_the_next_opens_another() -> None:
    """The server's side (batching._Stream): writing a message to the backend raises, so its
    Outbox's writer task ends. The call in that message is sent once more on a new stream and,
    when that write fails too, fails UNAVAILABLE at once saying the write failed (not
    DEADLINE_EXCEEDED at its deadline); once writes work again the next call is answered on
    a new stream."""
    servicer = Scripted()

    async def body(batcher: Batcher) -> tuple[Any, Any, bool]:
        await get(batcher, b"open")
        stream = batcher._stream
        assert stream is not None

        async def broken(message: Any) -> None:
            raise ConnectionError("the write failed on purpose")

        opened = batcher._stub.Stream

        def opened_broken(*args: Any, **kwargs: Any) -> Any:
            call = opened(*args, **kwargs)
            call.write = broken  # type: ignore[method-assign,assignment]
            return call

        stream.call.write = broken  # type: ignore[method-assign,assignment]
        batcher._stub.Stream = opened_broken  # type: ignore[assignment]
        lost = await get(batcher, b"lost", timeout=5)
        batcher._stub.Stream = opened
        after = await get(batcher, b"after")
        return lost, after, batcher._stream is not stream

    lost, after, reopened = asyncio.run(with_server(body, servicer))
    assert lost.code() == grpc.StatusCode.UNAVAILABLE, lost
    assert "writing to it failed" in lost.details()
    assert "the write failed on purpose" in lost.details()
    assert servicer.seen == [b"open", b"after"]
    assert (after.value, reopened) == (b"after", True)
