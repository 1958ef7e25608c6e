"""The KV cache's blocks: fixed-size pieces of `block_size` positions, the unit the scheduler
hands out (vLLM's paged KV cache). A sequence holds a block table, its blocks in position
order; position p of the sequence lives in block table[p // block_size] at offset
p % block_size.

Blocks are reference-counted: the samples of one request share the full blocks of their
prompt, and a later request whose prompt starts with the same tokens shares them too (prefix
caching). A full block of prompt is registered under a hash of its tokens chained with the
hashes of the blocks before it, so a hit means the same tokens at the same positions after the
same prefix. A block whose last holder lets go stays cached (its K/V untouched) on the free
list: blocks that never held a registered prefix are handed out first, then cached ones, least
recently used first (eviction).

A backend with one static slot per sequence is the case block_size = slot length: every
sequence holds exactly one block, which is its slot, and nothing is ever full enough to cache.
"""

from __future__ import annotations

import array
import collections
import hashlib
import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sax.errors import InternalError

# A registered block's key: the digest of its tokens chained with the blocks before it.
BlockHash = bytes


def block_hashes(
    tokens: Sequence[int], block_size: int, known: Sequence[BlockHash] = ()
) -> list[BlockHash]:
    """The chained hash of every full block of `tokens`, in order; `known`: the hashes of its
    leading blocks computed before (kept, not computed again)."""
    hashes = list(known)
    parent = hashes[-1] if hashes else b""
    for start in range(len(hashes) * block_size, len(tokens) - block_size + 1, block_size):
        chunk = array.array("q", tokens[start : start + block_size]).tobytes()
        parent = hashlib.blake2b(parent + chunk, digest_size=16).digest()
        hashes.append(parent)
    return hashes


def blocks_for(positions: int, block_size: int) -> int:
    """Blocks that hold `positions` positions."""
    return -(-positions // block_size)


@dataclass(frozen=True)
class BlockStats:
    """Counters of the pool since it was made."""

    # Prompt tokens looked up in the prefix cache, and those found.
    queried_tokens: int = 0
    hit_tokens: int = 0
    # Cached blocks handed out again for other tokens.
    evictions: int = 0


class BlockPool:
    """`num_blocks` blocks of `block_size` positions with reference counts and the prefix
    cache. Not thread-safe: the scheduler owns it."""

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"bad KV cache shape: {num_blocks} blocks of {block_size} positions")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._refs = [0] * num_blocks
        # Blocks with no holder: uncached ones (a heap: the lowest goes first, so one-block
        # sequences stay dense at the front) and cached ones by last use.
        self._fresh = list(range(num_blocks))
        self._cached_free: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._by_hash: dict[BlockHash, int] = {}
        self._hash_of: dict[int, BlockHash] = {}
        self._queried = self._hits = self._evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks no sequence holds (cached ones included: they are handed out when needed)."""
        return len(self._fresh) + len(self._cached_free)

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache (held or not)."""
        return len(self._by_hash)

    def stats(self) -> BlockStats:
        return BlockStats(self._queried, self._hits, self._evictions)

    def refs(self, block: int) -> int:
        """Holders of a block."""
        return self._refs[block]

    def lookup(self, hashes: Sequence[BlockHash], limit: int | None = None) -> list[int]:
        """The cached blocks of the longest run of a sequence's leading full blocks (`hashes`,
        from `block_hashes`), at most `limit` of them; takes no reference (`hold` does)."""
        found: list[int] = []
        if self.prefix_caching:
            for h in hashes[:limit]:
                block = self._by_hash.get(h)
                if block is None:
                    break
                found.append(block)
        return found

    def record_query(self, tokens: int, hit_blocks: int) -> None:
        """Counts a lookup that a sequence of `tokens` tokens used (`stats`)."""
        self._queried += tokens
        self._hits += hit_blocks * self.block_size

    def free_after_hold(self, blocks: Iterable[int]) -> int:
        """Free blocks that would be left after holding `blocks`."""
        return self.num_free - sum(1 for b in set(blocks) if self._refs[b] == 0)

    def hold(self, blocks: Iterable[int]) -> None:
        """Takes one more reference to each block (a shared prefix)."""
        for b in blocks:
            if self._refs[b] == 0:
                if b in self._cached_free:
                    del self._cached_free[b]
                else:  # not reached by the scheduler: only cached blocks are held from free
                    self._fresh.remove(b)
                    heapq.heapify(self._fresh)
            self._refs[b] += 1

    def allocate(self, n: int) -> list[int]:
        """n blocks for new positions, each with one reference; cached blocks are evicted
        least recently used first. InternalError if fewer are free (callers check
        `num_free`)."""
        if n > self.num_free:
            raise InternalError(f"asked for {n} KV cache blocks, only {self.num_free} are free")
        blocks = []
        for _ in range(n):
            if self._fresh:
                b = heapq.heappop(self._fresh)
            else:
                b, _ = self._cached_free.popitem(last=False)
                del self._by_hash[self._hash_of.pop(b)]
                self._evictions += 1
            self._refs[b] = 1
            blocks.append(b)
        return blocks

    def release(self, blocks: Iterable[int]) -> None:
        """Drops one reference to each block; a block nobody holds goes to the free list
        (keeping its cached K/V if it has registered tokens). InternalError on a block with no
        holder."""
        for b in blocks:
            if not 0 <= b < self.num_blocks or self._refs[b] <= 0:
                raise InternalError(f"KV cache block {b} was released more often than held")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._hash_of:
                    self._cached_free[b] = None
                else:
                    heapq.heappush(self._fresh, b)

    def register(self, table: Sequence[int], hashes: Sequence[BlockHash]) -> None:
        """Records the leading full blocks of a sequence whose K/V are written (`hashes`, from
        `block_hashes`, one per full block), so that later prompts starting with the same
        tokens reuse them."""
        if not self.prefix_caching:
            return
        for block, h in zip(table, hashes, strict=False):
            if h in self._by_hash or block in self._hash_of:
                continue  # the same tokens are cached in another block already
            self._by_hash[h] = block
            self._hash_of[block] = h
