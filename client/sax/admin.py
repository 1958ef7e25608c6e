"""Admin functions of the client: publish, update, list and watch models of a cell.

Each call finds the cell's admin through sax_root ($SAX_ROOT, or `SetSaxRoot(path)`) and takes
`timeout` in seconds (None: DEFAULT_ADMIN_TIMEOUT, or DEFAULT_WAIT_FOR_READY_TIMEOUT for
WaitForReady). Errors are the sax.errors classes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sax import admin_conn, channels, location
from sax.errors import InvalidArgumentError, NotFoundError
from sax.naming import ModelName, parse_cell, parse_cell_or_model, parse_model
from sax.v1 import admin_pb2, common_pb2

logger = logging.getLogger(__name__)

#: Deadline of WaitForReady when the caller gives none, in seconds (loading takes a while).
DEFAULT_WAIT_FOR_READY_TIMEOUT = 600.0


@dataclass(frozen=True)
class ReplicaDetail:
    """One assigned replica: its server address, status name (e.g. "LOADED") and why it failed."""

    address: str
    status: str
    failure_reason: str = ""


@dataclass(frozen=True)
class ModelDetail:
    """A published model as the admin sees it (`ListDetail`)."""

    model_id: str
    #: Servable config name, e.g. "test.TinyLM".
    model: str
    #: Checkpoint path.
    ckpt: str
    #: Requested number of replicas.
    max_replicas: int
    #: Number of LOADED replicas.
    active_replicas: int
    overrides: dict[str, str] = field(default_factory=dict)
    #: Every assigned replica with its status.
    replicas: tuple[ReplicaDetail, ...] = ()
    #: Addresses of the LOADED replicas.
    addresses: tuple[str, ...] = ()
    admin_acl: str = ""
    acls: dict[str, str] = field(default_factory=dict)
    method_names: tuple[str, ...] = ()
    version: int = 0


@dataclass(frozen=True)
class ModelServerTypeStat:
    """How many servers (or replicas of one model) a cell has on one platform."""

    chip_type: str
    chip_topology: str
    num_replicas: int


def SetSaxRoot(path: str | None) -> None:
    """Uses `path` (a local folder or gs://bucket/prefix) as sax_root from now on; None or ""
    goes back to $SAX_ROOT. Cached connections and watchers are closed when it changes."""
    if (path or None) == admin_conn._sax_root_override:
        return
    admin_conn.set_sax_root(path)
    CloseAll()


def CloseAll() -> None:
    """Stops every address watcher and closes every channel; later calls connect again."""
    location.close_all()
    admin_conn.close_all()
    channels.close_all()


def _conn(name: ModelName) -> admin_conn.AdminConnection:
    return admin_conn.get(name.cell_name)


def Publish(
    id: str,
    model_path: str,
    checkpoint_path: str,
    num_replicas: int,
    overrides: dict[str, str] | None = None,
    timeout: float | None = None,
) -> None:
    """Publishes a model; overrides map config attributes to JSON values, e.g. {"BATCH_SIZE": "4"}.

    AlreadyExistsError if the id is taken, InvalidArgumentError for bad values, NotFoundError
    for an unknown config name.
    """
    name = parse_model(id)
    if isinstance(num_replicas, bool) or not isinstance(num_replicas, int):
        raise InvalidArgumentError(f"num_replicas must be an int, got {num_replicas!r}")
    overrides = dict(overrides or {})
    for key, value in overrides.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidArgumentError(
                f"override {key!r}={value!r}: keys and values must be strings (values are JSON, "
                'e.g. "4", "[128,256]" or "\\"text\\"")'
            )
    model = admin_pb2.Model(
        model_id=name.full,
        model_path=model_path,
        checkpoint_path=checkpoint_path,
        requested_num_replicas=num_replicas,
        overrides=overrides,
    )
    _conn(name).call("Publish", admin_pb2.PublishRequest(model=model), timeout)
    location.forget(name)  # a NOT_FOUND cached from before this publish must not linger
    logger.info(
        "published %s (%s, %s, %d replicas)", name, model_path, checkpoint_path, num_replicas
    )


def Unpublish(id: str, timeout: float | None = None) -> None:
    """Unpublishes a model; its replicas are unloaded. NotFoundError if it is not published."""
    name = parse_model(id)
    _conn(name).call("Unpublish", admin_pb2.UnpublishRequest(model_id=name.full), timeout)
    logger.info("unpublished %s", name)


def GetPublished(id: str, timeout: float | None = None) -> admin_pb2.PublishedModel:
    """The admin's full record of one published model. NotFoundError if not published."""
    name = parse_model(id)
    response = _conn(name).call("List", admin_pb2.ListRequest(model_id=name.full), timeout)
    for published in response.published_models:
        if published.model.model_id == name.full:
            return published
    raise NotFoundError(
        f"model {name} is not published; list the cell's models with: saxutil ls {name.cell_name}"
    )


def UpdateModel(model: admin_pb2.Model, timeout: float | None = None) -> None:
    """Replaces a published model's definition (replicas, checkpoint, overrides, ACLs)."""
    name = parse_model(model.model_id)
    _conn(name).call("Update", admin_pb2.UpdateRequest(model=model), timeout)
    logger.info(
        "updated %s (%s, %d replicas)",
        name,
        model.checkpoint_path,
        model.requested_num_replicas,
    )


def Update(
    id: str,
    model_path: str,
    checkpoint_path: str,
    num_replicas: int,
    timeout: float | None = None,
) -> None:
    """Changes a published model's checkpoint and replica count; its overrides and ACLs stay."""
    published = GetPublished(id, timeout)
    model = admin_pb2.Model()
    model.CopyFrom(published.model)
    model.model_path = model_path
    model.checkpoint_path = checkpoint_path
    model.requested_num_replicas = num_replicas
    del model.method_names[:]
    UpdateModel(model, timeout)


def List(id: str, timeout: float | None = None) -> tuple[str, str, int]:
    """(model_path, checkpoint_path, number of LOADED replicas) of a published model."""
    published = GetPublished(id, timeout)
    return (
        published.model.model_path,
        published.model.checkpoint_path,
        len(published.modelet_addresses),
    )


def ListDetail(id: str, timeout: float | None = None) -> ModelDetail:
    """Everything the admin knows of a published model, replicas included."""
    published = GetPublished(id, timeout)
    m = published.model
    return ModelDetail(
        model_id=m.model_id,
        model=m.model_path,
        ckpt=m.checkpoint_path,
        max_replicas=m.requested_num_replicas,
        active_replicas=len(published.modelet_addresses),
        overrides=dict(m.overrides),
        replicas=tuple(
            ReplicaDetail(r.address, common_pb2.ModelStatus.Name(r.status), r.failure_reason)
            for r in published.replicas
        ),
        addresses=tuple(published.modelet_addresses),
        admin_acl=m.admin_acl,
        acls=dict(m.acls.items),
        method_names=tuple(m.method_names),
        version=m.version,
    )


def ListAll(cell: str, timeout: float | None = None) -> list[str]:
    """Full ids of every model published in the cell, sorted."""
    name = parse_cell(cell)
    conn = admin_conn.get(name)
    response = conn.call("List", admin_pb2.ListRequest(), timeout)
    return sorted(p.model.model_id for p in response.published_models)


def StatsDetail(id_or_cell: str, timeout: float | None = None) -> admin_pb2.StatsResponse:
    """The admin's full Stats answer for a cell, or for one model's servers."""
    name = parse_cell_or_model(id_or_cell)
    model_id = name.full if isinstance(name, ModelName) else ""
    cell = name.cell_name if isinstance(name, ModelName) else name
    return admin_conn.get(cell).call("Stats", admin_pb2.StatsRequest(model_id=model_id), timeout)


def Stats(id_or_cell: str, timeout: float | None = None) -> list[ModelServerTypeStat]:
    """Server counts by platform, for a cell (or replica counts, for a model)."""
    response = StatsDetail(id_or_cell, timeout)
    return [
        ModelServerTypeStat(s.chip_type, s.chip_topology, s.num_replicas)
        for s in response.model_server_type_stats
    ]


def WaitForReady(id: str, num_replicas: int, timeout: float | None = None) -> None:
    """Returns once the model has `num_replicas` LOADED replicas; DeadlineExceededError if not
    within `timeout` seconds (default DEFAULT_WAIT_FOR_READY_TIMEOUT)."""
    name = parse_model(id)
    request = admin_pb2.WaitForReadyRequest(model_id=name.full, num_replicas=num_replicas)
    if timeout is None or timeout <= 0:
        timeout = DEFAULT_WAIT_FOR_READY_TIMEOUT
    _conn(name).call("WaitForReady", request, timeout)
