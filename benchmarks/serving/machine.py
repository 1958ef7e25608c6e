"""What machine a benchmark ran on: the CPU model, its cores and the vector/matrix extensions
that decide which kernels run (AVX2, AVX-512, AVX-512 BF16/VNNI, AMX)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")


def cpu_info() -> dict[str, Any]:
    """{"cpu": model name, "cores": count, "flags": the extensions present, space-separated}
    from /proc/cpuinfo (Linux); elsewhere the machine type and no flags."""
    model, flags = platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    have = [f for f in _FLAGS if f in flags]
    return {"cpu": model, "cores": os.cpu_count(), "flags": " ".join(have) or "no AVX2"}
