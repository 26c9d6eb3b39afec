"""kvstack.forward, the local gateway's forwarder, between real sockets on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator

from kvstack import forward
from kvstack.dev.processes import free_port
from tests.conftest import listeners


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads until the caller half-closes, then answers everything back and closes."""
    data = await reader.read()  # up to EOF
    writer.write(b"echo:" + data)
    await writer.drain()
    writer.close()
    await writer.wait_closed()


@contextlib.asynccontextmanager
async def forwarder(target_port: int) -> AsyncIterator[int]:
    """A running forwarder to 127.0.0.1:target_port; its listening port. Everything it opened
    is closed (and the loop given time to finish closing) before the test's loop ends."""
    listen = free_port()
    task = asyncio.create_task(forward.serve(listen, "127.0.0.1", target_port))
    deadline = time.monotonic() + 10
    while not listeners(listen):  # listening, seen in the kernel's table: no probe connection
        assert time.monotonic() < deadline, "the forwarder did not start listening"
        await asyncio.sleep(0.02)
    try:
        yield listen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.2)


async def call(port: int, payload: bytes, half_close: bool) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        if half_close:
            writer.write_eof()
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


def test_a_half_closed_request_still_gets_its_reply() -> None:
    """A caller that sends, then shuts down its sending side (as HTTP clients and `nc -N` do),
    still receives the whole reply through the forwarder: the end of the request is passed on
    as a half-close, not as a close of the connection."""

    async def scenario() -> bytes:
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        async with server, forwarder(server.sockets[0].getsockname()[1]) as port:
            return await call(port, b"x" * 200_000, half_close=True)

    assert asyncio.run(scenario()) == b"echo:" + b"x" * 200_000


def test_an_unreachable_target_closes_the_callers_connection() -> None:
    """With nothing listening at the target, the caller's connection is closed at once (EOF)
    rather than left open with nobody behind it."""

    async def scenario() -> bytes:
        async with forwarder(free_port()) as port:
            return await call(port, b"hello", half_close=False)

    assert asyncio.run(scenario()) == b""


def test_keepalive_is_set_on_a_connection() -> None:
    """forward.keepalive turns TCP keepalive on, so a vanished peer is noticed."""

    async def scenario() -> int:
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            forward.keepalive(writer)
            sock = writer.get_extra_info("socket")
            value = int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))
            writer.close()
            await writer.wait_closed()
            await asyncio.sleep(0.1)
            return value

    assert asyncio.run(scenario()) == 1
