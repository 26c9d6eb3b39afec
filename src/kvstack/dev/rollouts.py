"""What a writer sees while the local stack changes: `make bench`'s rollout table, and the
helpers the fault tests (tests/containers/test_replication_faults.py) read the same figures with.

On a stack of its own (kvbench-XXXXXX, removed with its volumes afterwards), a writer (the
client's `load`: unique keys, N in flight, one JSON line per write with when it ended and how
long it took) runs through each of:

- a rolling update of the backend (`docker service update --force`: stop-first, one task at a
  time, the primary included; the server holds writes while the primary restarts);
- a rolling update of the server (start-first);
- `docker kill -s KILL` of the primary (Swarm starts a new task on its volume).

For each it reports write latency (p50, p99, max) in a window before and during the change, the
calls that failed, and for the primary where its restart went, phase by phase, from the two
containers' logs and Docker's clock.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from kvstack.dev.bench import percentile
from kvstack.ops import catalog, engine, images, local
from kvstack.ops.shell import Runner, say

WARMUP_S = 2.0  # the writer starts and finds the server
BEFORE_S = 8.0  # the "before" window: steady writes just before the change
AFTER_ACKS = 100  # writes acknowledged after the change ended, before the writer stops
PRIMARY_SLOT = local.PRIMARY_SLOT
SCENARIOS = ("backend rolling update", "server rolling update", "primary SIGKILL")


def docker(*args: str, timeout: float = 300, check: bool = True) -> str:
    """Run a docker command and return its stdout; raise with its stderr when it fails."""
    result = subprocess.run(
        engine.docker(*args), capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result.stdout


def json_logs(container: str) -> list[dict[str, object]]:
    """A container's JSON log lines (the services' logs, or a writer's output)."""
    lines = []
    for line in docker("logs", container, check=False).splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by the stop
    return lines


def logged_at(container: str, message: str) -> float:
    """When a container last logged `message` (epoch seconds; the services log RFC 3339)."""
    times = [str(r["time"]) for r in json_logs(container) if r.get("message") == message]
    if not times:
        raise LookupError(f"container {container[:12]} never logged {message!r}")
    return datetime.fromisoformat(times[-1]).timestamp()


def state_at(container: str, name: str) -> float:
    """A container's State.StartedAt or State.FinishedAt, in epoch seconds."""
    raw = docker("inspect", "--format", f"{{{{.State.{name}}}}}", container).strip()
    # Docker prints nanoseconds (2026-12-01T23:30:00.123456789Z); fromisoformat takes micro.
    stamp, _, fraction = raw.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{stamp}.{(fraction + '000000')[:6]}+00:00").timestamp()


def restart_phases(
    old: str, new: str, writes: Sequence[dict[str, object]], *, drained: bool
) -> dict[str, float]:
    """Where a primary's restart went (seconds), from the two containers' logs, Docker's clock
    and a writer's lines: the old one's drain (when it was stopped, not killed), its exit, the
    gap until Swarm started the new one, the new process's start (imports, to "listening"),
    LMDB open, start-up to SERVING, and then until the first write was acknowledged (the server
    found the new primary). `total` runs from the first of these to the last."""
    marks: dict[str, float] = {}
    if drained:
        marks |= {"draining": logged_at(old, "draining"), "stopped": logged_at(old, "stopped")}
    marks |= {
        "exited": state_at(old, "FinishedAt"),
        "started": state_at(new, "StartedAt"),
        "listening": logged_at(new, "listening"),
        "database open": logged_at(new, "database open"),
        "serving": logged_at(new, "serving"),
    }
    marks["first write"] = first_ack_after(writes, marks["serving"])
    phases = {f"{a} -> {b}": marks[b] - marks[a] for a, b in itertools.pairwise(marks)}
    first = next(iter(marks))
    total = marks["first write"] - marks[first]
    return {k: round(v, 2) for k, v in {**phases, "total": total}.items()}


def write_latency(lines: Sequence[dict[str, object]]) -> dict[str, float]:
    """p50, p99 and max (ms) of the acknowledged writes among a writer's lines."""
    ms = [float(str(r["ms"])) for r in lines if r.get("ack")]
    if not ms:
        raise LookupError("no write was acknowledged")
    return {"p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "max_ms": max(ms)}


def began(line: dict[str, object]) -> float:
    """When a write started (epoch seconds): its end less its duration."""
    return float(str(line["t"])) - float(str(line["ms"])) / 1000


def first_ack_after(lines: Sequence[dict[str, object]], moment: float) -> float:
    """When the first write acknowledged after `moment` was (epoch seconds)."""
    ends = [float(str(r["t"])) for r in lines if r.get("ack") and float(str(r["t"])) >= moment]
    if not ends:
        raise LookupError(f"no write was acknowledged after {moment:.3f}")
    return min(ends)


def backend_containers(stack: str) -> dict[int, str]:
    """The running backend containers by Swarm slot."""
    label = f"label=com.docker.swarm.service.name={stack}_backend"
    template = '{{.Label "com.docker.swarm.task.name"}} {{.ID}}'
    found = {}
    for line in docker("ps", "--filter", label, "--format", template).splitlines():
        name, _, cid = line.partition(" ")
        found[int(name.split(".")[1])] = cid
    return found


def writer_argv(stack: str, tag: str, in_flight: int, prefix: str) -> list[str]:
    """docker run arguments for the client's `load` on its network in the stack."""
    client = catalog.get("client")
    env = [f"--env={k}={v}" for k, v in local.callee_targets(client).items()]
    return [
        "run", "--detach", f"--name={stack}-writer-{uuid.uuid4().hex[:6]}",
        "--network", local.job_network(stack, client), *env, images.image_ref(client, tag),
        "load", "--count", "10000000", "--concurrency", str(in_flight), "--prefix", prefix,
    ]  # fmt: skip


@dataclass
class Outcome:
    """One scenario at one writer concurrency."""

    scenario: str
    in_flight: int
    seconds: float  # how long the change took
    before: dict[str, float]
    during: dict[str, float]
    failed: dict[str, int]  # calls that failed after the client's retries, by status code
    writes: int
    phases: dict[str, float] = field(default_factory=dict)


def wait_replaced(stack: str, slot: int, victim: str, timeout: float = 120) -> str:
    """Wait until a new backend task in `slot` is healthy; return its container."""
    label = f"label=com.docker.swarm.service.name={stack}_backend"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        healthy = docker("ps", "-q", "--filter", label, "--filter", "health=healthy").split()
        now = backend_containers(stack).get(slot)
        if now and now != victim and now in healthy:
            return now
        time.sleep(0.5)
    raise TimeoutError(f"Swarm did not replace backend slot {slot} within {timeout:.0f} s")


def resumed(writer: str, end: float, timeout: float = 60) -> None:
    """Wait until the writer has had AFTER_ACKS writes acknowledged after `end`: every write
    held during the change has had its answer by then (the writer prints in the order it sent)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = json_logs(writer)
        if sum(1 for r in lines if r.get("ack") and float(str(r["t"])) > end) >= AFTER_ACKS:
            return
        time.sleep(1)
    raise TimeoutError(f"writes did not resume within {timeout:.0f} s of the change's end")


def measure(stack: str, tag: str, scenario: str, in_flight: int) -> Outcome:
    prefix = f"bench/roll/{uuid.uuid4().hex[:6]}/"
    writer = docker(*writer_argv(stack, tag, in_flight, prefix)).strip()
    try:
        time.sleep(WARMUP_S + BEFORE_S)
        old = backend_containers(stack)[PRIMARY_SLOT]
        start = time.time()
        if scenario == "primary SIGKILL":
            docker("kill", "--signal", "KILL", old)
            new = wait_replaced(stack, PRIMARY_SLOT, old)
        else:
            service = "backend" if scenario.startswith("backend") else "server"
            docker("service", "update", "--force", "--detach=false", "--quiet",
                   f"{stack}_{service}")  # fmt: skip
            new = backend_containers(stack)[PRIMARY_SLOT]
        end = time.time()
        resumed(writer, end)
    finally:
        # Killed: as its container's PID 1 without a handler it ignores SIGTERM (a stop would
        # wait out its timeout), and every line it printed is flushed already.
        docker("kill", writer, check=False)
    lines = json_logs(writer)
    docker("rm", "-f", writer, check=False)
    writes = [r for r in lines if "ms" in r]
    before = [r for r in writes if start - BEFORE_S <= began(r) < start]
    during = [r for r in writes if began(r) < end and float(str(r["t"])) >= start]
    phases = {}
    if new != old:
        phases = restart_phases(old, new, writes, drained=scenario != "primary SIGKILL")
    return Outcome(
        scenario, in_flight, round(end - start, 1), write_latency(before), write_latency(during),
        dict(Counter(str(r["error"]) for r in writes if "error" in r)), len(writes), phases,
    )  # fmt: skip


def run(in_flight: Sequence[int] = (8, 32)) -> list[Outcome]:
    """Every scenario at each concurrency on a stack of its own; the stack goes afterwards."""
    runner = Runner()
    engine.ensure(runner)
    tag = images.version()
    images.build(runner, list(catalog.services().values()), tag, only_if_changed=True)
    stack = f"kvbench-{uuid.uuid4().hex[:6]}"
    target = local.Local(stack=stack)

    def wait_healthy() -> None:
        for svc in catalog.rollout_order():
            failure = target.wait(runner, svc, images.image_ref(svc, tag), 180)
            if failure is not None:
                raise RuntimeError(failure)

    outcomes = []
    try:
        local.deploy(runner, stack, tag)
        wait_healthy()
        for n, scenario in itertools.product(in_flight, SCENARIOS):
            say(f"rollouts: {scenario} with {n} writes in flight")
            outcomes.append(measure(stack, tag, scenario, n))
            wait_healthy()
    finally:
        local.remove(runner, stack, volumes=True)
        (local.BUILD_DIR / f"{stack}.stack.json").unlink(missing_ok=True)
    return outcomes
