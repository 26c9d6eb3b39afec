"""The local target's verbs for real: `kvstack deploy|scale|rollback|status|history local`.

Everything runs against the real Docker engine in Swarm mode, on a stack of this module's own
(kvtest-ops-XXXXXX, removed with its volume afterwards), through kvstack.ops.local.Local, the
object `kvstack VERB local` uses. While the stack changes, a client container on the stack's
network keeps calling (a put and a get every 20 ms, with the client's own retry budget: 5
attempts, exponential backoff) and reports every call that failed after its retries.

A server replica killed with SIGKILL (replaced by Swarm, no client error outside the retry
budget) is tested in test_stack.py::test_lost_server_replica_is_replaced_without_client_errors
and not repeated here.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from kvstack.ops import catalog, engine, images, local
from kvstack.ops.errors import CommandError
from kvstack.ops.shell import Runner
from kvstack.ops.targets import DeployRequest

from .conftest import StackUnderTest, docker

pytestmark = pytest.mark.containers

RUNNER = Runner()
TIMEOUT = 300  # a paced two-replica update takes ~110 s here; the CLI default
SERVER = catalog.get("server")
BACKEND = catalog.get("backend")

# Calls until stopped (SIGTERM) or for at most argv[1] seconds; one JSON line per failed call
# (after the client's retries) and a summary at the end.
CALLER = """
import json, signal, sys, time
import grpc
from kvstack.client import Client, Unreachable, default_target
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
client = Client(default_target(), verbose=False)
end = time.monotonic() + float(sys.argv[1])
ok = failed = 0
while not stop and time.monotonic() < end:
    key = f"{sys.argv[2]}{ok + failed}".encode()
    try:
        client.put(key, b"v")
        if client.get(key) != b"v":
            raise RuntimeError("read back a different value")
        ok += 1
    except (grpc.RpcError, Unreachable, RuntimeError) as err:
        failed += 1
        print(json.dumps({"error": str(err)[:300], "t": time.time()}), flush=True)
    time.sleep(0.02)
summary = {"summary": True, "ok": ok, "failed": failed, "retries": client.retries}
print(json.dumps(summary), flush=True)
"""


@dataclass
class Caller:
    """A client container calling the stack's server in a loop, in the background."""

    container: str

    def running(self) -> bool:
        return docker("inspect", "--format", "{{.State.Running}}", self.container).strip() == "true"

    def stop(self) -> dict[str, object]:
        """Stop it (SIGTERM: it finishes its call) and return its summary line."""
        docker("stop", "--time", "15", self.container)
        lines = [json.loads(x) for x in docker("logs", self.container).splitlines() if x[:1] == "{"]
        summaries = [x for x in lines if x.get("summary")]
        assert summaries, docker("logs", self.container)
        return {**summaries[-1], "errors": [x for x in lines if "error" in x][:3]}


@dataclass
class OpsStack:
    target: local.Local
    tag: str
    v2: str  # a second release: the server's image differs, the others are retags
    callers: list[Caller] = field(default_factory=list)

    @property
    def under_test(self) -> StackUnderTest:
        return StackUnderTest(self.target.stack, self.tag)

    def deploy(self, version: str) -> float:
        started = time.monotonic()
        request = DeployRequest(version=version, registry=None, timeout=TIMEOUT)
        self.target.deploy(RUNNER, request)
        return time.monotonic() - started

    def live(self, service: catalog.Service) -> local.Live:
        found = self.target.live(RUNNER, service)
        assert found is not None, f"{service.name} is not deployed"
        return found

    def running_images(self, service: catalog.Service) -> list[str]:
        """The image of each running container of the service."""
        label = f"label=com.docker.swarm.service.name={self.target.service(service)}"
        return docker("ps", "--filter", label, "--format", "{{.Image}}").split()

    def start_caller(self, seconds: int = 240) -> Caller:
        argv = self.under_test.job_argv(
            "client", "-c", CALLER, str(seconds), f"ops/{uuid.uuid4().hex[:6]}/", detach=True
        )
        image_at = argv.index(images.image_ref(catalog.get("client"), self.tag))
        argv.insert(image_at, "--entrypoint=/opt/venv/bin/python")
        caller = Caller(docker(*argv).strip())
        self.callers.append(caller)
        time.sleep(2)
        assert caller.running(), docker("logs", caller.container)
        return caller


def _make_release(tag: str, v2: str) -> None:
    """v2: the server rebuilt with one more label (a different image), backend and client
    retagged (same content, so the deploy must not restart the backend)."""
    for name in ("backend", "client"):
        svc = catalog.get(name)
        docker("tag", images.image_ref(svc, tag), images.image_ref(svc, v2))
    _build_server(
        v2, f"FROM {images.image_ref(SERVER, tag)}\nLABEL dev.kvstack.test-release={v2}\n"
    )


def _build_server(tag: str, dockerfile: str) -> None:
    """Build kvstack-server:TAG from a Dockerfile given as text (no build context)."""
    result = RUNNER.query(
        ["sh", "-c", f"printf '%s' \"$0\" | {engine.docker_bin()} build -q -t "
         f"{images.image_ref(SERVER, tag)} -", dockerfile],
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def ops(tag: str) -> Iterator[OpsStack]:
    """This module's stack, deployed with `kvstack deploy local` and removed afterwards."""
    v2 = f"{tag}-opstest2"
    stack = OpsStack(local.Local(stack=f"kvtest-ops-{uuid.uuid4().hex[:6]}"), tag, v2)
    try:
        _make_release(tag, v2)
        stack.deploy(tag)
        yield stack
    finally:
        for caller in stack.callers:
            docker("rm", "--force", caller.container, check=False)
        local.remove(RUNNER, stack.target.stack, volumes=True)
        (local.BUILD_DIR / f"{stack.target.stack}.stack.json").unlink(missing_ok=True)
        for svc in catalog.services().values():
            docker("image", "rm", images.image_ref(svc, v2), check=False)


def test_deploy_is_live_and_deploying_it_again_changes_nothing(ops: OpsStack) -> None:
    """After `kvstack deploy local` every replica is healthy on the version's images and the
    release is recorded; a second deploy of the same version leaves every service untouched
    (same spec version index) and still passes its smoke test."""
    ops.deploy(ops.tag)  # back to the base release if an earlier test moved it
    before = {svc.name: ops.live(svc) for svc in (SERVER, BACKEND)}
    for svc, live in zip((SERVER, BACKEND), before.values(), strict=True):
        assert live.image == images.image_ref(svc, ops.tag)
        assert live.releases[-1]["version"] == ops.tag
        assert ops.running_images(svc) == [live.image] * live.replicas
    ops.deploy(ops.tag)
    after = {svc.name: ops.live(svc) for svc in (SERVER, BACKEND)}
    for name in before:
        assert after[name].version_index == before[name].version_index, f"{name} was updated"


def test_scale_server_2_5_2_while_a_client_calls(ops: OpsStack) -> None:
    """`kvstack scale local server 5` then `2`: each waits for exactly that many healthy
    replicas, and a client calling throughout sees no failed call (after its retries)."""
    caller = ops.start_caller()
    for count in (5, 2):
        started = time.monotonic()
        ops.target.scale(RUNNER, SERVER, count, TIMEOUT)
        print(f"scale to {count}: {time.monotonic() - started:.1f} s")
        assert ops.live(SERVER).replicas == count
        assert len(ops.running_images(SERVER)) == count
    time.sleep(2)
    assert caller.running(), "the client stopped before the scaling ended"
    summary = caller.stop()
    print("client during scaling:", summary)
    assert summary["failed"] == 0, summary
    assert int(str(summary["ok"])) > 100, summary


def test_rolling_update_to_a_new_version_drops_no_call(ops: OpsStack) -> None:
    """`kvstack deploy local --version V2` while a client calls: the server rolls start-first,
    health-gated, one replica at a time; the backend (same image content) is not restarted;
    the client sees zero failed calls."""
    ops.deploy(ops.tag)
    backend_label = f"label=com.docker.swarm.service.name={ops.target.service(BACKEND)}"
    backend_before = docker("ps", "-q", "--filter", backend_label)
    caller = ops.start_caller()
    took = ops.deploy(ops.v2)
    print(f"rolling update to {ops.v2}: {took:.1f} s")
    time.sleep(2)
    assert caller.running(), "the client stopped before the update ended"
    summary = caller.stop()
    print("client during the rolling update:", summary)
    assert summary["failed"] == 0, summary
    server = ops.live(SERVER)
    assert server.image == images.image_ref(SERVER, ops.v2)
    assert ops.running_images(SERVER) == [server.image] * server.replicas
    assert server.releases[-1]["version"] == ops.v2
    backend_after = docker("ps", "-q", "--filter", backend_label)
    assert backend_after == backend_before, "the backend was restarted for an identical image"


def test_rollback_brings_the_previous_image_back(ops: OpsStack) -> None:
    """`kvstack rollback local server` after a deploy of V2 runs the previous image again on
    every replica (health-gated) and records the rollback in the history; `--to V2` goes
    forward again, and a deploy after that moves it back."""
    ops.deploy(ops.v2)
    ops.target.rollback(RUNNER, SERVER, None, TIMEOUT)
    server = ops.live(SERVER)
    assert server.image == images.image_ref(SERVER, ops.tag)
    assert ops.running_images(SERVER) == [server.image] * server.replicas
    assert server.releases[-1]["via"] == "rollback"
    assert server.releases[-1]["version"] == ops.tag
    ops.target.rollback(RUNNER, SERVER, ops.v2, TIMEOUT)
    assert ops.live(SERVER).image == images.image_ref(SERVER, ops.v2)
    # A deploy after `--to` moves the service again (stack deploy's image label followed).
    ops.deploy(ops.tag)
    assert ops.live(SERVER).image == images.image_ref(SERVER, ops.tag)


def test_a_failing_release_is_rolled_back_by_itself(ops: OpsStack) -> None:
    """A release whose server exits at start: the deploy fails naming the rollback, and the
    server runs its previous image again on every replica."""
    ops.deploy(ops.tag)
    bad = f"{ops.tag}-opsbad"
    for name in ("backend", "client"):
        svc = catalog.get(name)
        docker("tag", images.image_ref(svc, ops.tag), images.image_ref(svc, bad))
    dockerfile = (
        f"FROM {images.image_ref(SERVER, ops.tag)}\n"
        'ENTRYPOINT ["/opt/venv/bin/python", "-c", "raise SystemExit(3)"]\n'
    )
    try:
        _build_server(bad, dockerfile)
        with pytest.raises(CommandError, match="rolled back") as failed:
            ops.deploy(bad)
        print(failed.value)
        server = ops.live(SERVER)
        assert server.image == images.image_ref(SERVER, ops.tag)
        assert ops.running_images(SERVER) == [server.image] * server.replicas
    finally:
        for svc in catalog.services().values():
            docker("image", "rm", images.image_ref(svc, bad), check=False)
