"""A real Backend (a primary on LMDB in a temporary directory) served in-process over loopback,
for the tests that open its streams directly or hold its writer inside a commit."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

from grpc import aio

from kvstack import runtime
from kvstack.backend import Backend, BackendConfig
from kvstack.backend.store import Applied, Store, Write


@contextlib.asynccontextmanager
async def serving_backend(
    data_dir: Path,
) -> AsyncIterator[tuple[Backend, aio.Channel, aio.Server]]:
    """A started primary Backend on a loopback port, a channel to it, and its gRPC server."""
    config = runtime.load(
        BackendConfig, {"KVSTACK_DATA_DIR": str(data_dir), "KVSTACK_ORDINAL": "0"}
    )
    backend = Backend(config)
    await backend.start()
    server = aio.server()
    backend.register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield backend, channel, server
    finally:
        await channel.close()
        await server.stop(None)
        await backend.stop()


async def until(condition: Callable[[], object], what: str) -> None:
    """Wait (at most 5 s) until `condition()` holds."""
    try:
        async with asyncio.timeout(5):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"waited 5 s in vain for this: {what}") from None


@contextlib.contextmanager
def commits_held(store: Store) -> Iterator[threading.Event]:
    """From here the writer thread waits inside each commit (in store.apply, before its write
    transaction, at most 10 s) until the event yielded is set; it is set on leaving, so a
    failing test does not leave the writer held while the backend stops."""
    release = threading.Event()
    apply = store.apply

    def held(writes: list[Write], now: float | None = None) -> list[Applied | Exception]:
        release.wait(10)
        return apply(writes, now)

    store.apply = held  # type: ignore[method-assign]
    try:
        yield release
    finally:
        release.set()
