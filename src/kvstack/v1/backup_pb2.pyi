from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class BackupRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BackupChunk(_message.Message):
    __slots__ = ("data", "estimated_bytes", "manifest")
    DATA_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    estimated_bytes: int
    manifest: str
    def __init__(self, data: _Optional[bytes] = ..., estimated_bytes: _Optional[int] = ..., manifest: _Optional[str] = ...) -> None: ...

class RestoreChunk(_message.Message):
    __slots__ = ("manifest", "force", "data")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    manifest: str
    force: bool
    data: bytes
    def __init__(self, manifest: _Optional[str] = ..., force: _Optional[bool] = ..., data: _Optional[bytes] = ...) -> None: ...

class RestoreResponse(_message.Message):
    __slots__ = ("keys", "replaced", "lost", "seq")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    keys: int
    replaced: int
    lost: int
    seq: int
    def __init__(self, keys: _Optional[int] = ..., replaced: _Optional[int] = ..., lost: _Optional[int] = ..., seq: _Optional[int] = ...) -> None: ...
