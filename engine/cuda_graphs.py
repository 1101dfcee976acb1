"""Decode steps replayed as CUDA graphs.

A decode step has a fixed shape once its batch and attended context are bucketed, so it can be
captured once and replayed: the Python and kernel-launch overhead of ~48 layers x ~15 kernels
disappears. Inputs live in static buffers that padding rows fill with harmless values (token 0 at
position 0 writing into the scratch block). Graphs are captured lazily, the first time a
(batch bucket, context bucket) pair is needed, into one shared memory pool. On the CPU, or with
graphs disabled, the same padded static-buffer path runs eagerly: that is what the CPU tests exercise.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
    return [s for s in sizes if s < max_batch] + [max_batch]


class DecodeGraphs:
    def __init__(self, model: Any, block_size: int, max_batch: int, max_blocks: int, use_graphs: bool) -> None:
        self.model = model
        self.block_size = block_size
        self.buckets = batch_buckets(max_batch)
        self.use_graphs = use_graphs and torch.cuda.is_available() and str(model.device).startswith("cuda")
        dev = model.device
        self.input_ids = torch.zeros(max_batch, 1, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_batch, 1, dtype=torch.long, device=dev)
        self.slots = torch.zeros(max_batch, 1, dtype=torch.long, device=dev)
        self.block_table = torch.zeros(max_batch, max_blocks, dtype=torch.long, device=dev)
        self.logits = torch.zeros(max_batch, model.vocab_size, dtype=torch.float32, device=dev)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.capture_seconds = 0.0

    def batch_bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def run(self, ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]],
            num_blocks: int) -> torch.Tensor:
        """Logits [n, V] for one decode token per row; ``tables`` rows hold at least ``num_blocks`` entries."""
        n = len(ids)
        b = self.batch_bucket(n)
        pad = b - n
        host = torch.tensor([ids + [0] * pad, positions + [0] * pad, slots + [0] * pad], dtype=torch.long)
        self.input_ids[:b, 0].copy_(host[0], non_blocking=True)
        self.positions[:b, 0].copy_(host[1], non_blocking=True)
        self.slots[:b, 0].copy_(host[2], non_blocking=True)
        table = torch.tensor([(row + [0] * num_blocks)[:num_blocks] for row in tables] + [[0] * num_blocks] * pad,
                             dtype=torch.long)
        self.block_table[:b, :num_blocks].copy_(table, non_blocking=True)
        if not self.use_graphs:
            self._step(b, num_blocks)
            return self.logits[:n]
        graph = self.graphs.get((b, num_blocks))
        if graph is None:
            graph = self._capture(b, num_blocks)
        graph.replay()
        return self.logits[:n]

    def _step(self, b: int, num_blocks: int) -> None:
        self.logits[:b].copy_(self.model.forward(self.input_ids[:b], self.positions[:b], self.slots[:b],
                                                 self.block_table[:b, :num_blocks], self.block_size))

    def _capture(self, b: int, num_blocks: int) -> torch.cuda.CUDAGraph:
        # The warm-up runs compute the same KV for the same (real) inputs that the replay writes again.
        started = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(b, num_blocks)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._step(b, num_blocks)
        self.graphs[(b, num_blocks)] = graph
        elapsed = time.perf_counter() - started
        self.capture_seconds += elapsed
        log.info("captured decode graph batch=%d context=%d tokens in %.0f ms (%d graphs)", b,
                 num_blocks * self.block_size, elapsed * 1000, len(self.graphs))
        return graph
