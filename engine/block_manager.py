"""Paged KV cache bookkeeping: a pool of fixed-size blocks, per-sequence block tables, and the
prefix cache.

Only ids live here; the tensors are in `ModelRunner`. One block table per
sequence indexes every pool that holds one entry per target position (the
target KV and the DSpark drafter's context features), so growing, truncating,
sharing or freeing a table keeps all pools consistent by construction.

Prefix caching (on by default, `--no-enable-prefix-caching` turns it off): a full block of
prompt tokens is named by a chain hash of its tokens, its parent block's hash and a salt
(model, dtype, quantization). Blocks carry reference counts; a block whose count drops to
zero keeps its contents and its hash in an LRU pool of free-but-cached blocks, and is
evicted (its hash forgotten) only when an allocation needs it. A request admitted with no
blocks (new, or preempted and resumed) takes the longest chain of cached blocks that covers
its tokens, up to one token short of them all (the step must still compute a token to sample
from), and starts computing after them.

What is cached, and why that keeps output exact: only blocks whose tokens were all prompt
tokens of the request that computed them. Their KV and drafter context were computed by
prompt rows (the dense weights, models/quant.py), exactly as a prefill of the same tokens
would compute them, so a hit feeds the model the same numbers a miss would. A block holding
generated tokens is computed by the packed kernels instead (a different rounding); it is not
cached, and a later turn of the conversation recomputes it as part of its prompt (and caches
it then). A shared block is never written: it lies wholly before the sharer's computed
count, and speculative rollback (`truncate`) never reaches back past that count.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque


class NoFreeBlocks(RuntimeError):
    pass


class BlockAllocator:
    """Block ids with reference counts. Free blocks are either plain (`_free`) or still hold a
    cached prefix (`_cached_free`, least recently freed first); both count as free."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._cached_free: OrderedDict[int, None] = OrderedDict()
        self._refs: dict[int, int] = {}  # blocks in use -> number of tables holding them
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self.evictions = 0

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._cached_free)

    @property
    def num_used(self) -> int:
        return len(self._refs)

    @property
    def num_cached(self) -> int:
        """Blocks that hold a cached prefix (in use or free)."""
        return len(self._block_of)

    def refcount(self, block: int) -> int:
        return self._refs.get(block, 0)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise NoFreeBlocks(f"asked for {n} blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:  # evict the least recently freed cached block
                b, _ = self._cached_free.popitem(last=False)
                del self._block_of[self._hash_of.pop(b)]
                self.evictions += 1
            self._refs[b] = 1
            out.append(b)
        return out

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block. Freed in reverse so that a sequence's last blocks are
        evicted before its first ones (a prefix stays reusable longest)."""
        for b in reversed(blocks):
            refs = self._refs.get(b)
            if refs is None:
                raise RuntimeError(f"double free of KV block {b}")
            if refs > 1:
                self._refs[b] = refs - 1
                continue
            del self._refs[b]
            if b in self._hash_of:
                self._cached_free[b] = None
            else:
                self._free.append(b)

    # ------------------------------------------------------------ the prefix cache

    def lookup(self, h: bytes) -> int | None:
        return self._block_of.get(h)

    def acquire(self, block: int) -> None:
        """Take a reference to a cached block (in use by another table, or free-but-cached)."""
        if block in self._refs:
            self._refs[block] += 1
        else:
            del self._cached_free[block]
            self._refs[block] = 1

    def register(self, block: int, h: bytes) -> None:
        """Name an in-use block by its hash (a no-op when the hash already names another block:
        two tables computed the same tokens; the second copy stays private)."""
        if h in self._block_of or block in self._hash_of:
            return
        self._hash_of[block] = h
        self._block_of[h] = block

    def drop_cache(self) -> None:
        """Forget every cached prefix (after an engine error, whose step may have left blocks half
        written); blocks in use stay in use."""
        self._free.extend(self._cached_free)
        self._cached_free.clear()
        self._hash_of.clear()
        self._block_of.clear()


class BlockTable:
    """The blocks of one sequence, how many of their slots hold tokens, and the chain hashes of
    its leading full prompt blocks (prefix caching)."""

    __slots__ = ("blocks", "num_tokens", "hashes")

    def __init__(self) -> None:
        self.blocks: list[int] = []
        self.num_tokens = 0
        self.hashes: list[bytes] = []


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False, cache_salt: str = ""):
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.prefix_caching = prefix_caching
        self._salt = hashlib.blake2b(cache_salt.encode(), digest_size=16).digest()
        self.prefix_queries = 0  # tokens looked up at admission
        self.prefix_hits = 0  # of them, tokens found cached

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
        if keep < len(table.hashes):
            raise RuntimeError("truncate would cut a cached prefix block")
        if keep < len(table.blocks):
            self.allocator.free(table.blocks[keep:])
            del table.blocks[keep:]
        table.num_tokens = num_tokens

    def free(self, table: BlockTable) -> None:
        if table.blocks:
            self.allocator.free(table.blocks)
        table.blocks = []
        table.num_tokens = 0
        table.hashes = []

    # ------------------------------------------------------------ prefix caching

    def _extend_hashes(self, hashes: list[bytes], token_ids: list[int], num_blocks: int) -> None:
        """Append the chain hashes of blocks len(hashes)..num_blocks-1 of `token_ids`."""
        bs = self.block_size
        for i in range(len(hashes), num_blocks):
            parent = hashes[-1] if hashes else self._salt
            tokens = array("q", token_ids[i * bs:(i + 1) * bs]).tobytes()
            hashes.append(hashlib.blake2b(parent + tokens, digest_size=16).digest())

    def match_prefix(self, table: BlockTable, token_ids: list[int], num_prompt_tokens: int) -> int:
        """Share the longest cached chain of full prompt blocks into an empty `table`; returns the
        tokens it covers (0 when caching is off or nothing matched). At least one token is left
        to compute. Undo with `free(table)`."""
        if not self.prefix_caching or table.blocks:
            return 0
        limit = min(len(token_ids) - 1, num_prompt_tokens) // self.block_size
        hashes: list[bytes] = []
        self._extend_hashes(hashes, token_ids, limit)
        blocks = []
        for h in hashes:
            b = self.allocator.lookup(h)
            if b is None:
                break
            blocks.append(b)
        for b in blocks:
            self.allocator.acquire(b)
        table.blocks = blocks
        table.hashes = hashes[:len(blocks)]
        table.num_tokens = len(blocks) * self.block_size
        return table.num_tokens

    def count_lookup(self, num_tokens: int, hit: int) -> None:
        self.prefix_queries += num_tokens
        self.prefix_hits += hit

    def cache_prompt_blocks(self, table: BlockTable, token_ids: list[int], num_prompt_tokens: int, upto: int) -> None:
        """Register the full prompt blocks of `table` whose tokens lie before `upto` (computed, or
        computed by this step's forward, which writes each layer's KV before any attention of
        that layer reads it: a request admitted in the same step, such as another of the n
        choices, may share them at once)."""
        if not self.prefix_caching:
            return
        n = min(upto, num_prompt_tokens) // self.block_size
        if n <= len(table.hashes):
            return
        start = len(table.hashes)
        self._extend_hashes(table.hashes, token_ids, n)
        for i in range(start, n):
            self.allocator.register(table.blocks[i], table.hashes[i])

    def drop_prefix_cache(self) -> None:
        self.allocator.drop_cache()
