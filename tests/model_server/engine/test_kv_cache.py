"""KV slot allocator: lowest free slot first, double free detection."""

from __future__ import annotations

import pytest

from model_server.engine.kv_cache import SlotAllocator
from sax.errors import InternalError


def test_lowest_free_slot_first() -> None:
    slots = SlotAllocator(4)
    assert slots.allocate(3) == [0, 1, 2]
    slots.free(1)
    slots.free(0)
    assert slots.num_free == 3
    assert slots.allocate(2) == [0, 1]
    assert slots.allocate() == [3]
    assert slots.num_free == 0


def test_exhaustion_double_free_and_range() -> None:
    slots = SlotAllocator(2)
    slots.allocate(2)
    with pytest.raises(InternalError, match="only 0 are free"):
        slots.allocate()
    slots.free(1)
    with pytest.raises(InternalError, match="freed twice"):
        slots.free(1)
    with pytest.raises(InternalError, match="out of range"):
        slots.free(2)
    with pytest.raises(ValueError):
        SlotAllocator(0)
