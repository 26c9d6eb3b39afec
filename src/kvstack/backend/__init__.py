"""The backend: the KeyValue API over an LMDB database, with durable, group-committed writes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from kvstack import runtime, validation
from kvstack.backend.store import GroupCommitter, Store, StoreFull, Write
from kvstack.runtime import setting
from kvstack.v1 import kv_pb2, kv_pb2_grpc

NAME = "backend"
Context = aio.ServicerContext[Any, Any]


@dataclass(frozen=True)
class BackendConfig:
    data_dir: str = setting(
        "KVSTACK_DATA_DIR",
        "/data",
        "directory of the LMDB files (a local volume: never a network or shared file system)",
    )
    map_size: int = setting(
        "KVSTACK_MAP_SIZE",
        1 << 30,
        "LMDB map size: the most the database "
        "can hold (e.g. 1GiB); raise it when writes fail as full",
    )
    max_value_bytes: int = setting(
        "KVSTACK_MAX_VALUE_BYTES", validation.DEFAULT_MAX_VALUE_BYTES, "largest value accepted"
    )
    group_commit_max: int = setting(
        "KVSTACK_GROUP_COMMIT_MAX",
        256,
        "most writes committed in one transaction (1 turns group commit off)",
    )


class _Starting(Exception):
    """A call that arrived before the database was open (health still says NOT_SERVING)."""


async def _refuse(context: Context, err: Exception) -> None:
    if isinstance(err, _Starting):
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            "the backend is starting and its database is not open yet; retry",
        )
    if isinstance(err, validation.Invalid):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
    if isinstance(err, StoreFull):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
    raise err


class KeyValueServicer(kv_pb2_grpc.KeyValueServicer):
    """The API over the store; the store is attached once start-up has opened it."""

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self._store: Store | None = None
        self._writer: GroupCommitter | None = None

    def attach(self, store: Store, writer: GroupCommitter) -> None:
        self._store, self._writer = store, writer

    @property
    def store(self) -> Store:
        if self._store is None:
            raise _Starting
        return self._store

    @property
    def writer(self) -> GroupCommitter:
        if self._writer is None:
            raise _Starting
        return self._writer

    async def Put(self, request: kv_pb2.PutRequest, context: Context) -> kv_pb2.PutResponse:
        try:
            validation.check_key(request.key)
            validation.check_value(request.value, self.config.max_value_bytes)
            created = await self.writer.submit(Write("put", request.key, request.value))
        except (validation.Invalid, StoreFull, _Starting) as err:
            await _refuse(context, err)
        return kv_pb2.PutResponse(created=created)

    async def Get(self, request: kv_pb2.GetRequest, context: Context) -> kv_pb2.GetResponse:
        try:
            validation.check_key(request.key)
            value = self.store.get(request.key)
        except (validation.Invalid, _Starting) as err:
            await _refuse(context, err)
        if value is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no value for key {runtime.printable(request.key)!r}"
            )
        return kv_pb2.GetResponse(value=value)

    async def Delete(
        self, request: kv_pb2.DeleteRequest, context: Context
    ) -> kv_pb2.DeleteResponse:
        try:
            validation.check_key(request.key)
            existed = await self.writer.submit(Write("delete", request.key))
        except (validation.Invalid, StoreFull, _Starting) as err:
            await _refuse(context, err)
        if not existed:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no value for key {runtime.printable(request.key)!r}; nothing was deleted",
            )
        return kv_pb2.DeleteResponse()

    async def List(self, request: kv_pb2.ListRequest, context: Context) -> kv_pb2.ListResponse:
        try:
            limit = validation.page_size(request.page_size)
            validation.check_page_token(request.prefix, request.page_token)
            # One extra entry tells whether another page follows.
            entries = self.store.page(request.prefix, limit + 1, request.page_token)
        except (validation.Invalid, _Starting) as err:
            await _refuse(context, err)
        more = len(entries) > limit
        entries = entries[:limit]
        return kv_pb2.ListResponse(
            entries=[kv_pb2.Entry(key=k, value=v) for k, v in entries],
            next_page_token=entries[-1][0] if more else b"",
        )

    async def Scan(
        self, request: kv_pb2.ScanRequest, context: Context
    ) -> AsyncIterator[kv_pb2.Entry]:
        try:
            store = self.store
        except _Starting as err:
            await _refuse(context, err)
        for chunk in store.scan(request.prefix):
            for key, value in chunk:
                yield kv_pb2.Entry(key=key, value=value)
            await asyncio.sleep(0)  # let other calls in between chunks


class Backend:
    name = NAME

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self.store: Store | None = None
        self.writer: GroupCommitter | None = None
        self._servicer = KeyValueServicer(config)

    def register(self, server: aio.Server) -> list[str]:
        kv_pb2_grpc.add_KeyValueServicer_to_server(self._servicer, server)
        return [kv_pb2.DESCRIPTOR.services_by_name["KeyValue"].full_name]

    async def start(self) -> None:
        store = Store(Path(self.config.data_dir), self.config.map_size)
        writer = GroupCommitter(store, self.config.group_commit_max)
        writer.start()
        self._servicer.attach(store, writer)
        self.store, self.writer = store, writer
        runtime.log.info(
            "database open", extra=runtime.fields(path=str(store.path), **store.stats())
        )

    async def stop(self) -> None:
        if self.writer is not None:
            await self.writer.stop()
        if self.store is not None:
            self.store.close()


def main(argv: list[str]) -> int:
    if argv:
        print(
            "usage: the backend takes no arguments; configure it with KVSTACK_* variables "
            "(see docs/configuration.md)"
        )
        return 2
    return runtime.run(NAME, lambda: Backend(runtime.load(BackendConfig)))
