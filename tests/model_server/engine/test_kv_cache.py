"""KV cache blocks: allocation and release with reference counts, the prefix cache (chained
hashes, lookup, registration) and eviction of cached blocks, least recently used first."""

from __future__ import annotations

import pytest

from model_server.engine.kv_cache import BlockPool, block_hashes, blocks_for
from sax.errors import InternalError


def hashes(pool: BlockPool, tokens: list[int]) -> list[bytes]:
    return block_hashes(tokens, pool.block_size)


def test_blocks_for_and_chained_hashes() -> None:
    assert [blocks_for(n, 4) for n in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert len(a) == 2  # full blocks only
    # The same block of tokens after a different prefix hashes differently.
    b = block_hashes([9, 9, 9, 9, 5, 6, 7, 8], 4)
    assert a[0] != b[0] and a[1] != b[1]
    assert block_hashes([1, 2, 3, 4, 0, 0, 0, 0], 4)[0] == a[0]


def test_allocate_release_and_reference_counts() -> None:
    pool = BlockPool(4, 2)
    first = pool.allocate(3)
    assert len(set(first)) == 3 and pool.num_free == 1
    pool.hold(first[:2])  # a second holder of two of them
    pool.release(first)
    assert pool.num_free == 2 and [pool.refs(b) for b in first] == [1, 1, 0]
    pool.release(first[:2])
    assert pool.num_free == 4
    with pytest.raises(InternalError, match="released more often than held"):
        pool.release(first[:1])
    pool.allocate(4)
    with pytest.raises(InternalError, match="only 0 are free"):
        pool.allocate(1)
    with pytest.raises(ValueError):
        BlockPool(0, 16)


def test_prefix_lookup_finds_registered_full_blocks_only() -> None:
    pool = BlockPool(8, 4)
    tokens = list(range(10))  # two full blocks and a partial one
    table = pool.allocate(3)
    assert pool.lookup(hashes(pool, tokens)) == []
    pool.register(table, hashes(pool, tokens))
    assert pool.num_cached == 2
    assert pool.lookup(hashes(pool, tokens)) == table[:2]
    assert pool.lookup(hashes(pool, tokens), limit=1) == table[:1]
    assert (
        pool.lookup(hashes(pool, [*tokens[:4], 99, 5, 6, 7])) == table[:1]
    )  # diverges in the second block
    assert pool.lookup(hashes(pool, [5, *tokens[1:]])) == []
    # Cached blocks whose holder lets go stay cached, and count as free.
    pool.release(table)
    assert pool.num_free == 8 and pool.lookup(hashes(pool, tokens)) == table[:2]
    pool.record_query(10, 2)
    assert (pool.stats().queried_tokens, pool.stats().hit_tokens) == (10, 8)


def test_uncached_blocks_go_first_then_least_recently_used_cached() -> None:
    pool = BlockPool(4, 2)
    a, b = pool.allocate(1), pool.allocate(1)
    pool.register(a, hashes(pool, [1, 2]))
    pool.register(b, hashes(pool, [3, 4]))
    pool.release(a)  # released first: least recently used
    pool.release(b)
    # The two never-cached blocks come out before either cached one.
    fresh = pool.allocate(2)
    assert set(fresh).isdisjoint(a + b) and pool.stats().evictions == 0
    assert pool.allocate(1) == a and pool.stats().evictions == 1
    assert pool.lookup(hashes(pool, [1, 2])) == [] and pool.lookup(hashes(pool, [3, 4])) == b
    # A cached block held again is not on the free list, so it is not evicted.
    pool.hold(b)
    assert pool.free_after_hold(b) == pool.num_free == 0
    with pytest.raises(InternalError):
        pool.allocate(1)


def test_free_after_hold_counts_only_blocks_nobody_holds() -> None:
    pool = BlockPool(4, 2)
    table = pool.allocate(2)
    pool.register(table, hashes(pool, [1, 2, 3, 4]))
    pool.release(table[1:])
    assert pool.num_free == 3
    assert pool.free_after_hold(table) == 2  # table[0] is held already, table[1] is not


def test_no_prefix_caching_registers_nothing() -> None:
    pool = BlockPool(4, 2, prefix_caching=False)
    table = pool.allocate(2)
    pool.register(table, hashes(pool, [1, 2, 3, 4]))
    assert pool.num_cached == 0 and pool.lookup(hashes(pool, [1, 2, 3, 4])) == []
