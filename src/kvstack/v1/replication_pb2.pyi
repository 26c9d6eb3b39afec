from kvstack.v1 import kv_pb2 as _kv_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BackendRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKEND_ROLE_UNSPECIFIED: _ClassVar[BackendRole]
    BACKEND_ROLE_PRIMARY: _ClassVar[BackendRole]
    BACKEND_ROLE_REPLICA: _ClassVar[BackendRole]
BACKEND_ROLE_UNSPECIFIED: BackendRole
BACKEND_ROLE_PRIMARY: BackendRole
BACKEND_ROLE_REPLICA: BackendRole

class RoleRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RoleResponse(_message.Message):
    __slots__ = ("role", "seq", "readable", "ordinal", "following")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    READABLE_FIELD_NUMBER: _ClassVar[int]
    ORDINAL_FIELD_NUMBER: _ClassVar[int]
    FOLLOWING_FIELD_NUMBER: _ClassVar[int]
    role: BackendRole
    seq: int
    readable: bool
    ordinal: int
    following: bool
    def __init__(self, role: _Optional[_Union[BackendRole, str]] = ..., seq: _Optional[int] = ..., readable: _Optional[bool] = ..., ordinal: _Optional[int] = ..., following: _Optional[bool] = ...) -> None: ...

class Change(_message.Message):
    __slots__ = ("seq", "key", "value", "delete", "committed_at")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    DELETE_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    seq: int
    key: bytes
    value: bytes
    delete: bool
    committed_at: float
    def __init__(self, seq: _Optional[int] = ..., key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., delete: _Optional[bool] = ..., committed_at: _Optional[float] = ...) -> None: ...

class ChangeBatch(_message.Message):
    __slots__ = ("changes", "primary_seq", "snapshot_required", "primary_stopped")
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_SEQ_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_STOPPED_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.RepeatedCompositeFieldContainer[Change]
    primary_seq: int
    snapshot_required: bool
    primary_stopped: bool
    def __init__(self, changes: _Optional[_Iterable[_Union[Change, _Mapping]]] = ..., primary_seq: _Optional[int] = ..., snapshot_required: _Optional[bool] = ..., primary_stopped: _Optional[bool] = ...) -> None: ...

class ReplicaAck(_message.Message):
    __slots__ = ("applied_seq", "replica", "history")
    APPLIED_SEQ_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    applied_seq: int
    replica: str
    history: bytes
    def __init__(self, applied_seq: _Optional[int] = ..., replica: _Optional[str] = ..., history: _Optional[bytes] = ...) -> None: ...

class SnapshotRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SnapshotChunk(_message.Message):
    __slots__ = ("entries", "seq", "history")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[_kv_pb2.Entry]
    seq: int
    history: bytes
    def __init__(self, entries: _Optional[_Iterable[_Union[_kv_pb2.Entry, _Mapping]]] = ..., seq: _Optional[int] = ..., history: _Optional[bytes] = ...) -> None: ...
