"""Turns scheduled requests into the tensors a paged model runs on. Runs tensors; decides nothing."""
from __future__ import annotations

from typing import Protocol

import torch

from engine.block_manager import SCRATCH_BLOCK, BlockManager
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
    def __init__(self, model: PagedModel, blocks: BlockManager, max_blocks_per_seq: int) -> None:
        self.model = model
        self.blocks = blocks
        self.block_size = blocks.block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.device = model.device
        model.allocate_kv_cache(blocks.num_blocks * blocks.block_size)

    def _tensor(self, rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)

    def _block_table(self, reqs: list[Request], num_blocks: int) -> torch.Tensor:
        nb = bucket(num_blocks, self.max_blocks_per_seq)
        return self._tensor([(r.block_ids + [SCRATCH_BLOCK] * nb)[:nb] for r in reqs])

    def prefill(self, req: Request, num_tokens: int) -> torch.Tensor:
        """Compute KV for the next ``num_tokens`` pending tokens of ``req``; logits of the last one [1, V]."""
        start = req.num_computed
        end = start + num_tokens
        positions = list(range(start, end))
        return self.model.forward(
            self._tensor([req.tokens[start:end]]),
            self._tensor([positions]),
            self._tensor([[self.blocks.slot(req, p) for p in positions]]),
            self._block_table([req], self.blocks.blocks_for(end)),
            self.block_size,
        )

    def decode(self, reqs: list[Request]) -> torch.Tensor:
        """One token per request (each request's last token); logits [B, V]."""
        positions = [r.num_computed for r in reqs]
        return self.model.forward(
            self._tensor([[r.tokens[-1]] for r in reqs]),
            self._tensor([[p] for p in positions]),
            self._tensor([[self.blocks.slot(r, p)] for r, p in zip(reqs, positions)]),
            self._block_table(reqs, self.blocks.blocks_for(max(positions) + 1)),
            self.block_size,
        )
