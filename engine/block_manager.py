"""Paged KV-cache bookkeeping: which block holds which tokens, and which blocks can be reused.

Blocks are ``block_size`` token slots in one device pool. A block that a finished request fully
computed keeps its content and a SHA-256 chained over (previous block's digest, its tokens), the first
block's salted with the request's ``cache_salt``: a later request with the same salt whose prompt starts
with the same tokens reuses it (prefix caching, across turns and across sessions of one API key; another
key's salt never matches, so it cannot probe which prompts are cached).
The last, partial block of a finished request is kept for its session as a *tail*, so the session's
next turn (or the continuation after a tool result) recomputes nothing it already computed.
Unreferenced blocks are evicted least recently used first; tails after them. Block 0 is a scratch
block that padding rows write into and never holds data.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from engine.request import Request

SCRATCH_BLOCK = 0


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Tail:
    block_id: int
    index: int  # position of the block in its sequence
    parent_hash: bytes | None
    token_ids: tuple[int, ...]


def chain_hash(parent: bytes | None, token_ids: tuple[int, ...], salt: str = "") -> bytes:
    """SHA-256 of (the previous block's digest, or for a first block the salt; this block's token ids).

    Cryptographic, so nobody can craft two prefixes with one digest (Python's ``hash`` of ints can be
    collided at will: vLLM's GHSA-rm76-4mrf-v9r8); a hit still compares the block's own tokens."""
    h = hashlib.sha256()
    if parent is None:
        encoded = salt.encode("utf-8", "surrogatepass")
        h.update(b"\x00" + len(encoded).to_bytes(4, "big") + encoded)
    else:
        h.update(b"\x01" + parent)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def _common_prefix(a: tuple[int, ...] | list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.empty: list[int] = list(range(num_blocks - 1, SCRATCH_BLOCK, -1))  # pop() from the end
        self.cached: OrderedDict[int, None] = OrderedDict()  # free blocks that keep reusable content, LRU first
        self.hash_to_block: dict[bytes, int] = {}
        self.tails: OrderedDict[str, Tail] = OrderedDict()  # session -> its partial last block, LRU first

    # ---- capacity -------------------------------------------------------------------------------
    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_reclaimable(self) -> int:
        """Blocks that an allocation can obtain now, evicting cached content if it must."""
        return len(self.empty) + len(self.cached) + len(self.tails)

    @property
    def num_in_use(self) -> int:
        return self.num_usable - len(self.empty) - len(self.cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- allocation -------------------------------------------------------------------------------
    def allocate(self, req: Request, reserve: int = 0) -> bool:
        """Give ``req`` blocks for all its tokens, reusing cached ones, leaving ``reserve`` blocks spare.

        Returns False, changing nothing, when they don't fit."""
        bs, tokens = self.block_size, req.tokens
        limit = len(tokens) - 1  # the last token is always computed: its logits are needed
        hits: list[int] = []
        hashes: list[bytes] = []
        parent: bytes | None = None
        for i in range(limit // bs):
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            h = chain_hash(parent, chunk, req.cache_salt)
            bid = self.hash_to_block.get(h)
            if bid is None or self.blocks[bid].token_ids != chunk:
                break
            hits.append(bid)
            hashes.append(h)
            parent = h
        cached = len(hits) * bs
        tail = self.tails.get(req.session_key) if req.session_key is not None else None
        tail_common = 0
        if tail is not None and tail.index == len(hits) and tail.parent_hash == parent:
            tail_common = min(_common_prefix(tail.token_ids, tokens[cached:cached + bs]), limit - cached)
        needed = self.blocks_for(len(tokens)) - len(hits) - (1 if tail_common > 0 else 0)
        spare = self.num_reclaimable - sum(1 for b in hits if self.blocks[b].ref_count == 0)
        spare -= 1 if tail_common > 0 else 0
        if needed + reserve > spare:
            return False
        for bid in hits:
            self._ref(bid)
        req.block_ids = hits
        req.block_hashes = hashes
        if tail_common > 0:
            del self.tails[req.session_key]
            req.block_ids.append(tail.block_id)
            cached += tail_common
        for _ in range(needed):
            req.block_ids.append(self._take())
        req.num_computed = cached
        return True

    def ensure_slot(self, req: Request) -> bool:
        """Make sure the block for the next token to compute exists (decode growth)."""
        if (req.num_tokens - 1) // self.block_size < len(req.block_ids):
            return True
        if self.num_reclaimable == 0:
            return False
        req.block_ids.append(self._take())
        return True

    def slot(self, req: Request, position: int) -> int:
        """Flat index in the KV pool of the token at ``position`` of ``req``."""
        return req.block_ids[position // self.block_size] * self.block_size + position % self.block_size

    def on_computed(self, req: Request) -> None:
        """Register blocks that ``req`` has just filled completely so that others can reuse them."""
        bs = self.block_size
        # (async scheduling: a computed position may hold a token still in flight; it is hashed once known)
        while len(req.block_hashes) < min(req.num_computed, len(req.tokens)) // bs:
            i = len(req.block_hashes)
            chunk = tuple(req.tokens[i * bs:(i + 1) * bs])
            h = chain_hash(req.block_hashes[-1] if req.block_hashes else None, chunk, req.cache_salt)
            req.block_hashes.append(h)
            block = self.blocks[req.block_ids[i]]
            if block.hash is None and h not in self.hash_to_block:
                block.hash, block.token_ids = h, chunk
                self.hash_to_block[h] = block.block_id

    def free(self, req: Request, keep_tail: bool = True) -> None:
        """Release ``req``'s blocks. Its partial last block becomes its session's tail if ``keep_tail``."""
        bs = self.block_size
        if keep_tail:  # (async scheduling: the step that computed its last blocks may not have been completed yet)
            self.on_computed(req)
        last_full = req.num_computed // bs
        for idx, bid in enumerate(req.block_ids):
            partial = idx == last_full and req.num_computed > idx * bs
            if partial and keep_tail and req.session_key is not None:
                parent = req.block_hashes[idx - 1] if idx > 0 else None
                self.drop_tail(req.session_key)
                self.tails[req.session_key] = Tail(bid, idx, parent, tuple(req.tokens[idx * bs:req.num_computed]))
                continue
            self._unref(bid)
        req.block_ids = []
        req.block_hashes = []

    def drop_tail(self, session_key: str) -> None:
        tail = self.tails.pop(session_key, None)
        if tail is not None:
            self._unref(tail.block_id)

    # ---- internals -------------------------------------------------------------------------------
    def _ref(self, bid: int) -> None:
        block = self.blocks[bid]
        if block.ref_count == 0:
            self.cached.pop(bid, None)
        block.ref_count += 1

    def _unref(self, bid: int) -> None:
        block = self.blocks[bid]
        block.ref_count -= 1
        if block.ref_count > 0:
            return
        if block.hash is None:
            self.empty.append(bid)
        else:
            self.cached[bid] = None

    def _take(self) -> int:
        if not self.empty and not self.cached and self.tails:
            _, tail = self.tails.popitem(last=False)
            self._unref(tail.block_id)
        if self.empty:
            bid = self.empty.pop()
        else:
            bid, _ = self.cached.popitem(last=False)
            block = self.blocks[bid]
            if self.hash_to_block.get(block.hash) == bid:
                del self.hash_to_block[block.hash]
            block.hash, block.token_ids = None, ()
        self.blocks[bid].ref_count = 1
        return bid
