import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from hotslot.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FileSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FILE_SOURCE_UNSPECIFIED: _ClassVar[FileSource]
    FILE_SOURCE_LOCAL_HIT: _ClassVar[FileSource]
    FILE_SOURCE_FETCHED: _ClassVar[FileSource]
    FILE_SOURCE_JOINED: _ClassVar[FileSource]
FILE_SOURCE_UNSPECIFIED: FileSource
FILE_SOURCE_LOCAL_HIT: FileSource
FILE_SOURCE_FETCHED: FileSource
FILE_SOURCE_JOINED: FileSource

class ManifestTarget(_message.Message):
    __slots__ = ("name", "source", "manifest")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    name: str
    source: str
    manifest: _common_pb2.Manifest
    def __init__(self, name: _Optional[str] = ..., source: _Optional[str] = ..., manifest: _Optional[_Union[_common_pb2.Manifest, _Mapping]] = ...) -> None: ...

class EnsureModelRequest(_message.Message):
    __slots__ = ("model", "manifest", "pin_ttl")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    PIN_TTL_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    manifest: ManifestTarget
    pin_ttl: _duration_pb2.Duration
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., manifest: _Optional[_Union[ManifestTarget, _Mapping]] = ..., pin_ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class EnsuredFile(_message.Message):
    __slots__ = ("path", "sha256", "size_bytes", "source")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    path: str
    sha256: str
    size_bytes: int
    source: FileSource
    def __init__(self, path: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., source: _Optional[_Union[FileSource, str]] = ...) -> None: ...

class EnsureModelResponse(_message.Message):
    __slots__ = ("view_path", "view_id", "model", "files", "bytes_fetched", "elapsed", "lease_id", "lease_expire_time")
    VIEW_PATH_FIELD_NUMBER: _ClassVar[int]
    VIEW_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FETCHED_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    view_path: str
    view_id: str
    model: _common_pb2.ModelRef
    files: _containers.RepeatedCompositeFieldContainer[EnsuredFile]
    bytes_fetched: int
    elapsed: _duration_pb2.Duration
    lease_id: str
    lease_expire_time: _timestamp_pb2.Timestamp
    def __init__(self, view_path: _Optional[str] = ..., view_id: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., files: _Optional[_Iterable[_Union[EnsuredFile, _Mapping]]] = ..., bytes_fetched: _Optional[int] = ..., elapsed: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., lease_id: _Optional[str] = ..., lease_expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class EnsureModelStreamRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: EnsureModelRequest
    def __init__(self, request: _Optional[_Union[EnsureModelRequest, _Mapping]] = ...) -> None: ...

class EnsureProgress(_message.Message):
    __slots__ = ("bytes_done", "bytes_total", "files_done", "files_total", "path", "file_bytes_done", "file_bytes_total")
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FILES_DONE_FIELD_NUMBER: _ClassVar[int]
    FILES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    FILE_BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    FILE_BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int
    path: str
    file_bytes_done: int
    file_bytes_total: int
    def __init__(self, bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., files_done: _Optional[int] = ..., files_total: _Optional[int] = ..., path: _Optional[str] = ..., file_bytes_done: _Optional[int] = ..., file_bytes_total: _Optional[int] = ...) -> None: ...

class EnsureModelStreamResponse(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: EnsureProgress
    result: EnsureModelResponse
    def __init__(self, progress: _Optional[_Union[EnsureProgress, _Mapping]] = ..., result: _Optional[_Union[EnsureModelResponse, _Mapping]] = ...) -> None: ...

class PutFileHeader(_message.Message):
    __slots__ = ("path", "expected_sha256", "size_bytes", "overwrite")
    PATH_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    path: str
    expected_sha256: str
    size_bytes: int
    overwrite: bool
    def __init__(self, path: _Optional[str] = ..., expected_sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., overwrite: _Optional[bool] = ...) -> None: ...

class PutFileRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PutFileHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[PutFileHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class PutFileResponse(_message.Message):
    __slots__ = ("path", "sha256", "size_bytes")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    path: str
    sha256: str
    size_bytes: int
    def __init__(self, path: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("view_id", "ttl")
    VIEW_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    view_id: str
    ttl: _duration_pb2.Duration
    def __init__(self, view_id: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class PinResponse(_message.Message):
    __slots__ = ("lease_id", "expire_time")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    expire_time: _timestamp_pb2.Timestamp
    def __init__(self, lease_id: _Optional[str] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RenewLeaseRequest(_message.Message):
    __slots__ = ("lease_id", "ttl")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    ttl: _duration_pb2.Duration
    def __init__(self, lease_id: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class RenewLeaseResponse(_message.Message):
    __slots__ = ("expire_time",)
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    expire_time: _timestamp_pb2.Timestamp
    def __init__(self, expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class UnpinRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class UnpinResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("blobs_checked", "bytes_checked", "dropped_digests")
    BLOBS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    BYTES_CHECKED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    blobs_checked: int
    bytes_checked: int
    dropped_digests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, blobs_checked: _Optional[int] = ..., bytes_checked: _Optional[int] = ..., dropped_digests: _Optional[_Iterable[str]] = ...) -> None: ...

class ReportCorruptRequest(_message.Message):
    __slots__ = ("sha256", "path")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    path: str
    def __init__(self, sha256: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class ReportCorruptResponse(_message.Message):
    __slots__ = ("dropped",)
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    dropped: bool
    def __init__(self, dropped: _Optional[bool] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("capacity_bytes", "used_bytes", "pinned_bytes", "blob_count", "hits", "misses", "bytes_fetched", "evictions", "leases")
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PINNED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOB_COUNT_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FETCHED_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    capacity_bytes: int
    used_bytes: int
    pinned_bytes: int
    blob_count: int
    hits: int
    misses: int
    bytes_fetched: int
    evictions: int
    leases: int
    def __init__(self, capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., pinned_bytes: _Optional[int] = ..., blob_count: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., bytes_fetched: _Optional[int] = ..., evictions: _Optional[int] = ..., leases: _Optional[int] = ...) -> None: ...
