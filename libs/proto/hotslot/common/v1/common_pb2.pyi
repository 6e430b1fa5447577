import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_KIND_UNSPECIFIED: _ClassVar[ModelKind]
    MODEL_KIND_DIFFUSERS_PIPELINE: _ClassVar[ModelKind]
    MODEL_KIND_LORA_ADAPTER: _ClassVar[ModelKind]

class LoadPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOAD_PHASE_UNSPECIFIED: _ClassVar[LoadPhase]
    LOAD_PHASE_QUEUED: _ClassVar[LoadPhase]
    LOAD_PHASE_ENSURE: _ClassVar[LoadPhase]
    LOAD_PHASE_READ: _ClassVar[LoadPhase]
    LOAD_PHASE_MATERIALIZE: _ClassVar[LoadPhase]
    LOAD_PHASE_SWAP: _ClassVar[LoadPhase]

class ExecutorState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXECUTOR_STATE_UNSPECIFIED: _ClassVar[ExecutorState]
    EXECUTOR_STATE_STARTING: _ClassVar[ExecutorState]
    EXECUTOR_STATE_READY: _ClassVar[ExecutorState]
    EXECUTOR_STATE_DRAINING: _ClassVar[ExecutorState]

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_ACTIVE: _ClassVar[Tier]
    TIER_STANDBY: _ClassVar[Tier]
    TIER_HOST: _ClassVar[Tier]
    TIER_LOCAL_DISK: _ClassVar[Tier]
    TIER_BACKING_STORE: _ClassVar[Tier]

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    ERROR_REASON_INVALID_PARAMETER: _ClassVar[ErrorReason]
    ERROR_REASON_UNSAFE_FILE_FORMAT: _ClassVar[ErrorReason]
    ERROR_REASON_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_MODEL_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_MODEL_NOT_HELD: _ClassVar[ErrorReason]
    ERROR_REASON_EXECUTOR_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_ALREADY_EXISTS: _ClassVar[ErrorReason]
    ERROR_REASON_FAILED_PRECONDITION: _ClassVar[ErrorReason]
    ERROR_REASON_ADAPTER_MISMATCH: _ClassVar[ErrorReason]
    ERROR_REASON_RESOURCE_EXHAUSTED: _ClassVar[ErrorReason]
    ERROR_REASON_QUEUE_FULL: _ClassVar[ErrorReason]
    ERROR_REASON_MODEL_TOO_LARGE: _ClassVar[ErrorReason]
    ERROR_REASON_UNAVAILABLE: _ClassVar[ErrorReason]
    ERROR_REASON_NO_EXECUTOR_READY: _ClassVar[ErrorReason]
    ERROR_REASON_CHECKSUM_MISMATCH: _ClassVar[ErrorReason]
    ERROR_REASON_CANCELLED: _ClassVar[ErrorReason]
    ERROR_REASON_DEADLINE_EXCEEDED: _ClassVar[ErrorReason]
    ERROR_REASON_UNKNOWN: _ClassVar[ErrorReason]
    ERROR_REASON_INTERNAL: _ClassVar[ErrorReason]
    ERROR_REASON_UNIMPLEMENTED: _ClassVar[ErrorReason]
MODEL_KIND_UNSPECIFIED: ModelKind
MODEL_KIND_DIFFUSERS_PIPELINE: ModelKind
MODEL_KIND_LORA_ADAPTER: ModelKind
LOAD_PHASE_UNSPECIFIED: LoadPhase
LOAD_PHASE_QUEUED: LoadPhase
LOAD_PHASE_ENSURE: LoadPhase
LOAD_PHASE_READ: LoadPhase
LOAD_PHASE_MATERIALIZE: LoadPhase
LOAD_PHASE_SWAP: LoadPhase
EXECUTOR_STATE_UNSPECIFIED: ExecutorState
EXECUTOR_STATE_STARTING: ExecutorState
EXECUTOR_STATE_READY: ExecutorState
EXECUTOR_STATE_DRAINING: ExecutorState
TIER_UNSPECIFIED: Tier
TIER_ACTIVE: Tier
TIER_STANDBY: Tier
TIER_HOST: Tier
TIER_LOCAL_DISK: Tier
TIER_BACKING_STORE: Tier
ERROR_REASON_UNSPECIFIED: ErrorReason
ERROR_REASON_INVALID_PARAMETER: ErrorReason
ERROR_REASON_UNSAFE_FILE_FORMAT: ErrorReason
ERROR_REASON_NOT_FOUND: ErrorReason
ERROR_REASON_MODEL_NOT_FOUND: ErrorReason
ERROR_REASON_MODEL_NOT_HELD: ErrorReason
ERROR_REASON_EXECUTOR_NOT_FOUND: ErrorReason
ERROR_REASON_ALREADY_EXISTS: ErrorReason
ERROR_REASON_FAILED_PRECONDITION: ErrorReason
ERROR_REASON_ADAPTER_MISMATCH: ErrorReason
ERROR_REASON_RESOURCE_EXHAUSTED: ErrorReason
ERROR_REASON_QUEUE_FULL: ErrorReason
ERROR_REASON_MODEL_TOO_LARGE: ErrorReason
ERROR_REASON_UNAVAILABLE: ErrorReason
ERROR_REASON_NO_EXECUTOR_READY: ErrorReason
ERROR_REASON_CHECKSUM_MISMATCH: ErrorReason
ERROR_REASON_CANCELLED: ErrorReason
ERROR_REASON_DEADLINE_EXCEEDED: ErrorReason
ERROR_REASON_UNKNOWN: ErrorReason
ERROR_REASON_INTERNAL: ErrorReason
ERROR_REASON_UNIMPLEMENTED: ErrorReason

class ModelRef(_message.Message):
    __slots__ = ("model_id", "revision")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    revision: int
    def __init__(self, model_id: _Optional[str] = ..., revision: _Optional[int] = ...) -> None: ...

class AdapterRef(_message.Message):
    __slots__ = ("model", "scale")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    scale: float
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., scale: _Optional[float] = ...) -> None: ...

class FileEntry(_message.Message):
    __slots__ = ("path", "size_bytes", "sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    size_bytes: int
    sha256: str
    def __init__(self, path: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class Component(_message.Message):
    __slots__ = ("name", "library", "class_name")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LIBRARY_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    library: str
    class_name: str
    def __init__(self, name: _Optional[str] = ..., library: _Optional[str] = ..., class_name: _Optional[str] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("files", "pipeline_class", "components", "total_bytes", "digest")
    FILES_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_CLASS_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedCompositeFieldContainer[FileEntry]
    pipeline_class: str
    components: _containers.RepeatedCompositeFieldContainer[Component]
    total_bytes: int
    digest: str
    def __init__(self, files: _Optional[_Iterable[_Union[FileEntry, _Mapping]]] = ..., pipeline_class: _Optional[str] = ..., components: _Optional[_Iterable[_Union[Component, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., digest: _Optional[str] = ...) -> None: ...

class GenerationParams(_message.Message):
    __slots__ = ("prompt", "negative_prompt", "steps", "guidance_scale", "width", "height", "seed", "num_images")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    width: int
    height: int
    seed: int
    num_images: int
    def __init__(self, prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., seed: _Optional[int] = ..., num_images: _Optional[int] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("data", "mime_type", "width", "height", "seed")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    mime_type: str
    width: int
    height: int
    seed: int
    def __init__(self, data: _Optional[bytes] = ..., mime_type: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class PhaseTimings(_message.Message):
    __slots__ = ("queue", "ensure", "read", "materialize", "swap", "denoise", "encode", "total")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    ENSURE_FIELD_NUMBER: _ClassVar[int]
    READ_FIELD_NUMBER: _ClassVar[int]
    MATERIALIZE_FIELD_NUMBER: _ClassVar[int]
    SWAP_FIELD_NUMBER: _ClassVar[int]
    DENOISE_FIELD_NUMBER: _ClassVar[int]
    ENCODE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    queue: _duration_pb2.Duration
    ensure: _duration_pb2.Duration
    read: _duration_pb2.Duration
    materialize: _duration_pb2.Duration
    swap: _duration_pb2.Duration
    denoise: _duration_pb2.Duration
    encode: _duration_pb2.Duration
    total: _duration_pb2.Duration
    def __init__(self, queue: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., ensure: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., read: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., materialize: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., swap: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., denoise: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., encode: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., total: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...
