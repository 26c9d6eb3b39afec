"""Replication under faults, on the real engine: no acknowledged write lost, replicas converge.

One stack for the module (kvtest-rf-XXXXXX, removed with its volumes afterwards), with the
backend's change log kept short (KVSTACK_LOG_RETAIN) so that a replica that falls far enough
behind, and every replica added by a scale-out, bootstraps from a snapshot rather than the log.

Each test runs a workload on the stack's network while it injects one fault:

- a writer: the client's `load` (unique keys under a prefix of the test's own, a value unique to
  the run) prints one JSON line per acknowledged write;
- a reader: gets of the writer's recent keys through the server (so from the primary and from
  replicas), printing every value it saw.

Then the checker reads every backend DIRECTLY (each task's address on the stack network, port
50061: backends serve the KeyValue API too) and asserts that every acknowledged write is on the
primary and, once the replicas have caught up, that every replica holds exactly the primary's
contents under the prefix; and that no read (through the server) or stored value is a value the
writer never attempted. Writes failing while a backend is down are allowed; losing an
acknowledged one is not. Each test leaves the stack healthy with 2 converged backends.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import pytest

from kvstack.client import default_write_timeout
from kvstack.dev.rollouts import (
    json_logs,
    restart_phases,
    write_latency,
)
from kvstack.ops import catalog, images, local
from kvstack.ops.shell import Runner

from .conftest import StackUnderTest, docker

pytestmark = pytest.mark.containers

RUNNER = Runner()
BACKEND = catalog.get("backend")
PRIMARY_SLOT = local.PRIMARY_SLOT
BACKENDS = 2  # the stack's default backend count
LOG_RETAIN = 1500  # a few seconds of writes: a partitioned or new replica needs a snapshot
VALUE_BYTES = 64  # the client's default; the value is f"{run}-{i}-" + "x" * (VALUE_BYTES - 20)
WRITER_COUNT = 50_000  # an upper bound (minutes of writes); each test stops its writer long before
CONVERGE_S = 90
# The log lines a failed call's timeline shows (Workload.timeline).
TIMELINE = {
    "backends",
    "readable",
    "not readable",
    "the primary stopped; reads go on here until a primary answers",
    "told the replica this primary stopped",
    "replica left behind by the drain",
    "backend slow to answer a read; trying another",
    "backend slow to answer a read; trying again",
    "lost the primary",
    "draining",
    "serving",
}
# A new replica reaches the servers' reads within this of turning readable: Swarm adds it to
# DNS at its first passing health check (the check's 5 s interval), and each server's
# Directory resolves the name and asks every backend's Role once a second.
DISCOVERY_S = 15.0
WRITE_TIMEOUT_S = default_write_timeout()  # the client's deadline for one write
IN_FLIGHT = [8, 32]  # the writer's concurrency in the rollout and recovery tests

# Gets of the writer's keys through the server until SIGTERM or argv[2] seconds. It follows the
# writer's frontier: it reads keys near the highest index found so far. One JSON line per value
# seen, a summary at the end.
READER = """
import json, random, signal, sys, time
import grpc
from kvstack.client import Client, Unreachable, default_target
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
prefix, end = sys.argv[1], time.monotonic() + float(sys.argv[2])
# The client's default deadline per read: a replica stays readable while its drained primary
# restarts (docs/architecture.md, "Reads, and the staleness bound").
client = Client(default_target(), attempts=2, verbose=False, latest=False)
top = found = missing = errors = 0
while not stop and time.monotonic() < end:
    i = random.randint(max(0, top - 300), top + 20)
    key = f"{prefix}{i:08d}"
    try:
        value = client.get(key.encode()).decode()
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.NOT_FOUND:
            missing += 1  # a replica within its staleness bound, or a key not yet written
        else:
            errors += 1
            print(json.dumps({"read_error": err.code().name, "t": time.time()}), flush=True)
        time.sleep(0.05)
        continue
    except Unreachable as err:
        errors += 1
        print(json.dumps({"read_error": str(err)[:300], "t": time.time()}), flush=True)
        time.sleep(0.2)
        continue
    found += 1
    top = max(top, i)
    print(json.dumps({"key": key, "value": value}), flush=True)
    time.sleep(0.005)
summary = {"summary": True, "found": found, "missing": missing, "errors": errors}
print(json.dumps(summary), flush=True)
"""

# Every entry under argv[1] of each backend in argv[2:] (HOST:PORT, called directly), as one
# JSON object {target: {key: value}} or {target: {"__error__": why}}.
LISTER = """
import json, sys
from kvstack.client import Client
out = {}
for target in sys.argv[2:]:
    client = Client(target, attempts=3, verbose=False)
    try:
        out[target] = {e.key.decode(): e.value.decode() for e in client.list(sys.argv[1].encode())}
    except Exception as err:
        out[target] = {"__error__": str(err)[:300]}
    finally:
        client.close()
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Task:
    """One running backend task: its Swarm slot, container and address on the stack network."""

    slot: int
    container: str
    ip: str

    @property
    def target(self) -> str:
        return f"{self.ip}:{BACKEND.port}"


@pytest.fixture(scope="module")
def rstack(tag: str) -> Iterator[StackUnderTest]:
    """This module's stack, with a short change log on the backend (see LOG_RETAIN)."""
    stack = StackUnderTest(f"kvtest-rf-{uuid.uuid4().hex[:6]}", tag)
    spec = local.service_spec(BACKEND, tag)
    spec["environment"]["KVSTACK_LOG_RETAIN"] = str(LOG_RETAIN)
    try:
        local.deploy(RUNNER, stack.name, tag, services={BACKEND.name: spec})
        stack.wait_healthy(timeout=180)
        wait_backends(stack, BACKENDS)
        yield stack
    finally:
        local.remove(RUNNER, stack.name, volumes=True)
        (local.BUILD_DIR / f"{stack.name}.stack.json").unlink(missing_ok=True)


def python_job(
    stack: StackUnderTest, script: str, *args: str, detach: bool, network: str | None = None
) -> list[str]:
    """docker run arguments for a Python script in the client image on the client's network
    in the stack (it reaches the server), or on `network`."""
    argv = stack.job_argv("client", "-c", script, *args, detach=detach, network=network)
    argv.insert(argv.index(images.image_ref(catalog.get("client"), stack.tag)), "--entrypoint")
    argv.insert(argv.index("--entrypoint") + 1, "/opt/venv/bin/python")
    return argv


def backend_network(stack: StackUnderTest) -> str:
    """The backends' one network: the server's flow to them (replication uses it too)."""
    return stack.network("server", BACKEND.name)


def backends(stack: StackUnderTest) -> dict[int, Task]:
    """The running backend tasks by slot (a task cut off from the network has no ip)."""
    found: dict[int, Task] = {}
    template = (
        '{{index .Config.Labels "com.docker.swarm.task.name"}} {{json .NetworkSettings.Networks}}'
    )
    for cid in stack.containers(BACKEND.name):
        out = docker("inspect", "--format", template, cid, check=False).strip()
        if not out:
            continue  # gone between ps and inspect
        name, _, networks = out.partition(" ")
        slot = int(name.split(".")[1])
        ip = (json.loads(networks).get(backend_network(stack)) or {}).get("IPAddress", "")
        found[slot] = Task(slot, cid, ip)
    return found


def wait_backends(stack: StackUnderTest, count: int, timeout: float = 120) -> dict[int, Task]:
    """Wait until exactly `count` backend tasks run, every one healthy and on the network."""
    label = f"label=com.docker.swarm.service.name={stack.name}_{BACKEND.name}"
    deadline = time.monotonic() + timeout
    while True:
        healthy = docker("ps", "-q", "--filter", label, "--filter", "health=healthy").split()
        tasks = backends(stack)
        if (
            len(healthy) == count
            and sorted(tasks) == list(range(1, count + 1))
            and all(t.ip for t in tasks.values())
        ):
            return tasks
        if time.monotonic() > deadline:
            pytest.fail(f"{len(healthy)} of {count} backends healthy after {timeout} s: {tasks}")
        time.sleep(1)


def wait_seen_by_servers(
    stack: StackUnderTest, count: int, timeout: float = 120
) -> dict[int, Task]:
    """Wait until `count` backends run healthy and every server's Directory lists each of them
    as the primary or a readable replica (its last "backends" line): a test of a change then
    starts from a stack whose servers can use every backend, not only one whose tasks are
    healthy."""
    deadline = time.monotonic() + timeout
    while True:
        tasks = wait_backends(stack, count, timeout=max(1.0, deadline - time.monotonic()))
        views: list[set[str]] = []
        for server in stack.containers(catalog.get("server").name):
            lines = [r for r in json_logs(server) if r.get("message") == "backends"]
            listing = lines[-1].get("backends") if lines else None
            views.append({str(e) for e in listing} if isinstance(listing, list) else set())
        targets = {t.target for t in tasks.values()}
        usable = [{f"{t} primary", f"{t} replica"} for t in targets]
        if views and all(view & ok for view in views for ok in usable):
            return tasks
        if time.monotonic() > deadline:
            pytest.fail(
                f"the servers do not list every backend {targets} after {timeout} s: {views}"
            )
        time.sleep(1)


def seen_by_servers(stack: StackUnderTest, task: Task) -> float:
    """Seconds from a replica's first "readable" to when the last server's Directory listed it as
    a replica that says it may answer reads (the server reads from it from then on if it also
    says it follows the primary, which a replica that just turned readable does)."""

    def at(record: dict[str, object]) -> float:
        return datetime.fromisoformat(str(record["time"])).timestamp()

    became = [at(r) for r in json_logs(task.container) if r.get("message") == "readable"]
    assert became, f"the replica in slot {task.slot} never logged that it turned readable"
    readable = min(became)
    seen = []
    for server in stack.containers(catalog.get("server").name):
        listed = [
            at(r)
            for r in json_logs(server)
            if r.get("message") == "backends"
            and isinstance(listing := r.get("backends"), list)
            and f"{task.target} replica" in listing
        ]
        seen.append(min(listed, default=float("inf")))
    return round(max(seen) - readable, 2)


def listings(
    stack: StackUnderTest, prefix: str, tasks: dict[int, Task]
) -> dict[int, dict[str, str]]:
    """Each backend's entries under prefix, read from the backend itself."""
    targets = [t.target for t in tasks.values()]
    # It reads each backend directly, so it stands where the server stands.
    argv = python_job(stack, LISTER, prefix, *targets, detach=False, network=backend_network(stack))
    out = docker(*argv, timeout=120)
    by_target = json.loads(out.strip().splitlines()[-1])
    return {slot: by_target[t.target] for slot, t in tasks.items()}


def recent_logs(container: str, count: int = 25) -> str:
    """The last log records of a backend, one short line each: what a failure message needs."""
    lines = [
        " ".join(f"{k}={v}" for k, v in r.items() if k not in ("severity", "logger", "service"))
        for r in json_logs(container)
        if r.get("logger") != "kvstack.access"
    ]
    return f"--- last logs of {container[:12]}:\n" + "\n".join(lines[-count:])


class Workload:
    """A writer (`load`) and a reader through the server, in the background."""

    def __init__(self, stack: StackUnderTest, name: str, concurrency: int = 4) -> None:
        self.stack = stack
        self.concurrency = concurrency
        self.prefix = f"rf/{name}/{uuid.uuid4().hex[:6]}/"
        self.writer = docker(
            *stack.job_argv(
                "client",
                "load",
                "--count",
                str(WRITER_COUNT),
                "--concurrency",
                str(concurrency),
                "--prefix",
                self.prefix,
                detach=True,
            )
        ).strip()
        self.reader = docker(*python_job(stack, READER, self.prefix, "240", detach=True)).strip()
        self.writer_lines: list[dict[str, object]] = []
        self.reader_lines: list[dict[str, object]] = []

    def acked(self) -> dict[str, str]:
        lines = self.writer_lines or json_logs(self.writer)
        return {str(r["key"]): str(r["value"]) for r in lines if r.get("ack")}

    def wait_acks(self, more: int, timeout: float = 90) -> None:
        """Wait for `more` acknowledged writes beyond those seen so far."""
        target = len(self.acked()) + more
        deadline = time.monotonic() + timeout
        while len(self.acked()) < target:
            running = docker("inspect", "--format", "{{.State.Running}}", self.writer).strip()
            assert running == "true", (
                f"the writer ended early: {docker('logs', self.writer)[-2000:]}"
            )
            if time.monotonic() > deadline:
                pytest.fail(f"fewer than {more} more acknowledged writes in {timeout} s")
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop both (the writer mid-run: every acknowledgement it printed counts). The writer
        is killed: as its container's PID 1 without a handler it ignores SIGTERM, and each line
        it printed is flushed already; the reader ends on SIGTERM with its summary."""
        docker("kill", self.writer, check=False)
        docker("stop", "--time", "10", self.reader, check=False)
        self.writer_lines = json_logs(self.writer)
        self.reader_lines = json_logs(self.reader)

    def failures(self) -> list[dict[str, object]]:
        """Every call that failed after the client's retries: writes, then reads (after stop())."""
        writes = [r for r in self.writer_lines if "error" in r]
        return writes + [r for r in self.reader_lines if "read_error" in r]

    def assert_no_failed_call(self) -> None:
        failed = self.failures()
        assert not failed, (
            f"{len(failed)} calls failed at {self.concurrency} writes in flight, after the "
            f"client's retries (a write's deadline: {WRITE_TIMEOUT_S:.0f} s): {failed[:3]}\n"
            + "\n".join(self.timeline(float(str(failed[0].get("t", 0))), 12))
        )

    def timeline(self, moment: float, before: float) -> list[str]:
        """What the stack's containers (stopped tasks' too) said about backends in the `before`
        seconds up to `moment` (epoch): where to look when a call failed."""
        lines = []
        for service in (BACKEND.name, catalog.get("server").name):
            label = f"label=com.docker.swarm.service.name={self.stack.name}_{service}"
            # Stopped tasks' containers too (Swarm keeps a few): a drained primary's, say.
            for cid in docker("ps", "-aq", "--filter", label).split():
                for r in json_logs(cid):
                    if r.get("message") not in TIMELINE or "time" not in r:
                        continue
                    at = datetime.fromisoformat(str(r["time"])).timestamp()
                    if moment - before <= at <= moment + 1:
                        backends = r.get("backends", "")
                        lines.append(f"{at:.2f} {service} {cid[:8]} {r['message']} {backends}")
        return sorted(lines)

    def remove(self) -> None:
        docker("rm", "-f", self.writer, self.reader, check=False)

    def attempted(self, key: str) -> str | None:
        """The one value the writer ever sent for key (None: not one of its keys)."""
        if not key.startswith(self.prefix) or not key[len(self.prefix) :].isdigit():
            return None
        runs = {v.split("-", 1)[0] for v in self.acked().values()}
        assert len(runs) == 1, f"expected one writer run, saw {runs}"
        (run,) = runs
        return f"{run}-{int(key[len(self.prefix) :])}-" + "x" * (VALUE_BYTES - 20)

    def check(self, expected_backends: int = BACKENDS) -> dict[str, object]:
        """The checker (after stop()): see the module docstring. Returns figures for the log."""
        acked = self.acked()
        assert acked, "no write was acknowledged"
        reads = [r for r in self.reader_lines if "value" in r]
        assert reads, f"the reader saw no value: {self.reader_lines[-1:]}"
        bad_reads = [r for r in reads if r["value"] != self.attempted(str(r["key"]))]
        assert not bad_reads, f"reads returned values never written: {bad_reads[:3]}"

        tasks = wait_backends(self.stack, expected_backends)
        deadline = time.monotonic() + CONVERGE_S
        while True:
            held = listings(self.stack, self.prefix, tasks)
            primary = held[PRIMARY_SLOT]
            behind = {s: len(primary) - len(h) for s, h in held.items() if h != primary}
            if not behind and "__error__" not in primary:
                break
            if time.monotonic() > deadline:
                pytest.fail(
                    f"replicas differ from the primary after {CONVERGE_S} s "
                    f"(slot: entries behind, or an error): "
                    f"{ {s: held[s].get('__error__', n) for s, n in behind.items()} }\n"
                    + "\n".join(recent_logs(tasks[s].container) for s in [*behind, PRIMARY_SLOT])
                )
            time.sleep(2)
            tasks = wait_backends(self.stack, expected_backends)

        lost = sorted(k for k, v in acked.items() if primary.get(k) != v)
        assert not lost, f"{len(lost)} of {len(acked)} acknowledged writes lost: {lost[:3]}"
        bogus = sorted(k for k, v in primary.items() if v != self.attempted(k))
        assert not bogus, f"values never written are stored: {bogus[:3]}"
        for slot, entries in held.items():  # equal to the primary, so this holds; say it plainly
            missing = [k for k in acked if k not in entries]
            assert not missing, f"slot {slot} misses {len(missing)} acknowledged writes"
        summary = [r for r in self.reader_lines if r.get("summary")]
        return {
            "acked": len(acked),
            "stored": len(primary),
            "reads": len(reads),
            "reader": summary[-1] if summary else None,
        }


class StartWorkload(Protocol):
    def __call__(self, name: str, concurrency: int = 4) -> Workload: ...


@pytest.fixture
def workload(rstack: StackUnderTest) -> Iterator[StartWorkload]:
    started: list[Workload] = []

    def start(name: str, concurrency: int = 4) -> Workload:
        started.append(Workload(rstack, name, concurrency))
        return started[-1]

    yield start
    for run in started:
        run.remove()


def kill_and_wait(stack: StackUnderTest, slot: int) -> str:
    """SIGKILL the backend task of `slot`; wait until Swarm has a new healthy one there and
    return its container."""
    victim = backends(stack)[slot].container
    docker("kill", "--signal", "KILL", victim)
    deadline = time.monotonic() + 120
    while (tasks := wait_backends(stack, BACKENDS))[slot].container == victim:
        assert time.monotonic() < deadline, f"Swarm did not replace slot {slot}"
        time.sleep(1)
    assert victim not in {t.container for t in tasks.values()}
    return tasks[slot].container


@pytest.mark.parametrize("in_flight", IN_FLIGHT)
def test_primary_sigkill_fails_no_call_and_loses_no_write(
    rstack: StackUnderTest, workload: StartWorkload, in_flight: int
) -> None:
    """`docker kill -s KILL` of the primary (slot 1) with a writer at 8 and at 32 in flight and
    a reader; Swarm restarts it on its own volume. The server holds each write until the new
    primary serves (KVSTACK_PRIMARY_WAIT) and reads go to the replica, so no call fails. That
    zero means something only while the recovery (the old primary's exit -> the first write the
    new one acknowledged, measured here) is shorter than a write's deadline, so that is checked too.
    No acknowledged write is lost, the replica converges, no read saw a value never written."""
    wait_seen_by_servers(rstack, BACKENDS)
    run = workload("kill-primary", in_flight)
    run.wait_acks(500)
    old = backends(rstack)[PRIMARY_SLOT].container
    new = kill_and_wait(rstack, PRIMARY_SLOT)
    run.wait_acks(500)  # writes resume on the restarted primary
    run.stop()
    phases = restart_phases(old, new, run.writer_lines, drained=False)
    print({**write_latency(run.writer_lines), **run.check(), "primary restart": phases})
    assert phases["total"] < WRITE_TIMEOUT_S, (
        f"writes resumed {phases['total']:.1f} s after the primary died: longer than a write's "
        "deadline, so failed calls are to be expected; make the restart faster"
    )
    run.assert_no_failed_call()


def test_replica_sigkill_loses_no_acknowledged_write(
    rstack: StackUnderTest, workload: StartWorkload
) -> None:
    """`docker kill -s KILL` of the replica (slot 2) during writes; Swarm restarts it on its own
    volume and it catches up from where it was: identical to the primary, nothing lost, and no
    call failed (the primary acknowledges alone meanwhile; reads go to the primary)."""
    wait_seen_by_servers(rstack, BACKENDS)
    run = workload("kill-replica")
    run.wait_acks(500)
    kill_and_wait(rstack, PRIMARY_SLOT + 1)
    run.wait_acks(500)
    run.stop()
    print(run.check(), flush=True)
    run.assert_no_failed_call()


def test_partitioned_replica_converges_after_reconnect(
    rstack: StackUnderTest, workload: StartWorkload
) -> None:
    """The replica is cut off the stack network (`docker network disconnect`) while writes go on
    (the primary stops waiting for it and acknowledges alone), long enough to fall out of the
    primary's log; reconnected, it copies a snapshot and converges. Nothing acknowledged lost."""
    replica = wait_backends(rstack, BACKENDS)[PRIMARY_SLOT + 1].container
    run = workload("partition")
    run.wait_acks(300)
    docker("network", "disconnect", backend_network(rstack), replica)
    try:
        try:
            run.wait_acks(LOG_RETAIN + 500)  # beyond the primary's log: it needs a snapshot
        finally:
            docker("network", "connect", backend_network(rstack), replica)
        run.wait_acks(300)
        run.stop()
        print(run.check(), flush=True)
        assert replica == backends(rstack)[PRIMARY_SLOT + 1].container, "the replica was replaced"
        snapshots = [r for r in json_logs(replica) if r.get("message") == "snapshot loaded"]
        assert snapshots, "the reconnected replica did not copy a snapshot"
    finally:
        # A task container connected again by hand is back on the network but not in the
        # service's DNS (seen here: no server listed it again, so the next test began with the
        # primary as the only reader). Swarm replaces the task, which registers it properly;
        # whatever failed above, the next tests get a whole stack.
        docker("rm", "--force", replica, check=False)
        wait_seen_by_servers(rstack, BACKENDS)


@pytest.mark.parametrize("in_flight", IN_FLIGHT)
def test_backend_rolling_update_fails_no_call(
    rstack: StackUnderTest, workload: StartWorkload, in_flight: int
) -> None:
    """`docker service update --force` restarts every backend, one at a time (stop-first, the
    primary included), with a writer at 8 and at 32 in flight and a reader: no call fails (the
    server holds writes while the primary restarts), nothing acknowledged is lost, the new
    tasks converge. Prints the write latency and where the primary's restart time went."""
    before = wait_seen_by_servers(rstack, BACKENDS)
    run = workload("rolling", in_flight)
    run.wait_acks(300)
    service = f"{rstack.name}_{BACKEND.name}"
    docker("service", "update", "--force", "--detach=false", service, timeout=300)
    after = wait_backends(rstack, BACKENDS)
    assert not {t.container for t in before.values()} & {t.container for t in after.values()}, (
        "a backend was not restarted"
    )
    run.wait_acks(300)
    run.stop()
    old, new = before[PRIMARY_SLOT].container, after[PRIMARY_SLOT].container
    phases = restart_phases(old, new, run.writer_lines, drained=True)
    print({**write_latency(run.writer_lines), **run.check(), "primary restart": phases})
    run.assert_no_failed_call()


@pytest.mark.parametrize("in_flight", IN_FLIGHT)
def test_server_rolling_update_fails_no_call(
    rstack: StackUnderTest, workload: StartWorkload, in_flight: int
) -> None:
    """`docker service update --force` of the server (start-first: a new task is healthy before
    an old one stops) with a writer at 8 and at 32 in flight and a reader: no call fails and
    nothing acknowledged is lost."""
    service = f"{rstack.name}_{catalog.get('server').name}"
    wait_seen_by_servers(rstack, BACKENDS)
    before = set(rstack.containers("server"))
    run = workload("server-rolling", in_flight)
    run.wait_acks(300)
    docker("service", "update", "--force", "--detach=false", service, timeout=300)
    deadline = time.monotonic() + 60  # the old tasks drain (SIGTERM) after the update converged
    while before & set(rstack.containers("server")):
        assert time.monotonic() < deadline, "an old server task still runs a minute later"
        time.sleep(1)
    run.wait_acks(300)
    run.stop()
    print({**write_latency(run.writer_lines), **run.check()}, flush=True)
    run.assert_no_failed_call()


@pytest.mark.parametrize("in_flight", IN_FLIGHT)
def test_scale_out_to_five_and_back_fails_no_call(
    rstack: StackUnderTest, workload: StartWorkload, in_flight: int
) -> None:
    """Scale the backend 2 -> 5 with a writer at 8 and at 32 in flight and a reader: the new
    replicas copy a snapshot and converge; then 5 -> 2. The primary's task is never touched, no
    call fails, nothing acknowledged is lost."""
    service = f"{rstack.name}_{BACKEND.name}"
    primary = wait_seen_by_servers(rstack, BACKENDS)[PRIMARY_SLOT].container
    try:
        run = workload("scale-out", in_flight)
        run.wait_acks(
            LOG_RETAIN + 300
        )  # the log no longer starts at 0: new replicas need a snapshot
        docker("service", "scale", "--detach", f"{service}=5")
        tasks = wait_backends(rstack, 5, timeout=180)
        run.wait_acks(300)
        run.stop()
        print(run.check(expected_backends=5), flush=True)
        run.assert_no_failed_call()
        for slot in range(BACKENDS + 1, 6):
            loaded = [
                r for r in json_logs(tasks[slot].container) if r.get("message") == "snapshot loaded"
            ]
            assert loaded, f"the new replica in slot {slot} did not start from a snapshot"
        discovery = {slot: seen_by_servers(rstack, tasks[slot]) for slot in range(BACKENDS + 1, 6)}
        print({"readable -> in every server's reads, s": discovery}, flush=True)
        assert max(discovery.values()) <= DISCOVERY_S, discovery

        run = workload("scale-in", in_flight)
        run.wait_acks(300)
        docker("service", "scale", "--detach", f"{service}={BACKENDS}")
        wait_backends(rstack, BACKENDS, timeout=180)
        run.wait_acks(300)
        run.stop()
        print(run.check(), flush=True)
        run.assert_no_failed_call()
        assert backends(rstack)[PRIMARY_SLOT].container == primary, "the primary was replaced"
    finally:
        docker("service", "scale", "--detach", f"{service}={BACKENDS}", check=False)
