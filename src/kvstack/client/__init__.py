"""The client: a command-line program that talks to the server.

Run with no arguments it sends a batch of requests (writes, reads, a listing, a delete) and prints
every response. Subcommands (put, get, delete, list) serve a person at a terminal; `load` writes
unique keys and prints each acknowledgement, for the fault tests and benchmarks; `smoke` is what
every deploy runs as its smoke test: the batch, then a check of every tier (run_smoke).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from kvstack import defaults, runtime
from kvstack.runtime import printable
from kvstack.v1 import frontend_pb2, frontend_pb2_grpc, kv_pb2, kv_pb2_grpc, replication_pb2

R = TypeVar("R")

# Transient: the server (or a backend behind it) is restarting or briefly unreachable.
# UNAVAILABLE, and CANCELLED, which this client never causes (it cancels no call): gRPC gives it
# to a call still pending when the server it reached shuts down, as in a rolling update
# (grpc/grpc#41785; measured: one read in a server rolling update at 8 writes in flight).
# Every call may be sent again: reads change nothing, a write's request_id is applied once.
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


def default_target() -> str:
    """KVSTACK_SERVER_TARGET; else, in the client's own image (which sets KVSTACK_SERVICE), the
    server's name on the stack's network, and on a developer's machine the local stack's
    loopback address (kvstack up's gateway)."""
    if os.environ.get("KVSTACK_SERVICE") == "client":
        return os.environ.get("KVSTACK_SERVER_TARGET", defaults.target("server"))
    local = os.environ.get("KVSTACK_LOCAL_ADDRESS", "")  # where `kvstack up` put the gateway
    if local and not local.endswith(":0"):
        return os.environ.get("KVSTACK_SERVER_TARGET", local)
    return os.environ.get("KVSTACK_SERVER_TARGET", f"localhost:{defaults.port('server')}")


# Balance over every address the server's name resolves to, and re-resolve at most once a
# second (gRPC's default is 30 s): after a rolling update the old addresses are gone, and the
# client must learn the new ones before its retries run out.
CHANNEL_OPTIONS = [
    ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
    ("grpc.dns_min_time_between_resolutions_ms", 1000),
    *runtime.CHANNEL_OPTIONS,
]


class Unreachable(Exception):
    """The server did not answer within the retry budget."""


def default_write_timeout() -> float:
    """A write's deadline in seconds (KVSTACK_WRITE_TIMEOUT, default 30): longer than a primary's
    restart on every target (docs/deploying.md has the measured figures)."""
    return float(os.environ.get("KVSTACK_WRITE_TIMEOUT", "30"))


@dataclass
class Client:
    """A KeyValue stub with retries, backoff and a deadline on every call."""

    target: str
    timeout: float = 5.0
    # A write's deadline is longer: the server holds a write while the primary restarts
    # (KVSTACK_PRIMARY_WAIT) instead of failing it, so one attempt rides out a restart.
    write_timeout: float = field(default_factory=default_write_timeout)
    attempts: int = 5
    backoff: float = 0.1
    verbose: bool = True
    # Read from the primary, so every acknowledged write is seen: what a person (or the batch)
    # expects right after a put. False lets the server answer from any caught-up backend, which
    # spreads the load but may be a moment behind (see docs/architecture.md, Reads).
    latest: bool = True

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        self.stub = kv_pb2_grpc.KeyValueStub(self.channel)
        self.retries = 0

    def close(self) -> None:
        self.channel.close()

    def call(self, method: Callable[..., R], request: object, timeout: float | None = None) -> R:
        """Call within a deadline (`timeout`, default self.timeout) for all its attempts
        together; retry transient failures with exponential backoff and jitter while it lasts
        (a write's attempts all carry its one request_id: the primary applies it once)."""
        budget = timeout or self.timeout
        started = time.monotonic()
        for attempt in range(1, self.attempts + 1):
            left = budget - (time.monotonic() - started)
            try:
                return method(request, timeout=max(left, 0.001))
            except grpc.RpcError as err:
                code = err.code()
                if code not in TRANSIENT:
                    raise
                delay = min(2.0, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)  # noqa: S311
                spent = time.monotonic() - started
                if attempt == self.attempts or spent + delay >= budget:
                    raise Unreachable(
                        f"the kvstack server at {self.target} did not complete the call in "
                        f"{spent:.1f} s ({attempt} attempts; the last: {code.name}: "
                        f"{err.details()}). If it is not running, start it with `make up`; if "
                        "it runs elsewhere, point KVSTACK_SERVER_TARGET (or --target) at it; if "
                        "it waited for a backend, the backends are restarting or down "
                        "(`kvstack status TARGET` shows them)"
                    ) from err
                self.retries += 1
                if self.verbose:
                    print(
                        f"  ({code.name.lower()}, retrying in {delay:.2f}s: attempt "
                        f"{attempt + 1} of {self.attempts})",
                        file=sys.stderr,
                    )
                time.sleep(delay)
        raise AssertionError("unreachable")

    def put(self, key: bytes, value: bytes) -> bool:
        request = kv_pb2.PutRequest(key=key, value=value, request_id=uuid.uuid4().hex)
        reply: kv_pb2.PutResponse = self.call(self.stub.Put, request, self.write_timeout)
        return reply.created

    def get(self, key: bytes) -> bytes:
        reply: kv_pb2.GetResponse = self.call(
            self.stub.Get, kv_pb2.GetRequest(key=key, latest=self.latest)
        )
        return reply.value

    def delete(self, key: bytes) -> None:
        request = kv_pb2.DeleteRequest(key=key, request_id=uuid.uuid4().hex)
        self.call(self.stub.Delete, request, self.write_timeout)

    def list(self, prefix: bytes, page_size: int = 0) -> Iterator[kv_pb2.Entry]:
        """Every entry under prefix, following the pages."""
        token = b""
        while True:
            reply: kv_pb2.ListResponse = self.call(
                self.stub.List,
                kv_pb2.ListRequest(
                    prefix=prefix, page_size=page_size, page_token=token, latest=self.latest
                ),
            )
            yield from reply.entries
            token = reply.next_page_token
            if not token:
                return


def _show(data: bytes) -> str:
    return repr(printable(data))


def run_batch(client: Client) -> int:
    """The original system's batch: writes, reads, a listing, a delete; prints every response."""

    def put(key: bytes, value: bytes) -> Callable[[], str]:
        return lambda: "created" if client.put(key, value) else "updated"

    def get(key: bytes) -> Callable[[], str]:
        return lambda: _show(client.get(key))

    def listing(prefix: bytes) -> Callable[[], str]:
        return lambda: ", ".join(
            f"{printable(e.key)}={printable(e.value)}" for e in client.list(prefix)
        )

    def delete(key: bytes) -> Callable[[], str]:
        def action() -> str:
            client.delete(key)
            return "deleted"

        return action

    users = [(b"user/1", b"alice"), (b"user/2", b"bob"), (b"user/3", b"carol")]
    batch: list[tuple[str, Callable[[], str]]] = [
        *((f"put {_show(k)} = {_show(v)}", put(k, v)) for k, v in users),
        *((f"get {_show(k)}", get(k)) for k, _ in users),
        ("list 'user/'", listing(b"user/")),
        ("delete 'user/2'", delete(b"user/2")),
        ("get 'user/2'", get(b"user/2")),
        ("list 'user/'", listing(b"user/")),
    ]

    print(f"kvstack client: sending {len(batch)} requests to {client.target}")
    failed = 0
    for number, (label, action) in enumerate(batch, 1):
        try:
            outcome = action()
        except grpc.RpcError as err:
            if label == "get 'user/2'" and err.code() == grpc.StatusCode.NOT_FOUND:
                outcome = "NOT_FOUND (expected: it was just deleted)"
            else:
                failed += 1
                outcome = f"ERROR {err.code().name}: {err.details()}"
        print(f"[{number:2}] {label:<28} -> {outcome}")
    print(f"kvstack client: {len(batch) - failed} of {len(batch)} responses as expected")
    return 0 if failed == 0 else 1


def run_load(client: Client, count: int, concurrency: int, prefix: str, value_bytes: int) -> int:
    """Write `count` unique keys; print one JSON line per write (acknowledged or failed, with
    when it ended and how long it took) and a summary.

    Each value is unique to this run, so a checker can tell an acknowledged write from any
    other. Errors are counted, not retried past the client's budget.
    """
    run = uuid.uuid4().hex[:8]
    pad = "x" * max(0, value_bytes - 20)

    def one(i: int) -> dict[str, object]:
        key, value = f"{prefix}{i:08d}", f"{run}-{i}-{pad}"
        began = time.monotonic()
        try:
            client.put(key.encode(), value.encode())
        except (grpc.RpcError, Unreachable) as err:
            code = err.code().name if isinstance(err, grpc.RpcError) else "UNREACHABLE"
            outcome: dict[str, object] = {"key": key, "error": code, "message": str(err)[:300]}
        else:
            outcome = {"key": key, "value": value, "ack": True}
        # When it ended (wall clock, to line up with the services' logs) and how long it took.
        return {
            **outcome,
            "t": round(time.time(), 3),
            "ms": round(1000 * (time.monotonic() - began), 1),
        }

    started = time.monotonic()
    errors = 0

    def emit(line: dict[str, object]) -> None:
        nonlocal errors
        errors += "error" in line
        print(json.dumps(line), flush=True)

    # At most 2 x concurrency writes submitted ahead (Executor.map would submit all `count` at
    # once: with a large count, nothing is printed for minutes and memory grows); printed in
    # the order they were sent.
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        pending: deque[Future[dict[str, object]]] = deque()
        for i in range(count):
            pending.append(pool.submit(one, i))
            if len(pending) >= 2 * max(1, concurrency):
                emit(pending.popleft().result())
        while pending:
            emit(pending.popleft().result())
    elapsed = time.monotonic() - started
    print(
        json.dumps(
            {
                "summary": True,
                "acked": count - errors,
                "errors": errors,
                "retries": client.retries,
                "seconds": round(elapsed, 3),
            }
        ),
        flush=True,
    )
    return 0 if errors == 0 else 1


# -- the smoke test: every tier --------------------------------------------------------------------
#
# The network lets the client reach the server only (client -> server -> backend; a replica ->
# the primary), so every backend is checked through the server: it lists the backends it knows
# (kvstack.v1.Frontend/ListBackends), forwards a read to the one that `kvstack-backend` request
# metadata names, and says in trailing metadata which backend answered (kvstack.server).

BACKEND_KEY = "kvstack-backend"  # kvstack.server.BACKEND_KEY (the client does not import it)
SMOKE_WITHIN_ENV = "KVSTACK_SMOKE_WITHIN"
SMOKE_WITHIN_S = 10.0
SMOKE_READ_TIMEOUT_S = 1.0  # one read from one backend: a frozen backend costs this much a round
PRIMARY = replication_pb2.BACKEND_ROLE_PRIMARY
REPLICA = replication_pb2.BACKEND_ROLE_REPLICA


class SmokeFailed(Exception):
    """A tier did not do its part; the message names the backend and what to look at."""


def default_within() -> float:
    raw = os.environ.get(SMOKE_WITHIN_ENV, "")
    try:
        return float(raw) if raw else SMOKE_WITHIN_S
    except ValueError:
        raise SystemExit(
            f"kvstack-client: {SMOKE_WITHIN_ENV}={raw!r} is not a number of seconds; "
            f"set it to e.g. {SMOKE_WITHIN_S:g} or unset it"
        ) from None


def backend_name(info: frontend_pb2.BackendInfo) -> str:
    """`backend ordinal 1 (replica at 10.0.0.6:50061)`: the pod backend-1 on Kubernetes, the
    task in slot 1 on Swarm."""
    role = {PRIMARY: "primary", REPLICA: "replica"}.get(info.role, "role unknown")
    ordinal = f"backend ordinal {info.ordinal}" if info.ordinal >= 0 else "backend"
    return f"{ordinal} ({role} at {info.address})"


def _answered_by(call: Any) -> str:
    return next((str(v) for k, v in call.trailing_metadata() or () if k == BACKEND_KEY), "")


@dataclass
class Seen:
    """What the smoke test saw of one backend."""

    info: frontend_pb2.BackendInfo
    held_after: float | None = None  # seconds from the write's acknowledgement to a copy
    last: str = "not asked yet"
    reads: int = 0  # ordinary reads (no backend named) it answered


class Smoke:
    """Put a unique key through the server; read it back from every backend by name until each
    holds it (within `within` seconds); then check that ordinary reads reach every backend."""

    def __init__(self, client: Client, within: float) -> None:
        self.client = client
        self.within = within
        self.frontend = frontend_pb2_grpc.FrontendStub(client.channel)
        self.seen: dict[str, Seen] = {}
        self.written = False
        run = uuid.uuid4().hex[:12]
        self.key = f"smoke/{run}".encode()
        self.value = f"{run}-{time.time():.3f}".encode()

    def backends(self) -> list[frontend_pb2.BackendInfo]:
        """Every backend the server knows; new ones join the check (earlier ones stay in it)."""
        try:
            reply: frontend_pb2.ListBackendsResponse = self.client.call(
                self.frontend.ListBackends, frontend_pb2.ListBackendsRequest()
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise SmokeFailed(
                    f"the server at {self.client.target} does not serve kvstack.v1.Frontend, so "
                    "its backends cannot be checked: it is older than this client; deploy a "
                    "server of the same version"
                ) from err
            raise
        for info in reply.backends:
            if info.address in self.seen:
                self.seen[info.address].info = info
            else:
                self.seen[info.address] = Seen(info)
        return list(reply.backends)

    def read_from(self, address: str, timeout: float) -> str | None:
        """None when `address` holds the write; otherwise what it answered, as a phrase."""
        try:
            reply, call = self.client.stub.Get.with_call(
                kv_pb2.GetRequest(key=self.key),
                timeout=timeout,
                metadata=((BACKEND_KEY, address),),
            )
        except grpc.RpcError as err:
            code = err.code()
            if code == grpc.StatusCode.NOT_FOUND:
                return "does not hold it (NOT_FOUND)"
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return f"did not answer within {timeout:.1f} s (DEADLINE_EXCEEDED)"
            return f"{code.name}: {err.details()}"
        answered = _answered_by(call)
        if answered != address:
            # Not a lagging backend: the check itself cannot be trusted.
            raise SmokeFailed(
                f"a read for the backend at {address} was answered by "
                f"{answered or 'a backend the server did not name'!r}: the server does not "
                "honour kvstack-backend metadata (is it older than this client?); deploy a "
                "server of the same version"
            )
        if reply.value != self.value:
            return f"holds another value ({_show(reply.value)})"
        return None

    def write(self) -> None:
        backends = self.backends()
        print(
            f"kvstack smoke: the server at {self.client.target} knows {len(backends)} "
            "backend(s): " + ", ".join(backend_name(b) for b in backends)
        )
        primaries = sorted((b for b in backends if b.role == PRIMARY), key=lambda b: b.ordinal)
        if not primaries:
            raise SmokeFailed(
                "no backend the server knows says it is the primary, so no write can land; see "
                "the primary's logs (Kubernetes: backend-0; Swarm: the backend task in slot 1)"
            )
        put = kv_pb2.PutRequest(key=self.key, value=self.value, request_id=uuid.uuid4().hex)
        _, call = self.client.call(self.client.stub.Put.with_call, put, self.client.write_timeout)
        self.written = True
        taken_by = _answered_by(call)
        print(f"put {_show(self.key)} -> taken by {taken_by or '(not said)'}")
        if taken_by != primaries[0].address:
            raise SmokeFailed(
                f"the write was taken by {taken_by or 'a backend the server did not name'!r}, "
                f"not by the primary, {backend_name(primaries[0])}; the server routes writes "
                "wrongly: see its logs"
            )

    def converge(self) -> None:
        """Read the write back from every backend, by name, until each holds it."""
        started = time.monotonic()
        deadline = started + self.within
        while True:
            for address, seen in self.seen.items():
                if seen.held_after is not None:
                    continue
                timeout = max(0.05, min(SMOKE_READ_TIMEOUT_S, deadline - time.monotonic()))
                problem = self.read_from(address, timeout)
                if problem is None:
                    seen.held_after = time.monotonic() - started
                else:
                    seen.last = problem
            lagging = [s for s in self.seen.values() if s.held_after is None]
            if not lagging or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
            self.backends()  # a backend the server found meanwhile joins the check
        for seen in self.seen.values():
            outcome = (
                f"holds the write after {seen.held_after:.2f} s"
                if seen.held_after is not None
                else f"NOT within {self.within:g} s: {seen.last}"
            )
            print(f"  {backend_name(seen.info)}: {outcome}")
        if lagging:
            names = "; ".join(f"{backend_name(s.info)} {s.last}" for s in lagging)
            raise SmokeFailed(
                f"not every backend holds the write within {self.within:g} s: {names}. A "
                "replica that never gets it is not following the primary (its logs say why: "
                "it cannot reach it, or it is stopped); one that is only slow needs a longer "
                f"bound (--within, {SMOKE_WITHIN_ENV})"
            )

    def spread(self) -> None:
        """Ordinary reads (no backend named) until every backend has answered one."""
        deadline = time.monotonic() + self.within
        total = 0
        while time.monotonic() < deadline:
            if all(s.reads for s in self.seen.values()):
                break
            try:
                reply, call = self.client.call(
                    self.client.stub.Get.with_call, kv_pb2.GetRequest(key=self.key, latest=False)
                )
            except grpc.RpcError as err:
                raise SmokeFailed(
                    f"an ordinary read (no backend named) failed after {total} that worked: "
                    f"{err.code().name}: {err.details()}; the server's logs say which backend "
                    "it tried"
                ) from err
            total += 1
            answered = _answered_by(call)
            if reply.value != self.value:
                raise SmokeFailed(
                    f"an ordinary read answered by {answered or 'an unnamed backend'} returned "
                    f"{_show(reply.value)}, not the value just written"
                )
            if answered in self.seen:
                self.seen[answered].reads += 1
            time.sleep(0.02)
        print(
            f"ordinary reads: {total}, answered by "
            + ", ".join(f"{backend_name(s.info)} x{s.reads}" for s in self.seen.values())
        )
        unread = [s for s in self.seen.values() if not s.reads]
        if unread:
            self.backends()
            names = "; ".join(
                f"{backend_name(s.info)} (the server "
                + ("counts it as readable" if s.info.serves_reads else "does not send it reads")
                + ")"
                for s in unread
            )
            raise SmokeFailed(
                f"reads do not spread over every backend: none of {total} ordinary reads in "
                f"{self.within:g} s reached {names}. A replica out of the read rotation is "
                "catching up or lags past KVSTACK_MAX_LAG: see its logs"
            )

    def clean_up(self) -> None:
        if not self.written:
            return
        try:
            self.client.call(self.client.stub.Delete, kv_pb2.DeleteRequest(key=self.key))
        except (grpc.RpcError, Unreachable) as err:
            print(f"(could not delete {_show(self.key)}: {err}; harmless)", file=sys.stderr)


def run_smoke(client: Client, within: float) -> int:
    """The deploys' smoke test: the batch, then every tier. Writes reach the primary; every
    backend the server knows, each addressed by name, holds the write within `within` seconds;
    ordinary reads reach every backend. 0 when all holds, 1 (saying which backend) otherwise."""
    if run_batch(client) != 0:
        print("kvstack smoke: FAILED: the batch did not get every response right (above)")
        return 1
    smoke = Smoke(client, within)
    try:
        try:
            smoke.write()
            smoke.converge()
            smoke.spread()
        finally:
            smoke.clean_up()
    except SmokeFailed as err:
        print(f"kvstack smoke: FAILED: {err}")
        return 1
    except grpc.RpcError as err:
        print(f"kvstack smoke: FAILED: {err.code().name}: {err.details()}")
        return 1
    print(f"kvstack smoke: every tier OK ({len(smoke.seen)} backend(s))")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvstack-client",
        description="Talk to the kvstack server. With no command, send the demo batch.",
    )
    parser.add_argument(
        "--target",
        default=default_target(),
        help="server address (default: $KVSTACK_SERVER_TARGET or %(default)s)",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per call")
    reads = parser.add_mutually_exclusive_group()
    reads.add_argument(
        "--latest",
        dest="latest",
        action="store_true",
        default=True,
        help="read from the primary: see every acknowledged write (the default)",
    )
    reads.add_argument(
        "--any-backend",
        dest="latest",
        action="store_false",
        help="let the server answer reads from any caught-up replica (spreads the load; may be "
        "a moment behind the latest write)",
    )
    parser.add_argument(
        "--attempts", type=int, default=5, help="tries per call when the server is unavailable"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    put = sub.add_parser("put", help="store VALUE under KEY")
    put.add_argument("key")
    put.add_argument("value")
    get = sub.add_parser("get", help="print the value of KEY")
    get.add_argument("key")
    delete = sub.add_parser("delete", help="remove KEY")
    delete.add_argument("key")
    lst = sub.add_parser("list", help="print every KEY=VALUE under PREFIX")
    lst.add_argument("prefix", nargs="?", default="")
    load = sub.add_parser("load", help="write unique keys, print each acknowledgement (JSON)")
    load.add_argument("--count", type=int, default=1000)
    load.add_argument("--concurrency", type=int, default=8)
    load.add_argument("--prefix", default="load/")
    load.add_argument("--value-bytes", type=int, default=64)
    smoke = sub.add_parser(
        "smoke",
        help="the deploys' smoke test: the batch, then every backend must hold a fresh write "
        "and answer reads",
    )
    smoke.add_argument(
        "--within",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"how long each backend may take to hold the write (default: ${SMOKE_WITHIN_ENV} "
        f"or {SMOKE_WITHIN_S:g})",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    client = Client(
        args.target, timeout=args.timeout, attempts=max(1, args.attempts), latest=args.latest
    )
    try:
        if args.command is None:
            return run_batch(client)
        if args.command == "put":
            created = client.put(args.key.encode(), args.value.encode())
            print("created" if created else "updated")
        elif args.command == "get":
            print(printable(client.get(args.key.encode())))
        elif args.command == "delete":
            client.delete(args.key.encode())
            print("deleted")
        elif args.command == "list":
            for entry in client.list(args.prefix.encode()):
                print(f"{printable(entry.key)}={printable(entry.value)}")
        elif args.command == "load":
            return run_load(client, args.count, args.concurrency, args.prefix, args.value_bytes)
        elif args.command == "smoke":
            within = default_within() if args.within is None else args.within
            if within <= 0:
                print(
                    f"kvstack-client: error: the bound must be above 0 s (got {within:g}); "
                    f"give --within SECONDS or {SMOKE_WITHIN_ENV}, e.g. {SMOKE_WITHIN_S:g}",
                    file=sys.stderr,
                )
                return 2
            return run_smoke(client, within)
    except Unreachable as err:
        print(f"kvstack-client: error: {err}", file=sys.stderr)
        return 2
    except grpc.RpcError as err:
        print(f"kvstack-client: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0
