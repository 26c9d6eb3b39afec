"""Writes and reads ride out a backend restart; a write repeated after a lost answer applies once.

Real processes over loopback: a backend (the primary) and a server in front of it.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from kvstack.client import Client
from kvstack.v1 import kv_pb2, kv_pb2_grpc
from tests.conftest import Spawn, Stack


def held_while_the_backend_restarts(
    stack: Stack, spawn: Spawn, call: Callable[[Client], object], down_s: float
) -> dict[str, object]:
    """With the only backend stopped, make `call` in a thread; check it is still waiting
    `down_s` seconds later, start the backend again on its files, and return what the call
    returned ("value") or raised ("error"), how long it took and the client's retries."""
    stack.backend.signal(signal.SIGTERM)
    assert stack.backend.wait() == 0
    result: dict[str, object] = {}

    def run() -> None:
        client = Client(stack.server.target, verbose=False, timeout=30, write_timeout=30)
        started = time.monotonic()
        try:
            result["value"] = call(client)
        except Exception as err:  # noqa: BLE001 - the test reports whatever the call raised
            result["error"] = err
        result["seconds"], result["retries"] = time.monotonic() - started, client.retries
        client.close()

    caller = threading.Thread(target=run)
    caller.start()
    time.sleep(down_s)
    assert caller.is_alive(), f"the call did not wait: {result}"
    spawn("backend", {"KVSTACK_DATA_DIR": str(stack.data_dir)}, port=stack.backend.port)
    caller.join(40)
    assert "error" not in result, result
    return result


def test_a_write_waits_for_a_restarting_primary(stack: Stack, spawn: Spawn) -> None:
    """With the primary stopped, a put through the server is held, not failed: it lands as
    soon as the primary is back (4 s later here), within the client's write deadline, in one
    attempt (no client retry was needed)."""
    result = held_while_the_backend_restarts(stack, spawn, lambda c: c.put(b"held", b"v"), 4)
    assert result["value"] is True  # created
    assert result["retries"] == 0
    assert 4 <= float(str(result["seconds"])) < 30


def test_a_write_rides_out_a_primary_frozen_longer_than_an_attempt(stack: Stack) -> None:
    """The primary frozen (SIGSTOP) for 7 s, longer than one forwarded attempt may take
    (KVSTACK_BACKEND_TIMEOUT, 5 s): the server sends the put again within the caller's 30 s
    deadline, and it lands once the primary resumes, in one client attempt, applied once."""
    client = Client(stack.server.target, verbose=False, write_timeout=30)
    result: dict[str, object] = {}

    def write() -> None:
        started = time.monotonic()
        try:
            result["created"] = client.put(b"frozen", b"v")
        except Exception as err:  # noqa: BLE001 - the test reports whatever the write raised
            result["error"] = err
        result["seconds"] = time.monotonic() - started

    writer = threading.Thread(target=write)
    stack.backend.signal(signal.SIGSTOP)
    try:
        writer.start()
        time.sleep(7)
    finally:
        stack.backend.signal(signal.SIGCONT)
    writer.join(40)
    assert "error" not in result, result
    assert result["created"] is True
    assert client.retries == 0
    assert 7 <= float(str(result["seconds"])) < 30
    reply = kv_pb2_grpc.KeyValueStub(client.channel).Get(
        kv_pb2.GetRequest(key=b"frozen", latest=True), timeout=5
    )
    assert reply.value == b"v"


@pytest.mark.parametrize(
    ("method", "request_", "says"),
    [
        ("Put", kv_pb2.PutRequest(key=b"k", value=b"v", request_id="r1"),
         "may or may not have been applied"),
        ("Get", kv_pb2.GetRequest(key=b"k"), "could answer the read in the"),
    ],
)  # fmt: skip
def test_a_call_with_no_backend_coming_back_fails_saying_how_long_it_waited(
    stack: Stack, method: str, request_: object, says: str
) -> None:
    """With no backend coming back, a put (or a read from any backend) with a 2 s deadline
    fails with UNAVAILABLE (which the client may retry) and a sentence that says it waited,
    what it waited for and, for a write, that it may or may not have been applied."""
    stack.backend.signal(signal.SIGTERM)
    assert stack.backend.wait() == 0
    with grpc.insecure_channel(stack.server.target) as channel:
        call = getattr(kv_pb2_grpc.KeyValueStub(channel), method)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as raised:
            call(request_, timeout=2)
        took = time.monotonic() - started
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "waited" in str(raised.value.details())
    assert says in str(raised.value.details())
    assert 1.5 <= took < 2.5


def test_a_read_waits_for_a_backend_that_can_answer(stack: Stack, spawn: Spawn) -> None:
    """With no backend that can answer (the only one stopped), a read from any backend (not
    the latest) is held like a write, not failed: it is answered as soon as the backend is
    back (3 s later here), in one attempt."""
    Client(stack.server.target, verbose=False).put(b"kept", b"v")

    def read(client: Client) -> bytes:
        client.latest = False
        return client.get(b"kept")

    result = held_while_the_backend_restarts(stack, spawn, read, 3)
    assert result["value"] == b"v"
    assert result["retries"] == 0
    assert 3 <= float(str(result["seconds"])) < 30


def test_a_repeated_write_is_applied_once(stack: Stack) -> None:
    """A put whose answer was lost is sent again with the same request_id after another writer
    changed the key: the repeat gets the first answer and does not overwrite the later write
    (without the id it would: a lost update). A repeated delete answers as the first did
    (not NOT_FOUND), and a request_id over 64 characters is refused."""
    with grpc.insecure_channel(stack.server.target) as channel:
        stub = kv_pb2_grpc.KeyValueStub(channel)
        first = kv_pb2.PutRequest(key=b"acct", value=b"v1", request_id="a" * 32)
        assert stub.Put(first, timeout=10).created is True
        stub.Put(kv_pb2.PutRequest(key=b"acct", value=b"v2", request_id="b" * 32), timeout=10)
        assert stub.Put(first, timeout=10).created is True  # the first answer, again
        assert stub.Get(kv_pb2.GetRequest(key=b"acct", latest=True), timeout=10).value == b"v2"
        gone = kv_pb2.DeleteRequest(key=b"acct", request_id="c" * 32)
        stub.Delete(gone, timeout=10)
        stub.Delete(gone, timeout=10)  # the repeat: no NOT_FOUND
        with pytest.raises(grpc.RpcError) as raised:
            stub.Delete(kv_pb2.DeleteRequest(key=b"acct", request_id="d" * 32), timeout=10)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND  # a new delete: nothing left
        with pytest.raises(grpc.RpcError) as raised:
            stub.Put(kv_pb2.PutRequest(key=b"x", value=b"y", request_id="e" * 65), timeout=10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_repeats_survive_a_primary_restart(stack: Stack, spawn: Spawn, tmp_path: Path) -> None:
    """The request ids are kept in LMDB with the writes: after a kill -9 and restart of the
    primary, a repeat of a write made before is still recognised."""
    with grpc.insecure_channel(stack.server.target) as channel:
        stub = kv_pb2_grpc.KeyValueStub(channel)
        first = kv_pb2.PutRequest(key=b"k9", value=b"v1", request_id="f" * 32)
        assert stub.Put(first, timeout=10).created is True
        stub.Put(kv_pb2.PutRequest(key=b"k9", value=b"v2"), timeout=10)
    stack.backend.signal(signal.SIGKILL)
    stack.backend.wait()
    spawn("backend", {"KVSTACK_DATA_DIR": str(stack.data_dir)}, port=stack.backend.port)
    with grpc.insecure_channel(stack.server.target) as channel:
        stub = kv_pb2_grpc.KeyValueStub(channel)
        assert stub.Put(first, timeout=30).created is True
        assert stub.Get(kv_pb2.GetRequest(key=b"k9", latest=True), timeout=10).value == b"v2"
