"""A lean reader of GGUF headers: metadata and tensor infos, read once, sequentially.

`gguf.GGUFReader` keeps a numpy view per metadata item, which for a 49k-token vocabulary costs
~160 MB of Python objects, more than the model's largest tensor. This reader keeps plain Python
values (a list of str for the vocabulary) and the tensors' offsets; the tensor bytes are read
later, by row chunks, with `os.pread`. The `gguf` package still supplies the quantization types,
block sizes and dequantization.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from sax.errors import InvalidArgumentError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF value type -> struct format of a scalar.
_SCALARS = {
    0: "B",  # UINT8
    1: "b",  # INT8
    2: "H",  # UINT16
    3: "h",  # INT16
    4: "I",  # UINT32
    5: "i",  # INT32
    6: "f",  # FLOAT32
    7: "?",  # BOOL
    10: "Q",  # UINT64
    11: "q",  # INT64
    12: "d",  # FLOAT64
}
_FLOAT32, _STRING, _ARRAY = 6, 8, 9


@dataclass(frozen=True)
class GgufTensorInfo:
    """Where one tensor's bytes lie in the file and how to read them by rows."""

    name: str
    # ggml dimension order: dims[0] is the row length (innermost).
    dims: tuple[int, ...]
    qtype: int  # gguf.GGMLQuantizationType value
    offset: int  # absolute byte offset of the first byte
    nbytes: int
    rows: int
    row_bytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The numpy / Hugging Face shape (dims reversed)."""
        return tuple(reversed(self.dims))


@dataclass(frozen=True)
class GgufFile:
    """A GGUF file's metadata (key -> value) and tensor infos, in file order."""

    path: str
    version: int
    metadata: dict[str, Any]
    tensors: tuple[GgufTensorInfo, ...]


class _Stream:
    def __init__(self, f: IO[bytes], path: str) -> None:
        self._f = f
        self._path = path
        self.pos = 0

    def read(self, n: int) -> bytes:
        data = self._f.read(n)
        if len(data) != n:
            raise InvalidArgumentError(
                f"{self._path} is truncated (GGUF header at byte {self.pos})"
            )
        self.pos += n
        return data

    def scalar(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.read(self.scalar("Q")).decode("utf-8", "replace")

    def value(self, kind: int) -> Any:
        if kind == _FLOAT32:  # the shortest decimal that round-trips: 1e-05, not 9.99e-06
            return float(str(np.float32(self.scalar("f"))))
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.scalar("I"), self.scalar("Q")
            if item in _SCALARS:
                fmt = "<" + _SCALARS[item]
                size = struct.calcsize(fmt)
                return np.frombuffer(self.read(size * count), dtype=fmt).tolist()
            return [self.value(item) for _ in range(count)]
        raise InvalidArgumentError(f"{self._path}: unknown GGUF value type {kind}")


def read_gguf(path: str) -> GgufFile:
    """Parses the header of a GGUF (v2 or v3, little-endian) file."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        s = _Stream(f, path)
        if s.read(4) != MAGIC:
            raise InvalidArgumentError(f"{path} is not a GGUF file (no GGUF magic)")
        version = s.scalar("I")
        if version not in (2, 3):
            raise InvalidArgumentError(
                f"{path}: GGUF version {version} is not supported (2 and 3 little-endian are)"
            )
        n_tensors, n_kv = s.scalar("Q"), s.scalar("Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = s.string()
            metadata[key] = s.value(s.scalar("I"))
        raw_infos = []
        for _ in range(n_tensors):
            name = s.string()
            dims = tuple(s.scalar("Q") for _ in range(s.scalar("I")))
            raw_infos.append((name, dims, s.scalar("I"), s.scalar("Q")))
        alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-s.pos // alignment) * alignment
    tensors = []
    for name, dims, qtype, offset in raw_infos:
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise InvalidArgumentError(
                f"{path}: tensor {name} has a quantization type ({qtype}) the gguf package does "
                "not know; upgrade gguf"
            ) from None
        if dims[0] % block:
            raise InvalidArgumentError(f"{path}: tensor {name} rows are not whole blocks")
        row_bytes = dims[0] // block * block_bytes
        rows = math.prod(dims[1:])
        tensors.append(
            GgufTensorInfo(
                name=name,
                dims=dims,
                qtype=qtype,
                offset=data_start + offset,
                nbytes=rows * row_bytes,
                rows=rows,
                row_bytes=row_bytes,
            )
        )
    return GgufFile(path=path, version=version, metadata=metadata, tensors=tuple(tensors))
