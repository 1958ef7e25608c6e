from sax.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoadRequest(_message.Message):
    __slots__ = ("model_key", "model_path", "checkpoint_path", "acls", "overrides", "fencing_token")
    class OverridesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_KEY_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_PATH_FIELD_NUMBER: _ClassVar[int]
    ACLS_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model_key: str
    model_path: str
    checkpoint_path: str
    acls: _common_pb2.AccessControlLists
    overrides: _containers.ScalarMap[str, str]
    fencing_token: int
    def __init__(self, model_key: _Optional[str] = ..., model_path: _Optional[str] = ..., checkpoint_path: _Optional[str] = ..., acls: _Optional[_Union[_common_pb2.AccessControlLists, _Mapping]] = ..., overrides: _Optional[_Mapping[str, str]] = ..., fencing_token: _Optional[int] = ...) -> None: ...

class LoadResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UnloadRequest(_message.Message):
    __slots__ = ("model_key", "fencing_token")
    MODEL_KEY_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model_key: str
    fencing_token: int
    def __init__(self, model_key: _Optional[str] = ..., fencing_token: _Optional[int] = ...) -> None: ...

class UnloadResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ("include_failure_reasons", "fencing_token")
    INCLUDE_FAILURE_REASONS_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    include_failure_reasons: bool
    fencing_token: int
    def __init__(self, include_failure_reasons: _Optional[bool] = ..., fencing_token: _Optional[int] = ...) -> None: ...

class ModelWithStatus(_message.Message):
    __slots__ = ("model_key", "model_status", "failure_reason", "model_path", "checkpoint_path", "method_names", "overrides")
    class OverridesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_KEY_FIELD_NUMBER: _ClassVar[int]
    MODEL_STATUS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_PATH_FIELD_NUMBER: _ClassVar[int]
    METHOD_NAMES_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    model_key: str
    model_status: _common_pb2.ModelStatus
    failure_reason: str
    model_path: str
    checkpoint_path: str
    method_names: _containers.RepeatedScalarFieldContainer[str]
    overrides: _containers.ScalarMap[str, str]
    def __init__(self, model_key: _Optional[str] = ..., model_status: _Optional[_Union[_common_pb2.ModelStatus, str]] = ..., failure_reason: _Optional[str] = ..., model_path: _Optional[str] = ..., checkpoint_path: _Optional[str] = ..., method_names: _Optional[_Iterable[str]] = ..., overrides: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("models", "server_id", "total_loads", "total_unloads", "health_reason")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_LOADS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_UNLOADS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_REASON_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelWithStatus]
    server_id: str
    total_loads: int
    total_unloads: int
    health_reason: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelWithStatus, _Mapping]]] = ..., server_id: _Optional[str] = ..., total_loads: _Optional[int] = ..., total_unloads: _Optional[int] = ..., health_reason: _Optional[str] = ...) -> None: ...
