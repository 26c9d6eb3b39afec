"""Every backend behind a name, and what each one is: the primary or a read replica.

The server uses it to send writes to the primary and spread reads over every backend that may
answer them; a replica uses it to find the primary to copy from. It resolves the name itself
(every address of a headless Kubernetes Service, or of a Swarm service in dnsrr mode) about once
a second, keeps one channel per address, and asks each backend its role (Replication.Role).
Doing this in one place means the same code finds the primary on Kubernetes, on Swarm and on
loopback in the tests, with no naming convention to keep in step.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from grpc import aio

from kvstack.batching import Batcher
from kvstack.runtime import CHANNEL_OPTIONS, fields
from kvstack.v1 import kv_pb2_grpc, replication_pb2, replication_pb2_grpc

log = logging.getLogger("kvstack.directory")
CLOSE_S = 2.0  # closing the channel of a backend that left DNS
REFRESH_S = 10.0  # one refresh: DNS (the resolver's own timeouts) and a Role call to each
PRIMARY = replication_pb2.BACKEND_ROLE_PRIMARY
REPLICA = replication_pb2.BACKEND_ROLE_REPLICA


def parse_targets(target: str) -> list[tuple[str, int]]:
    """`dns:///backend:50061`, `backend:50061` or a comma-separated list of them."""
    hosts: list[tuple[str, int]] = []
    for part in target.split(","):
        address = part.strip().removeprefix("dns:///").removeprefix("dns:")
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ValueError(
                f"backend target {part.strip()!r} is not HOST:PORT; write e.g. dns:///backend:50061"
            )
        hosts.append((host.strip("[]"), int(port)))
    return hosts


@dataclass
class Member:
    """One backend address, its channel and what it last said about itself."""

    address: str
    channel: aio.Channel
    role: int = replication_pb2.BACKEND_ROLE_UNSPECIFIED
    seq: int = 0
    readable: bool = False
    following: bool = False  # a replica that says it is demonstrably following its primary
    ordinal: int = -1
    error: str = ""  # why the last Role call failed, for the logs
    answered_at: float = 0.0  # when (monotonic) its last Role answer arrived
    kv: kv_pb2_grpc.KeyValueAsyncStub = field(init=False)
    replication: replication_pb2_grpc.ReplicationAsyncStub = field(init=False)
    # The server's Put, Get, Delete and List: one stream, opened by the first call (a replica's
    # Directory never opens one).
    batch: Batcher = field(init=False)

    def __post_init__(self) -> None:
        self.kv = kv_pb2_grpc.KeyValueStub(self.channel)
        self.replication = replication_pb2_grpc.ReplicationStub(self.channel)
        self.batch = Batcher(self.channel, self.address)

    async def close(self) -> None:
        await self.batch.close()
        await self.channel.close()


class Directory:
    def __init__(
        self,
        target: str,
        channel_options: Sequence[tuple[str, Any]] = (),
        interval: float = 1.0,
        role_timeout: float = 0.5,
        max_lag: int = 1000,
    ) -> None:
        self.hosts = parse_targets(target)
        self.target = target
        self.channel_options = [*CHANNEL_OPTIONS, *channel_options]
        self.interval = interval
        self.role_timeout = role_timeout
        self.max_lag = max_lag
        self.members: dict[str, Member] = {}
        self._turn = itertools.count()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _resolve(self) -> tuple[set[str], bool]:
        """Every address the names resolve to, and whether every lookup answered."""
        loop = asyncio.get_running_loop()
        addresses: set[str] = set()
        complete = True
        for host, port in self.hosts:
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError:
                complete = False  # no answer now (every backend down, a DNS hiccup): try again
                continue
            for family, _, _, _, sockaddr in infos:
                ip = str(sockaddr[0])
                addresses.add(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
        return addresses, complete

    async def _ask(self, member: Member) -> None:
        try:
            reply = await member.replication.Role(
                replication_pb2.RoleRequest(), timeout=self.role_timeout
            )
        except aio.AioRpcError as err:
            member.role, member.readable = replication_pb2.BACKEND_ROLE_UNSPECIFIED, False
            member.following = False
            member.error = err.code().name
            return
        member.error, member.answered_at = "", time.monotonic()
        member.role, member.seq = reply.role, reply.seq
        member.readable, member.ordinal = reply.readable, reply.ordinal
        member.following = reply.following

    async def refresh(self) -> None:
        """Resolve the name again and ask every backend what it is."""
        before = {(a, m.role, m.readable) for a, m in self.members.items()}
        addresses, complete = await self._resolve()
        for address in addresses - set(self.members):
            channel = aio.insecure_channel(address, options=self.channel_options)
            self.members[address] = Member(address, channel)
        await asyncio.gather(*(self._ask(m) for m in self.members.values()))
        # A backend leaves when DNS answers without it AND it no longer answers itself. DNS
        # alone may drop a live backend for a moment (a failed lookup, a Swarm service update),
        # and closing its channel would cancel the calls in flight on it.
        gone = [
            a
            for a, m in self.members.items()
            if complete
            and a not in addresses
            and m.role == replication_pb2.BACKEND_ROLE_UNSPECIFIED
        ]
        for address in gone:
            # Bounded: grpc.aio may wait on a call that closing did not end (grpc/grpc#32005);
            # callers bound their own reads, so the channel is dropped either way.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_S):
                    await self.members.pop(address).close()
        after = {(a, m.role, m.readable) for a, m in self.members.items()}
        if after != before:
            log.info("backends", extra=fields(target=self.target, backends=self.describe()))
            self._changed.set()
            self._changed = asyncio.Event()

    def describe(self) -> list[str]:
        names: dict[int, str] = {PRIMARY: "primary", REPLICA: "replica"}
        return sorted(
            f"{m.address} {names.get(m.role, 'unreachable (' + (m.error or 'starting') + ')')}"
            + ("" if m.readable or m.role != REPLICA else " (catching up)")
            for m in self.members.values()
        )

    def member(self, address: str) -> Member | None:
        """The backend at `address` (host:port, as `describe` and ListBackends show it)."""
        return self.members.get(address)

    def primary(self) -> Member | None:
        primaries = [m for m in self.members.values() if m.role == PRIMARY]
        return min(primaries, key=lambda m: m.ordinal) if primaries else None

    def readers(self) -> list[Member]:
        """Every backend that may answer reads now: the primary, and the replicas that say they
        may and, when the primary answers here too, say they are following it (heard from it
        within their staleness bound) and are within max_lag changes of it."""
        primary = self.primary()

        def current(m: Member) -> bool:
            if m.role == PRIMARY:
                return True
            if m.role != REPLICA or not m.readable:
                return False
            return primary is None or (m.following and primary.seq - m.seq <= self.max_lag)

        return sorted((m for m in self.members.values() if current(m)), key=lambda m: m.address)

    def pick_reader(self, exclude: Sequence[Member] | Member | None = None) -> Member | None:
        """The next reader in turn (round-robin), other than those in `exclude` when there is a
        choice."""
        skip = [exclude] if isinstance(exclude, Member) else list(exclude or ())
        readers = [m for m in self.readers() if m not in skip] or self.readers()
        return readers[next(self._turn) % len(readers)] if readers else None

    async def wait_changed(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._changed.wait()

    async def _run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(REFRESH_S):
                    await self.refresh()
            except TimeoutError:
                log.warning(
                    "refreshing the backend list timed out; trying again",
                    extra=fields(target=self.target, timeout_s=REFRESH_S),
                )
            except Exception:  # a refresh must never end the loop that keeps the view fresh
                log.exception("refreshing the backend list failed")
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="directory")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for member in self.members.values():
            await member.close()
        self.members.clear()
