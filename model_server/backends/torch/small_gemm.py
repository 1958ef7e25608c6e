"""Float32 matrix products of few rows on a CPU, through a kernel built for the machine.

A decode step multiplies a few activation rows by every weight matrix; it is bound by how fast
the weights stream from memory. The BLAS inside torch's CPU build does not reach that bound
at these shapes everywhere: on a 2-core AMD EPYC (AVX-512), its float32 products of 1 to 16
rows by SmolLM2-135M's layer weights moved 8-12 GB/s on one core, where `small_gemm.c` moves
about 20 GB/s on both. The kernel is compiled here with the system C compiler (`-O3
-march=native -fopenmp`) the first time a process needs it, cached under
`$SAX_KERNEL_CACHE` (default `~/.cache/sax/kernels`) by a hash of its source, flags and the
CPU's flags, and loaded with ctypes. It runs on torch's OpenMP team: the process loads one
libgomp.

Whether it is used is measured, not assumed (`choose_max_rows`): on the model's own weights,
both ways, at 1, 2, 4, ... rows; it serves the row counts up to the first at which torch is as
fast. Without a C compiler, or if the build fails, everything stays on torch (logged once).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.nn import functional

from model_server.models.paged_torch import PagedDecoder

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("small_gemm.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
# Row counts the choice is measured at (each up to the largest it serves).
PROBE_ROWS = (1, 2, 4, 8, 16, 32, 64)
# Weights the probe streams at most: more than a CPU's last-level cache, so it measures memory.
PROBE_BYTES = 256 << 20
_ARGS = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 3 + [ctypes.c_long] * 3


def cache_dir() -> Path:
    """Where built kernels are kept."""
    if found := os.environ.get("SAX_KERNEL_CACHE"):
        return Path(found)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sax" / "kernels"


def _cpu_signature() -> str:
    """The CPU's model and flags (what -march=native builds for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    keep = [ln for ln in lines if ln.startswith(("model name", "flags"))]
    return "\n".join(dict.fromkeys(keep))


class SmallGemm:
    """y = x . w^T for float32 CPU tensors x [M, K] (rows contiguous) and w [N, K]."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._fn = library.sax_gemm_f32
        self._fn.argtypes = _ARGS
        self._fn.restype = None
        self.vector_width = int(library.sax_gemm_vector_width())

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        m, k = x.shape
        n = w.shape[0]
        if w.shape[1] != k or x.stride(1) != 1 or w.stride(1) != 1:
            raise ValueError(f"small_gemm takes x [M, K] and w [N, K], got {x.shape}, {w.shape}")
        y = torch.empty((m, n), dtype=torch.float32)
        self._fn(x.data_ptr(), w.data_ptr(), y.data_ptr(), m, n, k, x.stride(0), w.stride(0), n)
        return y


def _build(path: Path, compiler: str) -> None:
    """Compiles the kernel into `path` (written whole, then renamed: readers never see a part)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".so.part")
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *FLAGS, "-o", tmp, str(SOURCE)],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def load() -> SmallGemm | None:
    """The kernel, built on first use; None where it cannot be built (logged once)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler found: float32 products stay on torch's BLAS")
        return None
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), compiler.encode()):
        key.update(part)
    key.update(_cpu_signature().encode())
    path = cache_dir() / f"small_gemm-{key.hexdigest()[:16]}.so"
    try:
        if not path.exists():
            started = time.perf_counter()
            _build(path, compiler)
            logger.info("built %s in %.1f s", path, time.perf_counter() - started)
        gemm = SmallGemm(ctypes.CDLL(str(path)))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        logger.warning("small_gemm could not be built (%s): products stay on torch", detail)
        return None
    logger.debug("small_gemm loaded from %s (%d floats a vector)", path, gemm.vector_width)
    return gemm


class SmallRowsWeight:
    """A float32 CPU weight [N, K] whose products with at most `max_rows` rows run through the
    kernel, and with more through torch (a `LinearWeight` of the model)."""

    def __init__(self, weight: torch.Tensor, gemm: SmallGemm, max_rows: int) -> None:
        if not _float_cpu(weight):
            raise ValueError(f"small_gemm serves 2-D float32 CPU weights, not {weight.dtype}")
        self.weight = weight.contiguous()
        self._gemm = gemm
        self.max_rows = max_rows

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[-1]
        rows = x.numel() // k if k else 0
        if not 0 < rows <= self.max_rows or x.dtype != torch.float32:
            return functional.linear(x, self.weight)
        flat = x.reshape(rows, k)
        if flat.stride(1) != 1:
            flat = flat.contiguous()
        return self._gemm(flat, self.weight).view(*x.shape[:-1], self.weight.shape[0])


def _seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    fn()  # warm: first touches, thread team wake-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def probe_weights(weights: Sequence[torch.Tensor], limit: int = PROBE_BYTES) -> list[torch.Tensor]:
    """The first weights (in order) up to `limit` bytes, at least one."""
    chosen: list[torch.Tensor] = []
    total = 0
    for w in weights:
        if chosen and total + w.numel() * w.element_size() > limit:
            break
        chosen.append(w)
        total += w.numel() * w.element_size()
    return chosen


def choose_max_rows(
    gemm: SmallGemm, weights: Sequence[torch.Tensor], rows: Sequence[int] = PROBE_ROWS
) -> int:
    """The most rows for which the kernel is faster than torch on `weights` (float32 [N, K]
    each), measured at each count of `rows` in order up to the first at which it is not; 0
    when it is not faster even at the first."""
    chosen = 0
    for m in rows:
        inputs = {w.shape[1]: torch.randn(m, w.shape[1]) for w in weights}

        def ours(inputs: dict[int, torch.Tensor] = inputs) -> None:
            for w in weights:
                gemm(inputs[w.shape[1]], w)

        def theirs(inputs: dict[int, torch.Tensor] = inputs) -> None:
            for w in weights:
                functional.linear(inputs[w.shape[1]], w)

        mine, torchs = _seconds(ours), _seconds(theirs)
        logger.info(
            "float32 products of %d rows: small_gemm %.2f ms, torch %.2f ms",
            m,
            mine * 1e3,
            torchs * 1e3,
        )
        if mine >= torchs:
            break
        chosen = m
    return chosen


def _float_cpu(weight: object) -> bool:
    return (
        isinstance(weight, torch.Tensor)
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and weight.dim() == 2
    )


def install(model: PagedDecoder, gemm: SmallGemm) -> int:
    """Serves the model's float32 CPU projections (and its float32 output projection) through
    the kernel for the row counts where it measures faster than torch on the model's own
    weights. Returns the most rows it serves (0: nothing changed). Call it on the thread that
    runs the steps, with their thread count set: that is the team the kernel runs on."""
    slots = [(owner, name) for owner, name, _ in model.projections()]
    slots = [(owner, name) for owner, name in slots if _float_cpu(getattr(owner, name))]
    if not slots:
        return 0
    weights = [getattr(owner, name) for owner, name in slots]
    max_rows = choose_max_rows(gemm, probe_weights(weights))
    if max_rows:
        for owner, name in slots:
            setattr(owner, name, SmallRowsWeight(getattr(owner, name), gemm, max_rows))
        head = model.lm_head.weight
        if model.head is None and _float_cpu(head) and not head.is_meta:
            model.head = SmallRowsWeight(head.detach(), gemm, max_rows)
    logger.info(
        "float32 products of up to %d rows run through small_gemm, more through torch",
        max_rows,
    )
    return max_rows
