from kvstack.v1 import kv_pb2 as _kv_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BatchRequest(_message.Message):
    __slots__ = ("items",)
    class Item(_message.Message):
        __slots__ = ("id", "put", "get", "delete", "list")
        ID_FIELD_NUMBER: _ClassVar[int]
        PUT_FIELD_NUMBER: _ClassVar[int]
        GET_FIELD_NUMBER: _ClassVar[int]
        DELETE_FIELD_NUMBER: _ClassVar[int]
        LIST_FIELD_NUMBER: _ClassVar[int]
        id: int
        put: _kv_pb2.PutRequest
        get: _kv_pb2.GetRequest
        delete: _kv_pb2.DeleteRequest
        list: _kv_pb2.ListRequest
        def __init__(self, id: _Optional[int] = ..., put: _Optional[_Union[_kv_pb2.PutRequest, _Mapping]] = ..., get: _Optional[_Union[_kv_pb2.GetRequest, _Mapping]] = ..., delete: _Optional[_Union[_kv_pb2.DeleteRequest, _Mapping]] = ..., list: _Optional[_Union[_kv_pb2.ListRequest, _Mapping]] = ...) -> None: ...
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[BatchRequest.Item]
    def __init__(self, items: _Optional[_Iterable[_Union[BatchRequest.Item, _Mapping]]] = ...) -> None: ...

class BatchResponse(_message.Message):
    __slots__ = ("answers",)
    class Trailer(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class Answer(_message.Message):
        __slots__ = ("id", "code", "message", "trailers", "put", "get", "delete", "list")
        ID_FIELD_NUMBER: _ClassVar[int]
        CODE_FIELD_NUMBER: _ClassVar[int]
        MESSAGE_FIELD_NUMBER: _ClassVar[int]
        TRAILERS_FIELD_NUMBER: _ClassVar[int]
        PUT_FIELD_NUMBER: _ClassVar[int]
        GET_FIELD_NUMBER: _ClassVar[int]
        DELETE_FIELD_NUMBER: _ClassVar[int]
        LIST_FIELD_NUMBER: _ClassVar[int]
        id: int
        code: int
        message: str
        trailers: _containers.RepeatedCompositeFieldContainer[BatchResponse.Trailer]
        put: _kv_pb2.PutResponse
        get: _kv_pb2.GetResponse
        delete: _kv_pb2.DeleteResponse
        list: _kv_pb2.ListResponse
        def __init__(self, id: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., trailers: _Optional[_Iterable[_Union[BatchResponse.Trailer, _Mapping]]] = ..., put: _Optional[_Union[_kv_pb2.PutResponse, _Mapping]] = ..., get: _Optional[_Union[_kv_pb2.GetResponse, _Mapping]] = ..., delete: _Optional[_Union[_kv_pb2.DeleteResponse, _Mapping]] = ..., list: _Optional[_Union[_kv_pb2.ListResponse, _Mapping]] = ...) -> None: ...
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    answers: _containers.RepeatedCompositeFieldContainer[BatchResponse.Answer]
    def __init__(self, answers: _Optional[_Iterable[_Union[BatchResponse.Answer, _Mapping]]] = ...) -> None: ...
