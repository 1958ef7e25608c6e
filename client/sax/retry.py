"""Deadlines and bounded exponential backoff shared by the client's retry loops."""

from __future__ import annotations

import random
import threading
import time

#: First pause between attempts, in seconds.
INITIAL_BACKOFF_S = 0.01
#: Longest pause between attempts, in seconds.
MAX_BACKOFF_S = 1.0


class Deadline:
    """A point in time a call must finish by.

    `timeout` in seconds; None, 0 or a negative value means "no deadline given" and the
    `default` applies, so every call has a finite deadline.
    """

    def __init__(self, timeout: float | None, default: float) -> None:
        self.timeout: float = float(timeout) if timeout is not None and timeout > 0 else default
        self._expires = time.monotonic() + self.timeout

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self._expires - time.monotonic())

    def expired(self) -> bool:
        """Whether the deadline has passed."""
        return self.remaining() <= 0.0


class Backoff:
    """Exponential backoff from `initial` doubling up to `maximum`, with +-20% jitter."""

    def __init__(self, initial: float = INITIAL_BACKOFF_S, maximum: float = MAX_BACKOFF_S) -> None:
        self._initial = initial
        self._maximum = maximum
        self._next = initial

    def reset(self) -> None:
        """Starts again from the initial pause (after a success)."""
        self._next = self._initial

    def next_delay(self) -> float:
        """The next pause in seconds; grows the one after."""
        delay = self._next * random.uniform(0.8, 1.2)
        self._next = min(self._next * 2.0, self._maximum)
        return min(delay, self._maximum)

    def sleep(self, deadline: Deadline | None = None, stop: threading.Event | None = None) -> None:
        """Pauses for the next delay, cut short by the deadline or by `stop` being set."""
        delay = self.next_delay()
        if deadline is not None:
            delay = min(delay, deadline.remaining())
        if stop is not None:
            stop.wait(delay)
        elif delay > 0:
            time.sleep(delay)
