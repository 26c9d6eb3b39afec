"""kvstack.batching on its own: the Outbox's coalescing, and a Batcher against a real in-process
grpc.aio server whose Batch servicer answers as the test says."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc import aio

from kvstack import batching, validation
from kvstack.batching import Batcher, Outbox
from kvstack.v1 import batch_pb2, batch_pb2_grpc, kv_pb2

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
        big = b"x" * (1 << 20)  # two of these and a key fit 2 MiB, three do not
        for ident in range(6, 9):
            outbox.put(Item(id=ident, put=kv_pb2.PutRequest(key=b"k" * 511, value=big)))
        release.set()
        await outbox.flush()
        outbox.close()
        return sent

    assert asyncio.run(main()) == [[1], [2, 3, 4, 5, 6], [7], [8]]


class Scripted(batch_pb2_grpc.BatchServicer):
    """Answers a Get with the key as its value; the key b"refuse" with UNAVAILABLE and a
    pushback trailer; the key b"hold" never; the key b"break" by ending the stream with an
    error, and b"break-once" so the first time only. `seen` holds every key received."""

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
                    await context.abort(grpc.StatusCode.INTERNAL, "broken on purpose")
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
    """A 511-byte key and the largest value KVSTACK_MAX_VALUE_BYTES may allow fit one message's
    budget, so a put never waits for a message that cannot hold it."""
    item = Item(
        id=2**63,
        put=kv_pb2.PutRequest(
            key=b"k" * 511, value=b"v" * validation.MAX_VALUE_LIMIT_BYTES, request_id="r" * 64
        ),
    )
    assert item.ByteSize() < batching.MESSAGE_BYTES
