from sax.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Model(_message.Message):
    __slots__ = ("model_id", "model_path", "checkpoint_path", "requested_num_replicas", "acls", "admin_acl", "overrides", "uuid", "method_names", "version")
    class OverridesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_PATH_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_NUM_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    ACLS_FIELD_NUMBER: _ClassVar[int]
    ADMIN_ACL_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    METHOD_NAMES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    model_path: str
    checkpoint_path: str
    requested_num_replicas: int
    acls: _common_pb2.AccessControlLists
    admin_acl: str
    overrides: _containers.ScalarMap[str, str]
    uuid: bytes
    method_names: _containers.RepeatedScalarFieldContainer[str]
    version: int
    def __init__(self, model_id: _Optional[str] = ..., model_path: _Optional[str] = ..., checkpoint_path: _Optional[str] = ..., requested_num_replicas: _Optional[int] = ..., acls: _Optional[_Union[_common_pb2.AccessControlLists, _Mapping]] = ..., admin_acl: _Optional[str] = ..., overrides: _Optional[_Mapping[str, str]] = ..., uuid: _Optional[bytes] = ..., method_names: _Optional[_Iterable[str]] = ..., version: _Optional[int] = ...) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("address", "status", "failure_reason")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    address: str
    status: _common_pb2.ModelStatus
    failure_reason: str
    def __init__(self, address: _Optional[str] = ..., status: _Optional[_Union[_common_pb2.ModelStatus, str]] = ..., failure_reason: _Optional[str] = ...) -> None: ...

class PublishedModel(_message.Message):
    __slots__ = ("model", "modelet_addresses", "replicas")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODELET_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    model: Model
    modelet_addresses: _containers.RepeatedScalarFieldContainer[str]
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ..., modelet_addresses: _Optional[_Iterable[str]] = ..., replicas: _Optional[_Iterable[_Union[ReplicaStatus, _Mapping]]] = ...) -> None: ...

class State(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...

class Location(_message.Message):
    __slots__ = ("location", "admin_id", "updated_ms")
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    ADMIN_ID_FIELD_NUMBER: _ClassVar[int]
    UPDATED_MS_FIELD_NUMBER: _ClassVar[int]
    location: str
    admin_id: str
    updated_ms: int
    def __init__(self, location: _Optional[str] = ..., admin_id: _Optional[str] = ..., updated_ms: _Optional[int] = ...) -> None: ...

class Config(_message.Message):
    __slots__ = ("fs_root", "admin_acl")
    FS_ROOT_FIELD_NUMBER: _ClassVar[int]
    ADMIN_ACL_FIELD_NUMBER: _ClassVar[int]
    fs_root: str
    admin_acl: str
    def __init__(self, fs_root: _Optional[str] = ..., admin_acl: _Optional[str] = ...) -> None: ...

class ServableConfig(_message.Message):
    __slots__ = ("model_path",)
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    model_path: str
    def __init__(self, model_path: _Optional[str] = ...) -> None: ...

class ModelServer(_message.Message):
    __slots__ = ("chip_type", "chip_topology", "servable_model_paths", "tags", "memory_bytes")
    CHIP_TYPE_FIELD_NUMBER: _ClassVar[int]
    CHIP_TOPOLOGY_FIELD_NUMBER: _ClassVar[int]
    SERVABLE_MODEL_PATHS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    chip_type: str
    chip_topology: str
    servable_model_paths: _containers.RepeatedScalarFieldContainer[str]
    tags: _containers.RepeatedScalarFieldContainer[str]
    memory_bytes: int
    def __init__(self, chip_type: _Optional[str] = ..., chip_topology: _Optional[str] = ..., servable_model_paths: _Optional[_Iterable[str]] = ..., tags: _Optional[_Iterable[str]] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class JoinedModelServer(_message.Message):
    __slots__ = ("model_server", "address", "last_seen_ms", "loaded_models", "failure_reasons", "server_id", "memory_used_bytes")
    class LoadedModelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.ModelStatus
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.ModelStatus, str]] = ...) -> None: ...
    class FailureReasonsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_SERVER_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_MS_FIELD_NUMBER: _ClassVar[int]
    LOADED_MODELS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASONS_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    model_server: ModelServer
    address: str
    last_seen_ms: int
    loaded_models: _containers.ScalarMap[str, _common_pb2.ModelStatus]
    failure_reasons: _containers.ScalarMap[str, str]
    server_id: str
    memory_used_bytes: int
    def __init__(self, model_server: _Optional[_Union[ModelServer, _Mapping]] = ..., address: _Optional[str] = ..., last_seen_ms: _Optional[int] = ..., loaded_models: _Optional[_Mapping[str, _common_pb2.ModelStatus]] = ..., failure_reasons: _Optional[_Mapping[str, str]] = ..., server_id: _Optional[str] = ..., memory_used_bytes: _Optional[int] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: Model
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class PublishResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UpdateRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: Model
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class UpdateResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UnpublishRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class UnpublishResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("published_models",)
    PUBLISHED_MODELS_FIELD_NUMBER: _ClassVar[int]
    published_models: _containers.RepeatedCompositeFieldContainer[PublishedModel]
    def __init__(self, published_models: _Optional[_Iterable[_Union[PublishedModel, _Mapping]]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class ModelServerTypeStat(_message.Message):
    __slots__ = ("chip_type", "chip_topology", "num_replicas")
    CHIP_TYPE_FIELD_NUMBER: _ClassVar[int]
    CHIP_TOPOLOGY_FIELD_NUMBER: _ClassVar[int]
    NUM_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    chip_type: str
    chip_topology: str
    num_replicas: int
    def __init__(self, chip_type: _Optional[str] = ..., chip_topology: _Optional[str] = ..., num_replicas: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("model_server_type_stats", "num_servers_by_servable_model_path", "servers", "admin_id")
    class NumServersByServableModelPathEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_SERVER_TYPE_STATS_FIELD_NUMBER: _ClassVar[int]
    NUM_SERVERS_BY_SERVABLE_MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    ADMIN_ID_FIELD_NUMBER: _ClassVar[int]
    model_server_type_stats: _containers.RepeatedCompositeFieldContainer[ModelServerTypeStat]
    num_servers_by_servable_model_path: _containers.ScalarMap[str, int]
    servers: _containers.RepeatedCompositeFieldContainer[JoinedModelServer]
    admin_id: str
    def __init__(self, model_server_type_stats: _Optional[_Iterable[_Union[ModelServerTypeStat, _Mapping]]] = ..., num_servers_by_servable_model_path: _Optional[_Mapping[str, int]] = ..., servers: _Optional[_Iterable[_Union[JoinedModelServer, _Mapping]]] = ..., admin_id: _Optional[str] = ...) -> None: ...

class WatchLocRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class WatchLocResponse(_message.Message):
    __slots__ = ("admin_id", "addresses")
    ADMIN_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    admin_id: str
    addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, admin_id: _Optional[str] = ..., addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class WaitForReadyRequest(_message.Message):
    __slots__ = ("model_id", "num_replicas")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    num_replicas: int
    def __init__(self, model_id: _Optional[str] = ..., num_replicas: _Optional[int] = ...) -> None: ...

class WaitForReadyResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("address", "model_server", "server_id", "draining")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_SERVER_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    address: str
    model_server: ModelServer
    server_id: str
    draining: bool
    def __init__(self, address: _Optional[str] = ..., model_server: _Optional[_Union[ModelServer, _Mapping]] = ..., server_id: _Optional[str] = ..., draining: _Optional[bool] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("admin_id",)
    ADMIN_ID_FIELD_NUMBER: _ClassVar[int]
    admin_id: str
    def __init__(self, admin_id: _Optional[str] = ...) -> None: ...
