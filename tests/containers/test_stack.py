"""The system on Swarm: the client's batch, a SIGKILLed backend, a lost server replica."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable

import pytest

from kvstack import cli
from kvstack.client import Client
from kvstack.ops import catalog, engine, images, local
from kvstack.ops.shell import Runner
from tests.conftest import LOOPBACK, listeners

from .conftest import LoadRun, StackUnderTest, docker

pytestmark = pytest.mark.containers

StartLoad = Callable[..., LoadRun]
RUNNER = Runner()


def test_client_batch_succeeds_through_server_to_backend(stack: StackUnderTest) -> None:
    """The client image, run with no arguments on the stack's network, gets every response."""
    result = stack.run_job("client")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "->" in result.stdout


def test_the_client_image_finds_the_server_by_itself(stack: StackUnderTest) -> None:
    """`docker run --network STACK_client-server kvstack-client` with no settings at all: its
    default target is the server's name on the stack's network."""
    image = images.image_ref(catalog.get("client"), stack.tag)
    result = subprocess.run(
        engine.docker("run", "--rm", "--network", stack.network(), image, "put", "dflt", "v"),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def probe_from(stack: StackUnderTest, network: str, target: str) -> str:
    """What the image's health probe, run in a container on `network`, gets from `target`."""
    probe = ["-m", "kvstack.probe", "--target", target, "--timeout", "3"]
    argv = stack.job_argv("client", *probe, network=network)
    image = argv.index(images.image_ref(catalog.get("client"), stack.tag))
    argv[image:image] = ["--entrypoint", "/opt/venv/bin/python"]
    result = docker(*argv, check=False, timeout=60)
    return result.strip().rsplit(": ", 1)[-1]


def test_the_networks_allow_only_the_flow_graph(stack: StackUnderTest) -> None:
    """Where the client runs (its flow's network), the server answers and the backend cannot
    be reached at all; where the server stands (its flow to the backend), the backend answers.
    The engine, not our code, enforces this: the graph's networks are all that is there."""
    client_net, server_net = stack.network(), stack.network("server", "backend")
    assert probe_from(stack, client_net, "server:50051") == "SERVING"
    assert probe_from(stack, client_net, "backend:50061") in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    assert probe_from(stack, server_net, "backend:50061") == "SERVING"


def test_the_host_reaches_the_server_on_loopback_only(stack: StackUnderTest) -> None:
    """The gateway publishes the server on 127.0.0.1 and nothing else (no Swarm service
    publishes a port); a client on this machine writes and reads through it, and still does
    after every server task has been replaced (the gateway resolves the name per connection)."""
    address = local.gateway_address(RUNNER, stack.name)
    assert address is not None
    assert address.startswith("127.0.0.1:"), address
    port = int(address.rsplit(":", 1)[1])
    # Nothing listens on 0.0.0.0 or [::] for it.
    assert listeners(port), f"nothing listens on {port}"
    assert listeners(port) <= LOOPBACK, listeners(port)
    for name in catalog.services():
        if catalog.get(name).long_running:
            ports = docker("service", "inspect", "--format", "{{json .Endpoint.Ports}}",
                           f"{stack.name}_{name}").strip()  # fmt: skip
            assert ports in ("null", "[]"), f"{name} publishes {ports}"
    key = f"gw/{uuid.uuid4().hex[:8]}".encode()
    for value in (b"v1", b"v2"):
        client = Client(address, verbose=False)
        try:
            client.put(key, value)
            assert client.get(key) == value
        finally:
            client.close()
        if value == b"v1":
            docker("service", "update", "--force", "--quiet", f"{stack.name}_server", timeout=300)


def test_tasks_run_read_only_without_capabilities(stack: StackUnderTest) -> None:
    """What the engine really gives each task: a read-only root, no capabilities, the non-root
    user, and a writable in-memory /tmp (the services start and stay healthy so)."""
    for service in ("server", "backend"):
        for cid in stack.containers(service):
            template = "{{.HostConfig.ReadonlyRootfs}} {{.HostConfig.CapDrop}} {{.Config.User}}"
            assert docker("inspect", "--format", template, cid).split() == [
                "true", "[ALL]", f"{catalog.RUNTIME_UID}:{catalog.RUNTIME_UID}"
            ], service  # fmt: skip
            mounts = docker("inspect", "--format", "{{json .HostConfig.Mounts}}", cid)
            assert '"Type":"tmpfs","Target":"/tmp"' in mounts, mounts


def primary_container(stack: StackUnderTest) -> str:
    """The container of the backend's slot 1: the primary (see kvstack.ops.local.PRIMARY_SLOT)."""
    ids = [
        cid
        for cid in stack.containers("backend")
        if docker("inspect", "--format", "{{.Name}}", cid)
        .strip()
        .lstrip("/")
        .startswith(f"{stack.name}_backend.1.")
    ]
    assert len(ids) == 1, f"want one running primary (slot 1), found {ids}"
    return ids[0]


def test_backend_sigkill_loses_no_acknowledged_write(
    stack: StackUnderTest, start_load: StartLoad
) -> None:
    """`docker kill -s KILL` of the primary backend during writes: every acknowledged write
    survives.

    A client container writes unique keys and prints each acknowledgement; the primary is killed
    mid-run, Swarm restarts it on the same volume, and every acknowledged key reads back with
    its value (writes that fail while it is down are not acknowledged).
    """
    prefix = f"kill/{uuid.uuid4().hex[:8]}/"
    load = start_load("--count", "4000", "--concurrency", "8", "--prefix", prefix)
    load.wait_acks(200)
    backend = primary_container(stack)
    docker("kill", "--signal", "KILL", backend)
    assert load.running(), "the writes ended before the kill: raise --count"
    load.finish()
    acked = load.acked()
    stack.wait_healthy()
    assert backend not in stack.containers("backend"), "Swarm did not replace the backend"

    listing = stack.run_job("client", "--latest", "list", prefix)
    assert listing.returncode == 0, listing.stderr
    stored = dict(line.split("=", 1) for line in listing.stdout.splitlines() if "=" in line)
    lost = {key for key, value in acked.items() if stored.get(key) != value}
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged writes lost: {sorted(lost)[:3]}"


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_lost_server_replica_is_replaced_without_client_errors(
    stack: StackUnderTest, start_load: StartLoad, how: str
) -> None:
    """A stopped (SIGTERM) or killed (SIGKILL) server replica is replaced by Swarm, and a client
    writing meanwhile sees no error outside its retry budget."""
    prefix = f"{how}/{uuid.uuid4().hex[:8]}/"
    load = start_load("--count", "3000", "--concurrency", "4", "--prefix", prefix)
    load.wait_acks(200)
    victim = stack.containers("server")[0]
    if how == "stop":
        docker("stop", victim)
    else:
        docker("kill", "--signal", "KILL", victim)
    assert load.running(), "the writes ended before the replica went: raise --count"
    summary = load.finish()
    assert summary["errors"] == 0, (summary, [r for r in load.lines() if "error" in r][:5])
    stack.wait_healthy()
    assert victim not in stack.containers("server"), "Swarm did not replace the server replica"


def test_rollback_with_nothing_to_return_to_fails(
    stack: StackUnderTest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kvstack rollback local` on a stack with no earlier release changes nothing and exits 1
    saying so (it used to exit 0, as if it had rolled back)."""
    monkeypatch.setenv("KVSTACK_STACK", stack.name)
    before = docker("service", "inspect", "--format", "{{.Version.Index}}", f"{stack.name}_server")
    assert cli.main(["rollback", "local"]) == 1
    assert "nothing was rolled back" in capsys.readouterr().err
    after = docker("service", "inspect", "--format", "{{.Version.Index}}", f"{stack.name}_server")
    assert after == before
