"""The cell's published models (desired state): validation and durable saving.

Every change is validated first, saved to sax_root second and applied in memory last, so a
rejected or unsaved change leaves both the memory and the store as they were.

Saving: each save first copies the last good state (the bytes this admin restored or saved) to
`state.proto.prev`, then replaces `state.proto`. A save that fails (storage unreachable) is
retried for `save_retry_s`; if it still fails the change is refused with UNAVAILABLE and nothing
changes, so every acknowledged change is durable. Reads (List, WatchLoc) keep being answered
from memory meanwhile.

Restoring: a `state.proto` that does not parse, holds content this version does not know, or
names models that cannot be valid is corrupt: the admin refuses to start with a one-line message
naming the file and the kept copy to restore (it never overwrites either). The same holds when
`state.proto` is missing but a kept copy exists.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable, Mapping

from google.protobuf import unknown_fields
from google.protobuf.message import DecodeError

from sax import cell as cell_layout
from sax.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    SaxError,
    UnavailableError,
)
from sax.naming import CellName, parse_model
from sax.storage import Store, join
from sax.v1 import admin_pb2
from servables import registry
from servables.servable_config import ServableConfig, apply_overrides

logger = logging.getLogger(__name__)

_CHECKPOINT_RE = re.compile(r"^[\w/.:%=|+@-]+$")

#: The kept copy of the last good state, beside state.proto.
BACKUP_FILE = cell_layout.STATE_FILE + ".prev"
#: Seconds a failed save is retried before the change is refused with UNAVAILABLE.
SAVE_RETRY_S = 3.0


class PublishedState:
    """Published models of one cell, kept in memory and in <sax_root>/sax/<cell>/state.proto
    (with the previous good copy in state.proto.prev)."""

    def __init__(
        self,
        store: Store,
        cell: CellName,
        save_retry_s: float = SAVE_RETRY_S,
        may_write: Callable[[], bool] | None = None,
    ) -> None:
        """may_write() says whether this admin may still write the state (it holds the cell's
        lease); checked right before every write, so a deposed leader overwrites nothing."""
        self._store = store
        self._cell = cell
        self._save_retry_s = save_retry_s
        self._may_write = may_write
        self._models: dict[str, admin_pb2.Model] = {}
        self._lock = asyncio.Lock()
        # The bytes of state.proto as last restored or saved (None: no state file yet).
        self._good: bytes | None = None
        #: Saves that failed (each attempt), for metrics and tests.
        self.save_failures = 0

    @property
    def state_path(self) -> str:
        """Store path of the state file, e.g. "sax/test/state.proto"."""
        return join(cell_layout.cell_dir(self._cell), cell_layout.STATE_FILE)

    @property
    def backup_path(self) -> str:
        """Store path of the kept copy, e.g. "sax/test/state.proto.prev"."""
        return join(cell_layout.cell_dir(self._cell), BACKUP_FILE)

    def restore(self) -> None:
        """Loads the saved state. FAILED_PRECONDITION, naming the file and the kept copy, if it
        is corrupt (or missing while a kept copy exists); nothing is written either way."""
        state, data = self._read_saved()
        self._models = {m.model_id: m for m in state.models}
        self._good = data
        logger.info("restored %d published models of %s", len(self._models), self._cell)

    def check_saved(self) -> None:
        """Raises what `restore` would (a corrupt or missing state file) without loading it:
        the start-up check of an admin that may wait as a standby before it restores."""
        self._read_saved()

    def _read_saved(self) -> tuple[admin_pb2.State, bytes | None]:
        data = self._store.read(self.state_path)
        if data is None:
            if self._store.exists(self.backup_path):
                raise FailedPreconditionError(
                    f"state file {self._url(self.state_path)} is missing but a kept copy "
                    f"exists; {self._restore_hint()}"
                )
            return admin_pb2.State(), None
        return self._parse_state(data), data

    def _parse_state(self, data: bytes) -> admin_pb2.State:
        state = admin_pb2.State()
        try:
            state.ParseFromString(data)
            problem = _state_problem(state, self._cell)
        except DecodeError as e:
            problem = f"it does not parse ({e})"
        if problem:
            raise FailedPreconditionError(
                f"state file {self._url(self.state_path)} is corrupt: {problem}; the admin does "
                f"not start and changes nothing. {self._restore_hint()}"
            )
        return state

    def _url(self, path: str) -> str:
        return f"{self._store.url.rstrip('/')}/{path}"

    def _restore_hint(self) -> str:
        backup = self._url(self.backup_path)
        target = self._url(self.state_path)
        if not self._store.exists(self.backup_path):
            return f"no kept copy ({backup}) exists: fix or remove {target} by hand"
        copy = "gcloud storage cp" if backup.startswith("gs://") else "cp"
        return f"to go back to the last good state kept in {backup}, run: {copy} {backup} {target}"

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
        """Keeps the last good state in state.proto.prev, then writes the new one; retries for
        save_retry_s, then UNAVAILABLE (nothing changed in memory)."""
        data = admin_pb2.State(models=[models[k] for k in sorted(models)]).SerializeToString(
            deterministic=True
        )
        give_up = time.monotonic() + self._save_retry_s
        delay = 0.1
        while True:
            try:
                await asyncio.to_thread(self._write, data)
                break
            except _NotLeaderError:
                raise
            except Exception as e:
                self.save_failures += 1
                if time.monotonic() + delay > give_up:
                    logger.error("could not save the state of %s: %s", self._cell, e)
                    raise UnavailableError(
                        f"could not save the cell state to {self._store.url} ({_one_line(e)}); "
                        "nothing was changed, retry when storage is reachable"
                    ) from e
                logger.warning("saving the state of %s failed (%s); retrying", self._cell, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        self._good = data

    def _write(self, data: bytes) -> None:
        if self._may_write is not None and not self._may_write():
            raise _NotLeaderError(
                f"this admin no longer leads cell {self._cell}; nothing was changed, retry on "
                "the new leader"
            )
        if self._good is not None and self._good != data:
            self._store.write(self.backup_path, self._good)
        self._store.write(self.state_path, data)


class _NotLeaderError(UnavailableError):
    """The admin lost the cell's lease before it could save."""


def _validate_overrides(model_path: str, overrides: Mapping[str, str]) -> None:
    from servables.sampling_params import SamplingParams

    config = registry.get(model_path)  # NOT_FOUND for an unknown config name
    config = apply_overrides(config, dict(overrides))
    try:
        SamplingParams.defaults(config)  # every request would fail on a bad default
    except InvalidArgumentError as e:
        raise InvalidArgumentError(
            f"the extra input defaults of {model_path} with these overrides are invalid: {e}"
        ) from None


def _state_problem(state: admin_pb2.State, cell: CellName) -> str:
    """Why a parsed state cannot be a state this admin saved ("" if it can)."""
    if len(unknown_fields.UnknownFieldSet(state)):
        return "it holds content that is not a cell state"
    seen: set[str] = set()
    for model in state.models:
        try:
            name = parse_model(model.model_id)
        except SaxError:
            return f"it names an invalid model id {model.model_id!r}"
        if name.cell != cell.cell:
            return f"it names model {model.model_id}, which is not in cell {cell}"
        if model.model_id in seen:
            return f"it names model {model.model_id} twice"
        if not model.model_path or model.version < 1:
            return f"model {model.model_id} has no config name or version"
        seen.add(model.model_id)
    return ""


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
