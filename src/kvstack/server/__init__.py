"""The server (front end): the API clients call. It validates each request, forwards it to the
backend with a deadline, and retries what is safe to retry when a backend is UNAVAILABLE.

It reaches the backend through DNS with client-side round-robin over every address the name
resolves to: a plain Kubernetes Service would pin the one HTTP/2 connection to one pod.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstack import registry, runtime, validation
from kvstack.runtime import setting
from kvstack.v1 import kv_pb2, kv_pb2_grpc

NAME = "server"
log = logging.getLogger("kvstack.server")
Context = aio.ServicerContext[Any, Any]
R = TypeVar("R")


def _default_backend() -> str:
    return f"dns:///backend:{registry.get('backend').port}"


@dataclass(frozen=True)
class ServerConfig:
    backend_target: str = setting(
        "KVSTACK_BACKEND_TARGET",
        _default_backend(),
        "gRPC target of the backend; dns:/// resolves every address",
    )
    backend_timeout: float = setting(
        "KVSTACK_BACKEND_TIMEOUT",
        5.0,
        "seconds a forwarded call may take at most (less if the caller's deadline is nearer)",
    )
    backend_attempts: int = setting(
        "KVSTACK_BACKEND_ATTEMPTS",
        5,
        "tries per call when the backend is UNAVAILABLE (gRPC retry policy, 2 to 5)",
    )
    max_value_bytes: int = setting(
        "KVSTACK_MAX_VALUE_BYTES", validation.DEFAULT_MAX_VALUE_BYTES, "largest value accepted"
    )


def channel_options(config: ServerConfig) -> list[tuple[str, Any]]:
    """Round-robin over every resolved address, and gRPC's own retry on UNAVAILABLE."""
    service_config = {
        "loadBalancingConfig": [{"round_robin": {}}],
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
        # Re-resolve DNS often enough to find new backends after a scale-out.
        ("grpc.dns_min_time_between_resolutions_ms", 1000),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.max_receive_message_length", 8 << 20),
    ]


class FrontEnd(kv_pb2_grpc.KeyValueServicer):
    def __init__(self, config: ServerConfig, backend: kv_pb2_grpc.KeyValueAsyncStub) -> None:
        self.config = config
        self.backend = backend

    def _timeout(self, context: Context) -> float:
        remaining = context.time_remaining()
        if remaining is None:
            return self.config.backend_timeout
        return min(remaining, self.config.backend_timeout)

    async def _forward(
        self, context: Context, call: Callable[..., Awaitable[R]], request: Any
    ) -> R:
        timeout = self._timeout(context)
        if timeout <= 0:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "the call's deadline expired before it reached the backend; "
                "give the call a longer deadline",
            )
        try:
            return await call(request, timeout=timeout)
        except aio.AioRpcError as err:
            await context.abort(err.code(), _explain(err))
            raise  # unreachable: abort raises

    async def Put(self, request: kv_pb2.PutRequest, context: Context) -> kv_pb2.PutResponse:
        def check() -> None:
            validation.check_key(request.key)
            validation.check_value(request.value, self.config.max_value_bytes)

        await _validate(context, check)
        return await self._forward(context, self.backend.Put, request)

    async def Get(self, request: kv_pb2.GetRequest, context: Context) -> kv_pb2.GetResponse:
        await _validate(context, lambda: validation.check_key(request.key))
        return await self._forward(context, self.backend.Get, request)

    async def Delete(
        self, request: kv_pb2.DeleteRequest, context: Context
    ) -> kv_pb2.DeleteResponse:
        await _validate(context, lambda: validation.check_key(request.key))
        return await self._forward(context, self.backend.Delete, request)

    async def List(self, request: kv_pb2.ListRequest, context: Context) -> kv_pb2.ListResponse:
        def check() -> None:
            validation.page_size(request.page_size)
            validation.check_page_token(request.prefix, request.page_token)

        await _validate(context, check)
        return await self._forward(context, self.backend.List, request)

    async def Scan(
        self, request: kv_pb2.ScanRequest, context: Context
    ) -> AsyncIterator[kv_pb2.Entry]:
        # A stream has no single deadline to shrink: it inherits the caller's, if any.
        timeout = context.time_remaining()
        try:
            async for entry in self.backend.Scan(request, timeout=timeout):
                yield entry
        except aio.AioRpcError as err:
            await context.abort(err.code(), _explain(err))


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
        self.config = config
        self.channel = aio.insecure_channel(config.backend_target, options=channel_options(config))
        self.servicer = FrontEnd(config, kv_pb2_grpc.KeyValueStub(self.channel))

    def register(self, server: aio.Server) -> list[str]:
        kv_pb2_grpc.add_KeyValueServicer_to_server(self.servicer, server)
        return [kv_pb2.DESCRIPTOR.services_by_name["KeyValue"].full_name]

    async def start(self) -> None:
        """Ready once the backend answers its health check with SERVING."""
        health = health_pb2_grpc.HealthStub(self.channel)
        waited = 0.0
        while True:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    log.info(
                        "backend reachable", extra=runtime.fields(target=self.config.backend_target)
                    )
                    return
                reason = "backend not serving yet"
            except aio.AioRpcError as err:
                reason = f"{err.code().name}: {err.details()}"
            if waited % 5 < 0.5:
                log.info(
                    "waiting for the backend",
                    extra=runtime.fields(
                        target=self.config.backend_target, reason=reason, waited_s=round(waited)
                    ),
                )
            await asyncio.sleep(0.5)
            waited += 0.5

    async def stop(self) -> None:
        await self.channel.close()


def main(argv: list[str]) -> int:
    if argv:
        print(
            "usage: the server takes no arguments; configure it with KVSTACK_* variables "
            "(see docs/configuration.md)"
        )
        return 2
    return runtime.run(NAME, lambda: Server(runtime.load(ServerConfig)))
