"""The server (front end): the API clients call. It validates each request, forwards it to a
backend with a deadline, and retries what is safe to retry when a backend is UNAVAILABLE.

It finds every backend behind one DNS name (kvstack.directory: one channel per address, each
asked its role): writes, and reads that ask for the latest, go to the primary; other reads go
round-robin to every backend that may answer them. A plain Kubernetes Service would pin the one
HTTP/2 connection to one pod.

It also serves kvstack.v1.Frontend (frontend.proto): the backends it knows, and, for a read whose
`kvstack-backend` metadata names one, that backend alone. Every forwarded call says in trailing
metadata which backend answered. The client's smoke test checks every backend that way, through
the server: the network lets only the server reach a backend.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

from kvstack import defaults, runtime, validation, wire
from kvstack.directory import Directory, Member
from kvstack.runtime import setting
from kvstack.v1 import frontend_pb2, frontend_pb2_grpc, kv_pb2, kv_pb2_grpc, replication_pb2

NAME = "server"
# A write that waits for the primary gives up this long before the caller's deadline, so the
# caller gets the server's reason rather than its own DEADLINE_EXCEEDED.
WAIT_MARGIN_S = 0.2
PRIMARY_POLL_S = 0.25
log = logging.getLogger("kvstack.server")
Context = aio.ServicerContext[Any, Any]
# Request metadata: the backend (an address ListBackends returned) a Get or List is for.
# Trailing metadata of every forwarded call: the backend that answered.
BACKEND_KEY = "kvstack-backend"
NAMED = "the backend named"  # in messages about a read for a named backend


@dataclass(frozen=True)
class ServerConfig:
    backend_target: str = setting(
        "KVSTACK_BACKEND_TARGET",
        defaults.target("backend"),
        "the backends: a name resolving to every backend (or host:port,host:port)",
    )
    backend_timeout: float = setting(
        "KVSTACK_BACKEND_TIMEOUT",
        5.0,
        "seconds a forwarded call may take at most (less if the caller's deadline is nearer)",
    )
    backend_attempts: int = setting(
        "KVSTACK_BACKEND_ATTEMPTS",
        5,
        "tries per Scan when the backend is UNAVAILABLE (gRPC retry policy, 2 to 5). Put, "
        "Get, Delete and List travel on one stream per backend, which gRPC does not retry: "
        "the server's own loops send them again (KVSTACK_PRIMARY_WAIT)",
    )
    max_value_bytes: int = setting(
        "KVSTACK_MAX_VALUE_BYTES", validation.DEFAULT_MAX_VALUE_BYTES, "largest value accepted"
    )
    primary_wait: float = setting(
        "KVSTACK_PRIMARY_WAIT",
        30.0,
        "seconds a call waits, within its deadline, for a backend that can take it (a write "
        "or a read for the latest: the primary; another Get or List: any readable backend) "
        "while backends restart; then UNAVAILABLE saying how long it waited. A Scan is not "
        "held: with no backend to stream from it fails at once",
    )
    read_attempt_timeout: float = setting(
        "KVSTACK_READ_ATTEMPT_TIMEOUT",
        1.0,
        "seconds a read waits for one backend while another could answer it; then the read "
        "goes to the next backend within the same call (the last one gets the rest of the "
        "deadline)",
    )
    max_lag: int = setting(
        "KVSTACK_MAX_LAG",
        validation.DEFAULT_MAX_LAG,
        "changes a replica may be behind the primary and still get reads",
    )


def channel_options(config: ServerConfig) -> list[tuple[str, Any]]:
    """Options of the channel to each backend address: gRPC's own retry on UNAVAILABLE, which
    applies to unary and server-streaming KeyValue calls (Scan, and every call to a backend of
    a release before the batch stream); the batch stream's items are sent again by the Batcher
    instead (once, on a new stream) and by the server's own loops: gRPC commits a stream once
    the response headers arrive ("Once the response header is received, the RPC is committed.
    No further retries will be attempted", grpc.io/docs/guides/retry)."""
    service_config = {
        "methodConfig": [
            {
                "name": [{"service": "kvstack.v1.KeyValue"}],
                "retryPolicy": {
                    "maxAttempts": max(2, min(5, config.backend_attempts)),
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
    return [
        ("grpc.service_config", json.dumps(service_config)),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", 8 << 20),
    ]


# What a backend answers when it could not take the call but another attempt may: unavailable,
# or CANCELLED, which gRPC gives a call still pending when the backend shuts down (the server
# never cancels a forwarded call itself; grpc/grpc#41785). Every call may be sent again:
# reads change nothing and a write's request_id is applied once.
RETRY_ELSEWHERE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


class FrontEnd(kv_pb2_grpc.KeyValueServicer):
    """Validates, then sends writes (and reads that ask for the latest) to the primary and other
    reads to any readable backend in turn, trying a second one when the first is unavailable."""

    def __init__(self, config: ServerConfig, directory: Directory) -> None:
        self.config = config
        self.directory = directory

    def _timeout(self, context: Context) -> float:
        remaining = context.time_remaining()
        if remaining is None:
            return self.config.backend_timeout
        return min(remaining, self.config.backend_timeout)

    async def _deadline(self, context: Context) -> float:
        timeout = self._timeout(context)
        if timeout <= 0:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "the call's deadline expired before it reached the backend; "
                "give the call a longer deadline",
            )
        return timeout

    async def _named(self, context: Context, latest: bool) -> Member | None:
        """The backend a read's `kvstack-backend` metadata names, if it names one."""
        address = named_backend(context)
        if address is None:
            return None
        if latest:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the read asks for the latest (the primary) and names backend {address!r} in "
                f"{BACKEND_KEY} metadata; ask for one or the other",
            )
        member = self.directory.member(address)
        if member is None:
            known = ", ".join(sorted(self.directory.members)) or "none yet"
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this server knows no backend at {address!r} (it knows: {known}); "
                "kvstack.v1.Frontend/ListBackends lists them",
            )
        return member

    async def _refuse_named(self, context: Context, what: str) -> None:
        address = named_backend(context)
        if address is not None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{what}, so {BACKEND_KEY} metadata (naming {address!r}) does not apply; "
                "drop it, or send a Get or List to read from one backend",
            )

    async def _answer(
        self, context: Context, member: Member, method: str, request: Any, who: str
    ) -> Any:
        """Forward to one backend, no other: its reply, or its failure as this call's (the
        backend's own message; a read for a named backend also says which one answered)."""
        try:
            reply = await member.batch.call(method, request, self._timeout(context))
        except aio.AioRpcError as err:
            named = who == NAMED
            detail = f"{who} {member.address}: {_explain(err)}" if named else _explain(err)
            await context.abort(err.code(), detail)
            raise  # unreachable: abort raises
        answered_by(context, member)
        return reply

    def _wait_budget(self, context: Context) -> float:
        """How long a call may be held for a backend that can take it: the caller's deadline
        (less a margin to answer in), at most KVSTACK_PRIMARY_WAIT."""
        remaining = context.time_remaining()
        if remaining is None:
            return float(self.config.primary_wait)
        budget = remaining - WAIT_MARGIN_S
        if budget <= 0:
            # Too short to wait for a backend at all: one try within the deadline, instead of
            # answering "no backend took the call" without asking the one there is.
            budget = remaining
        return min(budget, self.config.primary_wait)

    async def _write(self, context: Context, method: str, request: Any) -> Any:
        await self._refuse_named(context, "writes always go to the primary")
        if not request.request_id:
            # A write that came without one (kv.proto makes it optional) is given one here, so
            # that this server's own tries of it are applied once: a Put tried again after it
            # was applied would otherwise answer created=false, a Delete NOT_FOUND.
            request.request_id = uuid.uuid4().hex
        return await self._to_primary(context, method, request)

    async def _to_primary(self, context: Context, method: str, request: Any) -> Any:
        """Send to the primary; while there is none that answers (it restarts, drains, or is not
        SERVING yet), wait for it within the caller's deadline, up to KVSTACK_PRIMARY_WAIT,
        rather than fail at once; an attempt that the primary does not answer within
        KVSTACK_BACKEND_TIMEOUT is sent again the same way. A write repeated here carries the
        caller's request_id, which the primary applies once, so waiting and retrying never
        applies a write twice."""
        await self._deadline(context)  # already expired: DEADLINE_EXCEEDED, nothing sent
        started, budget = time.monotonic(), self._wait_budget(context)
        why = "no backend says it is the primary"
        while True:
            left = budget - (time.monotonic() - started)
            primary = self.directory.primary()
            if primary is not None and left > 0:
                attempt = min(left, self.config.backend_timeout)
                try:
                    reply = await primary.batch.call(method, request, attempt)
                except aio.AioRpcError as err:
                    # An attempt that ran out of KVSTACK_BACKEND_TIMEOUT while the caller has
                    # time left is tried again, like an unavailable primary (a draining or
                    # overloaded one, measured under a rolling update at 32 writes in flight).
                    slow = err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and attempt < left
                    if err.code() not in RETRY_ELSEWHERE and not slow:
                        await context.abort(err.code(), _explain(err))
                    why = (
                        f"the primary at {primary.address} did not answer within {attempt:.1f} s"
                        if slow
                        else f"the primary at {primary.address} was unavailable ({err.details()})"
                    )
                else:
                    answered_by(context, primary)
                    return reply
                left = budget - (time.monotonic() - started)
            if left <= 0:
                break
            await self.directory.wait_changed(min(PRIMARY_POLL_S, left))
        waited = time.monotonic() - started
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"no primary backend took the call in the {waited:.1f} s it waited ({why}); it is "
            "restarting or unreachable. If this was a write, it may or may not have been "
            "applied: retry it with the same request_id (the client does), which is applied "
            "once" + (". Reads from any backend still work" if self.directory.readers() else ""),
        )
        raise AssertionError(waited)  # unreachable: abort raises

    async def _read(self, context: Context, method: str, request: Any, latest: bool) -> Any:
        named = await self._named(context, latest)
        timeout = await self._deadline(context)
        if named is not None:
            return await self._answer(context, named, method, request, NAMED)
        if latest:
            return await self._to_primary(context, method, request)  # same route as writes
        # While no backend can answer (the primary restarts and the replica is not readable,
        # or every one is starting), the read is held like a write: within the caller's
        # deadline and at most KVSTACK_PRIMARY_WAIT, sent again each time the Directory changes.
        started, budget = time.monotonic(), self._wait_budget(context)
        while True:
            reply = await self._read_once(context, method, request)
            if reply is not None:
                return reply
            left = budget - (time.monotonic() - started)
            if left <= 0:
                break
            await self.directory.wait_changed(min(PRIMARY_POLL_S, left))
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"no backend could answer the read in the {time.monotonic() - started:.1f} s it "
            "waited (restarting, or replicas catching up); retry in a few seconds",
        )
        raise AssertionError(timeout)  # unreachable: abort raises

    async def _read_once(self, context: Context, method: str, request: Any) -> Any:
        """One round of a read over the readable backends; None when none answered."""
        # Each reader in turn: one that is unavailable, or does not answer within
        # read_attempt_timeout while another could, hands the read to the next within this call
        # (a frozen replica used to hold it for the whole deadline). The last gets what is left.
        tried: list[Member] = []
        while True:
            member = self.directory.pick_reader(exclude=tried)
            if member is None:
                return None
            others = self._others(member, tried)
            remaining = self._timeout(context)
            if remaining <= 0:
                return None
            # Bounded too when this is the only reader while the call has 3 attempts' time or
            # more: the Directory's view may be a second old (a backend that just left, whose
            # address no longer answers; measured: one read failed DEADLINE_EXCEEDED in a
            # backend rolling update), and the read is held and sent again meanwhile.
            hurry = bool(others) or remaining >= 3 * self.config.read_attempt_timeout
            attempt = min(remaining, self.config.read_attempt_timeout) if hurry else remaining
            try:
                reply = await member.batch.call(method, request, attempt)
            except aio.AioRpcError as err:
                slow = err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and hurry
                if err.code() not in RETRY_ELSEWHERE and not slow:
                    await context.abort(err.code(), _explain(err))
                if slow:
                    log.warning(
                        "backend slow to answer a read; trying "
                        + ("another" if others else "again"),
                        extra=runtime.fields(backend=member.address, waited_s=attempt),
                    )
            else:
                answered_by(context, member)
                return reply
            tried.append(member)
            if not others:
                return None

    async def Put(self, request: kv_pb2.PutRequest, context: Context) -> kv_pb2.PutResponse:
        def check() -> None:
            validation.check_key(request.key)
            validation.check_value(request.value, self.config.max_value_bytes)
            validation.check_request_id(request.request_id)

        await _validate(context, check)
        reply: kv_pb2.PutResponse = await self._write(context, "Put", request)
        return reply

    async def Get(self, request: kv_pb2.GetRequest, context: Context) -> kv_pb2.GetResponse:
        await _validate(context, lambda: validation.check_key(request.key))
        reply: kv_pb2.GetResponse = await self._read(context, "Get", request, request.latest)
        return reply

    async def Delete(
        self, request: kv_pb2.DeleteRequest, context: Context
    ) -> kv_pb2.DeleteResponse:
        def check() -> None:
            validation.check_key(request.key)
            validation.check_request_id(request.request_id)

        await _validate(context, check)
        reply: kv_pb2.DeleteResponse = await self._write(context, "Delete", request)
        return reply

    async def List(self, request: kv_pb2.ListRequest, context: Context) -> kv_pb2.ListResponse:
        def check() -> None:
            validation.page_size(request.page_size)
            validation.check_page_token(request.prefix, request.page_token)

        await _validate(context, check)
        reply: kv_pb2.ListResponse = await self._read(context, "List", request, request.latest)
        return reply

    async def Scan(
        self, request: kv_pb2.ScanRequest, context: Context
    ) -> AsyncIterator[kv_pb2.Entry]:
        await self._refuse_named(context, "Scan streams from the backends in turn")
        # A stream has no single deadline to shrink: it inherits the caller's, if any.
        member, call, first = await self._start_scan(context, request)
        answered_by(context, member)
        try:
            entry = first
            while entry is not aio.EOF:
                yield entry
                entry = await call.read()
        except aio.AioRpcError as err:
            # Entries went to the caller already: the stream cannot move to another backend
            # without repeating or skipping some, so the caller gets the failure.
            await context.abort(err.code(), _explain(err))
        finally:
            call.cancel()  # the caller left (or the stream ended: then a no-op)

    async def _start_scan(
        self, context: Context, request: kv_pb2.ScanRequest
    ) -> tuple[Member, Any, Any]:
        """Open the Scan on a backend and wait for its first message (an entry, or the end of
        an empty scan). As for the other reads, a reader that is unavailable, or sends nothing
        within read_attempt_timeout while another could, hands the stream to the next before
        anything reached the caller; the last gets the rest of the caller's deadline."""
        tried: list[Member] = []
        while True:
            if request.latest:
                member = None if tried else self.directory.primary()
                others: list[Member] = []
            else:
                member = self.directory.pick_reader(exclude=tried)
                others = self._others(member, tried)
            if member is None:
                break
            remaining = context.time_remaining()
            wait = self.config.read_attempt_timeout if others else None
            if remaining is not None:
                wait = remaining if wait is None else min(wait, remaining)
            call = member.kv.Scan(request, timeout=remaining)
            try:
                async with asyncio.timeout(wait):
                    first = await call.read()
            except TimeoutError:
                call.cancel()
                if not others:
                    await context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"the backend ({member.address}) sent nothing before the deadline; "
                        "retry, or give the call a longer deadline",
                    )
                log.warning(
                    "backend slow to start a scan; trying another",
                    extra=runtime.fields(backend=member.address, waited_s=wait),
                )
            except aio.AioRpcError as err:
                if err.code() not in RETRY_ELSEWHERE or not others:
                    await context.abort(err.code(), _explain(err))
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    call.cancel()
                    raise  # this handler itself was cancelled: the client left, or shutdown
                # the Directory closed the channel of a backend that left: try the next
            else:
                return member, call, first
            tried.append(member)
            if not others:
                break
        await self._no_reader(context)
        raise AssertionError(tried)  # unreachable: abort raises

    def _others(self, member: Member | None, tried: list[Member]) -> list[Member]:
        """The readers a read could still go to after `member`."""
        return [m for m in self.directory.readers() if m is not member and m not in tried]

    async def _no_reader(self, context: Context) -> None:
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            "no backend can answer reads right now (restarting, or replicas catching up); "
            "retry in a few seconds",
        )


class BackendList(frontend_pb2_grpc.FrontendServicer):
    """kvstack.v1.Frontend: the backends this server knows, as its Directory last saw them."""

    def __init__(self, directory: Directory) -> None:
        self.directory = directory

    async def ListBackends(
        self, request: frontend_pb2.ListBackendsRequest, context: Context
    ) -> frontend_pb2.ListBackendsResponse:
        readers = {m.address for m in self.directory.readers()}
        return frontend_pb2.ListBackendsResponse(
            backends=[
                frontend_pb2.BackendInfo(
                    address=m.address,
                    role=replication_pb2.BackendRole.Name(m.role),
                    ordinal=m.ordinal,
                    seq=m.seq,
                    serves_reads=m.address in readers,
                    error=m.error,
                )
                for m in sorted(self.directory.members.values(), key=lambda m: m.address)
            ]
        )


def named_backend(context: Context) -> str | None:
    """The value of the call's `kvstack-backend` request metadata, if it has one."""
    for key, value in context.invocation_metadata() or ():
        if key == BACKEND_KEY:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return None


def answered_by(context: Context, member: Member) -> None:
    context.set_trailing_metadata(((BACKEND_KEY, member.address),))


async def _validate(context: Context, check: Callable[[], None]) -> None:
    try:
        check()
    except validation.Invalid as err:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))


def _explain(err: aio.AioRpcError) -> str:
    """The backend's message, or a sentence a person can act on when gRPC itself failed."""
    if err.code() == grpc.StatusCode.UNAVAILABLE:
        return (
            f"the backend is unavailable ({err.details()}); it may be restarting: "
            "retry in a few seconds"
        )
    if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return (
            "the backend did not answer before the deadline; retry, or give the call a "
            "longer deadline"
        )
    return err.details() or err.code().name


class Server:
    name = NAME

    def __init__(self, config: ServerConfig) -> None:
        try:
            validation.check_value_limit(config.max_value_bytes)
        except ValueError as err:
            raise runtime.ConfigError(str(err)) from None
        self.config = config
        self.directory = Directory(
            config.backend_target, channel_options(config), max_lag=config.max_lag
        )
        self.servicer = FrontEnd(config, self.directory)

    def register(self, server: aio.Server) -> list[str]:
        # Not the generated add_*_to_server: a request that is not a valid message gets
        # INVALID_ARGUMENT with a sentence, not UNKNOWN (kvstack.wire).
        kv = kv_pb2.DESCRIPTOR.services_by_name["KeyValue"]
        frontend = frontend_pb2.DESCRIPTOR.services_by_name["Frontend"]
        wire.add_servicer(self.servicer, kv, server)
        wire.add_servicer(BackendList(self.directory), frontend, server)
        return [kv.full_name, frontend.full_name]

    async def start(self) -> None:
        """Ready once a backend can answer: the primary, or a replica that has caught up."""
        self.directory.start()
        waited = 0.0
        while not self.directory.readers():
            if waited % 5 < 0.5:
                log.info(
                    "waiting for the backend",
                    extra=runtime.fields(
                        target=self.config.backend_target,
                        backends=self.directory.describe(),
                        waited_s=round(waited),
                    ),
                )
            await self.directory.wait_changed(0.5)
            waited += 0.5
        log.info(
            "backend reachable",
            extra=runtime.fields(
                target=self.config.backend_target, backends=self.directory.describe()
            ),
        )

    async def stop(self) -> None:
        await self.directory.close()


def main(argv: list[str]) -> int:
    return runtime.run(NAME, argv, lambda: Server(runtime.load(ServerConfig)), ServerConfig)
