"""sax_root storage: `open_store("/local/folder")` or `open_store("gs://bucket/prefix")`."""

from __future__ import annotations

import os

from sax.errors import FailedPreconditionError
from sax.storage.base import Store, join

__all__ = ["Store", "join", "open_store", "resolve_sax_root"]


def resolve_sax_root(flag_value: str | None = None) -> str:
    """The --sax_root flag if given, else $SAX_ROOT; raises if neither is set."""
    root = flag_value or os.environ.get("SAX_ROOT", "")
    if not root:
        raise FailedPreconditionError(
            "no sax_root: pass --sax_root=PATH or set SAX_ROOT (a local folder or gs://bucket/prefix)"
        )
    return root


def open_store(sax_root: str) -> Store:
    """Opens the backend for sax_root: gs:// URLs use GCS, anything else a local folder."""
    if sax_root.startswith("gs://"):
        from sax.storage.gcs import GcsStore

        return GcsStore(sax_root)
    from sax.storage.local import LocalStore

    return LocalStore(sax_root)
