"""`make bench` (`python -m kvstack.dev.bench`): throughput and latency of kvstack on this machine.

One run measures, with real processes on 127.0.0.1:

- Put, Get and List through server -> backend at 1 and 32 calls in flight;
- beside them, a single-hop gRPC echo (this module's `echo` command: a bare grpc.aio server with
  the services' server options and no LMDB), the practical ceiling of Python gRPC here;
- durable puts of the backend alone, with group commit and without (KVSTACK_GROUP_COMMIT_MAX=1),
  and the mean writes per LMDB commit read from the backend's /metrics;
- Put and Get at 32 in flight at the services' default log level against WARNING, alternating;
- durable puts through one backend and through two in semi-sync;
- etcd (Debian's etcd-server, installed when missing where apt-get can) as the peer, one node and
  three, driven by the same load generator, with kvstack's puts as ratios of its.

`--cells` and `--duration` run a few short cells while developing; `make bench` runs them all.

Each cell runs a load generator in its own process (this module's `loadgen` command: grpc.aio,
N concurrent callers on one channel, a warm-up, then a fixed measurement window), and the run
writes docs/benchmarks.md: the tables, the method, the machine and a short reading.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from kvstack import runtime
from kvstack.client import default_write_timeout
from kvstack.dev.processes import ServiceProcess, free_port
from kvstack.probe import varint
from kvstack.v1 import kv_pb2, kv_pb2_grpc

if TYPE_CHECKING:
    from kvstack.dev.rollouts import Outcome

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "benchmarks.md"

ECHO_METHOD = "/kvstack.bench.Echo/Echo"
VALUE_BYTES = 100
SEED_KEYS = 1000  # keys written before the Get and List cells
SEED_PREFIX = "bench/seed/"
LIST_PREFIX = SEED_PREFIX + "00"  # 100 of the seeded keys share it
LIST_PAGE = 10
CALL_TIMEOUT = 10.0
LOG_LEVEL = "WARNING"  # keeps the per-request access and "saved" lines out of the measurement
# The services' default level (kvstack.runtime.RuntimeConfig.log_level), priced against WARNING.
DEFAULT_LOG_LEVEL: str = runtime.RuntimeConfig().log_level
LEVEL_ROUNDS = 2  # each level's cells run this often, alternating: WARNING INFO WARNING INFO
# The cells the targets (issue 15) compare run twice, the whole sequence again after the first
# pass (echo, stack, semi-sync, etcd, then echo, stack, ...: A B A B), so each ratio is taken
# within a pass and its spread over the two shows how much the machine moved. The second run of
# a cell is named NAME@2.
TARGET_CELLS = ("echo-32", "get-32", "put-32", "semisync-put-32", "etcd-3node-32")
PASSES = 2

# etcd, the peer (Debian's etcd-server). Its KV.Put is called with hand-serialised bytes rather
# than etcd's .proto files, which this project does not vendor: etcdserverpb.PutRequest has
# `bytes key = 1; bytes value = 2;` (etcd's api/etcdserverpb/rpc.proto), so a request is two
# length-delimited fields (wire type 2: tags 0x0A and 0x12, each followed by a varint length).
# The answer (PutResponse) is taken as raw bytes and not decoded. etcd syncs each write of its
# WAL (fdatasync) before a proposal counts as stored, on a follower before it acknowledges to the
# leader too (etcd-io/etcd#12589, a maintainer's answer: "store ready.Entries into WAL
# (mustSync:true), then send MsgAppResp"; Red Hat's etcd practices: "fdatasync to sync each
# write in the WAL"). Debian's 3.4 lists no flag that turns this off (`etcd --help`; the later
# --unsafe-no-fsync, etcd-io/etcd#12751, is not in it), so its puts are durable as kvstack's are.
ETCD_PUT_METHOD = "/etcdserverpb.KV/Put"


# ---------------------------------------------------------------------------------------------
# Statistics.


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile by nearest rank: the smallest value such that at least q% of all
    values are at or below it (no interpolation; p100 is the maximum)."""
    if not values:
        raise ValueError("no values")
    if not 0 < q <= 100:
        raise ValueError(f"percentile {q} is outside (0, 100]")
    ordered = sorted(values)
    rank = math.ceil(round(q * len(ordered) / 100, 9))
    return ordered[max(1, rank) - 1]


# ---------------------------------------------------------------------------------------------
# The echo server: one hop, no storage.


async def _echo(request: kv_pb2.Entry, context: aio.ServicerContext[Any, Any]) -> kv_pb2.Entry:
    return request


async def serve_echo(port: int, observed: bool = False) -> None:
    """A grpc.aio server with the services' own server options and health, echoing Entry
    messages back, until SIGTERM or SIGINT. `observed` adds the services' interceptor (metrics
    and access log, at the benchmark's log level) to price it."""
    config = runtime.load(runtime.RuntimeConfig)
    runtime.configure_logging("echo", LOG_LEVEL)
    interceptors = [runtime.ObservingInterceptor()] if observed else None
    server = aio.server(interceptors=interceptors, options=runtime.server_options(config))
    handler = grpc.unary_unary_rpc_method_handler(
        _echo,
        request_deserializer=kv_pb2.Entry.FromString,
        response_serializer=kv_pb2.Entry.SerializeToString,
    )
    service, _, method = ECHO_METHOD.lstrip("/").partition("/")
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service, {method: handler}),)
    )
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise OSError(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await server.stop(1.0)


# ---------------------------------------------------------------------------------------------
# The load generator (its own process): N callers on one channel, warm-up, then a fixed window.


def machine_busy_seconds() -> float:
    """CPU time spent by everything on the machine (all cores, not idle or iowait)."""
    ticks = [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a whole process (every thread), from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    after_name = stat[stat.rindex(")") + 2 :].split()
    return (int(after_name[11]) + int(after_name[12])) / os.sysconf("SC_CLK_TCK")


def commit_writes(metrics_url: str) -> tuple[float, float]:
    """(sum, count) of the backend's kvstack_backend_commit_writes histogram."""
    with urllib.request.urlopen(metrics_url, timeout=5) as reply:  # noqa: S310 - our own http URL
        text = reply.read().decode()
    values = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        name, _, number = line.partition(" ")
        for suffix in values:
            if name == f"kvstack_backend_commit_writes_{suffix}":
                values[suffix] = float(number)
    return values["sum"], values["count"]


def histogram_quantile(metrics_url: str, name: str, q: float) -> float | None:
    """The upper bound of the bucket holding quantile q of a Prometheus histogram (as
    histogram_quantile does, without interpolation), or None when it has no observations."""
    with urllib.request.urlopen(metrics_url, timeout=5) as reply:  # noqa: S310 - our own http URL
        text = reply.read().decode()
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[math.inf if bound == "+Inf" else float(bound)] = float(line.split()[-1])
    return runtime.bucket_quantile(buckets, q)


@dataclass
class Sample:
    at: float
    cpu: dict[str, float]
    commits: tuple[float, float] | None


def _sample(watch: dict[str, int], metrics_url: str | None) -> Sample:
    cpu = {name: cpu_seconds(pid) for name, pid in watch.items()}
    cpu["machine"] = machine_busy_seconds()
    return Sample(
        time.perf_counter(),
        cpu,
        commit_writes(metrics_url) if metrics_url else None,
    )


def _request_maker(op: str, run: str, payload: bytes) -> Callable[[int, int], Any]:
    if op == "echo":
        return lambda w, i: kv_pb2.Entry(key=f"bench/echo/{w}/{i}".encode(), value=payload)
    if op == "put":
        return lambda w, i: kv_pb2.PutRequest(
            key=f"bench/put/{run}/{w}/{i:08d}".encode(), value=payload
        )
    if op == "get":
        return lambda w, i: kv_pb2.GetRequest(
            key=f"{SEED_PREFIX}{random.randrange(SEED_KEYS):04d}".encode()  # noqa: S311
        )
    if op == "list":
        return lambda w, i: kv_pb2.ListRequest(prefix=LIST_PREFIX.encode(), page_size=LIST_PAGE)
    if op == "etcd-put":
        return lambda w, i: etcd_put_request(f"bench/etcd/{run}/{w}/{i:08d}".encode(), payload)
    raise ValueError(f"unknown operation {op!r}")


def etcd_put_request(key: bytes, value: bytes) -> bytes:
    """An etcdserverpb.PutRequest{key, value}, serialised by hand (see ETCD_PUT_METHOD)."""
    return b"\x0a" + varint(len(key)) + key + b"\x12" + varint(len(value)) + value


async def _seed(stub: kv_pb2_grpc.KeyValueAsyncStub, payload: bytes) -> None:
    keys = iter(range(SEED_KEYS))

    async def writer() -> None:
        for i in keys:
            key = f"{SEED_PREFIX}{i:04d}".encode()
            await stub.Put(kv_pb2.PutRequest(key=key, value=payload), timeout=CALL_TIMEOUT)

    await asyncio.gather(*(writer() for _ in range(32)))


async def drive(
    target: str,
    op: str,
    concurrency: int,
    duration: float,
    warmup: float,
    *,
    watch: dict[str, int] | None = None,
    metrics_url: str | None = None,
    seed: bool = False,
) -> dict[str, Any]:
    """Run one cell against target and return its raw result (counts, latencies, CPU)."""
    watch = {"loadgen": os.getpid(), **(watch or {})}
    payload = os.urandom(VALUE_BYTES)
    run = os.urandom(4).hex()
    make = _request_maker(op, run, payload)
    # A target of several addresses (a three-node etcd) gets every call spread over them in
    # turn, as etcd's own client balances over its endpoints.
    options = [("grpc.lb_policy_name", "round_robin")] if "," in target else []
    async with aio.insecure_channel(target, options=options) as channel:
        async with asyncio.timeout(CALL_TIMEOUT):
            await channel.channel_ready()
        stub = kv_pb2_grpc.KeyValueStub(channel)
        call: Callable[..., Awaitable[Any]]
        if op == "etcd-put":
            call = channel.unary_unary(ETCD_PUT_METHOD)  # bytes in, bytes out
        elif op == "echo":
            call = channel.unary_unary(
                ECHO_METHOD,
                request_serializer=kv_pb2.Entry.SerializeToString,
                response_deserializer=kv_pb2.Entry.FromString,
            )
        else:
            call = getattr(stub, op.capitalize())
        if seed:
            await _seed(stub, payload)

        begin = time.perf_counter()
        start, end = begin + warmup, begin + warmup + duration
        latencies: list[float] = []
        errors: dict[str, int] = {}

        async def caller(worker: int) -> None:
            i = 0
            while time.perf_counter() < end:
                request = make(worker, i)
                i += 1
                code = None
                sent = time.perf_counter()
                try:
                    await call(request, timeout=CALL_TIMEOUT)
                except aio.AioRpcError as err:
                    code = err.code().name
                done = time.perf_counter()
                if start <= done <= end:  # counted by completion inside the window
                    if code is None:
                        latencies.append(done - sent)
                    else:
                        errors[code] = errors.get(code, 0) + 1

        async def sampler() -> tuple[Sample, Sample]:
            await asyncio.sleep(max(0.0, start - time.perf_counter()))
            first = await asyncio.to_thread(_sample, watch, metrics_url)
            await asyncio.sleep(max(0.0, end - time.perf_counter()))
            return first, await asyncio.to_thread(_sample, watch, metrics_url)

        sampling = asyncio.create_task(sampler())
        await asyncio.gather(*(caller(w) for w in range(concurrency)))
        first, last = await sampling

    window = last.at - first.at
    result: dict[str, Any] = {
        "ok": len(latencies),
        "errors": errors,
        "seconds": duration,
        "qps": len(latencies) / duration,
        "p50_ms": percentile(latencies, 50) * 1000 if latencies else math.nan,
        "p99_ms": percentile(latencies, 99) * 1000 if latencies else math.nan,
        "cpu_pct": {n: 100 * (last.cpu[n] - first.cpu[n]) / window for n in last.cpu},
    }
    if first.commits and last.commits:
        writes, commits = (b - a for a, b in zip(first.commits, last.commits, strict=True))
        result["writes_per_commit"] = writes / commits if commits else math.nan
    return result


# ---------------------------------------------------------------------------------------------
# The orchestrator: starts the processes each group of cells needs, runs the cells, writes docs.


@dataclass(frozen=True)
class Cell:
    name: str  # e.g. "put-32": what --cells selects
    group: str  # "echo", "stack", "levels", "replicated", "durable" or "etcd"
    op: str
    concurrency: int
    group_commit: bool = True
    observed: bool = False  # echo through the services' interceptor
    log_level: str = LOG_LEVEL  # the services' KVSTACK_LOG_LEVEL
    round: int = 0  # "levels": which of the LEVEL_ROUNDS
    nodes: int = 0  # "etcd": members of the cluster
    repeat: int = 1  # which pass (a TARGET_CELLS cell runs in each of PASSES)


def level_cell(op: str, level: str, round_: int) -> str:
    """The name of the "levels" cell of `op` at `level` in round `round_` (e.g. put-32-info-2)."""
    return f"{op}-32-{level.lower()}-{round_}"


def all_cells(concurrency: Sequence[int] = (1, 32)) -> list[Cell]:
    cells = [Cell(f"echo-{c}", "echo", "echo", c) for c in concurrency]
    cells.append(Cell("echo-observed-32", "echo", "echo", 32, observed=True))
    cells += [
        Cell(f"{op}-{c}", "stack", op, c) for op in ("put", "get", "list") for c in concurrency
    ]
    cells += [
        Cell(level_cell(op, level, r), "levels", op, 32, log_level=level, round=r)
        for r in range(1, LEVEL_ROUNDS + 1)
        for level in (LOG_LEVEL, DEFAULT_LOG_LEVEL)
        for op in ("put", "get")
    ]
    cells += [Cell(f"semisync-put-{c}", "replicated", "put", c) for c in concurrency]
    cells += [
        Cell(f"etcd-{n}node-{c}", "etcd", "etcd-put", c, nodes=n)
        for n in (1, 3)
        for c in concurrency
    ]
    cells += [
        Cell("durable-group-32", "durable", "put", 32, group_commit=True),
        Cell("durable-single-32", "durable", "put", 32, group_commit=False),
    ]
    cells += [
        dataclasses.replace(c, name=f"{c.name}@{n}", repeat=n)
        for n in range(2, PASSES + 1)
        for c in cells
        if c.name in TARGET_CELLS
    ]
    return cells


@dataclass
class Result:
    cell: Cell
    ok: int
    errors: dict[str, int]
    seconds: float
    qps: float
    p50_ms: float
    p99_ms: float
    cpu_pct: dict[str, float]
    writes_per_commit: float | None = None
    lag_p99_ms: float | None = None  # replicated cells: primary commit -> replica commit
    log_bytes_per_s: float | None = None  # "levels": what server and backend logged, per second


@dataclass
class Run:
    duration: float
    warmup: float
    data_dir: Path
    results: list[Result] = field(default_factory=list)
    started: datetime.datetime = field(default_factory=lambda: datetime.datetime.now(datetime.UTC))
    elapsed: float = 0.0
    load_before: str = field(default_factory=lambda: load_average())
    load_after: str = ""
    lmdb_commits: float | None = None  # single-put sync commits/s, in-process
    rollouts: list[Outcome] = field(default_factory=list)
    rollouts_skipped: str = ""  # why the rollout table is missing, when it is
    etcd_skipped: str = ""  # why etcd was not measured, when it was not
    etcd_version: str = ""

    def get(self, name: str) -> Result | None:
        return next((r for r in self.results if r.cell.name == name), None)


def _service_env(level: str = LOG_LEVEL, **extra: str) -> dict[str, str]:
    return {"KVSTACK_LOG_LEVEL": level, "KVSTACK_SHUTDOWN_GRACE": "2", **extra}


def _loadgen(
    cell: Cell,
    target: str,
    run: Run,
    log: Path,
    watch: dict[str, int],
    metrics_url: str | None = None,
    seed: bool = False,
) -> Result:
    args = [
        sys.executable,
        "-m",
        "kvstack.dev.bench",
        "loadgen",
        "--target",
        target,
        "--op",
        cell.op,
        "--concurrency",
        str(cell.concurrency),
        "--duration",
        str(run.duration),
        "--warmup",
        str(run.warmup),
        *(arg for name, pid in watch.items() for arg in ("--watch", f"{name}={pid}")),
        *(["--metrics-url", metrics_url] if metrics_url else []),
        *(["--seed"] if seed else []),
    ]
    with log.open("ab") as err:
        done = subprocess.run(
            args,
            stdout=subprocess.PIPE,
            stderr=err,
            timeout=run.warmup + run.duration + 120,
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(
            f"the load generator for {cell.name} failed ({done.returncode}):\n{log.read_text()}"
        )
    raw = json.loads(done.stdout.decode().strip().splitlines()[-1])
    result = Result(cell=cell, **raw)
    errors = sum(result.errors.values())
    print(
        f"  {cell.name:<18} {result.qps:8.0f} req/s  p50 {result.p50_ms:6.2f} ms  "
        f"p99 {result.p99_ms:6.2f} ms  errors {errors}"
        + (f"  writes/commit {result.writes_per_commit:.1f}" if result.writes_per_commit else ""),
        flush=True,
    )
    return result


def _wait_semisync(metrics_url: str, timeout: float = 20.0) -> None:
    """Wait until the primary reports semi-synchronous mode (its replica connected, caught up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(metrics_url, timeout=5) as reply:  # noqa: S310 - ours
            if "kvstack_replication_semisync 1.0" in reply.read().decode():
                return
        time.sleep(0.2)
    raise RuntimeError(f"the primary did not reach semi-sync within {timeout:g} s")


def _echo_process(port: int, log: Path, observed: bool) -> subprocess.Popen[bytes]:
    from kvstack.probe import check

    command = [sys.executable, "-m", "kvstack.dev.bench", "echo", "--port", str(port)]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [*command, *(["--observed"] if observed else [])],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 20
    while check(f"127.0.0.1:{port}", timeout=1.0) != "SERVING":
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the echo server did not start:\n{log.read_text()}")
        time.sleep(0.1)
    return proc


def _pid(service: ServiceProcess) -> int:
    if service.proc is None:
        raise RuntimeError(f"{service.name} was not started")
    return service.proc.pid


@contextlib.contextmanager
def _stack(
    run: Run, work: Path, name: str, level: str = LOG_LEVEL, **env: str
) -> Iterator[tuple[ServiceProcess, dict[str, int], str, list[Path]]]:
    """A backend and a server in front of it at log level `level` (and with `env`), logging
    to files named after `name`: (the server, the pids to measure, the backend's /metrics
    URL, the logs)."""
    metrics = free_port()
    backend = ServiceProcess(
        "backend",
        free_port(),
        work / f"backend-{name}.log",
        _service_env(
            level,
            KVSTACK_DATA_DIR=str(run.data_dir / name),
            KVSTACK_METRICS_PORT=str(metrics),
            **env,
        ),
    )
    server = ServiceProcess("server", free_port(), work / f"server-{name}.log", {})
    try:
        backend.start().wait_serving()
        server.env = _service_env(level, KVSTACK_BACKEND_TARGET=f"dns:///{backend.target}", **env)
        server.start().wait_serving()
        watch = {"server": _pid(server), "backend": _pid(backend)}
        logs = [backend.log_path, server.log_path]
        yield server, watch, f"http://127.0.0.1:{metrics}/metrics", logs
    finally:
        server.stop()
        backend.stop()


def run_cells(cells: Sequence[Cell], run: Run, work: Path) -> None:
    """Run every cell, group by group, with only that group's processes alive; then the
    target cells' second pass, in the same order."""
    for n in range(1, PASSES + 1):
        chosen = [c for c in cells if c.repeat == n]
        if chosen and n > 1:
            print(f"  pass {n} of the target cells", flush=True)
        _run_pass(chosen, run, work, "" if n == 1 else f"-{n}")


def _run_pass(cells: Sequence[Cell], run: Run, work: Path, suffix: str) -> None:
    log = work / "loadgen.log"

    for observed in (False, True):
        echo = [c for c in cells if c.group == "echo" and c.observed == observed]
        if not echo:
            continue
        port = free_port()
        proc = _echo_process(port, work / "echo.log", observed)
        try:
            for cell in echo:
                run.results.append(
                    _loadgen(cell, f"127.0.0.1:{port}", run, log, {"echo": proc.pid})
                )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)

    stack = [c for c in cells if c.group == "stack"]
    if stack:
        with _stack(run, work, "stack" + suffix) as (server, watch, metrics_url, _):
            seeded = False
            for cell in stack:
                seed = cell.op in ("get", "list") and not seeded
                seeded = seeded or seed
                url = metrics_url if cell.op == "put" else None
                run.results.append(_loadgen(cell, server.target, run, log, watch, url, seed))

    # The same Put and Get cells at WARNING and at the default level, alternating (A B A B),
    # each level on a stack of its own started at that level.
    for r in range(1, LEVEL_ROUNDS + 1):
        for level in (LOG_LEVEL, DEFAULT_LOG_LEVEL):
            levels = [
                c for c in cells if c.group == "levels" and (c.round, c.log_level) == (r, level)
            ]
            if not levels:
                continue
            name = f"levels-{level.lower()}-{r}"
            with _stack(run, work, name, level) as (server, watch, url, logs):
                for cell in levels:
                    put_url = url if cell.op == "put" else None
                    logged = sum(p.stat().st_size for p in logs)
                    seed = cell.op == "get"
                    result = _loadgen(cell, server.target, run, log, watch, put_url, seed)
                    logged = sum(p.stat().st_size for p in logs) - logged
                    if not seed:  # the seeding's own writes would be counted too
                        result.log_bytes_per_s = logged / (run.warmup + run.duration)
                    run.results.append(result)

    replicated = [c for c in cells if c.group == "replicated"]
    if replicated:
        ports = [free_port(), free_port()]
        peers = ",".join(f"127.0.0.1:{p}" for p in ports)
        replica_metrics = [free_port(), free_port()]
        backends = [
            ServiceProcess(
                "backend",
                ports[i],
                work / f"backend-{i}{suffix}.log",
                _service_env(
                    KVSTACK_DATA_DIR=str(run.data_dir / f"replicated-{i}{suffix}"),
                    KVSTACK_METRICS_PORT=str(replica_metrics[i]),
                    KVSTACK_ORDINAL=str(i),
                    KVSTACK_BACKEND_TARGET=peers,
                ),
            )
            for i in range(2)
        ]
        server = ServiceProcess(
            "server",
            free_port(),
            work / f"server-replicated{suffix}.log",
            _service_env(KVSTACK_BACKEND_TARGET=peers),
        )
        try:
            for backend in backends:
                backend.start().wait_serving()
            server.start().wait_serving()
            _wait_semisync(f"http://127.0.0.1:{replica_metrics[0]}/metrics")
            watch = {"server": _pid(server), "primary": _pid(backends[0])}
            watch["replica"] = _pid(backends[1])
            for cell in replicated:
                url = f"http://127.0.0.1:{replica_metrics[0]}/metrics"
                result = _loadgen(cell, server.target, run, log, watch, url)
                lag = histogram_quantile(
                    f"http://127.0.0.1:{replica_metrics[1]}/metrics",
                    "kvstack_replication_lag_seconds",
                    0.99,
                )
                result.lag_p99_ms = None if lag is None else lag * 1000
                run.results.append(result)
        finally:
            server.stop()
            for backend in backends:
                backend.stop()

    etcd_cells = [c for c in cells if c.group == "etcd"]
    if etcd_cells:
        run_etcd(etcd_cells, run, work, log, suffix)

    for cell in (c for c in cells if c.group == "durable"):
        metrics = free_port()
        name = "group" if cell.group_commit else "single"
        backend = ServiceProcess(
            "backend",
            free_port(),
            work / f"backend-{name}.log",
            _service_env(
                KVSTACK_DATA_DIR=str(run.data_dir / name),
                KVSTACK_METRICS_PORT=str(metrics),
                **({} if cell.group_commit else {"KVSTACK_GROUP_COMMIT_MAX": "1"}),
            ),
        )
        try:
            backend.start().wait_serving()
            url = f"http://127.0.0.1:{metrics}/metrics"
            watch = {"backend": _pid(backend)}
            run.results.append(_loadgen(cell, backend.target, run, log, watch, url))
        finally:
            backend.stop()


def run_etcd(cells: Sequence[Cell], run: Run, work: Path, log: Path, suffix: str = "") -> None:
    """The etcd cells: Debian's etcd-server (installed when missing, where that is ours to do),
    one node and then three, each cluster on loopback with its data under run.data_dir."""
    from kvstack.dev import etcd

    if run.etcd_skipped:
        return
    binary, why = etcd.ensure()
    if binary is None:
        run.etcd_skipped = why
        print(f"kvstack bench: etcd not measured: {why}", file=sys.stderr, flush=True)
        return
    run.etcd_version = etcd.version(binary)
    probe = etcd_put_request(b"bench/etcd/ready", b"")
    for nodes in sorted({c.nodes for c in cells}):
        data = run.data_dir / f"etcd-{nodes}{suffix}"
        with etcd.cluster(binary, nodes, data, work, probe, ETCD_PUT_METHOD) as members:
            watch = {f"etcd-{i}": m.proc.pid for i, m in enumerate(members) if m.proc is not None}
            target = (
                "ipv4:" + ",".join(m.client for m in members) if nodes > 1 else members[0].client
            )
            for cell in (c for c in cells if c.nodes == nodes):
                run.results.append(_loadgen(cell, target, run, log, watch))


# ---------------------------------------------------------------------------------------------
# The machine and the report.


def lmdb_commit_rate(path: Path, seconds: float = 1.0) -> float:
    """Transactions per second of one thread committing one 100-byte put per transaction
    into a fresh LMDB with sync on (as the backend opens it): the disk's own fsync ceiling,
    without gRPC or asyncio."""
    import lmdb

    env = lmdb.open(str(path), map_size=64 << 20, sync=True, metasync=True)
    try:
        value, count = os.urandom(VALUE_BYTES), 0
        began = time.perf_counter()
        while (elapsed := time.perf_counter() - began) < seconds:
            with env.begin(write=True) as txn:
                txn.put(f"k{count:08d}".encode(), value)
            count += 1
    finally:
        env.close()
    return count / elapsed


def load_average() -> str:
    """The 1, 5 and 15 minute load averages from /proc/loadavg."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def file_system(path: Path) -> str:
    """The file system type and device of the mount holding path, from /proc/self/mounts."""
    best, found = "", "unknown"
    resolved = str(path.resolve())
    for line in Path("/proc/self/mounts").read_text().splitlines():
        device, mount, kind, *_ = line.split()
        inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, found = mount, f"{kind} ({device} on {mount})"
    return found


def machine(data_dir: Path) -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next(
        (ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")),
        platform.processor() or "unknown",
    )
    meminfo = Path("/proc/meminfo").read_text()
    mem_kib = next(int(ln.split()[1]) for ln in meminfo.splitlines() if ln.startswith("MemTotal"))
    import lmdb

    return {
        "CPUs (nproc)": str(len(os.sched_getaffinity(0))),
        "CPU model": model,
        "memory": f"{mem_kib / (1 << 20):.1f} GiB",
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "grpcio": grpc.__version__,
        "py-lmdb": str(lmdb.__version__),
        "data dir file system": file_system(data_dir),
    }


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def _cpu(result: Result, *names: str) -> str:
    return " / ".join(f"{result.cpu_pct.get(n, math.nan):.0f}" for n in names)


def other_cpu(result: Result) -> float:
    """CPU (% of one core) used during the window by processes that are not the cell's own."""
    ours = sum(v for n, v in result.cpu_pct.items() if n != "machine")
    return max(0.0, result.cpu_pct.get("machine", math.nan) - ours)


def _errors(result: Result) -> str:
    if not result.errors:
        return "0"
    return ", ".join(f"{n} {code}" for code, n in sorted(result.errors.items()))


def reading(run: Run) -> list[str]:
    """A few sentences computed from the numbers; only about cells this run measured."""
    lines: list[str] = []
    echo32, echo1 = run.get("echo-32"), run.get("echo-1")
    get32, put32, list32 = run.get("get-32"), run.get("put-32"), run.get("list-32")
    get1, put1 = run.get("get-1"), run.get("put-1")
    if echo32 and get32:
        lines.append(
            f"- **The second hop.** A Get through server and backend does "
            f"{get32.qps:,.0f} req/s at 32 in flight, {100 * get32.qps / echo32.qps:.0f}% of "
            f"the single-hop echo ({echo32.qps:,.0f} req/s): each request is received and sent "
            "twice by Python gRPC, and the server, the backend and the load generator share 2 "
            f"cores (CPU at Get-32, % of one core, loadgen / server / backend: "
            f"{_cpu(get32, 'loadgen', 'server', 'backend')})."
        )
    if echo1 and get1:
        lines.append(
            f"- **Latency with one caller.** p50 is {echo1.p50_ms:.2f} ms for the echo and "
            f"{get1.p50_ms:.2f} ms for a Get through both services: the second hop, the "
            f"validation and an LMDB read add {get1.p50_ms - echo1.p50_ms:.2f} ms."
        )
    if put1 and get1:
        lines.append(
            f"- **One caller, Put against Get.** A lone Put, which waits for its own LMDB commit "
            f"and fsync, has p50 {put1.p50_ms:.2f} ms; a Get {get1.p50_ms:.2f} ms "
            f"({put1.qps:,.0f} vs {get1.qps:,.0f} req/s)."
        )
    if put32 and get32:
        wpc = put32.writes_per_commit
        lines.append(
            f"- **Puts under load.** At 32 in flight Put does {put32.qps:,.0f} req/s against "
            f"{get32.qps:,.0f} for Get"
            + (
                f"; the backend committed {wpc:.1f} writes per fsync on average, "
                f"about {put32.qps / wpc:,.0f} commits/s"
                if wpc
                else ""
            )
            + "."
        )
    if list32 and get32:
        lines.append(
            f"- **List** ({LIST_PAGE} entries of {VALUE_BYTES} bytes per page) does "
            f"{list32.qps:,.0f} req/s at 32 in flight, {100 * list32.qps / get32.qps:.0f}% of "
            "Get"
            + (
                ": a ten-entry answer costs little next to the per-call overhead."
                if list32.qps >= 0.85 * get32.qps
                else "."
            )
        )
    group, single = run.get("durable-group-32"), run.get("durable-single-32")
    if group and single:
        lines.append(
            f"- **Group commit.** The backend alone takes {group.qps:,.0f} durable puts/s with "
            f"group commit ({_fmt(group.writes_per_commit, 1)} writes per commit) and "
            f"{single.qps:,.0f}/s with one fsync per write "
            f"({_fmt(single.writes_per_commit, 1)} per commit): {group.qps / single.qps:.1f}x. "
            f"p99 {group.p99_ms:.1f} ms against {single.p99_ms:.1f} ms."
        )
        if run.lmdb_commits:
            lines.append(
                f"- **The disk is not the limit.** Committing one put per transaction with sync "
                f"on, in one thread without gRPC, this file system takes "
                f"{run.lmdb_commits:,.0f} commits/s ({1000 / run.lmdb_commits:.2f} ms each); the "
                f"backend without group commit reaches {100 * single.qps / run.lmdb_commits:.0f}% "
                "of that: most of each write's time goes to the gRPC call, the event loop and "
                "the hand-off to the writer thread, not to the fsync."
                if single.qps < 0.5 * run.lmdb_commits
                else f"- **The disk**: one put per transaction with sync on, in one thread "
                f"without gRPC, takes {run.lmdb_commits:,.0f} commits/s; the backend without "
                f"group commit reaches {100 * single.qps / run.lmdb_commits:.0f}% of that."
            )
        if put32:
            share = put32.qps / group.qps
            lines.append(
                f"- Through the server, Put reaches {100 * share:.0f}% of what the backend alone "
                "takes with group commit"
                + (": the extra hop, not the disk, is the narrower part." if share < 0.9 else ".")
            )
    semi32 = run.get("semisync-put-32")
    if semi32 and put32:
        lines.append(
            f"- **The price of replication.** At 32 in flight, durable puts through the server "
            f"do {semi32.qps:,.0f}/s with a replica in semi-sync against {put32.qps:,.0f}/s "
            f"with one backend ({semi32.qps / put32.qps:.2f}x), p99 {semi32.p99_ms:.1f} ms "
            f"against {put32.p99_ms:.1f} ms; the replica applied each change "
            f"{_fmt(semi32.lag_p99_ms, 1)} ms (p99) after the primary committed it. Every "
            "acknowledged put was then on two disks."
        )
    observed = run.get("echo-observed-32")
    if echo32 and observed:
        lines.append(
            f"- **The services' interceptor** (metrics and access log, `kvstack.runtime`): the "
            f"echo at 32 in flight does {observed.qps:,.0f} req/s with it and {echo32.qps:,.0f} "
            f"without ({100 * (observed.qps / echo32.qps - 1):+.0f}%); the server and the "
            "backend each run it on every call."
        )
    for c in (1, 32):
        single, three = run.get(f"etcd-1node-{c}"), run.get(f"etcd-3node-{c}")
        put, semi = run.get(f"put-{c}"), run.get(f"semisync-put-{c}")
        if single and put and three and semi and single.qps and three.qps:
            lines.append(
                f"- **Against etcd at {c} in flight.** kvstack's durable put with one backend "
                f"does {put.qps / single.qps:.2f}x of one etcd node ({put.qps:,.0f} against "
                f"{single.qps:,.0f} puts/s); its replicated put (two copies, semi-sync) "
                f"{semi.qps / three.qps:.2f}x of three etcd nodes (three copies; {semi.qps:,.0f} "
                f"against {three.qps:,.0f})."
            )
    busy = [r for r in run.results if other_cpu(r) > 20]
    if busy:
        worst = max(busy, key=other_cpu)
        lines.append(
            f"- **The machine was not quiet**: other processes used more than 20% of a core "
            f"during {len(busy)} of {len(run.results)} windows (up to {other_cpu(worst):.0f}% "
            f"during {worst.cell.name}); those cells are slower than on an idle machine. "
            f"Load average before / after the run: {run.load_before} / {run.load_after}."
        )
    errors = sum(sum(r.errors.values()) for r in run.results)
    if errors:
        lines.append(f"- **Errors**: {errors} calls failed inside the windows; see the tables.")
    return lines


def _spread(values: Sequence[float]) -> str:
    return " / ".join(_fmt(v) for v in values)


def level_ratio(run: Run, op: str) -> tuple[float, float, float] | None:
    """INFO / WARNING throughput of `op` at 32 in flight over the alternating rounds: (ratio of
    the means, lowest, highest: the worst and best run of one level against the other's)."""
    runs = {
        level: [
            r.qps
            for r in run.results
            if r.cell.group == "levels" and r.cell.op == op and r.cell.log_level == level
        ]
        for level in (LOG_LEVEL, DEFAULT_LOG_LEVEL)
    }
    quiet, default = runs[LOG_LEVEL], runs[DEFAULT_LOG_LEVEL]
    if not quiet or not default or min(quiet) <= 0:
        return None
    mean = (sum(default) / len(default)) / (sum(quiet) / len(quiet))
    return mean, min(default) / max(quiet), max(default) / min(quiet)


# The targets the report checks: (what, numerator cell, denominator cell, at least).
TARGETS = (
    ("Get through server and backend / one-hop echo", "get-32", "echo-32", 0.60),
    ("Put through server and backend / one-hop echo", "put-32", "echo-32", 0.60),
    ("Put in semi-sync / Put with one backend", "semisync-put-32", "put-32", 0.85),
    ("Put in semi-sync / three-node etcd", "semisync-put-32", "etcd-3node-32", 0.40),
)
LEVEL_TARGET = 0.9  # throughput at the default log level / at WARNING


def _verdict(ratios: Sequence[float], floor: float) -> str:
    if all(r >= floor for r in ratios):
        return "met"
    return "missed" if all(r < floor for r in ratios) else "met in some passes only"


def _in_pass(name: str, n: int) -> str:
    """The name of cell `name`'s run in pass n (NAME, NAME@2, ...)."""
    return name if n == 1 else f"{name}@{n}"


def target_pairs() -> list[tuple[str, list[tuple[str, str]], float]]:
    """Every target: (what, its (numerator cell, denominator cell) in each pass, at least).
    For the log levels a pass is a round: WARNING then the default level, each on a stack of
    its own; for the others it is one of the PASSES."""
    targets = [
        (what, [(_in_pass(top, n), _in_pass(bottom, n)) for n in range(1, PASSES + 1)], floor)
        for what, top, bottom, floor in TARGETS
    ]
    targets += [
        (
            f"{op.capitalize()} at {DEFAULT_LOG_LEVEL} / at {LOG_LEVEL} (within each of "
            f"{LEVEL_ROUNDS} rounds: {LOG_LEVEL}, then {DEFAULT_LOG_LEVEL})",
            [
                (level_cell(op, DEFAULT_LOG_LEVEL, r), level_cell(op, LOG_LEVEL, r))
                for r in range(1, LEVEL_ROUNDS + 1)
            ],
            LEVEL_TARGET,
        )
        for op in ("put", "get")
    ]
    return targets


def targets_table(run: Run) -> list[str]:
    """Each target ratio at 32 in flight, pass by pass (numerator and denominator from the same
    pass), against its floor: met only when every pass meets it."""
    rows = []
    for what, pairs, floor in target_pairs():
        results = {name: run.get(name) for pair in pairs for name in pair}
        if all(r is None for r in results.values()):
            continue  # none of its cells was chosen (--cells)
        # A measurement is missing where its cell did not run (skipped, etcd not available) or
        # no call of its window succeeded: the target is then incomplete, whatever the rest say.
        absent = [name for name, r in results.items() if r is None]
        failed = [name for name, r in results.items() if r is not None and not r.ok]
        ratios: list[float | None] = []
        for top, bottom in pairs:
            a, b = results[top], results[bottom]
            ratios.append(a.qps / b.qps if a and b and a.ok and b.ok else None)
        each = " / ".join("-" if r is None else f"{r:.2f}" for r in ratios)
        gaps = [f"not measured: {', '.join(absent)}"] if absent else []
        gaps += [f"no successful call: {', '.join(failed)}"] if failed else []
        measured = [r for r in ratios if r is not None]
        if gaps:
            mean, verdict = "-", "incomplete: " + "; ".join(gaps)
        else:
            mean, verdict = f"{sum(measured) / len(measured):.2f}", _verdict(measured, floor)
        rows.append(f"| {what} | {each} | {mean} | {floor:.2f} | {verdict} |")
    if not rows:
        return []
    return [
        "## Targets",
        "",
        f"Throughput ratios at 32 in flight. The cells compared run twice ({PASSES} passes of "
        "the same sequence, A B A B), each ratio taken within a pass; a target is met when it "
        f"holds in every pass. For the log levels a pass is one of the {LEVEL_ROUNDS} rounds "
        f"({LOG_LEVEL}, then {DEFAULT_LOG_LEVEL}, each on fresh processes): the ratio of the "
        "round's two runs. A target missing a measurement (a cell not run, or one without a "
        "successful call) is incomplete, and says which.",
        "",
        "| ratio | each pass | mean | at least | |",
        "| --- | --- | ---: | ---: | --- |",
        *rows,
        "",
    ]


def _mean_log_kb(results: Sequence[Result]) -> float | None:
    """KB/s the services logged during these cells (warm-up included), on average."""
    rates = [r.log_bytes_per_s for r in results if r.log_bytes_per_s is not None]
    return sum(rates) / len(rates) / 1000 if rates else None


def level_table(run: Run) -> list[str]:
    """Put and Get at 32 in flight at WARNING and at the services' default level."""
    if not any(r.cell.group == "levels" for r in run.results):
        return []
    out = [
        f"## The default log level ({DEFAULT_LOG_LEVEL}) against {LOG_LEVEL}",
        "",
        f"Put and Get through server -> backend at 32 in flight, {LEVEL_ROUNDS} runs of each "
        f"level alternating ({LOG_LEVEL}, {DEFAULT_LOG_LEVEL}, {LOG_LEVEL}, ...), each run on a "
        "fresh backend and server started at that level, logging to a file; logs KB/s is "
        "what they wrote during a Put cell, warm-up included (none for Get, whose cells "
        "write their keys first).",
        "",
        f"| call | {LOG_LEVEL}: req/s per run | {DEFAULT_LOG_LEVEL}: req/s per run "
        f"| {DEFAULT_LOG_LEVEL} / {LOG_LEVEL} (means) | lowest - highest | "
        f"p99 ms {LOG_LEVEL} / {DEFAULT_LOG_LEVEL} (worst run) | "
        f"logs KB/s {LOG_LEVEL} / {DEFAULT_LOG_LEVEL} | other processes (max) |",
        "| --- | --- | --- | ---: | --- | --- | --- | ---: |",
    ]
    for op in ("put", "get"):
        ratio = level_ratio(run, op)
        rows = [r for r in run.results if r.cell.group == "levels" and r.cell.op == op]
        if ratio is None:
            continue
        by = {
            lv: [r for r in rows if r.cell.log_level == lv] for lv in (LOG_LEVEL, DEFAULT_LOG_LEVEL)
        }
        p99 = " / ".join(_fmt(max(r.p99_ms for r in by[lv]), 1) for lv in by)
        logged = " / ".join(_fmt(_mean_log_kb(by[lv]), 1) for lv in by)
        out.append(
            f"| {op.capitalize()} | {_spread([r.qps for r in by[LOG_LEVEL]])} | "
            f"{_spread([r.qps for r in by[DEFAULT_LOG_LEVEL]])} | {ratio[0]:.2f} | "
            f"{ratio[1]:.2f} - {ratio[2]:.2f} | {p99} | {logged} | "
            f"{max(other_cpu(r) for r in rows):.0f} |"
        )
    return [*out, ""]


def _pass(result: Result) -> str:
    """A label's suffix for a cell's second pass."""
    return f" (pass {result.cell.repeat})" if result.cell.repeat > 1 else ""


def _same_pass(name: str, result: Result) -> str:
    """The name of cell `name` in the pass `result` ran in."""
    return name if result.cell.repeat == 1 else f"{name}@{result.cell.repeat}"


def etcd_table(run: Run) -> list[str]:
    """etcd's durable puts on the same load generator, and kvstack's puts as ratios of them."""
    if run.etcd_skipped:
        return ["## The peer: etcd", "", f"Not measured: {run.etcd_skipped}.", ""]
    results = [r for r in run.results if r.cell.group == "etcd"]
    if not results:
        return []
    out = [
        f"## The peer: etcd {run.etcd_version} (Debian's package) on the same load generator",
        "",
        f"Durable puts of {VALUE_BYTES}-byte values through etcd's KV.Put over gRPC, etcd's "
        "defaults (its WAL is fsync'd before it answers), members on 127.0.0.1 with their "
        "data in the run's temporary directory; the three-node cluster's calls are spread over "
        "its members in turn, as etcd's client does.",
        "",
        "| etcd members | in flight | puts/s | p50 ms | p99 ms | errors "
        "| CPU % of one core: loadgen / each member | other processes |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in results:
        members = [n for n in r.cpu_pct if n.startswith("etcd-")]
        out.append(
            f"| {r.cell.nodes}{_pass(r)} | {r.cell.concurrency} | {_fmt(r.qps)} | "
            f"{_fmt(r.p50_ms, 2)} | "
            f"{_fmt(r.p99_ms, 2)} | {_errors(r)} | {_cpu(r, 'loadgen', *members)} | "
            f"{other_cpu(r):.0f} |"
        )
    ratios = []
    for c in sorted({r.cell.concurrency for r in results}):
        pairs = [
            ("put", 1, "durable put, 1 backend (1 copy)"),
            ("semisync-put", 3, "replicated put, semi-sync (2 copies)"),
        ]
        for kv_name, nodes, what in pairs:
            ours, theirs = run.get(f"{kv_name}-{c}"), run.get(f"etcd-{nodes}node-{c}")
            if ours and theirs and theirs.qps > 0:
                ratios.append(
                    f"| {what} | {c} | {_fmt(ours.qps)} | {nodes} node{'s' if nodes > 1 else ''}: "
                    f"{_fmt(theirs.qps)} "
                    f"| {ours.qps / theirs.qps:.2f}x | {_fmt(ours.p99_ms, 1)} / "
                    f"{_fmt(theirs.p99_ms, 1)} |"
                )
    if ratios:
        out += [
            "",
            "kvstack's puts through the server as a ratio of etcd's, same run:",
            "",
            "| kvstack | in flight | kvstack puts/s | etcd puts/s | kvstack / etcd "
            "| p99 ms kvstack / etcd |",
            "| --- | ---: | ---: | --- | ---: | --- |",
            *ratios,
        ]
    return [*out, ""]


def rollout_table(run: Run) -> list[str]:
    """Write latency before and during each change of the local stack (kvstack.dev.rollouts)."""
    if run.rollouts_skipped:
        return [
            "## Writes while the stack changes",
            "",
            f"Not measured: {run.rollouts_skipped}.",
            "",
        ]
    if not run.rollouts:
        return []
    from kvstack.dev.rollouts import BEFORE_S

    out = [
        "## Writes while the stack changes (local Swarm stack, real containers)",
        "",
        "| change | in flight | took s | before: p50 / p99 / max ms | during: p50 / p99 / max "
        "ms | longest write s | failed calls | writes |",
        "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: |",
    ]

    def trio(d: dict[str, float]) -> str:
        return f"{d['p50_ms']:,.0f} / {d['p99_ms']:,.0f} / {d['max_ms']:,.0f}"

    for o in run.rollouts:
        out.append(
            f"| {o.scenario} | {o.in_flight} | {o.seconds:.1f} | {trio(o.before)} | "
            f"{trio(o.during)} | {o.during['max_ms'] / 1000:.1f} | "
            f"{', '.join(f'{n} {code}' for code, n in sorted(o.failed.items())) or '0'} | "
            f"{o.writes:,} |"
        )
    restarts = [o for o in run.rollouts if o.phases]
    if restarts:
        names = list(dict.fromkeys(k for o in restarts for k in o.phases))
        out += [
            "",
            "Where the primary's restart went (seconds, from the old and new containers' logs "
            "and Docker's clock; `first write` is the first write the new primary acknowledged; "
            "`total` runs from the first phase to it, the time writes waited):",
            "",
            "| change | in flight | " + " | ".join(names) + " |",
            "| --- | ---: |" + " ---: |" * len(names),
        ]
        for o in restarts:
            cells = " | ".join(f"{o.phases[n]:.2f}" if n in o.phases else "-" for n in names)
            out.append(f"| {o.scenario} | {o.in_flight} | {cells} |")
    out += [
        "",
        "Method (kvstack.dev.rollouts): a local stack of its own (2 backends, 2 servers) and a "
        "writer container on the client's network (the client's `load`: unique keys, N in "
        f"flight, the client's retries and its {default_write_timeout():.0f} s write deadline); "
        f"'before' is the writes started in the {BEFORE_S:.0f} s before the change, 'during' "
        "every write that overlapped it. A failed call is one that failed after the client's "
        "retries.",
        "",
    ]
    return out


def render(run: Run, info: dict[str, str]) -> str:
    out = [
        "# Benchmarks",
        "",
        "<!-- Generated by `make bench` (python -m kvstack.dev.bench); do not edit by hand: "
        "run it again. -->",
        "",
        f"Generated by `make bench` on {run.started:%Y-%m-%d %H:%M} UTC, in one run of "
        f"{run.elapsed:.0f} s on the machine described below. Numbers from another machine, "
        "or another run, differ: compare runs on the same machine only.",
        "",
        "Where a request's time goes in the server and the backend (py-spy profiles, before and "
        "after the logging change, and before and after the batching of server -> backend "
        "calls): [profile.md](profile.md), written by hand from `python -m kvstack.dev.profile` "
        "and not regenerated by this run.",
        "",
    ]
    out += targets_table(run)
    one_hop = [r for r in run.results if r.cell.group in ("echo", "stack")]
    if one_hop:
        out += [
            "## Requests through server -> backend, beside a single-hop echo",
            "",
            "| path | call | in flight | req/s | p50 ms | p99 ms | errors "
            "| CPU % of one core: loadgen / server or echo / backend | other processes |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
        ]
        for r in one_hop:
            path = "server -> backend"
            if r.cell.group == "echo":
                path = "echo, 1 hop" + (" + services' interceptor" if r.cell.observed else "")
            path += _pass(r)
            call = "Echo" if r.cell.op == "echo" else r.cell.op.capitalize()
            cpu = (
                _cpu(r, "loadgen", "echo")
                if r.cell.group == "echo"
                else _cpu(r, "loadgen", "server", "backend")
            )
            out.append(
                f"| {path} | {call} | {r.cell.concurrency} | {_fmt(r.qps)} | "
                f"{_fmt(r.p50_ms, 2)} | {_fmt(r.p99_ms, 2)} | {_errors(r)} | {cpu} "
                f"| {other_cpu(r):.0f} |"
            )
        out.append("")
    replicated = [r for r in run.results if r.cell.group == "replicated"]
    if replicated:
        out += [
            "## Durable puts through the server: 1 backend against 2 in semi-sync",
            "",
            "| backends | in flight | puts/s | p50 ms | p99 ms | replication lag p99 ms "
            "| writes per commit | errors | CPU % of one core: loadgen / server / primary / "
            "replica | other processes |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
        ]
        for r in replicated:
            single = run.get(_same_pass(f"put-{r.cell.concurrency}", r))
            if single:
                out.append(
                    f"| 1 (alone){_pass(r)} | {single.cell.concurrency} | {_fmt(single.qps)} | "
                    f"{_fmt(single.p50_ms, 2)} | {_fmt(single.p99_ms, 2)} | - | "
                    f"{_fmt(single.writes_per_commit, 1)} | {_errors(single)} | "
                    f"{_cpu(single, 'loadgen', 'server', 'backend')} | {other_cpu(single):.0f} |"
                )
            out.append(
                f"| 2 (semi-sync){_pass(r)} | {r.cell.concurrency} | {_fmt(r.qps)} | "
                f"{_fmt(r.p50_ms, 2)} | "
                f"{_fmt(r.p99_ms, 2)} | {_fmt(r.lag_p99_ms, 1)} | "
                f"{_fmt(r.writes_per_commit, 1)} | {_errors(r)} | "
                f"{_cpu(r, 'loadgen', 'server', 'primary', 'replica')} | {other_cpu(r):.0f} |"
            )
        out.append("")
    durable = [r for r in run.results if r.cell.group == "durable"]
    if durable:
        out += [
            "## Durable puts, backend alone",
            "",
            "| group commit | in flight | puts/s | p50 ms | p99 ms | writes per commit | errors "
            "| CPU % of one core: loadgen / backend | other processes |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
        ]
        for r in durable:
            mode = "on (default, up to 256)" if r.cell.group_commit else "off (MAX=1)"
            out.append(
                f"| {mode} | {r.cell.concurrency} | {_fmt(r.qps)} | {_fmt(r.p50_ms, 2)} | "
                f"{_fmt(r.p99_ms, 2)} | {_fmt(r.writes_per_commit, 1)} | {_errors(r)} | "
                f"{_cpu(r, 'loadgen', 'backend')} | {other_cpu(r):.0f} |"
            )
        out.append("")
    out += level_table(run)
    out += etcd_table(run)
    out += rollout_table(run)
    lines = reading(run)
    if lines:
        out += ["## Reading", "", *lines, ""]
    out += [
        "## Method",
        "",
        "- Every process is real and runs on this machine, over loopback (127.0.0.1): "
        "`python -m kvstack backend`, `python -m kvstack server` and, for the baseline, "
        "`python -m kvstack.dev.bench echo` (a bare grpc.aio server with the services' own "
        "server options, `kvstack.runtime.server_options`, echoing the request message back; "
        "no interceptor, no LMDB); once more with the services' interceptor "
        "(`kvstack.runtime.ObservingInterceptor`: Prometheus counters, latency histogram, access "
        "log) to price it.",
        "- The load comes from a separate process, `python -m kvstack.dev.bench loadgen`: one "
        "grpc.aio channel, N callers (1 or 32) each sending its next call as soon as the last "
        f"one answered, with a {CALL_TIMEOUT:.0f} s deadline per call.",
        f"- Each cell: {run.warmup:g} s of warm-up (not counted), then a {run.duration:g} s "
        "window. A call counts when it completes inside the window; req/s = calls completed "
        "successfully in the window / window length. Errors are counted by status code.",
        "- Latency is measured in the load generator, from just before the call to its answer, "
        "so it includes the client's own gRPC and event-loop time. p50 and p99 are nearest-rank "
        "percentiles over every successful call in the window (the smallest latency with at "
        "least 50% / 99% of the calls at or below it; no interpolation, no histogram buckets).",
        f"- Payload: {VALUE_BYTES}-byte random values. Put writes a new key per call; Get reads "
        f"one of {SEED_KEYS} keys written before the first Get or List cell (not timed); List "
        f"asks for a page of {LIST_PAGE} under a prefix that holds 100 of them. The echo sends "
        f"an Entry message (key + {VALUE_BYTES}-byte value) and gets it back.",
        "- The durable cells send Put straight to a fresh backend (no server), once with group "
        "commit (the default, KVSTACK_GROUP_COMMIT_MAX=256) and once without "
        "(KVSTACK_GROUP_COMMIT_MAX=1: one transaction and one fsync per write). Writes per "
        "commit is the change of `kvstack_backend_commit_writes` sum / count on the backend's "
        "/metrics over the window; the server -> backend Put cells report it too.",
        f"- Services run with KVSTACK_LOG_LEVEL={LOG_LEVEL} (no access or `saved` lines), but "
        f"for the cells of the default-level table, which run at {DEFAULT_LOG_LEVEL} (a `saved` "
        "line per commit, access lines only for errors and slow calls, a summary every "
        f"{runtime.RuntimeConfig().log_summary:g} s; docs/configuration.md) with the "
        "services' output in a file. Everything else is the services' defaults: the "
        "backend's LMDB is opened with sync on, so every acknowledged Put is on disk.",
        "- CPU is user + system time of each whole process (every thread) from /proc/PID/stat "
        "over the window, in % of one core; the machine has "
        f"{info.get('CPUs (nproc)', '?')} cores, shared by every process of the cell. "
        "'other processes' is the machine's busy time from /proc/stat over the same window "
        "minus the cell's own processes: anything else running on the machine (a shared "
        "machine is rarely idle; a high figure means the cell was slowed down by others).",
        "- The semi-sync cells run a primary (ordinal 0) and one replica (ordinal 1) behind "
        "the server; they start once the primary reports semi-sync, so every acknowledged Put "
        "waited for the replica's commit. Replication lag p99 is read from the replica's "
        "`kvstack_replication_lag_seconds` histogram (primary commit to replica commit, same "
        "machine clock) over the whole cell, warm-up included: the upper bound of the bucket "
        "holding the 99th percentile.",
        "- Only the processes of a group run at a time: the echo server alone, then backend + "
        "server for the Put/Get/List cells, then a fresh backend + server per level and round "
        "of the default-level table, then primary + replica + server for the semi-sync "
        "cells, then etcd (one node, then three), then a fresh backend per durable cell. "
        f"Then the targets' cells ({', '.join(TARGET_CELLS)}) run again in the same order, "
        "each on fresh processes (their rows in the tables, NAME@2 in --cells).",
        "- etcd: Debian's `etcd-server`, installed with apt-get by the benchmark where it is "
        "missing (as `make up` installs Docker), started with its defaults but for its "
        "addresses (127.0.0.1 ports only) and its data directory (under the run's temporary "
        "directory), and stopped after its cells. The same load generator calls its "
        "`etcdserverpb.KV/Put` with a new key per call and the same values.",
        "",
        "## Machine",
        "",
        "| | |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in info.items()),
        f"| load average (1, 5, 15 min) before / after | {run.load_before} / {run.load_after} |",
        *(
            [
                f"| LMDB sync commits/s, 1 put each, one thread, no gRPC (the disk's ceiling) "
                f"| {run.lmdb_commits:,.0f} ({1000 / run.lmdb_commits:.2f} ms each) |"
            ]
            if run.lmdb_commits
            else []
        ),
        "",
    ]
    return "\n".join(out)


def orchestrate(args: argparse.Namespace) -> int:
    wanted = {name.strip() for name in args.cells.split(",")} if args.cells != "all" else None
    cells = [c for c in all_cells() if wanted is None or c.name in wanted]
    unknown = (wanted or set()) - {c.name for c in all_cells()}
    if unknown or not cells:
        known = ", ".join(c.name for c in all_cells())
        print(f"unknown cells {sorted(unknown)}; choose from: {known} (or all)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="kvstack-bench-", dir=args.data_dir) as tmp:
        work = Path(tmp)
        run = Run(duration=args.duration, warmup=args.warmup, data_dir=work)
        print(
            f"kvstack bench: {len(cells)} cells, {args.warmup:g} s warm-up + {args.duration:g} s "
            f"each; data and logs in {work}",
            flush=True,
        )
        began = time.monotonic()
        run_cells(cells, run, work)
        if any(c.group == "durable" for c in cells):
            run.lmdb_commits = lmdb_commit_rate(work / "raw")
            print(f"  raw LMDB sync commits {run.lmdb_commits:8.0f} /s (1 put each, no gRPC)")
        if args.rollouts:
            from kvstack.dev import rollouts

            try:
                run.rollouts = rollouts.run()
            except Exception as err:  # noqa: BLE001 - the rest of the report still stands
                run.rollouts_skipped = f"the local stack could not be used ({err})"
                print(f"kvstack bench: rollouts not measured: {err}", file=sys.stderr)
        else:
            run.rollouts_skipped = "`--no-rollouts` was given"
        run.elapsed = time.monotonic() - began
        run.load_after = load_average()
        info = machine(work)
    out = Path(args.out)
    out.write_text(render(run, info))
    if args.json:
        Path(args.json).write_text(
            json.dumps([asdict(r) for r in run.results], indent=2, default=str)
        )
    print(f"kvstack bench: {run.elapsed:.0f} s; wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kvstack.dev.bench", description=__doc__)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds measured per cell")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per cell")
    parser.add_argument(
        "--cells",
        default="all",
        help="comma-separated cells to run (e.g. put-1,echo-32), or all (default)",
    )
    parser.add_argument("--out", default=str(DOC), help="Markdown report (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the raw results as JSON here")
    parser.add_argument(
        "--no-rollouts",
        dest="rollouts",
        action="store_false",
        help="skip the rollout table (it needs the Docker engine and takes most of the run)",
    )
    parser.add_argument(
        "--data-dir", default=None, help="parent of the temporary data directory (default: TMPDIR)"
    )
    sub = parser.add_subparsers(dest="command")
    load = sub.add_parser("loadgen", help="(internal) run one cell and print its result as JSON")
    load.add_argument("--target", required=True)
    load.add_argument("--op", choices=("echo", "put", "get", "list", "etcd-put"), required=True)
    load.add_argument("--concurrency", type=int, default=1)
    load.add_argument("--duration", type=float, default=6.0)
    load.add_argument("--warmup", type=float, default=1.0)
    load.add_argument("--watch", action="append", default=[], help="NAME=PID to measure CPU of")
    load.add_argument("--metrics-url", default=None)
    load.add_argument("--seed", action="store_true", help="write the Get/List keys first")
    echo = sub.add_parser("echo", help="(internal) serve the echo baseline")
    echo.add_argument("--port", type=int, required=True)
    echo.add_argument("--observed", action="store_true", help="add the services' interceptor")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "echo":
        asyncio.run(serve_echo(args.port, args.observed))
        return 0
    if args.command == "loadgen":
        watch = {name: int(pid) for name, _, pid in (w.partition("=") for w in args.watch)}
        result = asyncio.run(
            drive(
                args.target,
                args.op,
                args.concurrency,
                args.duration,
                args.warmup,
                watch=watch,
                metrics_url=args.metrics_url,
                seed=args.seed,
            )
        )
        print(json.dumps(result))
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
