"""The `Store` interface: the only code that touches sax_root (a local folder or gs://).

Paths are relative to the store's root and use "/" separators, e.g. "sax/test/state.proto".
"""

from __future__ import annotations

from typing import Protocol


class Store(Protocol):
    """Durable key -> bytes storage with atomic whole-object writes."""

    @property
    def url(self) -> str:
        """The root this store was opened on, e.g. "/tmp/sax-root" or "gs://bucket/prefix"."""
        ...

    def read(self, path: str) -> bytes | None:
        """Returns the object's bytes, or None if it does not exist."""
        ...

    def write(self, path: str, data: bytes) -> None:
        """Replaces the object atomically: readers see the old bytes or the new, never a mix."""
        ...

    def delete(self, path: str) -> None:
        """Removes the object; no error if it does not exist."""
        ...

    def exists(self, path: str) -> bool:
        """Whether the object exists."""
        ...

    def list_dir(self, path: str) -> list[str]:
        """Names of the immediate children (objects and sub-folders) under path, sorted."""
        ...

    def compare_and_swap(self, path: str, expected: bytes | None, data: bytes) -> bool:
        """Writes data only if the object's current bytes equal `expected` (None: only if it
        does not exist), atomically against other compare_and_swap calls; returns whether it
        wrote. The building block of leader leases."""
        ...


def join(*parts: str) -> str:
    """Joins relative store paths with "/"."""
    return "/".join(p.strip("/") for p in parts if p.strip("/"))
