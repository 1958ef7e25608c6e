"""KV cache slot allocation: the runner's static cache has `num_slots` slots, one per running
sample. The lowest free slot goes first, so decode batches stay dense at the front."""

from __future__ import annotations

import heapq

from sax.errors import InternalError


class SlotAllocator:
    """Hands out and takes back slot indices in [0, num_slots). Not thread-safe: the scheduler
    owns it."""

    def __init__(self, num_slots: int) -> None:
        if num_slots <= 0:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        self._num_slots = num_slots
        self._free = list(range(num_slots))  # a heap
        self._is_free = [True] * num_slots

    @property
    def num_slots(self) -> int:
        """All slots."""
        return self._num_slots

    @property
    def num_free(self) -> int:
        """Slots free now."""
        return len(self._free)

    def allocate(self, n: int = 1) -> list[int]:
        """The n lowest free slots, in increasing order. InternalError if fewer are free (the
        caller checks `num_free` first)."""
        if n > len(self._free):
            raise InternalError(f"asked for {n} KV cache slots, only {len(self._free)} are free")
        slots = [heapq.heappop(self._free) for _ in range(n)]
        for s in slots:
            self._is_free[s] = False
        return slots

    def free(self, slot: int) -> None:
        """Gives a slot back. InternalError on a slot that is out of range or already free."""
        if not 0 <= slot < self._num_slots:
            raise InternalError(f"KV cache slot {slot} is out of range [0, {self._num_slots})")
        if self._is_free[slot]:
            raise InternalError(f"KV cache slot {slot} was freed twice")
        self._is_free[slot] = True
        heapq.heappush(self._free, slot)
