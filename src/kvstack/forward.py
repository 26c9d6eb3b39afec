"""`python -m kvstack.forward PORT HOST:PORT`: the local stack's entrance from the host.

Swarm cannot publish a port on one interface only (moby/moby#26696: a service's published port
binds every interface), so `kvstack up` runs this in a plain container instead, published with
`docker run -p 127.0.0.1:50051:PORT` (loopback only, on Linux and Docker Desktop alike) and
joined to the network of the flow to the service (client -> server), where it stands for the
client. Each accepted connection is forwarded to HOST:PORT, resolved again for that connection
(the service's DNS name lists every healthy task), so the address survives scale, deploys,
rollbacks and restarts. One HTTP/2 connection is one task: a caller that wants its calls spread
over the replicas opens more than one, or runs on the stack's network (`dns:///server:50051`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import sys

log = logging.getLogger("kvstack.forward")
CHUNK = 64 * 1024


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy one direction until its end; then half-close the other side (the reply may still
    come back the other way), or close it when the connection failed."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
            return
    except (ConnectionError, OSError):
        pass
    with contextlib.suppress(ConnectionError, OSError):
        writer.close()


def keepalive(writer: asyncio.StreamWriter) -> None:
    """TCP keepalive every 10 s, given up after 3 unanswered probes: a peer that vanished
    without a reset (a killed task) does not hold this connection open forever."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):  # Linux; macOS names them otherwise
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


async def upstream(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to one of the addresses `host` resolves to now, tried in random order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    random.shuffle(infos)
    error: OSError = OSError(f"{host} resolves to no address")
    for *_, address in infos:
        try:
            return await asyncio.open_connection(str(address[0]), port)
        except OSError as err:
            error = err
    raise error


def handler(host: str, port: int):  # type: ignore[no-untyped-def]  # asyncio's callback type
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await upstream(host, port)
        except OSError as err:
            log.warning("cannot reach %s:%s (%s): closing the caller's connection", host, port, err)
            writer.close()
            return
        keepalive(writer)
        keepalive(up_writer)
        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            for end in (writer, up_writer):
                with contextlib.suppress(ConnectionError, OSError):
                    end.close()

    return handle


async def serve(listen_port: int, host: str, port: int) -> None:
    # Every interface of this container's own network namespace: the host reaches it only
    # through the loopback-only published port, and on the stack's network it offers nothing
    # beyond the flow to the service that this network already carries.
    server = await asyncio.start_server(handler(host, port), "0.0.0.0", listen_port)  # noqa: S104
    log.info("forwarding :%s to %s:%s", listen_port, host, port)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or ":" not in args[1] or not args[0].isdigit():
        print("usage: python -m kvstack.forward LISTEN_PORT HOST:PORT", file=sys.stderr)
        return 2
    host, _, port = args[1].rpartition(":")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(int(args[0]), host, int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
