"""Where each model is served: replica addresses kept fresh by watching the admin.

The first call for a model starts a daemon thread that follows the Admin.WatchLoc stream; each
response is the full set of LOADED replica addresses. On a stream error the watcher re-resolves
the admin (it may have moved) and starts again after a short backoff. NOT_FOUND (the model is not
published) marks the model unknown: calls fail with NotFoundError at once, and the entry is
dropped FORGET_NOT_FOUND_AFTER_S later so that a later call watches again.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

import grpc

from sax import admin_conn, retry
from sax.errors import NotFoundError, SaxError, UnavailableError, from_rpc_error
from sax.naming import ModelName
from sax.v1 import admin_pb2

logger = logging.getLogger(__name__)

#: How long a model the admin does not know stays known as unknown, in seconds.
FORGET_NOT_FOUND_AFTER_S = 5.0
#: First pause before watching again after a stream error, in seconds (doubles up to 1 s).
WATCH_RETRY_INITIAL_S = 0.05


class AddressWatcher:
    """Follows Admin.WatchLoc for one model and calls `on_set(addresses)` with every full set.

    `run()` blocks until `stop()` is called (from any thread, or from `on_set`), and raises
    NotFoundError when the model is not published or the cell does not exist. Other errors are
    retried forever; the latest is kept in `last_error`.
    """

    def __init__(
        self, model: ModelName, on_set: Callable[[list[str]], None], root: str | None = None
    ) -> None:
        self.model = model
        self.last_error: SaxError | None = None
        self._on_set = on_set
        self._root = root
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._call: grpc.Call | None = None

    def stop(self) -> None:
        """Ends `run()`: cancels the stream in flight."""
        self._stop.set()
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()

    def run(self) -> None:
        """Watches until stopped; raises NotFoundError for an unknown model or cell."""
        backoff = retry.Backoff(WATCH_RETRY_INITIAL_S, retry.MAX_BACKOFF_S)
        request = admin_pb2.WatchLocRequest(model_id=self.model.full)
        while not self._stop.is_set():
            conn: admin_conn.AdminConnection | None = None
            address = ""
            try:
                conn = admin_conn.get(self.model.cell_name, self._root)
                stub, address = conn.resolve()
                self._follow(stub.WatchLoc(request), backoff)
                err: SaxError = UnavailableError(f"the admin at {address} ended the address stream")
            except grpc.RpcError as e:
                if self._stop.is_set():
                    return
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    raise from_rpc_error(e) from None
                err = from_rpc_error(e)
            except NotFoundError:
                raise
            except SaxError as e:  # no admin has run yet, corrupt record, ...
                err = e
            self.last_error = err
            logger.debug("watch of %s: %s; watching again", self.model, err)
            if conn is not None and address:
                conn.drop(address)
            backoff.sleep(stop=self._stop)

    def _follow(self, call: grpc.Call, backoff: retry.Backoff) -> None:
        with self._lock:
            self._call = call
        try:
            if self._stop.is_set():
                return
            for response in call:
                backoff.reset()
                self.last_error = None
                self._on_set(list(response.addresses))
        finally:
            with self._lock:
                self._call = None
            call.cancel()


def _copy(err: SaxError) -> SaxError:
    """A fresh exception with the same class and message (raised once per caller)."""
    new = type(err)(str(err))
    new.code = err.code
    return new


class ModelLocation:
    """The replica addresses of one model, with round-robin picking."""

    def __init__(self, model: ModelName, root: str) -> None:
        self.model = model
        self._cond = threading.Condition()
        self._addresses: list[str] = []
        self._received = False
        self._error: SaxError | None = None
        self.forget_at: float | None = None
        self._next = random.randrange(1 << 16)
        self._watcher = AddressWatcher(model, self._update, root)
        self._thread = threading.Thread(target=self._run, name=f"sax-watch{model}", daemon=True)

    def start(self) -> None:
        """Starts the watcher thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stops the watcher thread."""
        self._watcher.stop()

    def _update(self, addresses: list[str]) -> None:
        with self._cond:
            new = sorted(set(addresses))
            if new != self._addresses or not self._received:
                logger.debug("replicas of %s: %s", self.model, new)
            self._addresses = new
            self._received = True
            self._cond.notify_all()

    def _run(self) -> None:
        try:
            self._watcher.run()
            return
        except SaxError as e:
            err: SaxError = e
        except Exception as e:
            logger.exception("watcher of %s failed", self.model)
            err = UnavailableError(f"the address watcher of {self.model} failed: {e!r}")
        with self._cond:
            self._error = err
            self._addresses = []
            self.forget_at = time.monotonic() + FORGET_NOT_FOUND_AFTER_S
            self._cond.notify_all()

    def addresses(self) -> list[str]:
        """The LOADED replica addresses known now (possibly empty)."""
        with self._cond:
            return list(self._addresses)

    def pick(self, deadline: retry.Deadline) -> str:
        """The next replica address, round-robin; waits for one within the deadline.

        Raises NotFoundError for an unknown model, UnavailableError when no replica shows up
        before the deadline.
        """
        with self._cond:
            while True:
                if self._error is not None:
                    raise _copy(self._error)
                if self._addresses:
                    address = self._addresses[self._next % len(self._addresses)]
                    self._next += 1
                    return address
                remaining = deadline.remaining()
                if remaining <= 0:
                    raise self._no_replica(deadline)
                self._cond.wait(remaining)

    def _no_replica(self, deadline: retry.Deadline) -> UnavailableError:
        why = "the admin lists none as LOADED"
        if not self._received:
            why = "no address list from the admin yet"
        if self._watcher.last_error is not None:
            why += f"; last watch error: {self._watcher.last_error}"
        return UnavailableError(
            f"no replica of {self.model} is ready after {deadline.timeout:g}s ({why}); "
            f"check its replicas with: saxutil ls {self.model}"
        )


_lock = threading.Lock()
_locations: dict[tuple[str, str], ModelLocation] = {}


def lookup(model: ModelName) -> ModelLocation:
    """The location of `model` under the current sax_root, watching it on first use."""
    root = admin_conn.sax_root()
    key = (root, model.full)
    with _lock:
        location = _locations.get(key)
        forget_at = location.forget_at if location is not None else None
        if forget_at is not None and time.monotonic() >= forget_at:
            location = None
        if location is None:
            location = ModelLocation(model, root)
            _locations[key] = location
            location.start()
        return location


def forget(model: ModelName) -> None:
    """Drops the cached location of `model` (after this process publishes it again)."""
    root = admin_conn.sax_root()
    with _lock:
        location = _locations.pop((root, model.full), None)
    if location is not None:
        location.stop()


def close_all() -> None:
    """Stops every watcher and forgets every location."""
    with _lock:
        locations = list(_locations.values())
        _locations.clear()
    for location in locations:
        location.stop()
