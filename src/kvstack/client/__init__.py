"""The client: a command-line program that talks to the server.

Run with no arguments it sends a batch of requests (writes, reads, a listing, a delete) and prints
every response. Subcommands (put, get, delete, list) serve a person at a terminal; `load` writes
unique keys and prints each acknowledgement, for the fault tests and benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import grpc

from kvstack import registry, runtime
from kvstack.runtime import printable
from kvstack.v1 import kv_pb2, kv_pb2_grpc

R = TypeVar("R")

# Transient: the server (or a backend behind it) is restarting or briefly unreachable.
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE})


def default_target() -> str:
    """KVSTACK_SERVER_TARGET; else, in the client's own image (which sets KVSTACK_SERVICE), the
    server's name on the stack's network, and on a developer's machine the local stack's
    loopback address (kvstack up's gateway)."""
    server = registry.get("server")
    if os.environ.get("KVSTACK_SERVICE") == "client":
        return os.environ.get("KVSTACK_SERVER_TARGET", server.target)
    local = os.environ.get("KVSTACK_LOCAL_ADDRESS", "")  # where `kvstack up` put the gateway
    if local and not local.endswith(":0"):
        return os.environ.get("KVSTACK_SERVER_TARGET", local)
    return os.environ.get("KVSTACK_SERVER_TARGET", f"localhost:{server.port}")


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


@dataclass
class Client:
    """A KeyValue stub with retries, backoff and a deadline on every call."""

    target: str
    timeout: float = 5.0
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

    def call(self, method: Callable[..., R], request: object) -> R:
        """Call with a deadline; retry transient failures with exponential backoff and jitter."""
        for attempt in range(1, self.attempts + 1):
            try:
                return method(request, timeout=self.timeout)
            except grpc.RpcError as err:
                code = err.code()
                if code not in TRANSIENT:
                    raise
                if attempt == self.attempts:
                    raise Unreachable(
                        f"cannot reach the kvstack server at {self.target}: no answer after "
                        f"{attempt} attempts ({code.name}: {err.details()}). If it is not "
                        "running, start it with `make up`; if it runs elsewhere, point "
                        "KVSTACK_SERVER_TARGET (or --target) at it"
                    ) from err
                delay = min(2.0, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)  # noqa: S311
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
        reply: kv_pb2.PutResponse = self.call(
            self.stub.Put, kv_pb2.PutRequest(key=key, value=value)
        )
        return reply.created

    def get(self, key: bytes) -> bytes:
        reply: kv_pb2.GetResponse = self.call(
            self.stub.Get, kv_pb2.GetRequest(key=key, latest=self.latest)
        )
        return reply.value

    def delete(self, key: bytes) -> None:
        self.call(self.stub.Delete, kv_pb2.DeleteRequest(key=key))

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
    """Write `count` unique keys; print one JSON line per acknowledged write and a summary.

    Each value is unique to this run, so a checker can tell an acknowledged write from any
    other. Errors are counted, not retried past the client's budget.
    """
    run = uuid.uuid4().hex[:8]
    pad = "x" * max(0, value_bytes - 20)

    def one(i: int) -> tuple[str, str, str | None]:
        key, value = f"{prefix}{i:08d}", f"{run}-{i}-{pad}"
        try:
            client.put(key.encode(), value.encode())
        except (grpc.RpcError, Unreachable) as err:
            code = err.code().name if isinstance(err, grpc.RpcError) else "UNREACHABLE"
            return key, value, code
        return key, value, None

    started = time.monotonic()
    errors = 0
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        for key, value, error in pool.map(one, range(count)):
            if error:
                errors += 1
                print(json.dumps({"key": key, "error": error}), flush=True)
            else:
                print(json.dumps({"key": key, "value": value, "ack": True}), flush=True)
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
    except Unreachable as err:
        print(f"kvstack-client: error: {err}", file=sys.stderr)
        return 2
    except grpc.RpcError as err:
        print(f"kvstack-client: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0
