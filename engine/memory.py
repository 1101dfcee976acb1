"""How much GPU memory the KV cache may take: what is free once the largest step and the decode graphs are
provided for, both measured (not guessed) by running those shapes once against a tiny KV pool first."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.block_manager import BlockManager
from engine.model_runner import ModelRunner, PagedModel, scratch_step
from engine.request import SamplingParams
from engine.sampler import Sampler
from engine.structured import bitmask_words, unpack_bitmask

log = logging.getLogger(__name__)

MARGIN = 256 * 2**20  # allocator fragmentation, cuBLAS workspaces, the graphs' own bookkeeping
FRACTION = 0.9  # of what is left after the measured needs


@dataclass(frozen=True)
class StepMemory:
    """Peak bytes the allocator handed out above the weights and caches."""

    step_bytes: int  # the largest eager step (prompt chunks and a full batch of decodes) with its sampling
    graph_bytes: int  # one decode step at the largest batch: what the shared graph pool holds


def _peak(fn) -> int:
    if not torch.cuda.is_available():
        fn()
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def profile(model: PagedModel, max_rows: int, max_step_tokens: int, block_size: int, attention: str) -> StepMemory:
    """Run the largest step and the largest decode step once (a 2-block pool: every token in the scratch block)."""
    blocks = BlockManager(2, block_size)
    runner = ModelRunner(model, blocks, max_blocks_per_seq=blocks.blocks_for(max_step_tokens + 1), max_rows=max_rows,
                         max_step_tokens=max_step_tokens, attention=attention, cuda_graphs=False)
    sampler = Sampler(model.vocab_size, max_rows, model.device)
    worst = SamplingParams(temperature=1.0, top_p=0.9, min_p=0.01, repetition_penalty=1.1, presence_penalty=0.5)
    for row in range(max_rows):  # every sampling feature on, top_k 0: a full sort of the vocabulary
        sampler.start_row(row, worst, [0], seed=row)
    big = scratch_step([1] * (max_rows - 1) + [max(1, max_step_tokens - (max_rows - 1))], block_size)
    decode = scratch_step([1] * max_rows, block_size)
    for req in big.requests:
        runner.start_row(req)

    def largest() -> None:  # every row under a grammar too: its mask unpacked on the device
        logits, inputs = runner.run(big)
        bitmask = torch.full((len(inputs.sample_host_rows), bitmask_words(model.vocab_size)), -1, dtype=torch.int32,
                             device=model.device)
        sampler.sample(logits, inputs.sample_rows, inputs.sample_host_rows, unpack_bitmask(bitmask, model.vocab_size))

    step_bytes = _peak(largest)
    graph_bytes = _peak(lambda: runner.run(decode))
    del runner, sampler
    model.allocate_kv_cache(0)
    return StepMemory(step_bytes, graph_bytes)


def free_gpu_bytes() -> int:
    """Free device memory, after the caching allocator gives back what loading and profiling freed."""
    torch.cuda.empty_cache()
    free, _total = torch.cuda.mem_get_info()
    return free


def kv_budget(free: int, needs: StepMemory) -> int:
    """KV cache bytes: what is free minus the measured step and graph needs and a margin, times FRACTION."""
    return max(0, int((free - needs.step_bytes - needs.graph_bytes - MARGIN) * FRACTION))


def auto_kv_cache_bytes(model: PagedModel, max_rows: int, max_step_tokens: int, block_size: int,
                        attention: str) -> int:
    needs = profile(model, max_rows, max_step_tokens, block_size, attention)
    free = free_gpu_bytes()
    budget = kv_budget(free, needs)
    log.info("KV cache: %.2f GiB (free %.2f GiB; largest step %.0f MiB, decode graphs ~%.0f MiB measured)",
             budget / 2**30, free / 2**30, needs.step_bytes / 2**20, needs.graph_bytes / 2**20)
    return budget
