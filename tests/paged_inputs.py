"""Test helper: the attention metadata of one step, built by hand from per-sequence lists (what the model runner
builds from a scheduled step), so tests can call a paged model's forward pass directly."""
from __future__ import annotations

import torch

from engine.attention import AttentionMetadata


def packed_step(tables: list[list[int]], contexts: list[int], query_lens: list[int], block_size: int,
                backend: str = "reference", device: str | torch.device = "cpu",
                table_width: int = 0) -> tuple[torch.Tensor, AttentionMetadata]:
    """Positions [T] and metadata for sequences whose blocks are ``tables``, each ending this step at
    ``contexts[i]`` tokens with ``query_lens[i]`` new ones; logits are asked for every sequence's last token.
    Sequences with one token must come first (as the scheduler orders them)."""
    width = table_width or max(len(t) for t in tables)
    table = torch.zeros(len(tables) + 1, width, dtype=torch.long)
    for i, blocks in enumerate(tables):
        table[i, :len(blocks)] = torch.tensor(blocks)
    positions, slots = [], []
    for blocks, ctx, n in zip(tables, contexts, query_lens):
        for p in range(ctx - n, ctx):
            positions.append(p)
            slots.append(blocks[p // block_size] * block_size + p % block_size)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    num_decode = next((i for i, n in enumerate(query_lens) if n != 1), len(query_lens))
    t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    meta = AttentionMetadata(backend, block_size, table.to(device), t(list(range(len(tables)))), t(contexts),
                             t(starts), t(slots), t([s - 1 for s in starts[1:]]), num_decode, list(query_lens))
    return t(positions), meta
