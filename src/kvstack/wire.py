"""Registering a servicer so that a request that is not a valid protobuf message is refused with
INVALID_ARGUMENT and a sentence, not UNKNOWN with a Python exception's class (what gRPC answers
when the generated code's deserializer raises).

Used instead of the generated `add_*Servicer_to_server` functions: every method whose request is
one message gets a deserializer that hands the servicer a `Malformed` marker instead of raising,
and a guard that refuses it before the servicer runs. Client-streaming methods (Replication.Stream,
which only our own replicas call) keep gRPC's behaviour.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from grpc import aio

Context = aio.ServicerContext[Any, Any]


@dataclass(frozen=True)
class Malformed:
    """A request whose bytes are not a valid message of the method's request type."""

    type_name: str
    error: str

    @property
    def message(self) -> str:
        return (
            f"the request is not a valid {self.type_name} message ({self.error}): send a "
            "message encoded with the kvstack.v1 protos (protos/kvstack/v1)"
        )


def _tolerant(cls: Any) -> Callable[[bytes], Any]:
    name = cls.DESCRIPTOR.full_name

    def parse(raw: bytes) -> Any:
        try:
            return cls.FromString(raw)
        except DecodeError as err:
            return Malformed(
                name, str(err).removeprefix(f"Error parsing message with type '{name}': ")
            )

    return parse


def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def _unary(behaviour: Callable[[Any, Context], Any]) -> Callable[[Any, Context], Any]:
    async def handler(request: Any, context: Context) -> Any:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await behaviour(request, context)

    return handler


def _stream(
    behaviour: Callable[[Any, Context], AsyncIterator[Any]],
) -> Callable[[Any, Context], AsyncIterator[Any]]:
    async def handler(request: Any, context: Context) -> AsyncIterator[Any]:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        async for item in behaviour(request, context):
            yield item

    return handler


def add_servicer(servicer: object, service: ServiceDescriptor, server: aio.Server) -> None:
    """Serve every method of `service` (a proto service descriptor) from `servicer`."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        behaviour = getattr(servicer, method.name)
        request_cls = message_factory.GetMessageClass(method.input_type)
        if method.client_streaming:
            make = (
                grpc.stream_stream_rpc_method_handler
                if method.server_streaming
                else grpc.stream_unary_rpc_method_handler
            )
            handlers[method.name] = make(
                behaviour,
                request_deserializer=request_cls.FromString,
                response_serializer=_serialize,
            )
        elif method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _stream(behaviour),
                request_deserializer=_tolerant(request_cls),
                response_serializer=_serialize,
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(behaviour),
                request_deserializer=_tolerant(request_cls),
                response_serializer=_serialize,
            )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)
