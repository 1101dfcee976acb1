"""Turns scheduled requests into the tensors a paged model runs on. Runs tensors; decides nothing."""
from __future__ import annotations

from typing import Protocol

import torch

from engine.block_manager import SCRATCH_BLOCK, BlockManager
from engine.cuda_graphs import DecodeGraphs
from engine.request import Request


class PagedModel(Protocol):
    """What the engine needs from a model: a forward pass over a paged KV cache it owns."""

    vocab_size: int
    device: torch.device

    def kv_bytes_per_token(self) -> int: ...

    def allocate_kv_cache(self, num_slots: int) -> None: ...

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                block_table: torch.Tensor, block_size: int) -> torch.Tensor: ...


def bucket(n: int, cap: int) -> int:
    """Round up to a power of two (fewer distinct shapes: fewer CUDA graphs, reusable kernels)."""
    return min(cap, 1 << max(0, n - 1).bit_length())


class ModelRunner:
    def __init__(self, model: PagedModel, blocks: BlockManager, max_blocks_per_seq: int, max_batch: int,
                 cuda_graphs: bool = True, static_decode: bool = False) -> None:
        self.model = model
        self.blocks = blocks
        self.block_size = blocks.block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.device = model.device
        model.allocate_kv_cache(blocks.num_blocks * blocks.block_size)
        self.graphs: DecodeGraphs | None = None
        if static_decode or (cuda_graphs and str(self.device).startswith("cuda")):
            self.graphs = DecodeGraphs(model, self.block_size, max_batch, max_blocks_per_seq, use_graphs=cuda_graphs)

    def _tensor(self, rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)

    def _block_table(self, reqs: list[Request], num_blocks: int) -> torch.Tensor:
        return self._tensor([(r.block_ids + [SCRATCH_BLOCK] * num_blocks)[:num_blocks] for r in reqs])

    def _context_blocks(self, ends: list[int]) -> int:
        return bucket(self.blocks.blocks_for(max(ends)), self.max_blocks_per_seq)

    def prefill(self, reqs: list[Request], counts: list[int]) -> torch.Tensor:
        """Compute KV for the next ``counts[i]`` pending tokens of each request; logits of each row's last [k, V].

        Rows are left-padded to the longest chunk (padding: token 0 at position 0, written to the scratch
        block), so every row's last real token is the batch's last position.
        """
        width = max(counts)
        ids, positions, slots = [], [], []
        for req, n in zip(reqs, counts):
            start, pad = req.num_computed, width - n
            pos = list(range(start, start + n))
            ids.append([0] * pad + req.tokens[start:start + n])
            positions.append([0] * pad + pos)
            slots.append([SCRATCH_BLOCK] * pad + [self.blocks.slot(req, p) for p in pos])
        nb = self._context_blocks([r.num_computed + n for r, n in zip(reqs, counts)])
        return self.model.forward(self._tensor(ids), self._tensor(positions), self._tensor(slots),
                                  self._block_table(reqs, nb), self.block_size)

    def decode(self, reqs: list[Request]) -> torch.Tensor:
        """One token per request (each request's last token); logits [B, V]."""
        positions = [r.num_computed for r in reqs]
        slots = [self.blocks.slot(r, p) for r, p in zip(reqs, positions)]
        ids = [r.tokens[-1] for r in reqs]
        nb = self._context_blocks([p + 1 for p in positions])
        if self.graphs is not None:
            return self.graphs.run(ids, positions, slots, [r.block_ids for r in reqs], nb)
        return self.model.forward(self._tensor([[t] for t in ids]), self._tensor([[p] for p in positions]),
                                  self._tensor([[s] for s in slots]), self._block_table(reqs, nb), self.block_size)
