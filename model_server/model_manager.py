"""Loaded models by key: the load/unload lifecycle, statuses and counters.

Runs on the server's event loop; the blocking part of a load (building the servable: reading or
drawing the weights) and of an unload (closing it) runs in a worker thread. Operations on one key
are serialized: a Load while the key is LOADING waits for that load, then is a no-op when the
settings are the same. A Load with other settings reloads the model (unload, then load).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from model_server.loader import build_servable
from model_server.servable import Servable
from sax.errors import (
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    SaxError,
)
from sax.v1 import common_pb2
from servables import registry
from servables.servable_config import ServableConfig, apply_overrides

logger = logging.getLogger(__name__)

Status = common_pb2.ModelStatus
# Builds a servable from a config and a checkpoint path (blocking).
Builder = Callable[[ServableConfig, str], Servable]
NO_CHECKPOINT = ("", "None")


@dataclass(frozen=True)
class ModelInfo:
    """One model as GetStatus reports it."""

    model_key: str
    status: int  # a sax.v1.ModelStatus value
    failure_reason: str
    model_path: str
    checkpoint_path: str
    method_names: tuple[str, ...]
    overrides: Mapping[str, str]


@dataclass(frozen=True)
class LoadedModel:
    """A LOADED model handed to a request for its duration (see `ModelManager.use`)."""

    model_key: str
    config: ServableConfig
    servable: Servable

    @property
    def method_names(self) -> tuple[str, ...]:
        return self.servable.method_names


@dataclass
class _Entry:
    model_key: str
    model_path: str
    checkpoint_path: str
    overrides: dict[str, str]
    status: int = Status.LOADING
    failure_reason: str = ""
    config: ServableConfig | None = None
    servable: Servable | None = None
    active: int = 0  # requests using the servable
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def same_settings(self, model_path: str, checkpoint: str, overrides: dict[str, str]) -> bool:
        return (self.model_path, self.checkpoint_path, self.overrides) == (
            model_path,
            checkpoint,
            overrides,
        )


class ModelManager:
    """Loads, unloads and hands out the models of one server platform (chip, topology)."""

    def __init__(
        self,
        chip: str,
        topology: str,
        *,
        builder: Builder = build_servable,
        executor: Executor | None = None,
        drain_timeout_s: float = 30.0,
    ) -> None:
        self._chip = chip
        self._topology = topology
        # The default builder places weights on the platform's device (cuda for GPU chips).
        self._builder = (
            functools.partial(build_servable, chip=chip) if builder is build_servable else builder
        )
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(2, thread_name_prefix="model-load")
        self._drain_timeout_s = drain_timeout_s
        self._entries: dict[str, _Entry] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._total_loads = 0
        self._total_unloads = 0
        # Seconds the last successful load of each key took (for metrics).
        self.load_seconds: dict[str, float] = {}

    @property
    def total_loads(self) -> int:
        """Loads started by this process, successful or not."""
        return self._total_loads

    @property
    def total_unloads(self) -> int:
        """Unloads completed by this process (reloads included)."""
        return self._total_unloads

    def loaded_keys(self) -> list[str]:
        """Keys of the LOADED models, sorted."""
        return sorted(k for k, e in self._entries.items() if e.status == Status.LOADED)

    def servables(self) -> list[tuple[str, Servable]]:
        """(key, servable) of the LOADED models, by key; callable from any thread (metrics)."""
        loaded = [
            (k, e.servable)
            for k, e in list(self._entries.items())
            if e.status == Status.LOADED and e.servable is not None
        ]
        return sorted(loaded, key=lambda kv: kv[0])

    def statuses(self) -> list[ModelInfo]:
        """Every model known here, sorted by key."""
        return [
            ModelInfo(
                model_key=e.model_key,
                status=e.status,
                failure_reason=e.failure_reason,
                model_path=e.model_path,
                checkpoint_path=e.checkpoint_path,
                method_names=e.servable.method_names if e.servable is not None else (),
                overrides=dict(e.overrides),
            )
            for _, e in sorted(self._entries.items())
        ]

    async def load(
        self, model_key: str, model_path: str, checkpoint_path: str, overrides: Mapping[str, str]
    ) -> None:
        """Loads a model under model_key; returns once it is LOADED.

        NOT_FOUND for an unknown config, INVALID_ARGUMENT for a bad override, FAILED_PRECONDITION
        when this platform cannot host it or a checkpoint is missing; the status is then FAILED
        with the reason. The load goes on if the caller goes away.
        """
        if not model_key or not model_path:
            raise InvalidArgumentError("Load needs a model_key and a model_path")
        settings = (model_path, checkpoint_path, dict(overrides))
        await self._run_detached(self._load_locked(model_key, *settings))

    async def unload(self, model_key: str) -> None:
        """Unloads a model and drops its memory. NOT_FOUND if the key is unknown here."""
        await self._run_detached(self._unload_locked(model_key))

    @asynccontextmanager
    async def use(self, model_key: str) -> AsyncIterator[LoadedModel]:
        """The LOADED model for one request; NOT_FOUND (retry another replica) otherwise.
        An unload waits for the requests using the model to finish."""
        entry = self._entries.get(model_key)
        if entry is None or entry.status != Status.LOADED or entry.servable is None:
            state = "" if entry is None else f" (it is {Status.Name(entry.status)})"
            raise NotFoundError(
                f"model {model_key} is not loaded here{state}; loaded: {self.loaded_keys()}"
            )
        assert entry.config is not None
        entry.active += 1
        entry.idle.clear()
        try:
            yield LoadedModel(model_key, entry.config, entry.servable)
        finally:
            entry.active -= 1
            if entry.active == 0:
                entry.idle.set()

    async def close(self) -> None:
        """Unloads every model (server shutdown) and stops the owned worker threads."""
        for key in list(self._entries):
            try:
                await self.unload(key)
            except SaxError as e:
                logger.warning("unload of %s at shutdown failed: %s", key, e)
        if self._own_executor:
            self._executor.shutdown(wait=False)

    async def _run_detached(self, coro: Any) -> None:
        """Runs coro as its own task so that a cancelled caller does not cut it in half."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        await asyncio.shield(task)

    def _lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    async def _load_locked(
        self, key: str, model_path: str, checkpoint_path: str, overrides: dict[str, str]
    ) -> None:
        async with self._lock(key):
            entry = self._entries.get(key)
            if entry is not None and entry.status == Status.LOADED:
                if entry.same_settings(model_path, checkpoint_path, overrides):
                    logger.debug("model %s is already loaded with these settings", key)
                    return
                logger.info("reloading %s: its settings changed", key)
                await self._release(entry)
            await self._load(_Entry(key, model_path, checkpoint_path, overrides))

    async def _load(self, entry: _Entry) -> None:
        key = entry.model_key
        self._entries[key] = entry
        self._total_loads += 1
        start = time.monotonic()
        logger.info("loading %s (%s, checkpoint %s)", key, entry.model_path, entry.checkpoint_path)
        try:
            config = self._config_for(entry)
            loop = asyncio.get_running_loop()
            servable = await loop.run_in_executor(
                self._executor, self._builder, config, entry.checkpoint_path
            )
        except SaxError as e:
            self._fail(entry, str(e))
            raise
        except Exception as e:
            logger.exception("loading %s failed", key)
            reason = f"internal error while loading: {e!r}"
            self._fail(entry, reason)
            raise InternalError(reason) from e
        entry.config, entry.servable = config, servable
        entry.status = Status.LOADED
        entry.idle.set()
        self.load_seconds[key] = time.monotonic() - start
        logger.info("loaded %s in %.2fs", key, self.load_seconds[key])

    def _config_for(self, entry: _Entry) -> ServableConfig:
        config = apply_overrides(registry.get(entry.model_path), entry.overrides)
        if not config.can_serve_on(self._chip, self._topology):
            raise FailedPreconditionError(
                f"{entry.model_path} cannot run on this server (chip {self._chip}, topology "
                f"{self._topology}): it needs {config.num_devices()} device(s) of "
                f"{', '.join(sorted(config.chips))}; place it on a matching server"
            )
        if not config.test_mode and entry.checkpoint_path in NO_CHECKPOINT:
            raise FailedPreconditionError(
                f"{entry.model_path} needs a checkpoint, got {entry.checkpoint_path!r}; publish "
                'it with a checkpoint path (only test-mode configs take "None")'
            )
        return config

    def _fail(self, entry: _Entry, reason: str) -> None:
        entry.status = Status.FAILED
        entry.failure_reason = reason
        logger.warning("loading %s failed: %s", entry.model_key, reason)

    async def _unload_locked(self, key: str) -> None:
        async with self._lock(key):
            entry = self._entries.get(key)
            if entry is None:
                raise NotFoundError(f"model {key} is not loaded here; loaded: {self.loaded_keys()}")
            await self._release(entry)
            self._entries.pop(key, None)

    async def _release(self, entry: _Entry) -> None:
        """UNLOADING, wait for in-flight requests, close the servable, drop the references."""
        entry.status = Status.UNLOADING
        servable, entry.servable, entry.config = entry.servable, None, None
        if servable is not None:
            if entry.active:
                try:
                    await asyncio.wait_for(entry.idle.wait(), self._drain_timeout_s)
                except asyncio.TimeoutError:
                    logger.warning(
                        "unloading %s with %d requests still running", entry.model_key, entry.active
                    )
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, servable.close)
            del servable
            gc.collect()
            _release_free_memory()
        self._total_unloads += 1
        logger.info("unloaded %s", entry.model_key)


def _release_free_memory() -> None:
    """Returns freed heap pages to the OS (glibc keeps them otherwise, so an unloaded model's
    memory would stay resident)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
