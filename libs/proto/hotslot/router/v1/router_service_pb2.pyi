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

class PlacementReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLACEMENT_REASON_UNSPECIFIED: _ClassVar[PlacementReason]
    PLACEMENT_REASON_ACTIVE: _ClassVar[PlacementReason]
    PLACEMENT_REASON_STANDBY: _ClassVar[PlacementReason]
    PLACEMENT_REASON_HOST: _ClassVar[PlacementReason]
    PLACEMENT_REASON_LOAD: _ClassVar[PlacementReason]
    PLACEMENT_REASON_SPREAD: _ClassVar[PlacementReason]

class EvictOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVICT_OUTCOME_UNSPECIFIED: _ClassVar[EvictOutcome]
    EVICT_OUTCOME_EVICTED: _ClassVar[EvictOutcome]
    EVICT_OUTCOME_MARKED: _ClassVar[EvictOutcome]
    EVICT_OUTCOME_NOT_HELD: _ClassVar[EvictOutcome]
    EVICT_OUTCOME_FAILED: _ClassVar[EvictOutcome]
PLACEMENT_REASON_UNSPECIFIED: PlacementReason
PLACEMENT_REASON_ACTIVE: PlacementReason
PLACEMENT_REASON_STANDBY: PlacementReason
PLACEMENT_REASON_HOST: PlacementReason
PLACEMENT_REASON_LOAD: PlacementReason
PLACEMENT_REASON_SPREAD: PlacementReason
EVICT_OUTCOME_UNSPECIFIED: EvictOutcome
EVICT_OUTCOME_EVICTED: EvictOutcome
EVICT_OUTCOME_MARKED: EvictOutcome
EVICT_OUTCOME_NOT_HELD: EvictOutcome
EVICT_OUTCOME_FAILED: EvictOutcome

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
    __slots__ = ("images", "model", "tier", "timings", "executor_id", "request_id", "batch_requests", "adapters", "attempted_executor_ids", "placement_reason")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTED_EXECUTOR_IDS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_REASON_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.Image]
    model: _common_pb2.ModelRef
    tier: _common_pb2.Tier
    timings: _common_pb2.PhaseTimings
    executor_id: str
    request_id: str
    batch_requests: int
    adapters: _containers.RepeatedCompositeFieldContainer[AppliedAdapter]
    attempted_executor_ids: _containers.RepeatedScalarFieldContainer[str]
    placement_reason: PlacementReason
    def __init__(self, images: _Optional[_Iterable[_Union[_common_pb2.Image, _Mapping]]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., timings: _Optional[_Union[_common_pb2.PhaseTimings, _Mapping]] = ..., executor_id: _Optional[str] = ..., request_id: _Optional[str] = ..., batch_requests: _Optional[int] = ..., adapters: _Optional[_Iterable[_Union[AppliedAdapter, _Mapping]]] = ..., attempted_executor_ids: _Optional[_Iterable[str]] = ..., placement_reason: _Optional[_Union[PlacementReason, str]] = ...) -> None: ...

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

class Model(_message.Message):
    __slots__ = ("model_id", "revision", "kind", "base_model_id", "labels", "manifest", "create_time")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    revision: int
    kind: _common_pb2.ModelKind
    base_model_id: str
    labels: _containers.ScalarMap[str, str]
    manifest: _common_pb2.Manifest
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, model_id: _Optional[str] = ..., revision: _Optional[int] = ..., kind: _Optional[_Union[_common_pb2.ModelKind, str]] = ..., base_model_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., manifest: _Optional[_Union[_common_pb2.Manifest, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "kind", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    kind: _common_pb2.ModelKind
    labels: _containers.ScalarMap[str, str]
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., kind: _Optional[_Union[_common_pb2.ModelKind, str]] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "next_page_token")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    next_page_token: str
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model_id", "revision")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    revision: int
    def __init__(self, model_id: _Optional[str] = ..., revision: _Optional[int] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: Model
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class PreloadRequest(_message.Message):
    __slots__ = ("model", "replicas")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    replicas: int
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., replicas: _Optional[int] = ...) -> None: ...

class PreloadResponse(_message.Message):
    __slots__ = ("replicas",)
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    replicas: _containers.RepeatedCompositeFieldContainer[PreloadReplica]
    def __init__(self, replicas: _Optional[_Iterable[_Union[PreloadReplica, _Mapping]]] = ...) -> None: ...

class PreloadReplica(_message.Message):
    __slots__ = ("executor_id", "model", "tier", "from_tier", "timings")
    EXECUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    FROM_TIER_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    executor_id: str
    model: _common_pb2.ModelRef
    tier: _common_pb2.Tier
    from_tier: _common_pb2.Tier
    timings: _common_pb2.PhaseTimings
    def __init__(self, executor_id: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., from_tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., timings: _Optional[_Union[_common_pb2.PhaseTimings, _Mapping]] = ...) -> None: ...

class EvictRequest(_message.Message):
    __slots__ = ("model", "executor_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    executor_id: str
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., executor_id: _Optional[str] = ...) -> None: ...

class EvictResult(_message.Message):
    __slots__ = ("executor_id", "outcome", "freed_bytes", "pending_bytes", "message")
    EXECUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PENDING_BYTES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    executor_id: str
    outcome: EvictOutcome
    freed_bytes: int
    pending_bytes: int
    message: str
    def __init__(self, executor_id: _Optional[str] = ..., outcome: _Optional[_Union[EvictOutcome, str]] = ..., freed_bytes: _Optional[int] = ..., pending_bytes: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class EvictResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EvictResult]
    def __init__(self, results: _Optional[_Iterable[_Union[EvictResult, _Mapping]]] = ...) -> None: ...

class GetClusterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetClusterStatusResponse(_message.Message):
    __slots__ = ("executors", "router_queue_depth", "unreachable_addresses")
    EXECUTORS_FIELD_NUMBER: _ClassVar[int]
    ROUTER_QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    executors: _containers.RepeatedCompositeFieldContainer[ExecutorStatus]
    router_queue_depth: int
    unreachable_addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, executors: _Optional[_Iterable[_Union[ExecutorStatus, _Mapping]]] = ..., router_queue_depth: _Optional[int] = ..., unreachable_addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class ExecutorStatus(_message.Message):
    __slots__ = ("executor_id", "address", "state", "device", "models", "adapters", "tiers", "queue_depth", "queue_capacity", "device_memory_total_bytes", "device_memory_used_bytes", "max_adapters", "preloader")
    EXECUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    QUEUE_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    PRELOADER_FIELD_NUMBER: _ClassVar[int]
    executor_id: str
    address: str
    state: _common_pb2.ExecutorState
    device: str
    models: _containers.RepeatedCompositeFieldContainer[HeldModel]
    adapters: _containers.RepeatedCompositeFieldContainer[HeldAdapter]
    tiers: _containers.RepeatedCompositeFieldContainer[TierUsage]
    queue_depth: int
    queue_capacity: int
    device_memory_total_bytes: int
    device_memory_used_bytes: int
    max_adapters: int
    preloader: PreloaderStatus
    def __init__(self, executor_id: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.ExecutorState, str]] = ..., device: _Optional[str] = ..., models: _Optional[_Iterable[_Union[HeldModel, _Mapping]]] = ..., adapters: _Optional[_Iterable[_Union[HeldAdapter, _Mapping]]] = ..., tiers: _Optional[_Iterable[_Union[TierUsage, _Mapping]]] = ..., queue_depth: _Optional[int] = ..., queue_capacity: _Optional[int] = ..., device_memory_total_bytes: _Optional[int] = ..., device_memory_used_bytes: _Optional[int] = ..., max_adapters: _Optional[int] = ..., preloader: _Optional[_Union[PreloaderStatus, _Mapping]] = ...) -> None: ...

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
