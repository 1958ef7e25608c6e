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
Paths are local folders or gs://bucket/prefix URLs. Tensors use transformers' names and layouts
of the family (Llama, BLOOM). Safetensors headers are read with the `safetensors` library
(`read_safetensors`).
Import-light: torch and safetensors are imported only when headers or tensors are read.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import shutil
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
# Bits per value of each safetensors dtype code (the format's table). A tensor's bytes follow from
# its shape and dtype, and the tensors fill the file after the header in offset order.
SAFETENSORS_DTYPE_BITS: Mapping[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}


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

    def exists(self, rel: str) -> bool:
        """Whether the file exists."""
        ...

    def list_dir(self, rel: str) -> list[str]:
        """Names of the files and folders directly under rel, sorted; [] if none."""
        ...

    def local_copy(self, rel: str) -> contextlib.AbstractContextManager[str]:
        """A local path holding the file while the context lasts (a temp copy for gs://)."""
        ...

    def header_copy(self, rel: str) -> contextlib.AbstractContextManager[str]:
        """A local path to a file of rel's size holding at least rel's safetensors header while
        the context lasts: the file itself when local; for gs://, a sparse temp file into which
        only the header bytes are downloaded."""
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

    def header_copy(self, rel: str) -> contextlib.AbstractContextManager[str]:
        return self.local_copy(rel)

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
        """`Files` under gs://bucket/prefix: GcsStore plus header reads and file transfers."""

        @contextlib.contextmanager
        def header_copy(self, rel: str) -> Iterator[str]:
            key = self._key(rel)
            bucket = self._bucket()
            fd, tmp = tempfile.mkstemp(prefix="sax-ckpt-", suffix=".safetensors")
            try:
                with self._errors("read", key):
                    blob = bucket.get_blob(key, **self._kwargs())
                    if blob is None:
                        raise _missing(self, rel)
                    size = int(blob.size or 0)

                    def read(start: int, end: int) -> bytes:
                        end = min(end, size)
                        if end <= start:
                            return b""
                        return bytes(
                            blob.download_as_bytes(start=start, end=end - 1, **self._kwargs())
                        )

                    head = read(0, 8)  # the header's length, a little-endian u64
                    head += read(8, 8 + int.from_bytes(head, "little")) if len(head) == 8 else b""
                with os.fdopen(fd, "wb") as f:
                    fd = -1
                    f.write(head)
                    f.truncate(size)
                yield tmp
            finally:
                if fd >= 0:
                    os.close(fd)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

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
            for name, t in _read_header(files, f"state/{shard}").tensors.items():
                info[name] = (t.dtype, t.shape)
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


@dataclass(frozen=True)
class SafetensorsTensor:
    """One tensor of a safetensors file, as its header says."""

    # Safetensors dtype code: "F32", "BF16", ...
    dtype: str
    shape: tuple[int, ...]
    # Byte offsets [begin, end) of its data in the file (absolute).
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """The header of a safetensors file."""

    # Tensor name -> its entry, in file (offset) order.
    tensors: Mapping[str, SafetensorsTensor]
    # The header's "__metadata__" strings.
    metadata: Mapping[str, str]


def read_safetensors(path: str) -> SafetensorsHeader:
    """The header of a local safetensors file, read and checked by the `safetensors` library
    (nothing but the header is read). ValueError saying why for a damaged file or an unknown
    dtype."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            entries = []
            for name in f.offset_keys():
                info = f.get_slice(name)
                entries.append((name, str(info.get_dtype()), tuple(info.get_shape())))
    except SafetensorError as e:
        raise ValueError(str(e)) from e
    sizes = []
    for name, dtype, shape in entries:
        if dtype not in SAFETENSORS_DTYPE_BITS:
            raise ValueError(f"tensor {name} has the unknown dtype {dtype}")
        sizes.append(math.prod(shape) * SAFETENSORS_DTYPE_BITS[dtype] // 8)
    begin = os.path.getsize(path) - sum(sizes)  # the data fills the file after the header
    tensors = {}
    for (name, dtype, shape), size in zip(entries, sizes, strict=True):
        tensors[name] = SafetensorsTensor(dtype=dtype, shape=shape, begin=begin, end=begin + size)
        begin += size
    return SafetensorsHeader(tensors=tensors, metadata=metadata)


def read_safetensors_header(files: Files, rel: str) -> dict[str, Any]:
    """The header of a checkpoint's safetensors file as its JSON reads: tensor name ->
    {"dtype", "shape", "data_offsets" (relative to the data)}, and "__metadata__" when it has
    any (only the header is read, also for gs://). FAILED_PRECONDITION for a damaged file."""
    header = _read_header(files, rel)
    base = min((t.begin for t in header.tensors.values()), default=0)
    raw: dict[str, Any] = {"__metadata__": dict(header.metadata)} if header.metadata else {}
    for name, t in header.tensors.items():
        offsets = [t.begin - base, t.end - base]
        raw[name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": offsets}
    return raw


def _read_header(files: Files, rel: str) -> SafetensorsHeader:
    with files.header_copy(rel) as local:
        try:
            return read_safetensors(local)
        except ValueError as e:
            raise FailedPreconditionError(
                f"{files.url}/{rel} has a bad safetensors header ({e}); convert it again"
            ) from e


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
