"""Decode steps replayed as CUDA graphs, one per batch bucket.

With paged attention a decode step's shape depends only on its batch size: the context of each row is data
(``seq_lens`` and the block table, read by the kernels on the device), so one graph per batch bucket replays at
any context length. All of them are captured at start-up, largest first into one shared memory pool (the smaller
ones reuse its blocks), before the server reports ready; nothing is captured while serving. Inputs are the
runner's persistent step buffers, which padding rows fill with harmless values (token 0 at position 0, written to
and attending to the scratch block alone).

The reference attention gathers a width of context that is baked into a graph, so with it graphs are keyed by
(batch bucket, context bucket) and captured when first needed (an A/B mode, not the serving default).
On the CPU, or with graphs disabled, the same padded static-buffer path runs eagerly: what the CPU tests exercise.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.scheduler import Step

if TYPE_CHECKING:
    from engine.model_runner import ModelRunner, StepInputs

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
    return [s for s in sizes if s < max_batch] + [max_batch]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # the captured forward's output, rewritten by every replay


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, use_graphs: bool) -> None:
        self.runner = runner
        self.model = runner.model
        self.max_batch = runner.max_rows
        self.buckets = batch_buckets(runner.max_rows)
        self.use_graphs = use_graphs and torch.cuda.is_available() and runner.device.type == "cuda"
        self.by_context = runner.attention == "reference"
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.capture_seconds = 0.0
        self.pool_bytes = 0  # memory the captured graphs hold (measured around the captures)

    def batch_bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def run(self, step: Step) -> tuple[torch.Tensor, StepInputs]:
        """Logits [n, V] for a decode step of n <= max_batch rows."""
        n = len(step.requests)
        b = self.batch_bucket(n)
        inputs = self.runner.prepare(step, pad_to=b)
        if not self.use_graphs:
            return self._forward(inputs)[:n], inputs
        key = (b, inputs.meta.gather_blocks if self.by_context else 0)
        entry = self.graphs.get(key)
        if entry is None:
            if not self.by_context:
                log.warning("decode graph for batch %d was not captured at start-up: capturing it now", b)
            entry = self._capture(key, inputs)
        entry.graph.replay()
        return entry.logits[:n], inputs

    def capture_all(self) -> int:
        """Capture every batch bucket's graph (paged attention), largest first; returns how many."""
        if not self.use_graphs or self.by_context:
            return 0
        torch.cuda.synchronize()
        before = torch.cuda.memory_reserved()
        for b in reversed(self.buckets):
            if (b, 0) not in self.graphs:
                self._capture((b, 0), self.runner.prepare(Step([], []), pad_to=b))
        torch.cuda.synchronize()
        self.pool_bytes = torch.cuda.memory_reserved() - before
        log.info("captured %d decode graphs (batch buckets %s) in %.1f s, holding %.0f MiB", len(self.graphs),
                 self.buckets, self.capture_seconds, self.pool_bytes / 2**20)
        return len(self.graphs)

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        return self.model.forward(inputs.input_ids, inputs.positions, inputs.meta)

    def _capture(self, key: tuple[int, int], inputs: StepInputs) -> _Graph:
        # The warm-up runs compute the same KV for the same inputs that the replay writes again (padding rows
        # write only to the scratch block), and compile any kernel variant the graph needs.
        started = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(inputs)
        entry = self.graphs[key] = _Graph(graph, logits)
        elapsed = time.perf_counter() - started
        self.capture_seconds += elapsed
        log.info("captured decode graph batch=%d%s in %.0f ms", key[0],
                 f" context={key[1] * self.runner.block_size}" if key[1] else "", elapsed * 1000)
        return entry
