"""What every converter shares: output dtypes, sizes, tensor sources and the streaming writer.

A converter describes each output tensor as a `TensorSource` (name, shape, and a function that
yields its values in row-major chunks); `write_checkpoint` plans the shards from the shapes alone,
writes each safetensors header first and then the tensors' bytes chunk by chunk, so memory stays
near one chunk. Names are sorted and nothing depends on the clock: converting twice gives the
same bytes. Numpy only (bfloat16 by bit operations): no torch here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from sax.errors import AlreadyExistsError, InternalError, InvalidArgumentError
from servables.checkpoint import (
    CHECKPOINT_RE,
    CONFIG_FILE,
    INDEX_FILE,
    MARKER,
    TOKENIZER_DIR,
    checkpoint_name,
    natural_key,
    open_files,
    shard_name,
)

logger = logging.getLogger(__name__)

# Output dtype -> (safetensors code, numpy dtype of its bits, bytes per value).
DTYPES: Mapping[str, tuple[str, Any, int]] = {
    "float32": ("F32", np.float32, 4),
    "bfloat16": ("BF16", np.uint16, 2),
    "float16": ("F16", np.float16, 2),
}
DEFAULT_SHARD_SIZE = "2GB"
# Target size of one chunk of output values; converters read and convert this much at a time.
CHUNK_BYTES = 4 << 20
MARKER_BYTES = b"commit_success\n"

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNIT = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str | int) -> int:
    """Bytes from "2GB", "500MB", "1.5GiB", "4096" (KB/MB/GB are powers of 1000, KiB/MiB/GiB of
    1024); INVALID_ARGUMENT if malformed or not positive."""
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE_RE.match(text)
        if not match:
            raise InvalidArgumentError(f"bad size {text!r}; use e.g. 2GB, 500MB, 1.5GiB or bytes")
        unit = (match.group(2) or "").lower()
        scale = 1024 ** "bkmgt".index(unit[0]) if "i" in unit else _UNIT[unit[:1]]
        value = int(float(match.group(1)) * scale)
    if value <= 0:
        raise InvalidArgumentError(f"size {text!r} must be positive")
    return value


def check_dtype(dtype: str) -> str:
    """The dtype if it is an output dtype; INVALID_ARGUMENT otherwise."""
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return dtype


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even as torch does; NaN -> 0x7FC0."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    bits = values.view(np.uint32)
    rounded = bits >> 16  # the one full-size temporary
    rounded &= 1
    rounded += 0x7FFF
    rounded += bits
    rounded >>= 16
    out = rounded.astype(np.uint16)
    del rounded
    nan = np.isnan(values)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def cast(values: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Values of dtype `src` ("float32", "float16", or "bfloat16" as uint16 bits) converted to
    `dst`, in dst's representation (bfloat16 as uint16 bits). No copy when src == dst."""
    if src == dst:
        return values
    f32 = bfloat16_bits_to_float32(values) if src == "bfloat16" else values.astype(np.float32)
    if dst == "float32":
        return f32
    if dst == "float16":
        return f32.astype(np.float16)
    return float32_to_bfloat16_bits(f32)


@dataclass(frozen=True)
class TensorSource:
    """One output tensor: its canonical name, shape, and `read(dtype)`, which yields its values
    converted to dtype (see `cast`) in row-major chunks whose sizes add up to the shape."""

    name: str
    shape: tuple[int, ...]
    read: Callable[[str], Iterator[np.ndarray]]

    def nbytes(self, dtype: str) -> int:
        """Bytes of the tensor in dtype."""
        return math.prod(self.shape) * DTYPES[dtype][2]


def row_chunks(rows: int, row_bytes: int, align: int = 1) -> Iterator[tuple[int, int]]:
    """[start, end) row ranges of about CHUNK_BYTES each, multiples of `align` rows."""
    step = max(align, (CHUNK_BYTES // max(1, row_bytes)) // align * align)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def rotary_rows_to_hf(rows: Any, head_dim: int) -> Any:
    """Q or K rows ([n * head_dim, D], whole heads; a numpy array or a torch tensor) from the
    interleaved rotary order of Meta's and llama.cpp's files to Hugging Face's ("rotate_half"):
    within each head, rows (i, j) of shape [head_dim/2, 2] become (j, i)."""
    n, cols = rows.shape[0] // head_dim, rows.shape[1]
    return rows.reshape(n, head_dim // 2, 2, cols).swapaxes(1, 2).reshape(rows.shape)


@dataclass(frozen=True)
class SourceModel:
    """A model read from a source format, ready to be written as a checkpoint: its HF-style
    config, its tensors (read lazily), its tokenizer files and the dtype it is written in unless
    another is asked for."""

    config: Mapping[str, Any]
    tensors: Sequence[TensorSource]
    tokenizer_files: Mapping[str, bytes]
    dtype: str


class Progress(Protocol):
    """Receives the conversion's progress in bytes written."""

    def start(self, total_bytes: int) -> None:
        """Called once, before writing, with the bytes the shards will hold."""
        ...

    def advance(self, nbytes: int) -> None:
        """Called after each chunk with the bytes just written."""
        ...


def plan_shards(
    tensors: Sequence[TensorSource], dtype: str, shard_size: int
) -> list[list[TensorSource]]:
    """Tensors in natural name order split into shards of at most shard_size bytes (a tensor
    larger than that gets a shard of its own)."""
    shards: list[list[TensorSource]] = []
    current: list[TensorSource] = []
    size = 0
    for t in sorted(tensors, key=lambda t: natural_key(t.name)):
        n = t.nbytes(dtype)
        if current and size + n > shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += n
    if current:
        shards.append(current)
    return shards


def safetensors_header(tensors: Sequence[TensorSource], dtype: str) -> bytes:
    """The 8-byte length plus JSON header of a safetensors file holding tensors in this order."""
    code = DTYPES[dtype][0]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        n = t.nbytes(dtype)
        header[t.name] = {
            "dtype": code,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _write_shard(
    path: str, tensors: Sequence[TensorSource], dtype: str, progress: Progress | None
) -> None:
    np_dtype = DTYPES[dtype][1]
    with open(path, "wb") as f:
        f.write(safetensors_header(tensors, dtype))
        for t in tensors:
            expected, written = t.nbytes(dtype), 0
            for chunk in t.read(dtype):
                if chunk.dtype != np_dtype:
                    raise InternalError(f"{t.name}: chunk of {chunk.dtype}, expected {np_dtype}")
                data = memoryview(np.ascontiguousarray(chunk)).cast("B")
                f.write(data)
                written += data.nbytes
                if progress is not None:
                    progress.advance(data.nbytes)
            if written != expected:
                raise InternalError(f"{t.name}: wrote {written} bytes, expected {expected}")


def json_bytes(value: Any) -> bytes:
    """Stable JSON: sorted keys, two-space indent, final newline."""
    return (json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def checkpoint_dir(dst: str) -> str:
    """The checkpoint folder a conversion into dst writes: dst itself if it is named
    checkpoint_NNNNNNNN, else dst/checkpoint_00000000."""
    dst = dst.rstrip("/")
    if CHECKPOINT_RE.match(dst.rsplit("/", 1)[-1]):
        return dst
    return f"{dst}/{checkpoint_name(0)}"


def write_checkpoint(
    dst: str,
    *,
    config: Mapping[str, Any],
    tensors: Iterable[TensorSource],
    tokenizer_files: Mapping[str, bytes],
    dtype: str,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    progress: Progress | None = None,
) -> str:
    """Writes a checkpoint into dst (a local folder or gs:// URL; see `checkpoint_dir`) and
    returns the checkpoint folder. The state, metadata and tokenizer come first, each folder's
    commit_success.txt after its files, the top-level one last. ALREADY_EXISTS if the checkpoint
    folder is not empty."""
    check_dtype(dtype)
    limit = parse_size(shard_size)
    path = checkpoint_dir(dst if dst.startswith("gs://") else _abspath(dst))
    files = open_files(path)
    if files.list_dir(""):
        raise AlreadyExistsError(
            f"{path} already exists and is not empty; remove it or choose another destination"
        )
    sources = list(tensors)
    names = [t.name for t in sources]
    if len(set(names)) != len(names):
        raise InternalError(f"duplicate tensor names in {sorted(names)}")
    shards = plan_shards(sources, dtype, limit)
    total = sum(t.nbytes(dtype) for t in sources)
    if progress is not None:
        progress.start(total)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        name = shard_name(i, len(shards))
        logger.info("writing %s/state/%s (%d tensors)", path, name, len(shard))
        with files.staged(f"state/{name}") as local:
            _write_shard(local, shard, dtype, progress)
        weight_map.update((t.name, name) for t in shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    files.write(INDEX_FILE, json_bytes(index))
    files.write(f"state/{MARKER}", MARKER_BYTES)
    files.write(CONFIG_FILE, json_bytes(dict(config, torch_dtype=dtype)))
    files.write(f"metadata/{MARKER}", MARKER_BYTES)
    for name in sorted(tokenizer_files):
        files.write(f"{TOKENIZER_DIR}/{name}", tokenizer_files[name])
    files.write(MARKER, MARKER_BYTES)
    logger.info("wrote %s: %d tensors, %d bytes in %d shards", path, len(names), total, len(shards))
    return path


def _abspath(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def check_tensors(
    sources: Sequence[TensorSource],
    expected: Mapping[str, Sequence[int]],
    what: str,
    *,
    family: str = "llama",
) -> None:
    """INVALID_ARGUMENT unless the sources are exactly the expected names and shapes (of a
    model of `family`, which the message names)."""
    got = {t.name: tuple(t.shape) for t in sources}
    missing = sorted(set(expected) - set(got), key=natural_key)
    extra = sorted(set(got) - set(expected), key=natural_key)
    if missing or extra:
        raise InvalidArgumentError(
            f"{what} does not hold a {family} model with the config's shapes: missing "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
            f"{extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    for name, shape in expected.items():
        if got[name] != tuple(shape):
            raise InvalidArgumentError(
                f"{what}: tensor {name} has shape {list(got[name])}, the config implies "
                f"{list(shape)}"
            )
