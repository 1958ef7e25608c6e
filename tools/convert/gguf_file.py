"""A lean reader of GGUF headers: metadata and tensor infos, read once, sequentially.

`gguf.GGUFReader` keeps a numpy view per metadata item: on SmolLM2-135M's 49k-token vocabulary
it takes 3.5 s and ~165 MB of Python objects, more than the model's largest tensor (108 MiB)
and past the converter's memory bound (`benchmarks/convert_memory.py`). This reader keeps plain
Python values (a list of str for the vocabulary) and the tensors' offsets, in 0.2 s and ~35 MB;
the tensor bytes are read later, by row chunks, with `os.pread`. The `gguf` package supplies the
format's constants (magic, versions, value types, alignment), the quantization types and block
sizes, and the dequantization; `GGUFReader` is the reference the tests compare this reader to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
)
from gguf.gguf_reader import READER_SUPPORTED_VERSIONS

from sax.errors import InvalidArgumentError

# GGUF scalar value type -> its little-endian numpy dtype.
_SCALARS = {
    kind: np.dtype(np_type).newbyteorder("<")
    for kind, np_type in GGUFReader.gguf_scalar_to_np.items()
}
_U32, _U64 = _SCALARS[GGUFValueType.UINT32], _SCALARS[GGUFValueType.UINT64]


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

    def array(self, dtype: np.dtype[Any], count: int) -> np.ndarray:
        return np.frombuffer(self.read(dtype.itemsize * count), dtype=dtype)

    def scalar(self, dtype: np.dtype[Any]) -> Any:
        return self.array(dtype, 1)[0].item()

    def string(self) -> str:
        return self.read(self.scalar(_U64)).decode("utf-8", "replace")

    def value(self, kind: int) -> Any:
        if kind == GGUFValueType.FLOAT32:  # the shortest decimal that round-trips: 1e-05
            return float(str(self.array(_SCALARS[GGUFValueType.FLOAT32], 1)[0]))
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == GGUFValueType.STRING:
            return self.string()
        if kind == GGUFValueType.ARRAY:
            item, count = self.scalar(_U32), self.scalar(_U64)
            if item in _SCALARS:
                return self.array(_SCALARS[item], count).tolist()
            return [self.value(item) for _ in range(count)]
        raise InvalidArgumentError(f"{self._path}: unknown GGUF value type {kind}")


def read_gguf(path: str) -> GgufFile:
    """Parses the header of a GGUF (v2 or v3, little-endian) file."""
    with open(path, "rb") as f:
        s = _Stream(f, path)
        if s.scalar(_U32) != GGUF_MAGIC:
            raise InvalidArgumentError(f"{path} is not a GGUF file (no GGUF magic)")
        version = s.scalar(_U32)
        if version not in READER_SUPPORTED_VERSIONS:
            raise InvalidArgumentError(
                f"{path}: GGUF version {version} is not supported (2 and 3 little-endian are)"
            )
        n_tensors, n_kv = s.scalar(_U64), s.scalar(_U64)
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = s.string()
            metadata[key] = s.value(s.scalar(_U32))
        raw_infos = []
        for _ in range(n_tensors):
            name = s.string()
            dims = tuple(s.array(_U64, s.scalar(_U32)).tolist())
            raw_infos.append((name, dims, s.scalar(_U32), s.scalar(_U64)))
        alignment = int(metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
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
    return GgufFile(path=path, metadata=metadata, tensors=tuple(tensors))
