"""The three services as real processes talking real gRPC over loopback, with real LMDB files."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvstack import client as client_cli
from kvstack.client import Client, Unreachable
from kvstack.dev.processes import free_port
from kvstack.v1 import kv_pb2, kv_pb2_grpc
from tests.conftest import LOOPBACK, Spawn, Stack, listeners, start_stack


@pytest.fixture
def stub(shared_stack: Stack) -> Iterator[kv_pb2_grpc.KeyValueStub]:
    """A stub for the module's shared stack: the tests using it write keys of their own."""
    channel = grpc.insecure_channel(shared_stack.server.target)
    yield kv_pb2_grpc.KeyValueStub(channel)
    channel.close()


def rpc_error(call: object, *args: object, **kwargs: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call(*args, **kwargs)  # type: ignore[operator]
    return raised.value


def test_client_batch_prints_every_response(
    shared_stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    """The client with no arguments runs the batch through server and backend, all as expected."""
    assert client_cli.main(["--target", shared_stack.server.target]) == 0
    out = capsys.readouterr().out
    assert "put 'user/1' = 'alice'" in out
    assert "-> 'bob'" in out
    assert "user/1=alice, user/3=carol" in out
    assert "10 of 10 responses as expected" in out


def test_client_subcommands(shared_stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    """put, get, list and delete work from the command line and print plain answers."""
    target = ["--target", shared_stack.server.target]
    assert client_cli.main([*target, "put", "color", "blue"]) == 0
    assert client_cli.main([*target, "get", "color"]) == 0
    assert client_cli.main([*target, "list", "co"]) == 0
    assert client_cli.main([*target, "delete", "color"]) == 0
    assert client_cli.main([*target, "get", "color"]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["created", "blue", "color=blue", "deleted"]
    assert "NOT_FOUND" in captured.err


def test_client_load_streams_its_writes_in_order_whatever_the_count(stack: Stack) -> None:
    """`load` prints each write as it is answered, in the order sent, with when it ended and
    how long it took: with a count of ten million (it used to submit every write before the
    first answer), the first lines come within seconds."""
    argv = [sys.executable, "-m", "kvstack", "client", "--target", stack.server.target, "load",
            "--count", "10000000", "--concurrency", "4", "--prefix", "load/"]  # fmt: skip
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as load:
        assert load.stdout is not None
        watchdog = threading.Timer(30, load.kill)  # ends the reads below if nothing comes
        watchdog.start()
        try:
            read = [load.stdout.readline() for _ in range(20)]
        finally:
            watchdog.cancel()
            load.kill()
    assert all(read), f"load printed {sum(map(bool, read))} lines in 30 s"
    lines = [json.loads(line) for line in read]
    assert [line["key"] for line in lines] == [f"load/{i:08d}" for i in range(20)]
    assert all(line["ack"] and line["ms"] > 0 and line["t"] > 0 for line in lines)


def test_client_exits_nonzero_when_server_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    """No server: the client retries its budget, then exits 2 saying what to do."""
    code = client_cli.main(["--target", f"127.0.0.1:{free_port()}", "--attempts", "3"])
    err = capsys.readouterr().err
    assert code == 2
    assert "did not complete the call" in err
    assert "make up" in err
    assert err.count("retrying") == 2


@pytest.mark.parametrize(
    ("key", "value_bytes", "words"),
    [
        (b"", 1, "key is empty"),
        (b"k" * 512, 1, "512 bytes"),
        (b"ok", (1 << 20) + 1, "KVSTACK_MAX_VALUE_BYTES"),
    ],
    ids=["empty-key", "512-byte-key", "oversized-value"],
)
def test_bad_puts_are_invalid_argument_and_change_nothing(
    stub: kv_pb2_grpc.KeyValueStub, key: bytes, value_bytes: int, words: str
) -> None:
    """Empty or 512-byte keys and oversized values: INVALID_ARGUMENT, a clear message, no write."""
    value = b"x" * value_bytes
    stub.Put(kv_pb2.PutRequest(key=b"ok", value=b"before"))
    err = rpc_error(stub.Put, kv_pb2.PutRequest(key=key, value=value))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in (err.details() or "")
    assert stub.Get(kv_pb2.GetRequest(key=b"ok")).value == b"before"


def test_backend_refuses_bad_input_on_its_own(shared_stack: Stack) -> None:
    """The backend does not trust its callers: called directly, it refuses an empty key too."""
    with grpc.insecure_channel(shared_stack.backend.target) as channel:
        err = rpc_error(kv_pb2_grpc.KeyValueStub(channel).Put, kv_pb2.PutRequest(key=b""))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_message_over_receive_limit_is_resource_exhausted(stub: kv_pb2_grpc.KeyValueStub) -> None:
    """A message larger than the receive limit (4 MiB) is refused by gRPC: RESOURCE_EXHAUSTED."""
    err = rpc_error(stub.Put, kv_pb2.PutRequest(key=b"huge", value=b"x" * (5 << 20)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rpc_error(stub.Get, kv_pb2.GetRequest(key=b"huge")).code() == grpc.StatusCode.NOT_FOUND


def test_full_map_is_resource_exhausted_naming_the_setting(spawn: Spawn, tmp_path: Path) -> None:
    """When LMDB's map is full the write fails with RESOURCE_EXHAUSTED naming KVSTACK_MAP_SIZE,
    and what was stored before is intact."""
    small = start_stack(spawn, tmp_path / "small", KVSTACK_MAP_SIZE="256KiB")
    with grpc.insecure_channel(small.server.target) as channel:
        stub = kv_pb2_grpc.KeyValueStub(channel)
        stub.Put(kv_pb2.PutRequest(key=b"first", value=b"kept"))
        err = rpc_error(stub.Put, kv_pb2.PutRequest(key=b"big", value=b"x" * (1 << 20)))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "KVSTACK_MAP_SIZE" in (err.details() or "")
        assert stub.Get(kv_pb2.GetRequest(key=b"first")).value == b"kept"


def test_unknown_key_is_not_found(stub: kv_pb2_grpc.KeyValueStub) -> None:
    """Get and Delete of a key that is not there: NOT_FOUND with the key in the message."""
    err = rpc_error(stub.Get, kv_pb2.GetRequest(key=b"missing"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "missing" in (err.details() or "")
    err = rpc_error(stub.Delete, kv_pb2.DeleteRequest(key=b"missing"))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_expired_deadline_is_deadline_exceeded(stub: kv_pb2_grpc.KeyValueStub) -> None:
    """A call whose deadline cannot be met ends with DEADLINE_EXCEEDED and writes nothing."""
    err = rpc_error(stub.Put, kv_pb2.PutRequest(key=b"late", value=b"v"), timeout=0.0001)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_list_pages_and_scan_streams(stub: kv_pb2_grpc.KeyValueStub) -> None:
    """List pages through every key under a prefix in order; Scan streams the same entries."""
    keys = [f"p/{i:03d}".encode() for i in range(25)]
    for key in keys:
        stub.Put(kv_pb2.PutRequest(key=key, value=key[::-1]))
    stub.Put(kv_pb2.PutRequest(key=b"q/0", value=b"other prefix"))
    seen, token, pages = [], b"", 0
    while True:
        page = stub.List(kv_pb2.ListRequest(prefix=b"p/", page_size=10, page_token=token))
        seen += [e.key for e in page.entries]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert (seen, pages) == (keys, 3)
    assert [e.key for e in stub.Scan(kv_pb2.ScanRequest(prefix=b"p/"))] == keys
    err = rpc_error(stub.List, kv_pb2.ListRequest(prefix=b"p/", page_token=b"q/0"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_health_follows_the_backend_and_shutdown(spawn: Spawn, tmp_path: Path) -> None:
    """The server says NOT_SERVING until its backend is up, SERVING then, and NOT_SERVING again
    as soon as SIGTERM arrives; it exits 0 after draining."""
    backend_port = free_port()
    server = spawn(
        "server",
        {
            "KVSTACK_BACKEND_TARGET": f"dns:///127.0.0.1:{backend_port}",
            "KVSTACK_SHUTDOWN_DELAY": "2",
        },
    )
    deadline = time.monotonic() + 10
    while server.health() != "NOT_SERVING" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.health() == "NOT_SERVING"
    time.sleep(1)
    assert server.health() == "NOT_SERVING"  # still: no backend
    spawn("backend", {"KVSTACK_DATA_DIR": str(tmp_path / "d")}, port=backend_port)
    server.wait_serving()
    server.signal(signal.SIGTERM)
    time.sleep(0.5)
    assert server.health() == "NOT_SERVING"
    assert server.wait() == 0
    assert '"message": "draining"' in server.logs()


def test_graceful_shutdown_finishes_calls_in_flight(stack: Stack) -> None:
    """SIGTERM during a long streaming call: the call still completes in full, new calls are
    refused, and the server exits 0."""
    with grpc.insecure_channel(stack.server.target) as channel:
        stub = kv_pb2_grpc.KeyValueStub(channel)
        value = b"v" * 1000
        for i in range(0, 3000, 100):
            # The batch is written by 100 concurrent futures to keep the set-up short.
            futures = [
                stub.Put.future(kv_pb2.PutRequest(key=f"g/{j:05d}".encode(), value=value))
                for j in range(i, i + 100)
            ]
            for future in futures:
                future.result()
        stream = stub.Scan(kv_pb2.ScanRequest(prefix=b"g/"))
        first = next(stream)
        stack.server.signal(signal.SIGTERM)
        time.sleep(0.3)
        received = [first.key, *(e.key for e in stream)]
    assert len(received) == 3000
    with grpc.insecure_channel(stack.server.target) as channel:
        err = rpc_error(
            kv_pb2_grpc.KeyValueStub(channel).Get, kv_pb2.GetRequest(key=b"g/00001"), timeout=2
        )
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert stack.server.wait() == 0


def test_kill_9_of_backend_loses_no_acknowledged_write(stack: Stack, spawn: Spawn) -> None:
    """Writers record every acknowledged put; the backend is SIGKILLed mid-stream and restarted
    on the same files; every acknowledged write is there afterwards."""
    acked: list[tuple[bytes, bytes]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def writer(worker: int) -> None:
        client = Client(stack.server.target, timeout=2, attempts=1, verbose=False)
        i = 0
        while not stop.is_set():
            key, value = f"w{worker}/{i:06d}".encode(), f"{worker}-{i}".encode()
            i += 1
            try:
                client.put(key, value)
            except (grpc.RpcError, Unreachable):
                continue
            with lock:
                acked.append((key, value))
        client.close()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    stack.backend.signal(signal.SIGKILL)
    stack.backend.wait()
    with lock:
        acked_before_kill = len(acked)
    restarted = spawn("backend", {"KVSTACK_DATA_DIR": str(stack.data_dir)}, port=stack.backend.port)
    restarted.wait_serving()
    time.sleep(1)
    stop.set()
    for thread in threads:
        thread.join(10)
    assert acked_before_kill > 100
    client = Client(stack.server.target, verbose=False)
    stored = {e.key: e.value for e in client.list(b"w", page_size=1000)}
    client.close()
    missing = [k for k, v in acked if stored.get(k) != v]
    assert missing == []


def test_metrics_count_requests_by_method_and_code(spawn: Spawn, tmp_path: Path) -> None:
    """/metrics on the metrics port counts calls by method and status code."""
    metrics_port = free_port()
    backend = spawn(
        "backend",
        {"KVSTACK_DATA_DIR": str(tmp_path / "m"), "KVSTACK_METRICS_PORT": str(metrics_port)},
    ).wait_serving()
    with grpc.insecure_channel(backend.target) as channel:
        stub = kv_pb2_grpc.KeyValueStub(channel)
        stub.Put(kv_pb2.PutRequest(key=b"m", value=b"1"))
        rpc_error(stub.Get, kv_pb2.GetRequest(key=b"absent"))
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    assert (
        'grpc_server_handled_total{grpc_code="OK",grpc_method="Put",'
        'grpc_service="kvstack.v1.KeyValue"} 1.0'
    ) in text
    assert 'grpc_code="NOT_FOUND",grpc_method="Get"' in text
    assert "kvstack_backend_commits_total 1.0" in text


def test_reflection_lists_the_services(shared_stack: Stack) -> None:
    """Server reflection names the API and the health service, for grpcurl and friends."""
    with grpc.insecure_channel(shared_stack.server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"kvstack.v1.KeyValue", "grpc.health.v1.Health"} <= names


def test_logs_are_json_with_one_saved_line_per_commit_and_errors_only(
    spawn: Spawn, tmp_path: Path
) -> None:
    """At the default level (INFO) the backend logs one structured 'saved' line per commit,
    naming the key it wrote; the server writes no line for a successful call that is not
    slow, and one for a call that failed, with its method and status."""
    never_slow = {"KVSTACK_SLOW_CALL": "60"}  # however busy the machine, no call here is slow
    data = {"KVSTACK_DATA_DIR": str(tmp_path / "data")}
    backend = spawn("backend", {**data, **never_slow}).wait_serving()
    server = spawn(
        "server", {"KVSTACK_BACKEND_TARGET": f"dns:///{backend.target}", **never_slow}
    ).wait_serving()
    client = Client(server.target, verbose=False)
    client.put(b"logged", b"value")
    client.close()
    with grpc.insecure_channel(server.target) as channel:
        rpc_error(kv_pb2_grpc.KeyValueStub(channel).Get, kv_pb2.GetRequest(key=b"absent"))
    time.sleep(0.2)
    saved = [json.loads(line) for line in backend.logs().splitlines() if '"saved"' in line]
    assert [(e["severity"], e["put"], e["bytes"], e["writes"]) for e in saved] == [
        ("INFO", ["logged"], 5, 1)
    ]
    responses = [json.loads(line) for line in server.logs().splitlines() if '"response"' in line]
    assert [(e["severity"], e["method"], e["code"]) for e in responses] == [
        ("INFO", "Get", "NOT_FOUND")
    ]


def test_bad_configuration_stops_with_a_clear_message(spawn: Spawn) -> None:
    """An unparsable setting stops the service with exit code 2 and names the variable."""
    bad = spawn("backend", {"KVSTACK_MAP_SIZE": "lots"})
    assert bad.wait() == 2
    assert "KVSTACK_MAP_SIZE='lots' is invalid" in bad.logs()


def test_a_service_run_by_hand_listens_on_loopback_only(spawn: Spawn) -> None:
    """Started with no KVSTACK_HOST (as a developer runs it), the server's gRPC and metrics
    ports listen on loopback only, not on every interface of the machine; the images set
    KVSTACK_HOST=[::] for their own containers instead."""
    metrics = free_port()
    server = spawn("server", {"KVSTACK_METRICS_PORT": str(metrics)}, unset=("KVSTACK_HOST",))
    deadline = time.monotonic() + 30
    while not listeners(server.port) and time.monotonic() < deadline:
        time.sleep(0.2)
    for port in (server.port, metrics):
        assert listeners(port), f"nothing listens on {port}"
        assert listeners(port) <= LOOPBACK, listeners(port)
