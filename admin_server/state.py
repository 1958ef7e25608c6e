"""The cell's published models (desired state): validation and durable saving.

Every change is validated first, saved to sax_root second and applied in memory last, so a
rejected or unsaved change leaves both the memory and the store as they were.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Mapping

from model_server.params import registry
from model_server.params.base import ServableConfig, apply_overrides
from sax import cell as cell_layout
from sax.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from sax.naming import CellName, parse_model
from sax.storage import Store
from sax.v1 import admin_pb2

logger = logging.getLogger(__name__)

_CHECKPOINT_RE = re.compile(r"^[\w/.:%=|+@-]+$")


class PublishedState:
    """Published models of one cell, kept in memory and in <sax_root>/sax/<cell>/state.proto."""

    def __init__(self, store: Store, cell: CellName) -> None:
        self._store = store
        self._cell = cell
        self._models: dict[str, admin_pb2.Model] = {}
        self._lock = asyncio.Lock()

    def restore(self) -> None:
        """Loads the saved state (raises FailedPreconditionError if it is corrupt)."""
        state = cell_layout.read_state(self._store, self._cell)
        self._models = {m.model_id: m for m in state.models}
        logger.info("restored %d published models of %s", len(self._models), self._cell)

    def models(self) -> dict[str, admin_pb2.Model]:
        """A snapshot of the published models by id (do not mutate the protos)."""
        return dict(self._models)

    def get(self, model_id: str) -> admin_pb2.Model:
        """The published model; NOT_FOUND otherwise."""
        self._check_id(model_id)
        try:
            return self._models[model_id]
        except KeyError:
            raise NotFoundError(
                f"model {model_id} is not published; see `saxutil ls {self._cell}`"
            ) from None

    def config_of(self, model: admin_pb2.Model) -> ServableConfig:
        """The servable config of a model with its overrides applied."""
        return apply_overrides(registry.get(model.model_path), dict(model.overrides))

    async def publish(self, model: admin_pb2.Model) -> admin_pb2.Model:
        """Adds a model. ALREADY_EXISTS, INVALID_ARGUMENT or NOT_FOUND (config) on bad input.

        Save and apply run shielded: a caller that gives up mid-save cannot leave the store and
        the memory disagreeing."""
        return await asyncio.shield(self._publish(model))

    async def _publish(self, model: admin_pb2.Model) -> admin_pb2.Model:
        async with self._lock:
            self._validate(model)
            if model.model_id in self._models:
                raise AlreadyExistsError(
                    f"model {model.model_id} is already published; use `saxutil update` to "
                    "change it or `saxutil unpublish` first"
                )
            new = admin_pb2.Model()
            new.CopyFrom(model)
            new.ClearField("method_names")
            new.uuid = os.urandom(16)
            new.version = 1
            await self._save({**self._models, new.model_id: new})
            self._models[new.model_id] = new
            logger.info(
                "published %s (%s, checkpoint %s, %d replicas)",
                new.model_id,
                new.model_path,
                new.checkpoint_path,
                new.requested_num_replicas,
            )
            return new

    async def update(self, model: admin_pb2.Model) -> admin_pb2.Model:
        """Changes checkpoint, replicas, ACLs or overrides of a published model (shielded)."""
        return await asyncio.shield(self._update(model))

    async def _update(self, model: admin_pb2.Model) -> admin_pb2.Model:
        async with self._lock:
            self._validate(model)
            old = self.get(model.model_id)
            if model.model_path != old.model_path:
                raise InvalidArgumentError(
                    f"model {model.model_id} is published with config {old.model_path}; "
                    f"update cannot change it to {model.model_path}: unpublish and publish again"
                )
            new = admin_pb2.Model()
            new.CopyFrom(model)
            new.ClearField("method_names")
            new.uuid = old.uuid
            new.version = old.version + 1
            await self._save({**self._models, new.model_id: new})
            self._models[new.model_id] = new
            logger.info(
                "updated %s: checkpoint %s, %d replicas, overrides %s",
                new.model_id,
                new.checkpoint_path,
                new.requested_num_replicas,
                dict(new.overrides),
            )
            return new

    async def unpublish(self, model_id: str) -> None:
        """Removes a model; NOT_FOUND if it is not published (shielded)."""
        await asyncio.shield(self._unpublish(model_id))

    async def _unpublish(self, model_id: str) -> None:
        async with self._lock:
            self.get(model_id)
            remaining = {k: v for k, v in self._models.items() if k != model_id}
            await self._save(remaining)
            self._models = remaining
            logger.info("unpublished %s", model_id)

    def _check_id(self, model_id: str) -> None:
        name = parse_model(model_id)
        if name.cell != self._cell.cell:
            raise InvalidArgumentError(
                f"model {model_id} is not in cell {self._cell}; this admin serves {self._cell}"
            )

    def _validate(self, model: admin_pb2.Model) -> None:
        self._check_id(model.model_id)
        if not model.model_path:
            raise InvalidArgumentError("a model needs a servable config name (model_path)")
        if not model.checkpoint_path or not _CHECKPOINT_RE.match(model.checkpoint_path):
            raise InvalidArgumentError(
                f"invalid checkpoint path {model.checkpoint_path!r}; give a path, a gs:// URL, "
                "or None for test-mode configs"
            )
        if model.requested_num_replicas < 0:
            raise InvalidArgumentError(
                f"number of replicas must be >= 0, got {model.requested_num_replicas}"
            )
        _validate_overrides(model.model_path, model.overrides)

    async def _save(self, models: Mapping[str, admin_pb2.Model]) -> None:
        state = admin_pb2.State(models=[models[k] for k in sorted(models)])
        try:
            await asyncio.to_thread(cell_layout.write_state, self._store, self._cell, state)
        except Exception as e:
            logger.error("could not save the state of %s: %s", self._cell, e)
            raise UnavailableError(
                f"could not save the cell state to {self._store.url} ({e}); nothing was changed, "
                "retry when storage is reachable"
            ) from e


def _validate_overrides(model_path: str, overrides: Mapping[str, str]) -> None:
    config = registry.get(model_path)  # NOT_FOUND for an unknown config name
    apply_overrides(config, dict(overrides))
