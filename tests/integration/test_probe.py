"""The image's health check (`kvstack.probe`, HTTP/2 by hand) answers what a grpcio health
client answers, against real service processes over loopback, in every state a check meets."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstack.dev.processes import free_port
from kvstack.probe import check
from tests.conftest import Spawn
from tests.integration.test_replication import Cluster

KV = "kvstack.v1.KeyValue"


def grpcio_check(target: str, service: str, timeout: float) -> str:
    """The reference: the same Check through grpcio and the generated health code."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as err:
            return str(err.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def test_the_probe_answers_as_grpcio_does(spawn: Spawn, tmp_path: Path) -> None:
    cluster = Cluster(spawn, tmp_path, [free_port()])
    primary = cluster.backend(0).wait_serving()
    # A replica whose primary is nowhere: the process serves, its KeyValue API does not.
    alone = cluster.spawn(
        "backend",
        {
            "KVSTACK_DATA_DIR": str(cluster.tmp / "alone"),
            "KVSTACK_ORDINAL": "1",
            "KVSTACK_BACKEND_TARGET": f"127.0.0.1:{free_port()}",
        },
    ).wait_serving()
    closed = f"127.0.0.1:{free_port()}"
    cases = {
        (primary.target, ""): "SERVING",
        (primary.target, KV): "SERVING",
        (primary.target, "no.such.Service"): "NOT_FOUND",
        (primary.target, "s" * 300): "NOT_FOUND",  # a name longer than one length byte
        (alone.target, ""): "SERVING",
        (alone.target, KV): "NOT_SERVING",
        (closed, ""): "UNAVAILABLE",
    }
    got = {case: (check(case[0], 2, case[1]), grpcio_check(case[0], case[1], 2)) for case in cases}
    assert got == {case: (want, want) for case, want in cases.items()}, (
        "(probe, grpcio) answers differ from the expected: fix kvstack.probe.call"
    )

    alone.signal(signal.SIGSTOP)  # it holds its port and answers nothing
    try:
        frozen = (check(alone.target, 1, ""), grpcio_check(alone.target, "", 1))
    finally:
        alone.signal(signal.SIGCONT)
    assert frozen == ("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED")


def test_the_probe_exits_zero_only_on_serving(spawn: Spawn, tmp_path: Path) -> None:
    cluster = Cluster(spawn, tmp_path, [free_port()])
    primary = cluster.backend(0).wait_serving()

    def run(*args: str) -> tuple[int, str]:
        argv = [sys.executable, "-m", "kvstack.probe", "--target", primary.target, *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        return done.returncode, done.stdout.strip()

    assert run("--service", KV) == (0, f"{primary.target} {KV}: SERVING")
    assert run("--service", "nope") == (1, f"{primary.target} nope: NOT_FOUND")
