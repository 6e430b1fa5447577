import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from hotslot.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_EVENT_TYPE_UNSPECIFIED: _ClassVar[ModelEventType]
    MODEL_EVENT_TYPE_EXISTING: _ClassVar[ModelEventType]
    MODEL_EVENT_TYPE_SYNCED: _ClassVar[ModelEventType]
    MODEL_EVENT_TYPE_REGISTERED: _ClassVar[ModelEventType]
    MODEL_EVENT_TYPE_DELETED: _ClassVar[ModelEventType]
MODEL_EVENT_TYPE_UNSPECIFIED: ModelEventType
MODEL_EVENT_TYPE_EXISTING: ModelEventType
MODEL_EVENT_TYPE_SYNCED: ModelEventType
MODEL_EVENT_TYPE_REGISTERED: ModelEventType
MODEL_EVENT_TYPE_DELETED: ModelEventType

class Model(_message.Message):
    __slots__ = ("model_id", "revision", "kind", "base_model_id", "labels", "source", "manifest", "create_time")
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
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    revision: int
    kind: _common_pb2.ModelKind
    base_model_id: str
    labels: _containers.ScalarMap[str, str]
    source: str
    manifest: _common_pb2.Manifest
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, model_id: _Optional[str] = ..., revision: _Optional[int] = ..., kind: _Optional[_Union[_common_pb2.ModelKind, str]] = ..., base_model_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., source: _Optional[str] = ..., manifest: _Optional[_Union[_common_pb2.Manifest, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RegisterModelRequest(_message.Message):
    __slots__ = ("model_id", "kind", "base_model_id", "source", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    kind: _common_pb2.ModelKind
    base_model_id: str
    source: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, model_id: _Optional[str] = ..., kind: _Optional[_Union[_common_pb2.ModelKind, str]] = ..., base_model_id: _Optional[str] = ..., source: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RegisterModelResponse(_message.Message):
    __slots__ = ("model", "created")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    model: Model
    created: bool
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

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

class DeleteModelRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class DeleteModelResponse(_message.Message):
    __slots__ = ("deleted_revisions",)
    DELETED_REVISIONS_FIELD_NUMBER: _ClassVar[int]
    deleted_revisions: int
    def __init__(self, deleted_revisions: _Optional[int] = ...) -> None: ...

class WatchModelsRequest(_message.Message):
    __slots__ = ("kind",)
    KIND_FIELD_NUMBER: _ClassVar[int]
    kind: _common_pb2.ModelKind
    def __init__(self, kind: _Optional[_Union[_common_pb2.ModelKind, str]] = ...) -> None: ...

class WatchModelsResponse(_message.Message):
    __slots__ = ("type", "model")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    type: ModelEventType
    model: Model
    def __init__(self, type: _Optional[_Union[ModelEventType, str]] = ..., model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...
