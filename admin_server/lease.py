"""The leader lease of a cell: at most one admin at a time loads and unloads.

The lease is one small JSON object in sax_root, `<sax_root>/sax/<cell>/lease`:

    {"holder": "3f2a9c...", "address": "10.0.0.5:10000", "fencing": 7,
     "renewed_ms": 1718000000000, "lease_s": 5.0}

- holder: the admin id of the leader ("" once released); address: where it serves.
- fencing: +1 on every change of holder, never reset (a released lease keeps its number), so a
  later leader always has a higher number. It travels in every Load and Unload (and status poll);
  model servers refuse a lower one.
- renewed_ms: wall time of the last renewal (ms since the epoch); lease_s: how long it holds.

Every change is a `Store.compare_and_swap` on the exact bytes read, so two admins racing for an
expired lease cannot both win (a lock file locally, generation preconditions on GCS).

Clocks: a standby compares the record's wall time with its own clock and takes over only when
`now > renewed + lease_s + clock_skew_s`. The leader never trusts the wall clock for itself: it
counts its lease from the monotonic time just before its last successful renewal and considers
itself leader only until `lease_s - clock_skew_s` after it. As long as the clocks of two admins
differ by less than `clock_skew_s`, the old leader has stopped before a standby can take over;
the fencing number covers what is left (a paused process, a larger skew).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sax.storage import Store

logger = logging.getLogger(__name__)

LEASE_FILE = "lease"


@dataclass(frozen=True)
class LeaseRecord:
    """The lease object's content."""

    # Admin id of the holder; "" when released.
    holder: str
    # "host:port" of the holder's Admin service.
    address: str
    # Fencing number of the holder: strictly increasing over holders.
    fencing: int
    # Wall time of the last acquisition or renewal, ms since the epoch (0 when released).
    renewed_ms: int
    # Seconds the lease holds after renewed_ms.
    lease_s: float

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseRecord:
        """Parses a record; ValueError if it is not one."""
        try:
            raw = json.loads(data)
            return cls(
                holder=str(raw["holder"]),
                address=str(raw["address"]),
                fencing=int(raw["fencing"]),
                renewed_ms=int(raw["renewed_ms"]),
                lease_s=float(raw["lease_s"]),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"not a lease record: {e}") from e

    def expired(self, now_s: float, clock_skew_s: float) -> bool:
        """Whether a standby whose wall clock reads now_s may take the lease over."""
        if not self.holder:
            return True
        return now_s > self.renewed_ms / 1000.0 + self.lease_s + clock_skew_s


class Renewal(enum.Enum):
    """Outcome of `Lease.renew`."""

    RENEWED = "renewed"
    # Storage did not answer; the lease still holds until `Lease.valid_until`.
    ERROR = "error"
    # Another admin holds the lease now, or it ran out: this one is no longer the leader.
    LOST = "lost"


class Lease:
    """One admin's handle on its cell's lease. Blocking (storage calls); thread-safe.

    wall and mono are the clocks (time.time and time.monotonic), replaceable in tests.
    """

    def __init__(
        self,
        store: Store,
        path: str,
        holder: str,
        address: str,
        *,
        lease_s: float,
        clock_skew_s: float,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        if not lease_s > 2 * clock_skew_s >= 0:
            raise ValueError(f"lease_s ({lease_s}) must exceed twice clock_skew_s ({clock_skew_s})")
        self._store = store
        self.path = path
        self.holder = holder
        self.address = address
        self.lease_s = lease_s
        self.clock_skew_s = clock_skew_s
        self._wall = wall
        self._mono = mono
        self._lock = threading.Lock()
        # The record as this admin last wrote it, and its bytes; None when not held.
        self._record: LeaseRecord | None = None
        self._bytes = b""
        # Monotonic time until which this admin may act as the leader.
        self._valid_until = 0.0

    # ----------------------------------------------------------------------------- queries

    @property
    def fencing(self) -> int:
        """The fencing number of the current holding (0 when not held)."""
        with self._lock:
            return self._record.fencing if self._record is not None else 0

    @property
    def valid_until(self) -> float:
        """Monotonic time after which this admin must no longer act as the leader."""
        with self._lock:
            return self._valid_until if self._record is not None else 0.0

    def held(self) -> bool:
        """Whether this admin holds the lease now (written by it and not run out)."""
        with self._lock:
            return self._record is not None and self._mono() < self._valid_until

    def read(self) -> LeaseRecord | None:
        """The record in storage (None if absent or unreadable as a record)."""
        data = self._store.read(self.path)
        if data is None:
            return None
        try:
            return LeaseRecord.from_bytes(data)
        except ValueError:
            return None

    # ----------------------------------------------------------------------------- changes

    def try_acquire(self, predecessor_gone: Callable[[LeaseRecord], bool] | None = None) -> bool:
        """Takes the lease if it is free, released, expired, or already this admin's; returns
        whether this admin holds it now. predecessor_gone(record) may declare a live-looking
        holder dead (e.g. this admin now listens on the holder's own address). Storage errors
        propagate."""
        if self.held():
            return self.renew() is Renewal.RENEWED
        start, now = self._mono(), self._wall()
        data = self._store.read(self.path)
        if data is None:
            fencing = 1
        else:
            try:
                current = LeaseRecord.from_bytes(data)
            except ValueError as e:
                # Overwritten by something else: take it, with a number above any counter.
                logger.error("lease %s is unreadable (%s); replacing it", self.path, e)
                fencing = int(now * 1000)
            else:
                free = (
                    current.holder == self.holder
                    or current.expired(now, self.clock_skew_s)
                    or (predecessor_gone is not None and predecessor_gone(current))
                )
                if not free:
                    return False
                fencing = current.fencing + 1
        record = LeaseRecord(
            holder=self.holder,
            address=self.address,
            fencing=fencing,
            renewed_ms=int(now * 1000),
            lease_s=self.lease_s,
        )
        new = record.to_bytes()
        if not self._store.compare_and_swap(self.path, data, new):
            return False  # another admin changed it between our read and write
        with self._lock:
            self._record, self._bytes = record, new
            self._valid_until = start + self.lease_s - self.clock_skew_s
        logger.info(
            "acquired lease %s (fencing %d, %.1f s)", self.path, record.fencing, self.lease_s
        )
        return True

    def renew(self) -> Renewal:
        """Extends the lease. LOST when another admin changed the record (or it ran out before
        storage answered); ERROR when storage failed (the lease holds until valid_until)."""
        with self._lock:
            record, old = self._record, self._bytes
        if record is None:
            return Renewal.LOST
        start, now = self._mono(), self._wall()
        new_record = dataclasses.replace(record, renewed_ms=int(now * 1000))
        new = new_record.to_bytes()
        try:
            swapped = self._store.compare_and_swap(self.path, old, new)
        except Exception as e:  # noqa: BLE001 - any storage failure: retried until valid_until
            with self._lock:
                if self._record is not record:
                    return Renewal.LOST
                if self._mono() >= self._valid_until:
                    self._record = None
                    logger.error("lease %s ran out: storage failed (%s)", self.path, e)
                    return Renewal.LOST
            logger.warning("could not renew lease %s: %s; retrying", self.path, e)
            return Renewal.ERROR
        with self._lock:
            if self._record is not record:  # abandoned meanwhile
                return Renewal.LOST
            if not swapped:
                self._record = None
                logger.error("lease %s was taken over by another admin", self.path)
                return Renewal.LOST
            self._record, self._bytes = new_record, new
            self._valid_until = start + self.lease_s - self.clock_skew_s
            return Renewal.RENEWED

    def abandon(self) -> None:
        """Stops holding without touching storage (the leader stepped down on its own); a
        renewal in flight no longer counts."""
        with self._lock:
            self._record = None

    def release(self) -> bool:
        """Gives the lease up so a standby takes over at once; keeps the fencing number.
        Returns whether the release was written (False if it was no longer ours)."""
        with self._lock:
            record, old = self._record, self._bytes
            self._record = None
        if record is None:
            return False
        released = LeaseRecord(
            holder="", address="", fencing=record.fencing, renewed_ms=0, lease_s=record.lease_s
        )
        done = self._store.compare_and_swap(self.path, old, released.to_bytes())
        logger.info("released lease %s (fencing %d)", self.path, record.fencing)
        return done
