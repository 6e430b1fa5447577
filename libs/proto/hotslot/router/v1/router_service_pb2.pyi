from hotslot.common.v1 import common_pb2 as _common_pb2
from hotslot.executor.v1 import executor_service_pb2 as _executor_service_pb2
from hotslot.registry.v1 import registry_service_pb2 as _registry_service_pb2
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
PLACEMENT_REASON_UNSPECIFIED: PlacementReason
PLACEMENT_REASON_ACTIVE: PlacementReason
PLACEMENT_REASON_STANDBY: PlacementReason
PLACEMENT_REASON_HOST: PlacementReason
PLACEMENT_REASON_LOAD: PlacementReason
PLACEMENT_REASON_SPREAD: PlacementReason

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
    __slots__ = ("result", "attempted_executor_ids", "placement_reason")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTED_EXECUTOR_IDS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_REASON_FIELD_NUMBER: _ClassVar[int]
    result: _executor_service_pb2.GenerateResponse
    attempted_executor_ids: _containers.RepeatedScalarFieldContainer[str]
    placement_reason: PlacementReason
    def __init__(self, result: _Optional[_Union[_executor_service_pb2.GenerateResponse, _Mapping]] = ..., attempted_executor_ids: _Optional[_Iterable[str]] = ..., placement_reason: _Optional[_Union[PlacementReason, str]] = ...) -> None: ...

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

class GenerateStreamResponse(_message.Message):
    __slots__ = ("load", "step", "result")
    LOAD_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    load: _executor_service_pb2.LoadProgress
    step: _executor_service_pb2.StepProgress
    result: GenerateResponse
    def __init__(self, load: _Optional[_Union[_executor_service_pb2.LoadProgress, _Mapping]] = ..., step: _Optional[_Union[_executor_service_pb2.StepProgress, _Mapping]] = ..., result: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: _registry_service_pb2.ListModelsRequest
    def __init__(self, request: _Optional[_Union[_registry_service_pb2.ListModelsRequest, _Mapping]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("response",)
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    response: _registry_service_pb2.ListModelsResponse
    def __init__(self, response: _Optional[_Union[_registry_service_pb2.ListModelsResponse, _Mapping]] = ...) -> None: ...

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
    model: _registry_service_pb2.Model
    def __init__(self, model: _Optional[_Union[_registry_service_pb2.Model, _Mapping]] = ...) -> None: ...

class PreloadRequest(_message.Message):
    __slots__ = ("model", "replicas")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    replicas: int
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., replicas: _Optional[int] = ...) -> None: ...

class PreloadResponse(_message.Message):
    __slots__ = ("executor_id", "result", "replicas")
    EXECUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    executor_id: str
    result: _executor_service_pb2.PreloadResponse
    replicas: _containers.RepeatedCompositeFieldContainer[PreloadReplica]
    def __init__(self, executor_id: _Optional[str] = ..., result: _Optional[_Union[_executor_service_pb2.PreloadResponse, _Mapping]] = ..., replicas: _Optional[_Iterable[_Union[PreloadReplica, _Mapping]]] = ...) -> None: ...

class PreloadReplica(_message.Message):
    __slots__ = ("executor_id", "result")
    EXECUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    executor_id: str
    result: _executor_service_pb2.PreloadResponse
    def __init__(self, executor_id: _Optional[str] = ..., result: _Optional[_Union[_executor_service_pb2.PreloadResponse, _Mapping]] = ...) -> None: ...

class GetClusterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetClusterStatusResponse(_message.Message):
    __slots__ = ("executors", "router_queue_depth", "unreachable_addresses")
    EXECUTORS_FIELD_NUMBER: _ClassVar[int]
    ROUTER_QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    executors: _containers.RepeatedCompositeFieldContainer[_executor_service_pb2.ExecutorStatus]
    router_queue_depth: int
    unreachable_addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, executors: _Optional[_Iterable[_Union[_executor_service_pb2.ExecutorStatus, _Mapping]]] = ..., router_queue_depth: _Optional[int] = ..., unreachable_addresses: _Optional[_Iterable[str]] = ...) -> None: ...
