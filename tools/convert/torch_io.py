"""torch helpers of the Hugging Face .bin and Meta .pth converters: memory-mapped loads, chunk
conversion to the output dtype, and giving touched file pages back."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import mmap
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from sax.errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_MADV_DONTNEED = 4
_LOAD_ARGS: dict[str, Any] = {"map_location": "cpu", "weights_only": True}


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of an output dtype name."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def dtype_name(dtype: torch.dtype) -> str | None:
    """ "float32" / "bfloat16" / "float16" for those torch dtypes, else None."""
    return str(dtype).removeprefix("torch.") if str(dtype).endswith(("32", "16")) else None


@dataclass
class TorchFile:
    """A torch checkpoint file's tensors; `mmapped` when their bytes stay in the file."""

    path: str
    tensors: dict[str, Any]
    mmapped: bool

    def release(self, tensor: torch.Tensor) -> None:
        """Gives back the file pages reading `tensor` (a view of one of ours) brought in."""
        if self.mmapped:
            release_pages(tensor)


def load(path: str) -> TorchFile:
    """A torch checkpoint file loaded memory-mapped (tensor bytes stay on disk until read)."""
    import pickle

    import torch

    try:
        return TorchFile(path, dict(torch.load(path, **_LOAD_ARGS, mmap=True)), mmapped=True)
    except RuntimeError as e:
        if "mmap" not in str(e) and "zip" not in str(e):
            raise InvalidArgumentError(f"cannot read {path}: {e}") from e
        logger.warning("%s is in torch's legacy format; loading it whole (no mmap)", path)
        return TorchFile(path, dict(torch.load(path, **_LOAD_ARGS)), mmapped=False)
    except (pickle.UnpicklingError, OSError, EOFError) as e:
        raise InvalidArgumentError(f"cannot read {path}: {e}") from e


def to_numpy(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    """A tensor converted to dtype, as numpy in `common.cast`'s representation (bfloat16 as
    uint16 bits)."""
    import torch

    t = tensor.to(torch_dtype(dtype)).contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


@functools.cache
def _madvise() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def release_pages(tensor: torch.Tensor) -> None:
    """Drops the file pages a memory-mapped tensor's reads brought into this process, so the
    resident memory of a conversion stays near one chunk. ONLY for views of a private file
    mapping never written to (pages come back from the file on the next read): on ordinary
    memory it would zero the data. Use `TorchFile.release`, which checks."""
    fn = _madvise()
    if fn is None or tensor.numel() == 0:
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        fn(first, last - first, _MADV_DONTNEED)
