from __future__ import annotations

import pytest

from dspark_serve.engine.block_manager import BlockAllocator, BlockTable, KVCacheManager, NoFreeBlocks


def test_allocate_and_free_round_trip():
    a = BlockAllocator(4)
    got = a.allocate(3)
    assert len(set(got)) == 3 and a.num_free == 1 and a.num_used == 3
    with pytest.raises(NoFreeBlocks):
        a.allocate(2)
    a.free(got)
    assert a.num_free == 4 and a.num_used == 0
    with pytest.raises(RuntimeError, match="double free"):
        a.free(got[:1])


def test_grow_allocates_whole_blocks_only_when_needed():
    kv = KVCacheManager(num_blocks=10, block_size=16)
    t = BlockTable()
    kv.grow(t, 1)
    assert len(t.blocks) == 1
    kv.grow(t, 16)
    assert len(t.blocks) == 1
    kv.grow(t, 17)
    assert len(t.blocks) == 2 and t.num_tokens == 17
    assert kv.extra_blocks_needed(t, 48) == 1


def test_truncate_rolls_back_and_frees_tail_blocks():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    t = BlockTable()
    kv.grow(t, 13)  # 4 blocks
    assert kv.num_used_blocks == 4
    kv.truncate(t, 8)  # exactly two blocks
    assert len(t.blocks) == 2 and t.num_tokens == 8 and kv.num_used_blocks == 2
    kv.truncate(t, 5)
    assert len(t.blocks) == 2  # slot 5 still lives in block 1
    with pytest.raises(ValueError):
        kv.truncate(t, 9)
    kv.free(t)
    assert kv.num_used_blocks == 0 and t.blocks == []


def test_can_grow_respects_reserve():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    t = BlockTable()
    assert kv.can_grow(t, 8)
    assert not kv.can_grow(t, 8, reserve=1)
    assert not kv.can_grow(t, 9)
