"""Writes ride out a primary restart, and a write repeated after a lost answer is applied once.

Real processes over loopback: a backend (the primary) and a server in front of it.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import grpc
import pytest

from kvstack.client import Client
from kvstack.v1 import kv_pb2, kv_pb2_grpc
from tests.conftest import Spawn, Stack


def test_a_write_waits_for_a_restarting_primary(stack: Stack, spawn: Spawn) -> None:
    """With the primary stopped, a put through the server is held, not failed: it lands as
    soon as the primary is back (4 s later here), within the client's write deadline, in one
    attempt (no client retry was needed)."""
    stack.backend.signal(signal.SIGTERM)
    assert stack.backend.wait() == 0
    result: dict[str, object] = {}

    def write() -> None:
        client = Client(stack.server.target, verbose=False, write_timeout=30)
        started = time.monotonic()
        try:
            result["created"] = client.put(b"held", b"v")
        except Exception as err:  # noqa: BLE001 - the test reports whatever the write raised
            result["error"] = err
        result["seconds"] = time.monotonic() - started
        result["retries"] = client.retries
        client.close()

    writer = threading.Thread(target=write)
    writer.start()
    time.sleep(4)
    assert writer.is_alive(), f"the write did not wait: {result}"
    spawn("backend", {"KVSTACK_DATA_DIR": str(stack.data_dir)}, port=stack.backend.port)
    writer.join(40)
    assert "error" not in result, result
    assert result["created"] is True
    assert result["retries"] == 0
    assert 4 <= float(str(result["seconds"])) < 30


def test_a_write_with_no_primary_fails_saying_how_long_it_waited(stack: Stack) -> None:
    """With no primary coming back, a put with a 2 s deadline fails with UNAVAILABLE (which the
    client may retry) and a sentence that says it waited and what it waited for."""
    stack.backend.signal(signal.SIGTERM)
    assert stack.backend.wait() == 0
    with grpc.insecure_channel(stack.server.target) as channel:
        stub = kv_pb2_grpc.KeyValueStub(channel)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as raised:
            stub.Put(kv_pb2.PutRequest(key=b"k", value=b"v", request_id="r1"), timeout=2)
        took = time.monotonic() - started
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "waited" in str(raised.value.details())
    assert "may or may not have been applied" in str(raised.value.details())
    assert 1.5 <= took < 2.5


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
