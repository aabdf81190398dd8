"""Paged KV cache bookkeeping: a pool of fixed-size blocks and per-sequence block tables.

Only ids live here; the tensors are in `ModelRunner`. One block table per
sequence indexes every pool that holds one entry per target position (the
target KV now, the DSpark drafter's context K/V later), so growing,
truncating or freeing a table keeps all pools consistent by construction.
"""

from __future__ import annotations

from collections import deque


class NoFreeBlocks(RuntimeError):
    pass


class BlockAllocator:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise NoFreeBlocks(f"asked for {n} blocks, {len(self._free)} free")
        out = [self._free.popleft() for _ in range(n)]
        self._used.update(out)
        return out

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if b not in self._used:
                raise RuntimeError(f"double free of KV block {b}")
            self._used.remove(b)
            self._free.append(b)


class BlockTable:
    """The blocks of one sequence and how many of their slots hold tokens."""

    __slots__ = ("blocks", "num_tokens")

    def __init__(self) -> None:
        self.blocks: list[int] = []
        self.num_tokens = 0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.allocator.num_used

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks_needed(self, table: BlockTable, num_tokens: int) -> int:
        """Blocks to add so that `table` covers `num_tokens` token slots in all."""
        return max(0, self.blocks_for(num_tokens) - len(table.blocks))

    def can_grow(self, table: BlockTable, num_tokens: int, reserve: int = 0) -> bool:
        return self.extra_blocks_needed(table, num_tokens) + reserve <= self.allocator.num_free

    def grow(self, table: BlockTable, num_tokens: int) -> None:
        """Make `table` cover `num_tokens` slots (allocates whole blocks)."""
        need = self.extra_blocks_needed(table, num_tokens)
        if need:
            table.blocks.extend(self.allocator.allocate(need))
        table.num_tokens = max(table.num_tokens, num_tokens)

    def truncate(self, table: BlockTable, num_tokens: int) -> None:
        """Roll back to the first `num_tokens` slots (rejected speculative tokens)."""
        if num_tokens > table.num_tokens:
            raise ValueError("truncate cannot grow a table")
        keep = self.blocks_for(num_tokens)
        if keep < len(table.blocks):
            self.allocator.free(table.blocks[keep:])
            del table.blocks[keep:]
        table.num_tokens = num_tokens

    def free(self, table: BlockTable) -> None:
        if table.blocks:
            self.allocator.free(table.blocks)
        table.blocks = []
        table.num_tokens = 0
