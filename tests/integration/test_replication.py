"""Replication between real backend processes over loopback: a primary (ordinal 0) and read
replicas that stream its change log, with the server routing writes and reads."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from kvstack import client as client_cli
from kvstack.dev.processes import ServiceProcess, free_port
from kvstack.probe import check
from kvstack.v1 import kv_pb2, kv_pb2_grpc, replication_pb2, replication_pb2_grpc
from tests.conftest import Spawn


@dataclass
class Cluster:
    spawn: Spawn
    tmp: Path
    ports: list[int]

    @property
    def peers(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def backend(self, ordinal: int, **env: str) -> ServiceProcess:
        return self.spawn(
            "backend",
            {
                "KVSTACK_DATA_DIR": str(self.tmp / f"data-{ordinal}"),
                "KVSTACK_ORDINAL": str(ordinal),
                "KVSTACK_BACKEND_TARGET": self.peers,
                **env,
            },
            port=self.ports[ordinal],
        )

    def server(self) -> ServiceProcess:
        return self.spawn("server", {"KVSTACK_BACKEND_TARGET": self.peers}).wait_serving()


@pytest.fixture
def cluster(spawn: Spawn, tmp_path: Path) -> Cluster:
    return Cluster(spawn, tmp_path, [free_port() for _ in range(3)])


def stub(target: str) -> kv_pb2_grpc.KeyValueStub:
    return kv_pb2_grpc.KeyValueStub(grpc.insecure_channel(target))


def role(target: str) -> replication_pb2.RoleResponse:
    with grpc.insecure_channel(target) as channel:
        reply: replication_pb2.RoleResponse = replication_pb2_grpc.ReplicationStub(channel).Role(
            replication_pb2.RoleRequest(), timeout=2
        )
        return reply


def eventually(condition: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    pytest.fail(f"not within {timeout}s: {what}")


def entries(target: str) -> dict[bytes, bytes]:
    reply = stub(target).List(kv_pb2.ListRequest(page_size=1000), timeout=5)
    return {e.key: e.value for e in reply.entries}


def log_lines(process: ServiceProcess, msg: str) -> list[dict[str, object]]:
    lines = [json.loads(x) for x in process.logs().splitlines() if x.startswith("{")]
    return [x for x in lines if x.get("message") == msg]


def test_replica_copies_every_write_and_primary_waits_for_it(cluster: Cluster) -> None:
    """Writes through the server land on the primary and on the replica; the primary runs in
    semi-sync mode once the replica is connected, and the replica refuses writes of its own."""
    primary = cluster.backend(0).wait_serving()
    replica = cluster.backend(1).wait_serving()
    server = cluster.server()
    eventually(lambda: role(replica.target).readable, what="replica readable")
    eventually(lambda: bool(log_lines(primary, "replication mode")), what="semi-sync")
    front = stub(server.target)
    for i in range(50):
        front.Put(kv_pb2.PutRequest(key=f"r/{i:02d}".encode(), value=str(i).encode()), timeout=5)
    assert log_lines(primary, "replication mode")[-1]["mode"] == "semi-sync"
    # Semi-sync: every acknowledged write is already on the replica's disk.
    assert entries(replica.target) == entries(primary.target)
    assert len(entries(replica.target)) == 50
    assert (role(primary.target).role, role(replica.target).role) == (
        replication_pb2.BACKEND_ROLE_PRIMARY,
        replication_pb2.BACKEND_ROLE_REPLICA,
    )
    with pytest.raises(grpc.RpcError) as refused:
        stub(replica.target).Put(kv_pb2.PutRequest(key=b"direct", value=b"x"), timeout=5)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "read replica" in (refused.value.details() or "")


def test_new_replica_bootstraps_from_a_snapshot(cluster: Cluster) -> None:
    """A replica that joins after the primary has trimmed its log copies a consistent snapshot,
    then streams: it ends with exactly the primary's contents."""
    primary = cluster.backend(0, KVSTACK_LOG_RETAIN="20").wait_serving()
    front = stub(primary.target)
    for i in range(200):
        front.Put(kv_pb2.PutRequest(key=f"s/{i:03d}".encode(), value=b"v"), timeout=5)
    front.Delete(kv_pb2.DeleteRequest(key=b"s/000"), timeout=5)
    replica = cluster.backend(1).wait_serving()
    eventually(lambda: role(replica.target).readable, what="replica caught up")
    front.Put(kv_pb2.PutRequest(key=b"s/after", value=b"streamed"), timeout=5)
    eventually(lambda: entries(replica.target) == entries(primary.target), what="same contents")
    assert log_lines(replica, "snapshot loaded")
    assert b"s/000" not in entries(replica.target)


def test_primary_down_writes_wait_then_fail_reads_continue(cluster: Cluster) -> None:
    """With the primary gone for good, a write through the server waits for it for its whole
    deadline (it may only be restarting), then fails with UNAVAILABLE saying it waited; reads
    keep working from the replica; when the primary comes back on its own files, the replica
    resumes and writes work again."""
    primary = cluster.backend(0).wait_serving()
    replica = cluster.backend(1).wait_serving()
    server = cluster.server()
    front = stub(server.target)
    eventually(lambda: role(replica.target).readable, what="replica readable")
    front.Put(kv_pb2.PutRequest(key=b"kept", value=b"1"), timeout=5)
    primary.signal(signal.SIGKILL)
    primary.wait()
    time.sleep(2.5)  # the server's directory notices within about a second
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as failed:
        front.Put(kv_pb2.PutRequest(key=b"lost", value=b"x"), timeout=5)
    assert 4.0 < time.monotonic() - started < 5.5
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "waited" in (failed.value.details() or "")
    assert front.Get(kv_pb2.GetRequest(key=b"kept"), timeout=5).value == b"1"
    restarted = cluster.backend(0).wait_serving()
    # Following the restarted primary, not only readable (which it stayed while the primary was
    # down): until its stream resumes it refuses reads, as the primary takes writes again.
    eventually(lambda: role(replica.target).following, what="replica resumed")

    def writes_work() -> bool:
        try:
            front.Put(kv_pb2.PutRequest(key=b"again", value=b"2"), timeout=5)
        except grpc.RpcError:
            return False
        return True

    eventually(writes_work, what="writes after restart")
    eventually(lambda: entries(replica.target) == entries(restarted.target), what="resumed")


def test_unresponsive_replica_degrades_then_recovers_semi_sync(cluster: Cluster) -> None:
    """A replica that stops answering makes the primary fall back to acknowledging alone after
    KVSTACK_SEMISYNC_TIMEOUT (and say so); once the replica is back and caught up, semi-sync
    returns, and the replica holds every acknowledged write."""
    primary = cluster.backend(0, KVSTACK_SEMISYNC_TIMEOUT="0.5").wait_serving()
    replica = cluster.backend(1).wait_serving()
    server = cluster.server()
    front = stub(server.target)
    eventually(lambda: role(replica.target).readable, what="replica readable")
    replica.signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        for i in range(20):
            front.Put(kv_pb2.PutRequest(key=f"d/{i}".encode(), value=b"v"), timeout=5)
        assert time.monotonic() - started < 5.0  # only the first write waited the timeout
        modes = [line["mode"] for line in log_lines(primary, "replication mode")]
        assert modes[-1] == "degraded"
    finally:
        replica.signal(signal.SIGCONT)
    eventually(
        lambda: log_lines(primary, "replication mode")[-1]["mode"] == "semi-sync",
        what="back to semi-sync",
    )
    eventually(lambda: entries(replica.target) == entries(primary.target), what="caught up")


def test_replica_without_primary_is_not_readable(cluster: Cluster) -> None:
    """A replica that cannot reach its primary says NOT_SERVING for the KeyValue service (so no
    reads go to it) while the process itself is SERVING; it turns readable once it catches up."""
    replica = cluster.backend(1).wait_serving()
    time.sleep(1)
    assert check(replica.target, 2, "kvstack.v1.KeyValue") == "NOT_SERVING"
    assert check(replica.target, 2) == "SERVING"
    assert not role(replica.target).readable
    cluster.backend(0).wait_serving()
    eventually(
        lambda: check(replica.target, 2, "kvstack.v1.KeyValue") == "SERVING", what="readable"
    )


def test_reads_spread_over_every_backend(cluster: Cluster) -> None:
    """The server spreads plain reads over the primary and both replicas, and sends reads that
    ask for the latest write to the primary."""
    # At DEBUG each backend logs every call it answers (at INFO only errors and slow ones).
    backends = [cluster.backend(i, KVSTACK_LOG_LEVEL="DEBUG").wait_serving() for i in range(3)]
    server = cluster.server()
    front = stub(server.target)
    for b in backends[1:]:
        eventually(lambda b=b: role(b.target).readable, what="replicas readable")  # type: ignore[misc]
    front.Put(kv_pb2.PutRequest(key=b"spread", value=b"v"), timeout=5)
    eventually(lambda: all(b"spread" in entries(b.target) for b in backends), what="copies")

    def gets(backend: ServiceProcess) -> int:
        return sum(1 for x in log_lines(backend, "response") if x.get("method") == "Get")

    for _ in range(10):
        front.Get(kv_pb2.GetRequest(key=b"spread", latest=True), timeout=5)
    time.sleep(0.3)
    assert [gets(b) for b in backends] == [10, 0, 0]

    def every_backend_reads() -> bool:
        # The server's view refreshes every second; within a few, plain reads reach all three.
        for _ in range(30):
            front.Get(kv_pb2.GetRequest(key=b"spread"), timeout=5)
        time.sleep(0.2)
        return all(gets(b) >= 10 + 5 if b is backends[0] else gets(b) >= 5 for b in backends)

    eventually(every_backend_reads, what="plain reads spread over every backend")

    # The client's reads default to the latest write: all of them go to the primary.
    before = [gets(b) for b in backends]
    for _ in range(6):
        assert client_cli.main(["--target", server.target, "get", "spread"]) == 0
    time.sleep(0.3)
    assert [gets(b) - n for b, n in zip(backends, before, strict=True)] == [6, 0, 0]


def test_a_primary_with_replicas_drains_without_waiting_out_its_grace(cluster: Cluster) -> None:
    """SIGTERM to a primary that a replica streams from, with no client call in flight: it
    ends the replication stream and exits in well under its 10 s grace (the stream, a call
    that never ends by itself, used to hold the drain open for all of it); the replica keeps
    what it had."""
    primary = cluster.backend(0, KVSTACK_SHUTDOWN_GRACE="10").wait_serving()
    replica = cluster.backend(1).wait_serving()
    stub(primary.target).Put(kv_pb2.PutRequest(key=b"d", value=b"1"), timeout=10)
    eventually(lambda: role(replica.target).following, what="the replica follows")
    started = time.monotonic()
    primary.signal(signal.SIGTERM)
    assert primary.wait(timeout=30) == 0
    took = time.monotonic() - started
    assert took < 5, f"the primary took {took:.1f} s to drain"
    stopped = log_lines(primary, "stopped")
    assert stopped, primary.logs()[-2000:]
