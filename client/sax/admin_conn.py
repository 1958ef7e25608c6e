"""Connections to the admin server of each cell, found through the cell's location record.

`get(cell)` returns the process-wide `AdminConnection` of a cell under the current sax_root.
`AdminConnection.call` makes a unary Admin RPC within a deadline: on UNAVAILABLE it drops the
channel, re-reads the location record (the admin may have moved) and tries again with bounded
exponential backoff; RESOURCE_EXHAUSTED is retried the same way without re-reading.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import grpc

from sax import retry
from sax.cell import read_location
from sax.channels import make_channel
from sax.errors import (
    DeadlineExceededError,
    SaxError,
    UnavailableError,
    error_for_code,
    from_rpc_error,
)
from sax.naming import CellName
from sax.storage import Store, open_store, resolve_sax_root
from sax.v1 import admin_pb2_grpc

logger = logging.getLogger(__name__)

#: Deadline of an admin call when the caller gives none, in seconds.
DEFAULT_ADMIN_TIMEOUT = 30.0

_RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)

_lock = threading.Lock()
_sax_root_override: str | None = None
_stores: dict[str, Store] = {}
_connections: dict[tuple[str, str], AdminConnection] = {}


def set_sax_root(path: str | None) -> None:
    """Uses `path` as sax_root from now on; None or "" goes back to $SAX_ROOT."""
    global _sax_root_override
    with _lock:
        _sax_root_override = path or None


def sax_root() -> str:
    """The sax_root in use: the one set with `set_sax_root`, else $SAX_ROOT.

    Raises FailedPreconditionError when neither is set.
    """
    return resolve_sax_root(_sax_root_override)


def store_for(root: str) -> Store:
    """The (cached) store opened on `root`."""
    with _lock:
        store = _stores.get(root)
        if store is None:
            store = open_store(root)
            _stores[root] = store
        return store


class AdminConnection:
    """The channel to one cell's admin server, re-resolved when the admin moves."""

    def __init__(self, root: str, cell: CellName) -> None:
        self._root = root
        self.cell = cell
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stub: admin_pb2_grpc.AdminStub | None = None
        self._address = ""

    def resolve(self) -> tuple[admin_pb2_grpc.AdminStub, str]:
        """The stub and address of the admin, reading the location record if needed.

        Raises NotFoundError if the cell does not exist and UnavailableError if no admin server
        has ever run for it.
        """
        with self._lock:
            if self._stub is None:
                location = read_location(store_for(self._root), self.cell)
                self._channel = make_channel(location.location)
                self._stub = admin_pb2_grpc.AdminStub(self._channel)
                self._address = location.location
                logger.debug("admin of cell %s is at %s", self.cell, self._address)
            return self._stub, self._address

    def drop(self, address: str) -> None:
        """Forgets the channel if it still goes to `address`; the next call re-reads the record.

        The old channel is not closed here: calls still running on it finish or fail by
        themselves, and it is closed once garbage.
        """
        with self._lock:
            if self._stub is not None and self._address == address:
                logger.debug("dropping admin channel of cell %s to %s", self.cell, address)
                self._stub = None
                self._channel = None
                self._address = ""

    def close(self) -> None:
        """Closes the channel (in-flight calls on it are cancelled)."""
        with self._lock:
            channel, self._channel, self._stub, self._address = self._channel, None, None, ""
        if channel is not None:
            channel.close()

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """Calls Admin.<method>(request) with retries within `timeout` seconds.

        `timeout` None or <= 0 means DEFAULT_ADMIN_TIMEOUT. Raises the sax.errors class of the
        final status.
        """
        deadline = retry.Deadline(timeout, DEFAULT_ADMIN_TIMEOUT)
        backoff = retry.Backoff()
        attempts = 0
        last: grpc.RpcError | None = None
        unresolved: UnavailableError | None = None
        address = ""
        while True:
            remaining = deadline.remaining()
            if remaining <= 0:
                if last is None and unresolved is not None:
                    raise unresolved
                raise self._give_up(method, deadline, attempts, address, last)
            try:
                stub, address = self.resolve()
            except UnavailableError as e:  # no admin has run yet: it may be starting
                unresolved = e
                backoff.sleep(deadline)
                continue
            attempts += 1
            try:
                return getattr(stub, method)(request, timeout=remaining)
            except grpc.RpcError as e:
                code = e.code()
                if code not in _RETRIED:
                    raise self._error(method, deadline, e) from None
                last = e
                if code == grpc.StatusCode.UNAVAILABLE:
                    self.drop(address)
                logger.debug("Admin.%s on %s: %s; retrying", method, address, code.name)
            backoff.sleep(deadline)

    def _error(self, method: str, deadline: retry.Deadline, err: grpc.RpcError) -> SaxError:
        if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceededError(
                f"Admin.{method} on the admin of cell {self.cell} did not finish within "
                f"{deadline.timeout:g}s; retry with a longer timeout"
            )
        return from_rpc_error(err)

    def _give_up(
        self,
        method: str,
        deadline: retry.Deadline,
        attempts: int,
        address: str,
        last: grpc.RpcError | None,
    ) -> SaxError:
        if last is None:
            return DeadlineExceededError(
                f"Admin.{method} for cell {self.cell} ran out of time ({deadline.timeout:g}s)"
            )
        return error_for_code(
            last.code(),
            f"the admin server of cell {self.cell} (last at {address}) did not answer "
            f"Admin.{method} within {deadline.timeout:g}s ({attempts} attempts; last error: "
            f"{last.details()}); check that it runs: python -m admin_server "
            f"--sax_cell={self.cell}",
        )


def get(cell: CellName, root: str | None = None) -> AdminConnection:
    """The process-wide connection to `cell`'s admin under `root` (default: the current
    sax_root)."""
    root = root or sax_root()
    key = (root, cell.cell)
    with _lock:
        conn = _connections.get(key)
        if conn is None:
            conn = AdminConnection(root, cell)
            _connections[key] = conn
        return conn


def close_all() -> None:
    """Closes every admin connection and forgets the cached stores."""
    with _lock:
        conns = list(_connections.values())
        _connections.clear()
        _stores.clear()
    for conn in conns:
        conn.close()
