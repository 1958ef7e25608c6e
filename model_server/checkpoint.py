"""Checkpoints: the on-disk layout, and the reader that streams tensors one shard at a time.

```
<path>/checkpoint_00000000/
  commit_success.txt                  written last: the checkpoint is complete
  metadata/config.json                architecture, Hugging Face style keys
  metadata/commit_success.txt
  state/model-00001-of-0000N.safetensors ...
  state/model.safetensors.index.json  {"metadata": {"total_size": N}, "weight_map": {name: file}}
  state/commit_success.txt
  tokenizer/tokenizer.json, tokenizer_config.json, ...
```
Paths are local folders or gs://bucket/prefix URLs. Tensors use Hugging Face Llama names and
layouts. Import-light: torch and safetensors are imported only when tensors are read.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import struct
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sax.errors import FailedPreconditionError

if TYPE_CHECKING:
    import torch

MARKER = "commit_success.txt"
CONFIG_FILE = "metadata/config.json"
INDEX_FILE = "state/model.safetensors.index.json"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_RE = re.compile(r"^checkpoint_(\d{8})$")


def checkpoint_name(step: int = 0) -> str:
    """The folder name of a checkpoint: "checkpoint_00000000"."""
    return f"checkpoint_{step:08d}"


def shard_name(index: int, count: int) -> str:
    """The file name of shard `index` (1-based) of `count`: "model-00001-of-00002.safetensors"."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def natural_key(name: str) -> list[Any]:
    """Sort key that orders "layers.2" before "layers.10"."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


class Files(Protocol):
    """The files under one checkpoint folder; `rel` paths use "/" and are relative to it."""

    url: str

    def read(self, rel: str) -> bytes | None:
        """The file's bytes, or None if it does not exist."""
        ...

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the file (fewer at its end)."""
        ...

    def exists(self, rel: str) -> bool:
        """Whether the file exists."""
        ...

    def list_dir(self, rel: str) -> list[str]:
        """Names of the files and folders directly under rel, sorted; [] if none."""
        ...

    def local_copy(self, rel: str) -> contextlib.AbstractContextManager[str]:
        """A local path holding the file while the context lasts (a temp copy for gs://)."""
        ...

    def write(self, rel: str, data: bytes) -> None:
        """Writes a small file whole."""
        ...

    def staged(self, rel: str) -> contextlib.AbstractContextManager[str]:
        """A local path to write a large file into; it becomes `rel` when the context exits
        without error (renamed locally, uploaded for gs://)."""
        ...


class LocalFiles:
    """`Files` in a local folder."""

    def __init__(self, root: str) -> None:
        self.url = root

    def _path(self, rel: str) -> str:
        return os.path.join(self.url, *[p for p in rel.split("/") if p])

    def read(self, rel: str) -> bytes | None:
        try:
            with open(self._path(rel), "rb") as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        try:
            with open(self._path(rel), "rb") as f:
                f.seek(start)
                return f.read(max(0, end - start))
        except FileNotFoundError:
            raise _missing(self, rel) from None

    def exists(self, rel: str) -> bool:
        return os.path.isfile(self._path(rel))

    def list_dir(self, rel: str) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self._path(rel)) if not n.startswith("."))
        except (FileNotFoundError, NotADirectoryError):
            return []

    @contextlib.contextmanager
    def local_copy(self, rel: str) -> Iterator[str]:
        if not self.exists(rel):
            raise _missing(self, rel)
        yield self._path(rel)

    def write(self, rel: str, data: bytes) -> None:
        with self.staged(rel) as tmp, open(tmp, "wb") as f:
            f.write(data)

    @contextlib.contextmanager
    def staged(self, rel: str) -> Iterator[str]:
        target = self._path(rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = os.path.join(
            os.path.dirname(target), f".{os.path.basename(target)}.{uuid.uuid4().hex}"
        )
        open(tmp, "xb").close()
        try:
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _gcs_files(url: str) -> Files:
    from sax.storage.gcs import GcsStore

    class GcsFiles(GcsStore):
        """`Files` under gs://bucket/prefix: GcsStore plus ranged reads and file transfers."""

        def read_range(self, rel: str, start: int, end: int) -> bytes:
            if end <= start:
                return b""
            key = self._key(rel)
            bucket = self._bucket()
            with self._errors("read", key):
                blob = bucket.get_blob(key, **self._kwargs())
                if blob is None:
                    raise _missing(self, rel)
                end = min(end, int(blob.size or 0))
                if end <= start:
                    return b""
                return bytes(blob.download_as_bytes(start=start, end=end - 1, **self._kwargs()))

        @contextlib.contextmanager
        def local_copy(self, rel: str) -> Iterator[str]:
            key = self._key(rel)
            bucket = self._bucket()
            fd, tmp = tempfile.mkstemp(prefix="sax-ckpt-", suffix=".tmp")
            os.close(fd)
            try:
                with self._errors("download", key):
                    blob = bucket.get_blob(key, **self._kwargs())
                    if blob is None:
                        raise _missing(self, rel)
                    blob.download_to_filename(tmp, **self._kwargs())
                yield tmp
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

        @contextlib.contextmanager
        def staged(self, rel: str) -> Iterator[str]:
            key = self._key(rel)
            fd, tmp = tempfile.mkstemp(prefix="sax-ckpt-", suffix=".tmp")
            os.close(fd)
            try:
                yield tmp
                bucket = self._bucket()
                with self._errors("upload", key):
                    bucket.blob(key).upload_from_filename(
                        tmp, content_type="application/octet-stream", **self._kwargs()
                    )
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    return GcsFiles(url)


def open_files(url: str) -> Files:
    """`Files` for a local folder or a gs://bucket/prefix URL."""
    if url.startswith("gs://"):
        return _gcs_files(url)
    return LocalFiles(url)


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint, found and checked by `open_checkpoint`."""

    # The checkpoint_NNNNNNNN folder: a local path or a gs:// URL.
    path: str
    # metadata/config.json.
    config: Mapping[str, Any]
    # Tensor name -> shard file name under state/, from the index.
    weight_map: Mapping[str, str] = field(default_factory=dict, repr=False)

    def _files(self) -> Files:
        return open_files(self.path)

    def tensor_names(self) -> list[str]:
        """Every tensor name, in natural order."""
        return sorted(self.weight_map, key=natural_key)

    def shard_files(self) -> list[str]:
        """The shard file names under state/, sorted."""
        return sorted(set(self.weight_map.values()))

    def tokenizer_dir(self) -> str:
        """A local folder with the tokenizer files (downloaded once per process for gs://)."""
        return _tokenizer_dir(self.path)

    def tensor_info(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Tensor name -> (safetensors dtype code such as "BF16", shape), from the shard headers
        (reads only the headers, also for gs://)."""
        files = self._files()
        info: dict[str, tuple[str, tuple[int, ...]]] = {}
        for shard in self.shard_files():
            header = read_safetensors_header(files, f"state/{shard}")
            for name, entry in header.items():
                if name != "__metadata__":
                    info[name] = (str(entry["dtype"]), tuple(int(d) for d in entry["shape"]))
        return info

    def iter_tensors(
        self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields (name, tensor) on `device`, cast to `dtype` if given, one shard at a time: a
        local shard is memory-mapped, a gs:// shard downloaded to a temp file and removed after,
        so host memory stays near one shard. Shards and names come in natural order."""
        from safetensors import safe_open

        files = self._files()
        by_shard: dict[str, list[str]] = {}
        for name, shard in self.weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        for shard in sorted(by_shard):
            rel = f"state/{shard}"
            with (
                files.local_copy(rel) as local,
                safe_open(local, framework="pt", device=str(device)) as f,
            ):
                present = set(f.keys())
                for name in sorted(by_shard[shard], key=natural_key):
                    if name not in present:
                        raise FailedPreconditionError(
                            f"{files.url}/{rel} has no tensor {name!r} although the index lists "
                            "it there; the checkpoint is damaged, convert it again"
                        )
                    tensor = f.get_tensor(name)
                    if dtype is not None and tensor.dtype != dtype:
                        tensor = tensor.to(dtype)
                    yield name, tensor


def open_checkpoint(path: str) -> Checkpoint:
    """Opens a checkpoint_NNNNNNNN folder, or the highest committed one in a folder holding
    several. Raises FailedPreconditionError naming the missing file when a commit marker, the
    config, the index or a shard listed in the index is missing."""
    path = path.rstrip("/") if path not in ("/", "gs://") else path
    if not path.startswith("gs://"):
        path = os.path.abspath(os.path.expanduser(path))
    files = open_files(path)
    ckpt_path = _find_checkpoint(files, path)
    files = open_files(ckpt_path)
    for rel in (MARKER, f"metadata/{MARKER}", CONFIG_FILE, f"state/{MARKER}", INDEX_FILE):
        if not files.exists(rel):
            raise _missing(files, rel)
    config = _read_json(files, CONFIG_FILE)
    index = _read_json(files, INDEX_FILE)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise FailedPreconditionError(
            f"{files.url}/{INDEX_FILE} has no weight_map; the checkpoint is damaged, convert it "
            "again"
        )
    present = set(files.list_dir("state"))
    for shard in sorted(set(weight_map.values())):
        if shard not in present:
            raise _missing(files, f"state/{shard}", "listed in the index ")
    return Checkpoint(path=ckpt_path, config=config, weight_map=dict(weight_map))


def read_safetensors_header(files: Files, rel: str) -> dict[str, Any]:
    """The JSON header of a safetensors file (only its first bytes are read)."""
    head = files.read_range(rel, 0, 8)
    if len(head) != 8:
        raise FailedPreconditionError(f"{files.url}/{rel} is not a safetensors file (too short)")
    (size,) = struct.unpack("<Q", head)
    raw = files.read_range(rel, 8, 8 + size)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FailedPreconditionError(
            f"{files.url}/{rel} has a bad safetensors header ({e}); convert it again"
        ) from e
    if not isinstance(header, dict):
        raise FailedPreconditionError(f"{files.url}/{rel} has a bad safetensors header")
    return header


def _missing(files: Files, rel: str, what: str = "") -> FailedPreconditionError:
    hint = (
        "the checkpoint is incomplete (a conversion or copy still running, or interrupted); "
        "wait for it to finish or convert it again with `saxutil convert`"
    )
    return FailedPreconditionError(f"checkpoint file {files.url}/{rel} {what}is missing: {hint}")


def _find_checkpoint(files: Files, path: str) -> str:
    """The checkpoint folder to load under path (path itself if it is one)."""
    if CHECKPOINT_RE.match(path.rsplit("/", 1)[-1]) or files.exists(CONFIG_FILE):
        return path
    names = files.list_dir("")
    steps = sorted((n for n in names if CHECKPOINT_RE.match(n)), reverse=True)
    if not steps:
        if not names and not files.exists(MARKER):
            raise FailedPreconditionError(
                f"checkpoint path {path} does not exist or is empty; convert a model there with "
                "`saxutil convert --from gguf|hf|meta SRC DST`"
            )
        raise FailedPreconditionError(
            f"no checkpoint_NNNNNNNN folder under {path} (found {', '.join(names[:5])}); point "
            "at a converted checkpoint (`saxutil convert`)"
        )
    for step in steps:
        if files.exists(f"{step}/{MARKER}"):
            return f"{path}/{step}"
    raise _missing(files, f"{steps[0]}/{MARKER}")


def _read_json(files: Files, rel: str) -> dict[str, Any]:
    data = files.read(rel)
    if data is None:
        raise _missing(files, rel)
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FailedPreconditionError(
            f"checkpoint file {files.url}/{rel} is not valid JSON ({e}); convert it again"
        ) from e
    if not isinstance(value, dict):
        raise FailedPreconditionError(f"checkpoint file {files.url}/{rel} is not a JSON object")
    return value


@functools.lru_cache(maxsize=16)
def _tokenizer_dir(path: str) -> str:
    files = open_files(path)
    names = files.list_dir(TOKENIZER_DIR)
    if "tokenizer.json" not in names and "tokenizer.model" not in names:
        raise _missing(files, f"{TOKENIZER_DIR}/tokenizer.json")
    if not path.startswith("gs://"):
        return f"{path}/{TOKENIZER_DIR}"
    local = tempfile.mkdtemp(prefix="sax-tokenizer-")
    try:
        for name in names:
            with files.local_copy(f"{TOKENIZER_DIR}/{name}") as src:
                shutil.copyfile(src, os.path.join(local, name))
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(local)
        raise
    return local
