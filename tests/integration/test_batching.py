"""The server's batch stream to each backend (kvstack.batching, kvstack.v1.Batch), between real
processes over loopback: many calls in flight answered each as its own, with its own status,
deadline and cancellation; a broken stream fails its calls UNAVAILABLE and the next call opens
another; a draining backend answers what it runs and ends its streams at once.

Most tests drive a `Batcher` (what the server holds per backend) against a real backend
process, so that the server's retries do not hide what one stream did; the burst and the large
values go through the server."""

from __future__ import annotations

import asyncio
import re
import signal
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import lmdb
from grpc import aio

from kvstack import batching, validation
from kvstack.batching import Batcher
from kvstack.dev.processes import ServiceProcess, free_port
from kvstack.runtime import CHANNEL_OPTIONS
from kvstack.v1 import batch_pb2, batch_pb2_grpc, kv_pb2, kv_pb2_grpc
from tests.conftest import Spawn, Stack, start_stack

T = TypeVar("T")


def run_with_batcher(target: str, body: Callable[[Batcher], Awaitable[T]]) -> T:
    """Run `body` with a Batcher on a channel to `target`, as the server's Directory makes it."""

    async def main() -> T:
        channel = aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        batcher = Batcher(channel, target)
        try:
            return await body(batcher)
        finally:
            await batcher.close()
            await channel.close()

    return asyncio.run(main())


async def outcome(call: Awaitable[Any]) -> Any:
    """The reply, or the AioRpcError it raised."""
    try:
        return await call
    except aio.AioRpcError as err:
        return err


def test_a_burst_of_calls_through_the_server_is_answered_call_by_call(stack: Stack) -> None:
    """300 concurrent puts, then gets, deletes and lists of distinct keys through the server:
    each call gets its own answer (its own value back, created once, NOT_FOUND after delete)."""

    async def main() -> None:
        async with aio.insecure_channel(stack.server.target) as channel:
            kv = kv_pb2_grpc.KeyValueStub(channel)
            keys = [f"burst/{i:03d}".encode() for i in range(300)]
            puts = await asyncio.gather(
                *(kv.Put(kv_pb2.PutRequest(key=k, value=k[::-1]), timeout=20) for k in keys)
            )
            assert all(p.created for p in puts)
            gets = await asyncio.gather(
                *(kv.Get(kv_pb2.GetRequest(key=k), timeout=20) for k in keys)
            )
            assert [g.value for g in gets] == [k[::-1] for k in keys]
            pages = await asyncio.gather(
                *(
                    kv.List(kv_pb2.ListRequest(prefix=f"burst/{d}".encode()), timeout=20)
                    for d in range(3)
                )
            )
            assert [len(p.entries) for p in pages] == [100, 100, 100]
            await asyncio.gather(
                *(kv.Delete(kv_pb2.DeleteRequest(key=k), timeout=20) for k in keys[::2])
            )
            after = await asyncio.gather(
                *(outcome(kv.Get(kv_pb2.GetRequest(key=k), timeout=20)) for k in keys)
            )
            for i, got in enumerate(after):
                if i % 2:
                    assert got.value == keys[i][::-1]
                else:
                    assert got.code() == grpc.StatusCode.NOT_FOUND
                    assert keys[i].decode() in got.details()

    asyncio.run(main())


def test_each_item_keeps_its_code_and_message(spawn: Spawn, tmp_path: Path) -> None:
    """In one burst on one stream, each refusal is its own: NOT_FOUND, INVALID_ARGUMENT (the
    backend's own check), RESOURCE_EXHAUSTED (the map full) beside puts that succeed; and a
    write sent to a replica is FAILED_PRECONDITION saying where writes go."""
    ports = [free_port(), free_port()]
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)

    def backend(ordinal: int) -> ServiceProcess:
        env = {
            "KVSTACK_DATA_DIR": str(tmp_path / f"data-{ordinal}"),
            "KVSTACK_ORDINAL": str(ordinal),
            "KVSTACK_BACKEND_TARGET": peers,
            "KVSTACK_MAP_SIZE": "256KiB",
        }
        return spawn("backend", env, port=ports[ordinal])

    primary = backend(0).wait_serving()
    replica = backend(1)

    async def on_primary(batcher: Batcher) -> list[Any]:
        return await asyncio.gather(
            outcome(batcher.call("Get", kv_pb2.GetRequest(key=b"missing"), 10)),
            outcome(batcher.call("Put", kv_pb2.PutRequest(key=b"", value=b"v"), 10)),
            outcome(batcher.call("Put", kv_pb2.PutRequest(key=b"big", value=b"x" * 900_000), 10)),
            outcome(batcher.call("Delete", kv_pb2.DeleteRequest(key=b"missing"), 10)),
            *(
                outcome(batcher.call("Put", kv_pb2.PutRequest(key=b"k%d" % i, value=b"v"), 10))
                for i in range(20)
            ),
        )

    missing, empty, big, deleted, *puts = run_with_batcher(primary.target, on_primary)
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    assert missing.details() == "no value for key 'missing'"
    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "key" in empty.details()
    assert big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "KVSTACK_MAP_SIZE" in big.details()
    assert deleted.code() == grpc.StatusCode.NOT_FOUND
    assert "nothing was deleted" in deleted.details()
    assert all(p.created for p in puts), puts

    replica.wait_serving()

    async def on_replica(batcher: Batcher) -> Any:
        return await outcome(batcher.call("Put", kv_pb2.PutRequest(key=b"r", value=b"v"), 10))

    refused = run_with_batcher(replica.target, on_replica)
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is a read replica; writes go to the primary (ordinal 0)" in refused.details()


def test_a_deadline_on_a_frozen_backend_fails_that_call_only(stack: Stack) -> None:
    """The backend frozen (SIGSTOP): a get with a 0.5 s deadline fails DEADLINE_EXCEEDED in
    about 0.5 s, while a get with 10 s on the same stream is answered once the backend resumes,
    and the stream goes on serving (no new stream was opened)."""

    async def body(batcher: Batcher) -> None:
        await batcher.call("Put", kv_pb2.PutRequest(key=b"f", value=b"v"), 10)
        stream = batcher._stream
        stack.backend.signal(signal.SIGSTOP)
        try:
            patient = asyncio.create_task(batcher.call("Get", kv_pb2.GetRequest(key=b"f"), 10))
            started = time.monotonic()
            hurried = await outcome(batcher.call("Get", kv_pb2.GetRequest(key=b"f"), 0.5))
            took = time.monotonic() - started
            await asyncio.sleep(1)
        finally:
            stack.backend.signal(signal.SIGCONT)
        assert hurried.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0.4 < took < 1.5
        assert (await patient).value == b"v"
        assert (await batcher.call("Get", kv_pb2.GetRequest(key=b"f"), 5)).value == b"v"
        assert batcher._stream is stream

    run_with_batcher(stack.backend.target, body)


def test_a_cancelled_caller_leaves_the_others_on_its_stream_alone(stack: Stack) -> None:
    """Calls queued on a frozen backend; half their callers are cancelled; once the backend
    resumes the other half get their own answers on the same stream, and later calls too."""

    async def body(batcher: Batcher) -> None:
        await batcher.call("Put", kv_pb2.PutRequest(key=b"c", value=b"v"), 10)
        stream = batcher._stream
        stack.backend.signal(signal.SIGSTOP)
        try:
            calls = [
                asyncio.create_task(
                    batcher.call("Put", kv_pb2.PutRequest(key=b"c%d" % i, value=b"%d" % i), 20)
                )
                for i in range(20)
            ]
            await asyncio.sleep(0.3)
            for task in calls[::2]:
                task.cancel()
        finally:
            stack.backend.signal(signal.SIGCONT)
        done = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(d, asyncio.CancelledError) for d in done[::2])
        assert all(isinstance(d, kv_pb2.PutResponse) and d.created for d in done[1::2]), done
        got = await batcher.call("Get", kv_pb2.GetRequest(key=b"c3"), 5)
        assert got.value == b"3"
        assert batcher._stream is stream

    run_with_batcher(stack.backend.target, body)


def test_a_killed_backend_fails_its_pending_calls_unavailable_then_calls_resume(
    stack: Stack, spawn: Spawn
) -> None:
    """Calls pending on a frozen backend that is then killed (SIGKILL) fail UNAVAILABLE at once,
    not at their 20 s deadline (their one retry, on a new stream, is refused at once too); with
    the backend started again on its files, calls open a new stream and work as soon as gRPC's
    reconnect backoff lets the channel connect (a call during that backoff fails fast
    UNAVAILABLE, as a unary call does; the server's own retries wait it out)."""

    async def body(batcher: Batcher) -> None:
        await batcher.call("Put", kv_pb2.PutRequest(key=b"kept", value=b"v"), 10)
        stack.backend.signal(signal.SIGSTOP)
        pending = [
            asyncio.create_task(outcome(batcher.call("Get", kv_pb2.GetRequest(key=b"kept"), 20)))
            for _ in range(5)
        ]
        await asyncio.sleep(0.3)
        started = time.monotonic()
        stack.backend.signal(signal.SIGKILL)
        failed = await asyncio.gather(*pending)
        assert time.monotonic() - started < 5
        assert {f.code() for f in failed} == {grpc.StatusCode.UNAVAILABLE}
        assert "batch stream" in failed[0].details()
        await asyncio.to_thread(stack.backend.wait)
        restarted = spawn(
            "backend", {"KVSTACK_DATA_DIR": str(stack.data_dir)}, port=stack.backend.port
        )
        await asyncio.to_thread(restarted.wait_serving)
        until = time.monotonic() + 10
        while True:
            got = await outcome(batcher.call("Get", kv_pb2.GetRequest(key=b"kept"), 5))
            if not isinstance(got, aio.AioRpcError) or time.monotonic() > until:
                break
            assert got.code() == grpc.StatusCode.UNAVAILABLE, got
            await asyncio.sleep(0.2)
        assert got.value == b"v"

    run_with_batcher(stack.backend.target, body)


def test_sixteen_largest_puts_at_once_through_the_server(stack: Stack) -> None:
    """16 concurrent puts of a 1 MiB value under a 511-byte key (the limits): each fits a
    message of the stream alone, and every one is stored whole."""
    value = bytes(range(256)) * 4096  # 1 MiB

    async def main() -> None:
        async with aio.insecure_channel(stack.server.target) as channel:
            kv = kv_pb2_grpc.KeyValueStub(channel)
            keys = [b"%02d" % i + b"k" * 509 for i in range(16)]
            puts = await asyncio.gather(
                *(kv.Put(kv_pb2.PutRequest(key=k, value=value), timeout=30) for k in keys)
            )
            assert all(p.created for p in puts)
            gets = await asyncio.gather(
                *(kv.Get(kv_pb2.GetRequest(key=k), timeout=30) for k in keys)
            )
            assert all(g.value == value for g in gets)

    asyncio.run(main())


def test_a_draining_backend_answers_its_writes_and_ends_the_stream(
    spawn: Spawn, tmp_path: Path
) -> None:
    """SIGTERM during a burst of writes on the stream: each write is answered (OK, or the
    drain's UNAVAILABLE, or UNAVAILABLE for what had not reached it); exactly the writes
    answered OK are stored (none applied but answered as failed), and the backend exits well
    within its 20 s grace period (the stream does not hold it open)."""
    data = tmp_path / "data"
    backend = spawn(
        "backend", {"KVSTACK_DATA_DIR": str(data), "KVSTACK_SHUTDOWN_GRACE": "20"}
    ).wait_serving()

    async def body(batcher: Batcher) -> tuple[list[Any], float]:
        await batcher.call("Put", kv_pb2.PutRequest(key=b"warm", value=b"v"), 10)
        writes = [
            asyncio.create_task(
                outcome(batcher.call("Put", kv_pb2.PutRequest(key=b"d%d" % i, value=b"v"), 15))
            )
            for i in range(200)
        ]
        # SIGTERM as soon as the first write is answered, the others still in flight
        await asyncio.wait(writes, return_when=asyncio.FIRST_COMPLETED)
        backend.signal(signal.SIGTERM)
        started = time.monotonic()
        results = await asyncio.gather(*writes)
        assert await asyncio.to_thread(backend.wait) == 0
        return results, time.monotonic() - started

    results, took = run_with_batcher(backend.target, body)
    assert took < 5, f"the drain took {took:.1f} s"
    answered = [i for i, r in enumerate(results) if isinstance(r, kv_pb2.PutResponse)]
    refused = [r for r in results if not isinstance(r, kv_pb2.PutResponse)]
    assert answered, "no write in flight was answered"
    assert {r.code() for r in refused} <= {grpc.StatusCode.UNAVAILABLE}
    restarted = spawn("backend", {"KVSTACK_DATA_DIR": str(data)}).wait_serving()
    with grpc.insecure_channel(restarted.target) as channel:
        listed = kv_pb2_grpc.KeyValueStub(channel).List(
            kv_pb2.ListRequest(prefix=b"d", page_size=1000), timeout=5
        )
    assert sorted(e.key for e in listed.entries) == sorted(b"d%d" % i for i in answered)


def test_a_draining_replica_ends_its_stream_at_once(spawn: Spawn, tmp_path: Path) -> None:
    """A replica (here with no primary to follow) with the server's stream open to it stops
    on SIGTERM well within its 20 s grace period: the stream ends instead of holding it."""
    replica = spawn(
        "backend",
        {
            "KVSTACK_DATA_DIR": str(tmp_path / "data"),
            "KVSTACK_ORDINAL": "1",
            "KVSTACK_BACKEND_TARGET": f"127.0.0.1:{free_port()}",
            "KVSTACK_SHUTDOWN_GRACE": "20",
        },
    ).wait_serving()

    async def body(batcher: Batcher) -> float:
        await outcome(batcher.call("Get", kv_pb2.GetRequest(key=b"k"), 5))  # the stream is open
        assert batcher._stream is not None
        replica.signal(signal.SIGTERM)
        started = time.monotonic()
        assert await asyncio.to_thread(replica.wait) == 0
        return time.monotonic() - started

    took = run_with_batcher(replica.target, body)
    assert took < 5, f"the drain took {took:.1f} s"


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus family's samples `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if match is None or match[1] != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', match[2] or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(match[3])
    return total


def test_metrics_count_each_batched_item_as_its_call(spawn: Spawn, tmp_path: Path) -> None:
    """The backend's /metrics after a burst through the server: each item is a KeyValue call
    with its code (Put OK, Get NOT_FOUND), and kvstack_backend_batch_items shows messages that
    carried more than one item. A Batch stream that ended (one opened here, given one Get and
    closed) is not itself counted as a call: only its item is."""
    port = free_port()
    stack = start_stack(spawn, tmp_path / "data", KVSTACK_METRICS_PORT=str(port))

    async def main() -> None:
        async with aio.insecure_channel(stack.server.target) as channel:
            kv = kv_pb2_grpc.KeyValueStub(channel)
            await asyncio.gather(
                *(
                    kv.Put(kv_pb2.PutRequest(key=b"m%d" % i, value=b"v"), timeout=20)
                    for i in range(200)
                )
            )
            await asyncio.gather(
                *(
                    outcome(kv.Get(kv_pb2.GetRequest(key=b"none%d" % i), timeout=20))
                    for i in range(30)
                )
            )
        async with aio.insecure_channel(stack.backend.target) as channel:
            call = batch_pb2_grpc.BatchStub(channel).Stream()
            item = batch_pb2.BatchRequest.Item(id=1, get=kv_pb2.GetRequest(key=b"m0"))
            await call.write(batch_pb2.BatchRequest(items=[item]))
            async with asyncio.timeout(10):
                reply = await call.read()
            assert isinstance(reply, batch_pb2.BatchResponse), reply
            assert [answer.get.value for answer in reply.answers] == [b"v"]
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK

    asyncio.run(main())
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    handled = "grpc_server_handled_total"
    kv_service = "kvstack.v1.KeyValue"
    assert metric(text, handled, grpc_service=kv_service, grpc_method="Put", grpc_code="OK") == 200
    assert (
        metric(text, handled, grpc_service=kv_service, grpc_method="Get", grpc_code="NOT_FOUND")
        == 30
    )
    assert metric(text, handled, grpc_service=kv_service, grpc_method="Get", grpc_code="OK") == 1
    assert metric(text, handled, grpc_service="kvstack.v1.Batch") == 0
    assert metric(text, "grpc_server_handling_seconds_count", grpc_method="Put") == 200
    items = metric(text, "kvstack_backend_batch_items_sum", direction="requests")
    messages = metric(text, "kvstack_backend_batch_items_count", direction="requests")
    assert items == 231
    assert messages < items, "no message carried more than one item"


def test_the_server_does_not_export_the_backends_batch_histogram(
    spawn: Spawn, tmp_path: Path
) -> None:
    """kvstack_backend_batch_items is the backend's (it counts what the backend received and
    sent): the server's /metrics, after calls that went over its batch stream, has no such
    family, while the server's own gRPC metrics are there (the page was read)."""
    port = free_port()
    backend = spawn("backend", {"KVSTACK_DATA_DIR": str(tmp_path / "data")}).wait_serving()
    server = spawn(
        "server",
        {"KVSTACK_BACKEND_TARGET": f"dns:///{backend.target}", "KVSTACK_METRICS_PORT": str(port)},
    ).wait_serving()

    async def main() -> None:
        async with aio.insecure_channel(server.target) as channel:
            kv = kv_pb2_grpc.KeyValueStub(channel)
            await kv.Put(kv_pb2.PutRequest(key=b"s", value=b"v"), timeout=10)

    asyncio.run(main())
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    assert metric(text, "grpc_server_handled_total", grpc_method="Put") == 1
    assert "kvstack_backend_batch_items" not in text


def test_a_backend_refuses_a_receive_limit_below_the_servers_batches(
    spawn: Spawn, tmp_path: Path
) -> None:
    """KVSTACK_MAX_RECEIVE_BYTES one byte below validation.MIN_BACKEND_RECEIVE_BYTES: the
    backend does not start (exit code 2) and its log says the minimum, why and what to set. At
    exactly the minimum it starts and takes a batch message of exactly MESSAGE_BYTES (five
    puts), then answers gets of those values (answer messages up to MESSAGE_BYTES too). What
    this cannot show: a server whose own limits differ; only the backend's setting is varied."""
    minimum = validation.MIN_BACKEND_RECEIVE_BYTES
    small = spawn(
        "backend",
        {
            "KVSTACK_DATA_DIR": str(tmp_path / "small"),
            "KVSTACK_MAX_RECEIVE_BYTES": str(minimum - 1),
        },
    )
    assert small.wait() == 2
    logs = small.logs()
    assert f"KVSTACK_MAX_RECEIVE_BYTES={minimum - 1} is too small for a backend" in logs
    assert f"give at least {minimum} bytes" in logs
    assert "batch messages" in logs

    backend = spawn(
        "backend",
        {"KVSTACK_DATA_DIR": str(tmp_path / "data"), "KVSTACK_MAX_RECEIVE_BYTES": str(minimum)},
    ).wait_serving()
    Put = batch_pb2.BatchRequest.Item
    items = [
        Put(id=i, put=kv_pb2.PutRequest(key=b"min/%d" % i, value=b"v" * 500_000)) for i in range(4)
    ]
    last = Put(id=4, put=kv_pb2.PutRequest(key=b"min/4"))
    size = batching.MESSAGE_BYTES - batch_pb2.BatchRequest(items=[*items, last]).ByteSize()
    while True:  # the fifth value's length that makes the message exactly MESSAGE_BYTES
        last.put.value = b"v" * size
        over = batch_pb2.BatchRequest(items=[*items, last]).ByteSize() - batching.MESSAGE_BYTES
        if over <= 0:
            break
        size -= over
    message = batch_pb2.BatchRequest(items=[*items, last])
    assert message.ByteSize() == batching.MESSAGE_BYTES == minimum

    async def answers(call: Any, count: int) -> dict[int, Any]:
        got: dict[int, Any] = {}
        while len(got) < count:
            async with asyncio.timeout(10):
                reply = await call.read()
            assert reply is not aio.EOF, await call.details()
            got.update((answer.id, answer) for answer in reply.answers)
        return got

    async def main() -> tuple[dict[int, Any], dict[int, Any]]:
        async with aio.insecure_channel(backend.target) as channel:
            call = batch_pb2_grpc.BatchStub(channel).Stream()
            await call.write(message)
            puts = await answers(call, 5)
            gets = [
                Put(id=10 + i, get=kv_pb2.GetRequest(key=item.put.key))
                for i, item in enumerate(message.items)
            ]
            await call.write(batch_pb2.BatchRequest(items=gets))
            values = await answers(call, 5)
            await call.done_writing()
            return puts, values

    puts, values = asyncio.run(main())
    assert [(a.code, a.put.created) for a in puts.values()] == [(0, True)] * 5
    assert [len(values[10 + i].get.value) for i in range(5)] == [
        len(item.put.value) for item in message.items
    ]


def test_the_server_gives_a_write_without_a_request_id_one(stack: Stack) -> None:
    """A Put and a Delete sent to the server with no request_id (kv.proto makes it optional) are
    stored by the backend under a request id the server gave them, so the server's own tries
    of them (a stream that broke after the backend applied one) are applied once; a Put sent to
    the backend directly without one records none, which shows that the count below sees only
    the server's ids."""
    with grpc.insecure_channel(stack.backend.target) as channel:
        kv_pb2_grpc.KeyValueStub(channel).Put(kv_pb2.PutRequest(key=b"direct"), timeout=5)
    assert request_ids(stack.data_dir) == 0
    with grpc.insecure_channel(stack.server.target) as channel:
        kv = kv_pb2_grpc.KeyValueStub(channel)
        assert kv.Put(kv_pb2.PutRequest(key=b"anonymous", value=b"v"), timeout=5).created
        kv.Delete(kv_pb2.DeleteRequest(key=b"anonymous"), timeout=5)
    assert request_ids(stack.data_dir) == 2


def request_ids(data_dir: Path) -> int:
    """How many request ids the backend's LMDB holds (read beside the running backend)."""
    env = lmdb.open(str(data_dir), readonly=True, max_dbs=5, lock=True)
    try:
        with env.begin() as txn:
            return int(txn.stat(env.open_db(b"requests", txn=txn, create=False))["entries"])
    finally:
        env.close()
