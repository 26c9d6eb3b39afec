"""`python -m kvstack.dev.probe_cost`: the CPU one Swarm health check costs, idle and saturated.

It starts a backend container of this tree's image (`kvstack images` first), then, inside that
container (`docker exec`, as Docker runs a HEALTHCHECK: same cgroup, same file system), runs
each command N times in a row from one Python parent and reads the children's CPU time
(getrusage RUSAGE_CHILDREN: user + system of every check process, nothing else) and each run's
wall time:

- `python -c pass`: the interpreter's own start-up, the floor of any check written in Python;
- a grpcio health client (`grpc.insecure_channel` + `HealthStub.Check`), the probe as it was;
- `python -m kvstack.probe --service kvstack.v1.KeyValue`: the image's check now;
- the last two again with one `docker exec` per check, as Docker runs a HEALTHCHECK: CPU from the
  container's cgroup (which the runtime's set-up of each exec is charged to as well), less what
  the service uses at rest; wall from the host;
- one `Check` sent from this process on one channel, as the kubelet probes: the service's answer.

Then again while a CPU burner of its own runs: a container of the client image with one busy
loop per core for a bounded time (it ends by itself; removed in `finally` in any case), at
`--cpu-shares` SHARES (each container has 1024): with 16384, the burner weighs as much as 16 busy
containers, so a check in a service's container gets about 1/9 of a core while it runs.

It prints a Markdown table for docs/architecture.md ("What a health check costs"); the machine is
shared, so compare figures from one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
import uuid
from pathlib import Path

from kvstack import defaults
from kvstack.ops import catalog, engine, images

PY = "/opt/venv/bin/python"
# Run inside the container: N runs of argv, then one JSON line of the children's CPU and walls.
MEASURE = """
import json, resource, subprocess, sys, time
n, argv, walls, codes = int(sys.argv[1]), sys.argv[2:], [], set()
for _ in range(n):
    start = time.monotonic()
    codes.add(subprocess.run(argv, capture_output=True).returncode)
    walls.append(time.monotonic() - start)
use = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"cpu": (use.ru_utime + use.ru_stime) / n, "walls": sorted(walls),
                  "codes": sorted(codes)}))
"""
BACKEND = catalog.get("backend")
GRPCIO_CHECK = f"""
import sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
with grpc.insecure_channel("localhost:{BACKEND.port}") as channel:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="{BACKEND.readiness}"), timeout=10)
sys.exit(0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1)
"""
BURN = """
import multiprocessing, sys, time
def burn(end):
    while time.monotonic() < end:
        pass
if __name__ == "__main__":
    end = time.monotonic() + float(sys.argv[1])
    procs = [multiprocessing.Process(target=burn, args=(end,)) for _ in range(int(sys.argv[2]))]
    for p in procs: p.start()
    for p in procs: p.join()
"""
COMMANDS = {
    "`python -c pass` (start-up only)": [PY, "-c", "pass"],
    "grpcio health client (the probe before)": [PY, "-c", GRPCIO_CHECK],
    "`python -m kvstack.probe` (now)": [PY, "-m", "kvstack.probe", "--target",
                                        f"localhost:{BACKEND.port}",
                                        "--service", BACKEND.readiness, "--timeout", "10"],
}  # fmt: skip


def docker(*args: str, timeout: float = 300) -> str:
    return subprocess.run(
        engine.docker(*args), capture_output=True, text=True, check=True, timeout=timeout
    ).stdout


def measure(container: str, argv: list[str], runs: int) -> dict[str, float]:
    out = json.loads(docker("exec", container, PY, "-c", MEASURE, str(runs), *argv))
    assert out["codes"] == [0], f"{argv[:3]} failed in the container: exit codes {out['codes']}"
    walls = out["walls"]
    return {"cpu_ms": out["cpu"] * 1000, "p50_ms": walls[len(walls) // 2] * 1000,
            "max_ms": walls[-1] * 1000}  # fmt: skip


def answers(port: int, runs: int) -> dict[str, float]:
    """Walls of Check calls from this process (outside the container, on one channel, as the
    kubelet probes): what the service itself takes to answer, with no process started."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    walls = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=BACKEND.readiness)
        stub.Check(request, timeout=30)  # connected
        for _ in range(runs):
            start = time.monotonic()
            stub.Check(request, timeout=30)
            walls.append(time.monotonic() - start)
            time.sleep(0.2)
    walls.sort()
    return {"cpu_ms": float("nan"), "p50_ms": walls[len(walls) // 2] * 1000,
            "max_ms": walls[-1] * 1000}  # fmt: skip


def cgroup_cpu_ns(container_id: str) -> int:
    """CPU time used so far by every process of a container (its cgroup), in nanoseconds."""
    v1 = Path(f"/sys/fs/cgroup/cpuacct/docker/{container_id}/cpuacct.usage")
    if v1.exists():
        return int(v1.read_text())
    v2 = Path(f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/cpu.stat")
    usage = dict(line.split() for line in v2.read_text().splitlines())
    return int(usage["usage_usec"]) * 1000


def execs(container: str, argv: list[str], runs: int) -> dict[str, float]:
    """Checks as Docker runs them: one `docker exec` each, so the runtime's own set-up in the
    container (runc joins the container's namespaces and cgroup) is counted too. CPU is the
    container's cgroup usage over the runs, less the service's own usage at rest over as long."""
    cid = docker("inspect", "--format", "{{.Id}}", container).strip()
    rest_start, rest_ns = time.monotonic(), cgroup_cpu_ns(cid)
    time.sleep(5)
    rest_rate = (cgroup_cpu_ns(cid) - rest_ns) / (time.monotonic() - rest_start)
    walls = []
    begin, before = time.monotonic(), cgroup_cpu_ns(cid)
    for _ in range(runs):
        start = time.monotonic()
        docker("exec", container, *argv)
        walls.append(time.monotonic() - start)
    used = cgroup_cpu_ns(cid) - before - rest_rate * (time.monotonic() - begin)
    walls.sort()
    return {"cpu_ms": used / runs / 1e6, "p50_ms": walls[len(walls) // 2] * 1000,
            "max_ms": walls[-1] * 1000}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m kvstack.dev.probe_cost", description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--shares", type=int, action="append", help="burner --cpu-shares")
    args = parser.parse_args()
    tag = images.version()
    run = uuid.uuid4().hex[:6]
    backend = f"probe-cost-{run}-backend"
    burner = f"probe-cost-{run}-burner"
    rows = []
    spec, data, uid = BACKEND, defaults.DATA_DIR, catalog.RUNTIME_UID
    try:
        docker("run", "--detach", "--name", backend, "--read-only", "--tmpfs", "/tmp",  # noqa: S108 - the container's
               "--publish", f"127.0.0.1::{spec.port}",
               "--tmpfs", f"{data}:uid={uid}", "--env", f"KVSTACK_DATA_DIR={data}",
               images.image_ref(spec, tag))  # fmt: skip
        time.sleep(5)  # LMDB open, SERVING
        port = int(docker("port", backend, str(spec.port)).split(":")[-1])
        for shares in [0, *(args.shares or [16384])]:
            if shares:
                seconds = 60 + args.runs * 30
                docker("run", "--detach", "--rm", "--name", burner, "--cpu-shares", str(shares),
                       "--entrypoint", PY, images.image_ref(catalog.get("client"), tag),
                       "-c", BURN, str(seconds), str(os.cpu_count() or 2))  # fmt: skip
                time.sleep(2)
            for name, argv in COMMANDS.items():
                cell = measure(backend, argv, args.runs)
                where = f"saturated (burner --cpu-shares {shares})" if shares else "idle"
                rows.append(f"| {name} | {where} | {cell['cpu_ms']:.0f} | {cell['p50_ms']:.0f} | "
                            f"{cell['max_ms']:.0f} |")  # fmt: skip
            for name in list(COMMANDS)[1:]:
                cell = execs(backend, COMMANDS[name], args.runs)
                rows.append(f"| {name}, one `docker exec` each (as Docker runs a check) | "
                            f"{where} | {cell['cpu_ms']:.0f} | {cell['p50_ms']:.0f} | "
                            f"{cell['max_ms']:.0f} |")  # fmt: skip
            cell = answers(port, args.runs)
            rows.append(
                f"| one Check answered, caller outside the container (as the kubelet) "
                f"| {where} | - | {cell['p50_ms']:.0f} | {cell['max_ms']:.0f} |"
            )
            if shares:
                docker("rm", "--force", burner)
    finally:
        subprocess.run(engine.docker("rm", "--force", burner, backend), capture_output=True)
    print(f"{args.runs} checks each, in a backend container of {tag}, one after another; "
          f"load average after: {Path('/proc/loadavg').read_text().split()[:3]}\n")  # fmt: skip
    print("| check | host | CPU ms per check | wall p50 ms | wall max ms |")
    print("| --- | --- | ---: | ---: | ---: |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
