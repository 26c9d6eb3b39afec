"""The smoke test every deploy runs (`kvstack-client smoke`), against real backend and server
processes over loopback: it passes when the primary takes the write and every replica holds it,
and fails, naming the backend, when a replica is frozen, stopped or not following the primary.

It reaches the backends only through the server (the network allows client -> server ->
backend, nothing else): the server's kvstack.v1.Frontend lists them, a read whose
`kvstack-backend` metadata names one goes to that one, and trailing metadata names the backend
that answered. Those server features are tested here too, with their refusals of bad input.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from kvstack import client as client_cli
from kvstack.dev.processes import ServiceProcess, free_port
from kvstack.server import BACKEND_KEY
from kvstack.v1 import frontend_pb2, frontend_pb2_grpc, kv_pb2, kv_pb2_grpc, replication_pb2
from tests.conftest import Spawn
from tests.integration.test_replication import Cluster, eventually, role

WITHIN = 3.0  # the bound the failing cases wait out; the default (10 s) is for real clusters
# The primary drains its replica's open stream for the whole grace at exit: 10 s a test.
QUICK_EXIT = {"KVSTACK_SHUTDOWN_GRACE": "1"}


@pytest.fixture
def cluster(spawn: Spawn, tmp_path: Path) -> Cluster:
    return Cluster(spawn, tmp_path, [free_port() for _ in range(2)])


Pair = tuple[ServiceProcess, ServiceProcess, ServiceProcess]


def start_pair(cluster: Cluster) -> Pair:
    """A primary (ordinal 0), a caught-up replica (ordinal 1) and a server in front of both,
    the server already seeing both as readers."""
    primary = cluster.backend(0, **QUICK_EXIT).wait_serving()
    replica = cluster.backend(1, **QUICK_EXIT).wait_serving()
    eventually(lambda: role(replica.target).readable, what="replica caught up")
    server = cluster.server()
    eventually(lambda: len(readers(server)) == 2, what="the server reads from both")
    return primary, replica, server


@pytest.fixture
def pair(cluster: Cluster) -> Iterator[Pair]:
    """A pair of a test's own, to break; a replica it froze is thawed afterwards."""
    primary, replica, server = start_pair(cluster)
    yield primary, replica, server
    replica.signal(signal.SIGCONT)


@pytest.fixture(scope="module")
def healthy_pair(module_spawn: Spawn, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    """A pair the tests that leave it healthy share (they write only keys of their own)."""
    ports = [free_port() for _ in range(2)]
    return start_pair(Cluster(module_spawn, tmp_path_factory.mktemp("pair"), ports))


def listing(server: ServiceProcess) -> list[frontend_pb2.BackendInfo]:
    with grpc.insecure_channel(server.target) as channel:
        reply = frontend_pb2_grpc.FrontendStub(channel).ListBackends(
            frontend_pb2.ListBackendsRequest(), timeout=5
        )
        return list(reply.backends)


def readers(server: ServiceProcess) -> list[str]:
    return [b.address for b in listing(server) if b.serves_reads]


def smoke(server: ServiceProcess, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, float]:
    """Run `kvstack-client smoke`; its exit code, its output and how long it took."""
    started = time.monotonic()
    code = client_cli.main(["--target", server.target, "smoke", "--within", str(WITHIN)])
    elapsed = time.monotonic() - started
    captured = capsys.readouterr()
    return code, captured.out + captured.err, elapsed


def test_smoke_passes_when_every_backend_holds_the_write(
    healthy_pair: Pair,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Primary + caught-up replica: the write is taken by the primary, each backend (read by
    name) holds it, ordinary reads reach both, and the smoke key is deleted afterwards."""
    primary, replica, server = healthy_pair
    code, out, _ = smoke(server, capsys)
    assert code == 0, out
    assert re.search(rf"put 'smoke/\w+' -> taken by {primary.target}", out), out
    assert re.search(rf"backend ordinal 0 \(primary at {primary.target}\): holds the write", out)
    assert re.search(rf"backend ordinal 1 \(replica at {replica.target}\): holds the write", out)
    reads = re.search(r"ordinary reads: (\d+), answered by (.*)", out)
    assert reads, out
    counts = dict(re.findall(r"at ([\d.:]+)\) x(\d+)", reads[2]))
    assert set(counts) == {primary.target, replica.target}, out
    assert all(int(n) >= 1 for n in counts.values()), out
    assert "every tier OK (2 backend(s))" in out
    for backend in (primary, replica):
        left = kv_pb2_grpc.KeyValueStub(grpc.insecure_channel(backend.target)).List(
            kv_pb2.ListRequest(prefix=b"smoke/"), timeout=5
        )
        assert not left.entries, f"the smoke key was left on {backend.target}"


@pytest.mark.parametrize("fault", ["frozen", "stopped"])
def test_smoke_fails_naming_a_replica_that_is_frozen_or_stopped(
    pair: Pair,
    capsys: pytest.CaptureFixture[str],
    fault: str,
) -> None:
    """A replica frozen with SIGSTOP (its connections stay open, nothing answers) or stopped
    with SIGTERM: the smoke test exits 1 within its bound (plus the batch's few seconds) and
    names that replica, by ordinal and address, as not holding the write."""
    _, replica, server = pair
    if fault == "frozen":
        replica.signal(signal.SIGSTOP)
    else:
        replica.stop()
    code, out, elapsed = smoke(server, capsys)
    assert code == 1, out
    failure = out[out.index("kvstack smoke: FAILED") :]
    # Its role is what the server saw last: "replica", or "role unknown" once it stops answering.
    assert re.search(rf"backend ordinal 1 \((replica|role unknown) at {replica.target}\)", failure)
    assert f"not every backend holds the write within {WITHIN:g} s" in failure
    assert "backend ordinal 0" not in failure, "the primary holds it: only the replica lags"
    assert elapsed < WITHIN + 15, f"took {elapsed:.1f} s"


def test_smoke_fails_naming_a_replica_that_does_not_follow(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    """A replica that runs but cannot find the primary (its own address is the only peer it is
    given) never gets the write: the smoke test exits 1 naming it. (It refuses reads since it
    follows no primary, UNAVAILABLE; a replica that answered would say NOT_FOUND.)"""
    cluster.backend(0, **QUICK_EXIT).wait_serving()
    lost = cluster.backend(1, KVSTACK_BACKEND_TARGET=f"127.0.0.1:{cluster.ports[1]}", **QUICK_EXIT)
    lost.wait_serving()  # the process as a whole says SERVING: only the smoke test tells
    server = cluster.server()
    eventually(lambda: len(listing(server)) == 2, what="the server knows both")
    code, out, _ = smoke(server, capsys)
    assert code == 1, out
    failure = out[out.index("kvstack smoke: FAILED") :]
    assert f"backend ordinal 1 (replica at {lost.target})" in failure
    assert "UNAVAILABLE" in failure or "(NOT_FOUND)" in failure, failure


# -- what the server offers the smoke test ---------------------------------------------------------


def test_server_lists_backends_and_reads_from_the_one_named(
    healthy_pair: Pair,
) -> None:
    """ListBackends gives each backend's address, role and ordinal; a Get naming a backend is
    answered by that backend, and trailing metadata names who answered a Put and each Get.
    (That a named read reaches a backend that does not hold the key, and is not answered by
    another, is what test_smoke_fails_naming_a_replica_that_does_not_follow shows.)"""
    primary, replica, server = healthy_pair
    info = {b.address: b for b in listing(server)}
    assert (info[primary.target].role, info[primary.target].ordinal) == (
        replication_pb2.BACKEND_ROLE_PRIMARY,
        0,
    )
    assert (info[replica.target].role, info[replica.target].ordinal) == (
        replication_pb2.BACKEND_ROLE_REPLICA,
        1,
    )
    front = kv_pb2_grpc.KeyValueStub(grpc.insecure_channel(server.target))
    _, call = front.Put.with_call(kv_pb2.PutRequest(key=b"named", value=b"v"), timeout=5)
    assert dict(call.trailing_metadata())[BACKEND_KEY] == primary.target
    with pytest.raises(grpc.RpcError) as missing:
        front.Delete(kv_pb2.DeleteRequest(key=b"nope"), timeout=5)
    # A write's failure still reads as the backend's own sentence, with no address in front.
    assert missing.value.details() == "no value for key 'nope'; nothing was deleted"
    for target in [primary.target, replica.target] * 3:  # round-robin would alternate
        reply, call = front.Get.with_call(
            kv_pb2.GetRequest(key=b"named"), timeout=5, metadata=((BACKEND_KEY, target),)
        )
        assert (reply.value, dict(call.trailing_metadata())[BACKEND_KEY]) == (b"v", target)


@pytest.mark.parametrize(
    ("call", "code", "phrase"),
    [
        ("get-unknown", grpc.StatusCode.FAILED_PRECONDITION, "knows no backend at '10.9.9.9:1'"),
        ("get-latest", grpc.StatusCode.INVALID_ARGUMENT, "ask for one or the other"),
        ("put", grpc.StatusCode.INVALID_ARGUMENT, "writes always go to the primary"),
        ("scan", grpc.StatusCode.INVALID_ARGUMENT, "Scan streams from the backends"),
    ],
)
def test_server_refuses_a_backend_name_it_cannot_honour(
    healthy_pair: Pair,
    call: str,
    code: grpc.StatusCode,
    phrase: str,
) -> None:
    """`kvstack-backend` naming an unknown address, on a read that asks for the latest, on a
    write or on a Scan: the right status and a sentence saying what to do instead."""
    _, replica, server = healthy_pair
    front = kv_pb2_grpc.KeyValueStub(grpc.insecure_channel(server.target))
    named = ((BACKEND_KEY, "10.9.9.9:1" if call == "get-unknown" else replica.target),)
    calls: dict[str, Callable[[], object]] = {
        "get-unknown": lambda: front.Get(kv_pb2.GetRequest(key=b"k"), timeout=5, metadata=named),
        "get-latest": lambda: front.Get(
            kv_pb2.GetRequest(key=b"k", latest=True), timeout=5, metadata=named
        ),
        "put": lambda: front.Put(
            kv_pb2.PutRequest(key=b"k", value=b"v"), timeout=5, metadata=named
        ),
        "scan": lambda: list(front.Scan(kv_pb2.ScanRequest(), timeout=5, metadata=named)),
    }
    with pytest.raises(grpc.RpcError) as refused:
        calls[call]()
    assert refused.value.code() == code
    assert phrase in (refused.value.details() or "")
