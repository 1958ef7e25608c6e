"""Platforms a model server may run on: chip kinds, topologies, device counts and memory.

Import-light (no torch, no JAX): the CLI, the admin and the configs read it.
"""

from __future__ import annotations

import math
import re

from sax.errors import InvalidArgumentError

GIB = 1 << 30

# Memory per chip in bytes (device memory; for "cpu", host memory given to models per server).
CHIP_MEMORY: dict[str, int] = {
    "cpu": 16 * GIB,
    "p100": 16 * GIB,
    "v100": 16 * GIB,
    "t4": 16 * GIB,
    "l4": 24 * GIB,
    "a100": 40 * GIB,
    "h100": 80 * GIB,
    "h200": 141 * GIB,
    "tpuv2": 8 * GIB,
    "tpuv3": 16 * GIB,
    "tpuv4": 32 * GIB,
    "tpuv4i": 8 * GIB,
    "tpuv5e": 16 * GIB,
    "tpuv5p": 95 * GIB,
    "tpuv6e": 32 * GIB,
}
GPU_CHIPS = frozenset({"p100", "v100", "t4", "l4", "a100", "h100", "h200"})
TPU_CHIPS = frozenset(c for c in CHIP_MEMORY if c.startswith("tpu"))
ALL_CHIPS = frozenset(CHIP_MEMORY)

_TOPOLOGY_RE = re.compile(r"^\d+(x\d+){0,2}$")


def parse_chip(chip: str) -> str:
    """Normalizes a --platform_chip value; INVALID_ARGUMENT if unknown."""
    c = chip.strip().lower()
    if c not in CHIP_MEMORY:
        raise InvalidArgumentError(
            f"unknown platform chip {chip!r}; use one of: {', '.join(sorted(CHIP_MEMORY))}"
        )
    return c


def num_devices(topology: str) -> int:
    """Devices in a topology: "8" -> 8, "2x4" -> 8, "2x2x1" -> 4 ("_twisted" suffix dropped)."""
    t = topology.strip().lower().split("_")[0]
    if not _TOPOLOGY_RE.match(t):
        raise InvalidArgumentError(
            f"invalid platform topology {topology!r}; use a device count (1, 4, 8) or a shape (2x2)"
        )
    return math.prod(int(x) for x in t.split("x"))


def default_memory_bytes(chip: str, topology: str) -> int:
    """Memory a server of this platform offers to models by default."""
    return CHIP_MEMORY[parse_chip(chip)] * num_devices(topology)
