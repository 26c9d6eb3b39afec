"""A saturated host does not get healthy tasks killed by their own health checks.

One stack for the module (kvtest-cpu-XXXXXX, removed with its volumes afterwards). The test
saturates both cores for BURN_S seconds with a CPU burner of its own: a container of the client
image running one busy loop per core until its own deadline (it stops by itself; `finally`
removes it whatever happens), at `--cpu-shares` SHARES where every other container has 1024, so
that a health check in a service's container gets only a small slice of a core while it runs (the
figures for this very burner are in docs/architecture.md, "What a health check costs").

It then asserts that every task that was healthy before is the same task, in the same container,
afterwards (Swarm's task history has no new task), and that writes and reads still work. While
the burner runs it reads each container's health log (`docker inspect`), so a failure says how
long the checks took and what they answered.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from kvstack.dev.probe_cost import BURN
from kvstack.ops import catalog, images, local

from .conftest import StackUnderTest, docker, own_stack

pytestmark = pytest.mark.containers

BURN_S = 120
SHARES = 65536  # 64 busy containers' worth
# The stack's health check: unhealthy after this many failures in a row.
RETRIES = local.service_spec(catalog.get("server"), "t")["healthcheck"]["retries"]


@pytest.fixture(scope="module")
def cstack(tag: str) -> Iterator[StackUnderTest]:
    with own_stack("kvtest-cpu", tag) as stack:
        yield stack


def tasks(stack: StackUnderTest) -> dict[str, list[str]]:
    """Every task Swarm has for each service (its history included): 'ID DESIRED-STATE'."""
    out = {}
    for service in catalog.rollout_order():
        name = local.service_name(stack.name, service)
        fmt = "{{.ID}} {{.DesiredState}}"
        out[service.name] = docker("service", "ps", "--no-trunc", "--format", fmt, name).split("\n")
    return {k: sorted(filter(None, v)) for k, v in out.items()}


def health(container: str) -> dict[str, Any]:
    out = docker("inspect", "--format", "{{json .State.Health}}", container, check=False).strip()
    return json.loads(out) if out and out != "null" else {}


def seconds(start: str, end: str) -> float:
    """The time between two of Docker's RFC 3339 timestamps (nanoseconds, Z)."""

    def parse(stamp: str) -> float:
        whole, _, fraction = stamp.rstrip("Z").partition(".")
        return datetime.fromisoformat(whole + "+00:00").timestamp() + float(f"0.{fraction or 0}")

    return parse(end) - parse(start)


def busy_fraction(before: list[int], after: list[int]) -> float:
    """The machine's busy share between two readings of /proc/stat's cpu line."""
    delta = [b - a for a, b in zip(before, after, strict=True)]
    idle = delta[3] + delta[4]  # idle, iowait
    return 1 - idle / max(1, sum(delta))


def cpu_times() -> list[int]:
    return [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]


def test_a_saturated_host_kills_no_healthy_task(cstack: StackUnderTest) -> None:
    key = f"cpu/{uuid.uuid4().hex[:8]}"
    put = cstack.run_job("client", "put", f"{key}/before", "v", timeout=120)
    assert put.returncode == 0, f"the stack does not take writes before the burn: {put.stderr}"
    before_tasks = tasks(cstack)
    containers = {s.name: sorted(cstack.containers(s.name)) for s in catalog.rollout_order()}
    wanted = {s.name: s.replicas for s in catalog.rollout_order()}
    assert {k: len(v) for k, v in containers.items()} == wanted, (
        f"not every task runs before the burn: {containers}; see `docker stack ps {cstack.name}`"
    )
    burner = f"{cstack.name}-burner"
    streaks: dict[str, int] = {}  # container -> the longest failing streak seen
    failures: dict[str, dict[str, Any]] = {}  # container -> its last failed check
    checks: dict[tuple[str, str], float] = {}  # (container, start) -> seconds the check took
    client = images.image_ref(catalog.get("client"), cstack.tag)
    started = time.monotonic()
    try:
        docker("run", "--detach", "--rm", "--name", burner, "--cpu-shares", str(SHARES),
               "--entrypoint", "/opt/venv/bin/python", client,
               "-c", BURN, str(BURN_S), str(os.cpu_count() or 2))  # fmt: skip
        stat_before = cpu_times()
        while time.monotonic() - started < BURN_S + 5:
            for cid in (c for ids in containers.values() for c in ids):
                state = health(cid)
                streak = int(str(state.get("FailingStreak", 0)))
                streaks[cid] = max(streaks.get(cid, 0), streak)
                log = state.get("Log") or []
                for entry in log:
                    checks[cid, entry["Start"]] = seconds(entry["Start"], entry["End"])
                failed = [e for e in log if e.get("ExitCode") != 0]
                if failed:
                    failures[cid] = failed[-1]
            time.sleep(5)
        busy = busy_fraction(stat_before, cpu_times())
        burner_left = docker("ps", "-q", "--filter", f"name={burner}").strip()
    finally:
        docker("rm", "--force", burner, check=False)
    elapsed = time.monotonic() - started
    assert not burner_left, f"the burner ran past its {BURN_S} s (removed now): fix BURN"
    assert busy > 0.9, (
        f"the host was busy only {busy:.0%} of the {elapsed:.0f} s burn: the burner did not "
        f"saturate it, so this run proves nothing; see `docker logs` of a burner run by hand"
    )

    slowest = max(checks.values(), default=0.0)
    detail = f"  {len(checks)} checks seen, the slowest {slowest:.1f} s\n" + "\n".join(
        f"  {cid[:12]}: longest failing streak {streaks.get(cid, 0)} of {RETRIES}, "
        f"last failed check: {failures.get(cid)}"
        for cid in (c for ids in containers.values() for c in ids)
    )
    after = {s.name: sorted(cstack.containers(s.name)) for s in catalog.rollout_order()}
    after_tasks = tasks(cstack)
    replaced = (
        f"tasks were replaced during {elapsed:.0f} s of a saturated host (burner at "
        f"--cpu-shares {SHARES}): before {before_tasks}, after {after_tasks}\n{detail}\n"
        "Their health checks took longer than the host gave them: measure a check with "
        "`python -m kvstack.dev.probe_cost` and widen the timeout or retries in "
        "kvstack.ops.local.service_spec (see docs/architecture.md, 'What a health check costs')"
    )
    assert after == containers, replaced
    assert after_tasks == before_tasks, replaced
    for cid in (c for ids in containers.values() for c in ids):
        assert health(cid).get("Status") == "healthy", f"{cid[:12]} is not healthy:\n{detail}"

    put = cstack.run_job("client", "put", f"{key}/after", "v", timeout=120)
    assert put.returncode == 0, f"a write after the burn failed: {put.stderr}\n{detail}"
    got = cstack.run_job("client", "get", f"{key}/before", timeout=120)
    assert got.returncode == 0, f"a read after the burn failed: {got.stderr}\n{detail}"
    assert got.stdout.split()[-1:] == ["v"], f"the read after the burn returned {got.stdout!r}"
    print(f"burn {elapsed:.0f} s, host busy {busy:.0%}; health checks during it:\n{detail}")
