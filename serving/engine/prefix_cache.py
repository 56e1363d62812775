"""Which prompt prefixes the prefix cache holds: `PrefixBlockIndex`, pure Python (no JAX).

The cache keeps the KV of recent prompts in fixed-size blocks of `block_size` tokens, as vLLM's
automatic prefix caching and llama.cpp's `cache_prompt` do. The engine owns the device pool the
blocks live in (a KVCache of `capacity_tokens` positions); this index decides which block holds what.

A block is named by a digest of its tokens and of every token before it (a hash chain), so a block
matches only where the whole prefix up to its end is the same. Only full blocks are cached. The pool
has a fixed number of blocks, reused least recently used first. A lookup touches the blocks it
matched from the last to the first, so a prefix's first blocks are always the most recent of its
chain, and eviction takes the tails of chains first: a chain whose head is gone can never match.

Every decision depends only on the sequence of calls, so each process of a multi-host group, which
replays the same engine calls, keeps the same index.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np

DEFAULT_BLOCK_SIZE = 16  # tokens per block: vLLM's default block size


@dataclasses.dataclass(frozen=True)
class CachedPrefix:
    """A lookup's answer: pool block ids holding the prompt's first len(blocks) * block_size tokens,
    and the digests of the prompt's full blocks (for `add`)."""

    blocks: tuple[int, ...]
    digests: tuple[bytes, ...]

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)


class PrefixBlockIndex:
    """Maps chained block digests to pool block ids, with least-recently-used reuse."""

    def __init__(self, capacity_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE):
        if capacity_blocks <= 0 or block_size <= 0:
            raise ValueError(f"a prefix cache needs blocks (got {capacity_blocks} of {block_size} tokens)")
        self.block_size = block_size
        self.capacity = capacity_blocks
        self._by_digest: collections.OrderedDict[bytes, int] = collections.OrderedDict()  # LRU first
        self._free = list(range(capacity_blocks - 1, -1, -1))

    def __len__(self) -> int:
        return len(self._by_digest)

    @property
    def capacity_tokens(self) -> int:
        """The pool's token positions: block b holds positions b * block_size .. (b + 1) * block_size - 1."""
        return self.capacity * self.block_size

    def digests(self, tokens: Sequence[int]) -> tuple[bytes, ...]:
        """The chained digest of every full block of `tokens`."""
        ids = np.asarray(tokens, np.int64)
        chain, parent = [], b""
        for start in range(0, len(ids) - self.block_size + 1, self.block_size):
            parent = hashlib.sha256(parent + ids[start : start + self.block_size].tobytes()).digest()
            chain.append(parent)
        return tuple(chain)

    def match(self, tokens: Sequence[int]) -> CachedPrefix:
        """The longest cached prefix of `tokens` in whole blocks, leaving at least one token to
        prefill (the first generated token needs the logits of the prompt's last one)."""
        digests = self.digests(tokens)
        usable = (len(tokens) - 1) // self.block_size
        blocks = []
        for digest in digests[:usable]:
            block = self._by_digest.get(digest)
            if block is None:
                break
            blocks.append(block)
        for digest in reversed(digests[: len(blocks)]):
            self._by_digest.move_to_end(digest)
        return CachedPrefix(tuple(blocks), digests)

    def add(self, cached: CachedPrefix) -> list[tuple[int, int]]:
        """Give the prompt's full blocks after the cached ones a pool block each, evicting the least
        recently used; returns (block index in the prompt, pool block id) for each block to store.
        The blocks of `cached` itself are never evicted for its own later blocks."""
        keep = set(cached.digests[: cached.n_blocks])
        stores = []
        for index in range(cached.n_blocks, len(cached.digests)):
            digest = cached.digests[index]
            if digest not in self._by_digest:  # else stored since the lookup, by an equal prompt
                block = self._take_block(keep)
                if block is None:  # the pool is smaller than this prompt
                    break
                self._by_digest[digest] = block
                stores.append((index, block))
            keep.add(digest)
        for digest in reversed(cached.digests[: len(keep)]):
            self._by_digest.move_to_end(digest)
        return stores

    def _take_block(self, keep: set[bytes]) -> int | None:
        if self._free:
            return self._free.pop()
        for digest in self._by_digest:  # least recently used first
            if digest not in keep:
                return self._by_digest.pop(digest)
        return None
