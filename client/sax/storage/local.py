"""Local-folder backend of `Store`: atomic writes by write-to-temp, fsync, rename."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import tempfile

from sax.errors import InvalidArgumentError


class LocalStore:
    """A `Store` on a local folder (the embedded default sax_root)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = pathlib.Path(root).expanduser().resolve()

    @property
    def url(self) -> str:
        return str(self._root)

    def _path(self, path: str) -> pathlib.Path:
        full = (self._root / path.strip("/")).resolve()
        if full != self._root and self._root not in full.parents:
            raise InvalidArgumentError(f"path {path!r} escapes the store root {self._root}")
        return full

    def read(self, path: str) -> bytes | None:
        try:
            return self._path(path).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def write(self, path: str, data: bytes) -> None:
        target = self._path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(path).unlink()

    def exists(self, path: str) -> bool:
        return self._path(path).is_file()

    def list_dir(self, path: str) -> list[str]:
        folder = self._path(path)
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))

    def compare_and_swap(self, path: str, expected: bytes | None, data: bytes) -> bool:
        """Writes data only if the file's bytes are `expected` (None: it must not exist).

        Returns whether it wrote. Atomic against other compare_and_swap calls on the same path,
        in any process on this host (an flock on a hidden ".<name>.lock" file beside it).
        """
        target = self._path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(target.parent / f".{target.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            if self.read(path) != expected:
                return False
            self.write(path, data)
            return True
        finally:
            os.close(lock_fd)  # releases the lock
