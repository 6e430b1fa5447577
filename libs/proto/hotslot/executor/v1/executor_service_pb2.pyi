import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from hotslot.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class QueuedState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    QUEUED_STATE_UNSPECIFIED: _ClassVar[QueuedState]
    QUEUED_STATE_RUNNING: _ClassVar[QueuedState]
    QUEUED_STATE_READY: _ClassVar[QueuedState]
    QUEUED_STATE_LOADING: _ClassVar[QueuedState]
    QUEUED_STATE_WAITING: _ClassVar[QueuedState]
QUEUED_STATE_UNSPECIFIED: QueuedState
QUEUED_STATE_RUNNING: QueuedState
QUEUED_STATE_READY: QueuedState
QUEUED_STATE_LOADING: QueuedState
QUEUED_STATE_WAITING: QueuedState

class GenerateRequest(_message.Message):
    __slots__ = ("model", "params", "request_id", "adapters")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    params: _common_pb2.GenerationParams
    request_id: str
    adapters: _containers.RepeatedCompositeFieldContainer[_common_pb2.AdapterRef]
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., params: _Optional[_Union[_common_pb2.GenerationParams, _Mapping]] = ..., request_id: _Optional[str] = ..., adapters: _Optional[_Iterable[_Union[_common_pb2.AdapterRef, _Mapping]]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("images", "model", "tier", "timings", "executor_id", "request_id", "batch_requests", "adapters")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.Image]
    model: _common_pb2.ModelRef
    tier: _common_pb2.Tier
    timings: _common_pb2.PhaseTimings
    executor_id: str
    request_id: str
    batch_requests: int
    adapters: _containers.RepeatedCompositeFieldContainer[AppliedAdapter]
    def __init__(self, images: _Optional[_Iterable[_Union[_common_pb2.Image, _Mapping]]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., timings: _Optional[_Union[_common_pb2.PhaseTimings, _Mapping]] = ..., executor_id: _Optional[str] = ..., request_id: _Optional[str] = ..., batch_requests: _Optional[int] = ..., adapters: _Optional[_Iterable[_Union[AppliedAdapter, _Mapping]]] = ...) -> None: ...

class AppliedAdapter(_message.Message):
    __slots__ = ("model", "scale", "tier")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    scale: float
    tier: _common_pb2.Tier
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., scale: _Optional[float] = ..., tier: _Optional[_Union[_common_pb2.Tier, str]] = ...) -> None: ...

class GenerateStreamRequest(_message.Message):
    __slots__ = ("model", "params", "request_id", "adapters")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    params: _common_pb2.GenerationParams
    request_id: str
    adapters: _containers.RepeatedCompositeFieldContainer[_common_pb2.AdapterRef]
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., params: _Optional[_Union[_common_pb2.GenerationParams, _Mapping]] = ..., request_id: _Optional[str] = ..., adapters: _Optional[_Iterable[_Union[_common_pb2.AdapterRef, _Mapping]]] = ...) -> None: ...

class LoadProgress(_message.Message):
    __slots__ = ("phase", "bytes_done", "bytes_total", "queue_position")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    phase: _common_pb2.LoadPhase
    bytes_done: int
    bytes_total: int
    queue_position: int
    def __init__(self, phase: _Optional[_Union[_common_pb2.LoadPhase, str]] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., queue_position: _Optional[int] = ...) -> None: ...

class StepProgress(_message.Message):
    __slots__ = ("step", "total_steps", "elapsed")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    elapsed: _duration_pb2.Duration
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., elapsed: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("load", "step", "result")
    LOAD_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    load: LoadProgress
    step: StepProgress
    result: GenerateResponse
    def __init__(self, load: _Optional[_Union[LoadProgress, _Mapping]] = ..., step: _Optional[_Union[StepProgress, _Mapping]] = ..., result: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...

class PreloadRequest(_message.Message):
    __slots__ = ("model", "target_tier")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TARGET_TIER_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    target_tier: _common_pb2.Tier
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., target_tier: _Optional[_Union[_common_pb2.Tier, str]] = ...) -> None: ...

class PreloadResponse(_message.Message):
    __slots__ = ("model", "tier", "from_tier", "timings")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    FROM_TIER_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    tier: _common_pb2.Tier
    from_tier: _common_pb2.Tier
    timings: _common_pb2.PhaseTimings
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., from_tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., timings: _Optional[_Union[_common_pb2.PhaseTimings, _Mapping]] = ...) -> None: ...

class EvictRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ...) -> None: ...

class EvictResponse(_message.Message):
    __slots__ = ("freed_bytes", "pending_bytes")
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PENDING_BYTES_FIELD_NUMBER: _ClassVar[int]
    freed_bytes: int
    pending_bytes: int
    def __init__(self, freed_bytes: _Optional[int] = ..., pending_bytes: _Optional[int] = ...) -> None: ...

class HeldModel(_message.Message):
    __slots__ = ("model", "tier", "size_bytes", "ref_count", "evicting", "unique_bytes", "shared_bytes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REF_COUNT_FIELD_NUMBER: _ClassVar[int]
    EVICTING_FIELD_NUMBER: _ClassVar[int]
    UNIQUE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARED_BYTES_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    tier: _common_pb2.Tier
    size_bytes: int
    ref_count: int
    evicting: bool
    unique_bytes: int
    shared_bytes: int
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., size_bytes: _Optional[int] = ..., ref_count: _Optional[int] = ..., evicting: _Optional[bool] = ..., unique_bytes: _Optional[int] = ..., shared_bytes: _Optional[int] = ...) -> None: ...

class HeldAdapter(_message.Message):
    __slots__ = ("model", "base", "tier", "size_bytes", "ref_count")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REF_COUNT_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    base: _common_pb2.ModelRef
    tier: _common_pb2.Tier
    size_bytes: int
    ref_count: int
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., base: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., size_bytes: _Optional[int] = ..., ref_count: _Optional[int] = ...) -> None: ...

class TierUsage(_message.Message):
    __slots__ = ("tier", "used_bytes", "budget_bytes")
    TIER_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    tier: _common_pb2.Tier
    used_bytes: int
    budget_bytes: int
    def __init__(self, tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., used_bytes: _Optional[int] = ..., budget_bytes: _Optional[int] = ...) -> None: ...

class PreloaderStatus(_message.Message):
    __slots__ = ("pid", "alive", "restarts", "loading")
    PID_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    LOADING_FIELD_NUMBER: _ClassVar[int]
    pid: int
    alive: bool
    restarts: int
    loading: _common_pb2.ModelRef
    def __init__(self, pid: _Optional[int] = ..., alive: _Optional[bool] = ..., restarts: _Optional[int] = ..., loading: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ...) -> None: ...

class ExecutorStatus(_message.Message):
    __slots__ = ("executor_id", "address", "state", "device", "models", "tiers", "queue_depth", "queue_capacity", "device_memory_total_bytes", "device_memory_used_bytes", "preloader", "version", "queue", "costs", "adapters", "max_adapters")
    EXECUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    QUEUE_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PRELOADER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    COSTS_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    MAX_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    executor_id: str
    address: str
    state: _common_pb2.ExecutorState
    device: str
    models: _containers.RepeatedCompositeFieldContainer[HeldModel]
    tiers: _containers.RepeatedCompositeFieldContainer[TierUsage]
    queue_depth: int
    queue_capacity: int
    device_memory_total_bytes: int
    device_memory_used_bytes: int
    preloader: PreloaderStatus
    version: int
    queue: _containers.RepeatedCompositeFieldContainer[QueuedRequest]
    costs: CostEstimates
    adapters: _containers.RepeatedCompositeFieldContainer[HeldAdapter]
    max_adapters: int
    def __init__(self, executor_id: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.ExecutorState, str]] = ..., device: _Optional[str] = ..., models: _Optional[_Iterable[_Union[HeldModel, _Mapping]]] = ..., tiers: _Optional[_Iterable[_Union[TierUsage, _Mapping]]] = ..., queue_depth: _Optional[int] = ..., queue_capacity: _Optional[int] = ..., device_memory_total_bytes: _Optional[int] = ..., device_memory_used_bytes: _Optional[int] = ..., preloader: _Optional[_Union[PreloaderStatus, _Mapping]] = ..., version: _Optional[int] = ..., queue: _Optional[_Iterable[_Union[QueuedRequest, _Mapping]]] = ..., costs: _Optional[_Union[CostEstimates, _Mapping]] = ..., adapters: _Optional[_Iterable[_Union[HeldAdapter, _Mapping]]] = ..., max_adapters: _Optional[int] = ...) -> None: ...

class QueuedRequest(_message.Message):
    __slots__ = ("request_id", "model", "state", "waited", "overtaken", "num_images", "adapters")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    WAITED_FIELD_NUMBER: _ClassVar[int]
    OVERTAKEN_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: _common_pb2.ModelRef
    state: QueuedState
    waited: _duration_pb2.Duration
    overtaken: _duration_pb2.Duration
    num_images: int
    adapters: _containers.RepeatedCompositeFieldContainer[_common_pb2.AdapterRef]
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., state: _Optional[_Union[QueuedState, str]] = ..., waited: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., overtaken: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., num_images: _Optional[int] = ..., adapters: _Optional[_Iterable[_Union[_common_pb2.AdapterRef, _Mapping]]] = ...) -> None: ...

class TierCost(_message.Message):
    __slots__ = ("tier", "fixed_seconds", "seconds_per_gib", "samples")
    TIER_FIELD_NUMBER: _ClassVar[int]
    FIXED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_PER_GIB_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    tier: _common_pb2.Tier
    fixed_seconds: float
    seconds_per_gib: float
    samples: int
    def __init__(self, tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., fixed_seconds: _Optional[float] = ..., seconds_per_gib: _Optional[float] = ..., samples: _Optional[int] = ...) -> None: ...

class CostEstimates(_message.Message):
    __slots__ = ("seconds_per_work_unit", "seconds_per_request", "backlog_seconds", "load_costs", "default_steps", "default_width", "default_height")
    SECONDS_PER_WORK_UNIT_FIELD_NUMBER: _ClassVar[int]
    SECONDS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    BACKLOG_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOAD_COSTS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    seconds_per_work_unit: float
    seconds_per_request: float
    backlog_seconds: float
    load_costs: _containers.RepeatedCompositeFieldContainer[TierCost]
    default_steps: int
    default_width: int
    default_height: int
    def __init__(self, seconds_per_work_unit: _Optional[float] = ..., seconds_per_request: _Optional[float] = ..., backlog_seconds: _Optional[float] = ..., load_costs: _Optional[_Iterable[_Union[TierCost, _Mapping]]] = ..., default_steps: _Optional[int] = ..., default_width: _Optional[int] = ..., default_height: _Optional[int] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: ExecutorStatus
    def __init__(self, status: _Optional[_Union[ExecutorStatus, _Mapping]] = ...) -> None: ...

class WatchStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchStatusResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: ExecutorStatus
    def __init__(self, status: _Optional[_Union[ExecutorStatus, _Mapping]] = ...) -> None: ...
