"""Fixtures for the container tests: the real images on the real engine, in a stack of their own.

The set-up is the one `make up` does (engine, images), so these tests work on a fresh machine.
Each session deploys its own stack (kvtest-XXXXXX) and removes it with its volume afterwards: a
developer's `kvstack up` stack and anything else on the engine are left alone. Tests reach the
services only from containers on that stack's attachable network.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kvstack.ops import catalog, engine, images, local
from kvstack.ops.errors import CommandError
from kvstack.ops.shell import Runner

RUNNER = Runner()


def docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    """Run a docker command, return its stdout; fail the test with its stderr on error."""
    result = subprocess.run(
        engine.docker(*args), capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        pytest.fail(f"docker {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result.stdout


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test here that uses the engine (the `tag` or `stack` fixture) is a containers test,
    marked or not, so that `make test-fast` (-m "not containers") never builds images."""
    here = Path(__file__).parent
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if item.path.is_relative_to(here) and {"tag", "stack"} & fixtures:
            item.add_marker(pytest.mark.containers)


@pytest.fixture(scope="session")
def tag() -> str:
    """The tag of this tree's images, built (or found up to date) as `make up` would."""
    try:
        engine.ensure(RUNNER)
        version = images.version()
        images.build(RUNNER, list(catalog.services().values()), version, only_if_changed=True)
    except CommandError as err:
        pytest.fail(f"cannot set up the Docker engine and images: {err}")
    return version


@dataclass(frozen=True)
class StackUnderTest:
    name: str
    tag: str

    def network(self, caller: str = "client", callee: str = "server") -> str:
        """The stack's network of the flow caller -> callee (the graph has one per flow)."""
        return local.network_name(self.name, f"{caller}-{callee}")

    def containers(self, service: str) -> list[str]:
        """IDs of the running containers of one service's tasks."""
        label = f"label=com.docker.swarm.service.name={self.name}_{service}"
        return docker("ps", "-q", "--filter", label).split()

    def job_argv(
        self, job: str, *args: str, detach: bool = False, network: str | None = None
    ) -> list[str]:
        """docker run arguments for a job (the client) on its network in the stack, or on
        `network` (a test that stands where another service stands, e.g. reads backends)."""
        service = catalog.get(job)
        env = [f"--env={k}={v}" for k, v in local.callee_targets(service).items()]
        name = f"{self.name}-{job}-{uuid.uuid4().hex[:6]}"
        mode = ["--detach", f"--name={name}"] if detach else ["--rm"]
        image = images.image_ref(service, self.tag)
        where = network or local.job_network(self.name, service)
        return ["run", *mode, "--network", where, *env, image, *args]

    def run_job(
        self, job: str, *args: str, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            engine.docker(*self.job_argv(job, *args)),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def healthy_counts(self) -> dict[str, tuple[int, int]]:
        """Per long-running service: (healthy tasks on this tag's image, replicas wanted); a
        service in the middle of an update counts one replica short."""
        counts = {}
        for service in catalog.rollout_order():
            name = local.service_name(self.name, service)
            images_run = docker("ps", "--filter", f"label=com.docker.swarm.service.name={name}",
                                "--filter", "health=healthy", "--format", "{{.Image}}",
                                check=False)  # fmt: skip
            healthy = images_run.split().count(images.image_ref(service, self.tag))
            state = "{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}"
            updating = docker("service", "inspect", "--format", state, name, check=False).strip()
            if updating in ("updating", "rollback_started"):
                healthy = min(healthy, service.replicas - 1)
            counts[service.name] = (healthy, service.replicas)
        return counts

    def wait_healthy(self, timeout: float = 120) -> None:
        """Wait until every replica of every long-running service is healthy on this tag."""
        deadline = time.monotonic() + timeout
        while True:
            counts = self.healthy_counts()
            status = ", ".join(f"{n} {h}/{w}" for n, (h, w) in counts.items())
            if all(h >= w for h, w in counts.values()):
                return
            if time.monotonic() > deadline:
                pytest.fail(
                    f"not healthy after {timeout:.0f} s ({status}); see `docker stack ps "
                    f"{self.name} --no-trunc` and `docker service logs {self.name}_SERVICE`"
                )
            time.sleep(2)


@contextlib.contextmanager
def own_stack(
    prefix: str, tag: str, services: dict[str, dict[str, Any]] | None = None
) -> Iterator[StackUnderTest]:
    """A stack of its own (PREFIX-XXXXXX; `services` overrides entries of the stack file),
    deployed and healthy; removed with its volumes afterwards, whatever happened."""
    test_stack = StackUnderTest(f"{prefix}-{uuid.uuid4().hex[:6]}", tag)
    try:
        local.deploy(RUNNER, test_stack.name, tag, services=services)
        test_stack.wait_healthy(timeout=180)
        yield test_stack
    finally:
        local.remove(RUNNER, test_stack.name, volumes=True)
        (local.BUILD_DIR / f"{test_stack.name}.stack.json").unlink(missing_ok=True)


@pytest.fixture(scope="session")
def stack(tag: str) -> Iterator[StackUnderTest]:
    """A stack of every long-running service, deployed for this session and removed after it."""
    with own_stack("kvtest", tag) as test_stack:
        server = catalog.get("server")
        local.ensure_gateway(RUNNER, test_stack.name, images.image_ref(server, tag),
                             local.local_address())  # fmt: skip
        yield test_stack


@dataclass
class LoadRun:
    """A `kvstack-client load` container running in the background, and what it printed."""

    container: str

    def lines(self) -> list[dict[str, object]]:
        out = docker("logs", self.container)
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def acked(self) -> dict[str, str]:
        return {str(r["key"]): str(r["value"]) for r in self.lines() if r.get("ack")}

    def running(self) -> bool:
        return docker("inspect", "--format", "{{.State.Running}}", self.container).strip() == "true"

    def wait_acks(self, at_least: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acked()) < at_least:
            if time.monotonic() > deadline:
                pytest.fail(f"fewer than {at_least} acknowledged writes after {timeout} s")
            time.sleep(0.2)

    def finish(self, timeout: float = 180) -> dict[str, object]:
        """Wait for the run to end; return its summary line."""
        docker("wait", self.container, timeout=timeout)
        summaries = [r for r in self.lines() if r.get("summary")]
        assert summaries, docker("logs", self.container)
        return summaries[-1]


@pytest.fixture
def start_load(stack: StackUnderTest) -> Iterator[Callable[..., LoadRun]]:
    """Start `load` runs of the client on the stack's network; remove their containers after."""
    started: list[LoadRun] = []

    def start(*args: str) -> LoadRun:
        cid = docker(*stack.job_argv("client", "load", *args, detach=True)).strip()
        started.append(LoadRun(cid))
        return started[-1]

    yield start
    for run in started:
        docker("rm", "-f", run.container, check=False)
