"""Turns a scheduled step into the tensors a paged model runs on, and runs them. Decides nothing.

The host path is kept lean: a step's inputs (token ids, positions, slots, per-sequence lengths and rows) are
written with numpy into one pinned host buffer and sent with one non-blocking copy into a persistent device
buffer, whose views every step (and every CUDA graph) reads. The block table lives on the device, one row per
running sequence, and only its new entries are sent (a sequence's blocks only grow while it runs). Nothing here
reads the device back: the engine's one read per step is the sampled tokens.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from engine.attention import AttentionMetadata
from engine.block_manager import BlockManager
from engine.cuda_graphs import DecodeGraphs
from engine.request import Request, SamplingParams
from engine.scheduler import Step


class PagedModel(Protocol):
    """What the engine needs from a model: a forward pass over packed tokens and a paged KV cache it owns."""

    vocab_size: int
    device: torch.device

    def kv_bytes_per_token(self) -> int: ...

    def allocate_kv_cache(self, num_slots: int) -> None: ...

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor: ...


def bucket(n: int, cap: int) -> int:
    """Round up to a power of two (fewer distinct shapes: fewer CUDA graphs, reusable kernels)."""
    return min(cap, 1 << max(0, n - 1).bit_length())


def scratch_step(counts: list[int], block_size: int) -> Step:
    """A step of sequences living in the scratch block only (rows 0, 1, ...), ``counts[i]`` tokens each and every
    one completing: for profiling and warming up (what it writes lands in the scratch block)."""
    reqs = []
    for row, n in enumerate(counts):
        req = Request([0] * (n + 1), SamplingParams(), lambda event: None)
        req.row, req.num_computed = row, 1
        req.block_ids = [0] * (-(-(n + 1) // block_size))
        reqs.append(req)
    return Step(reqs, list(counts))


@dataclass
class StepInputs:
    """A prepared step: the model's inputs and which rows its logits belong to."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # [S] device: sampler rows of the sequences whose last token is in this step
    sample_host_rows: list[int]


class StepBuffers:
    """The persistent device buffer of step inputs, its two pinned host twins (alternating, so a step may be
    prepared while the previous one's copy is still in flight) and their numpy views."""

    def __init__(self, rows: int, tokens: int, device: torch.device) -> None:
        self.rows, self.tokens = rows, tokens
        fields = {"query_start": rows + 1, "seq_lens": rows, "block_rows": rows, "logits_indices": rows,
                  "sample_rows": rows, "input_ids": tokens, "positions": tokens, "slots": tokens}
        size = sum(fields.values())
        pin = device.type == "cuda"
        self.device_buf = torch.zeros(size, dtype=torch.int64, device=device)
        self.host_bufs = [torch.zeros(size, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, n in fields.items():
            self.offsets[name] = (start, start + n)
            start += n
        self.dev = {name: self.device_buf[a:b] for name, (a, b) in self.offsets.items()}
        self.flip = 0

    def host(self) -> dict[str, np.ndarray]:
        """Numpy views of the host buffer to fill for the next step."""
        self.flip ^= 1
        arr = self.host_bufs[self.flip].numpy()
        return {name: arr[a:b] for name, (a, b) in self.offsets.items()}

    def send(self) -> None:
        self.device_buf.copy_(self.host_bufs[self.flip], non_blocking=True)


class ModelRunner:
    def __init__(self, model: PagedModel, blocks: BlockManager, max_blocks_per_seq: int, max_rows: int,
                 max_step_tokens: int, attention: str, cuda_graphs: bool = True, static_decode: bool = False) -> None:
        self.model = model
        self.blocks = blocks
        self.block_size = blocks.block_size
        self.device = model.device
        self.attention = attention
        self.max_rows = max_rows
        model.allocate_kv_cache(blocks.num_blocks * blocks.block_size)
        # one row per sequence row, plus a scratch row of zeros (block 0) for padding; width a multiple of 16 so
        # the kernels' table loads are aligned
        self.table_width = -(-max_blocks_per_seq // 16) * 16
        self.block_table = torch.zeros(max_rows + 1, self.table_width, dtype=torch.int64, device=self.device)
        self.scratch_row = max_rows
        self._synced = [0] * max_rows  # table entries of each row already on the device
        self._updates = [torch.zeros(2 * self.table_width * max_rows, dtype=torch.int64,
                                     pin_memory=self.device.type == "cuda") for _ in range(2)]
        self._update_flip = 0
        self.buffers = StepBuffers(max_rows, max(max_step_tokens, max_rows), self.device)
        self.last_prepare_seconds = 0.0  # host time of the latest prepare()
        self.last_tokens: torch.Tensor | None = None  # the sampler's last token per row (inputs still in flight)
        self._fixups = [torch.zeros(2 * max_rows, dtype=torch.int64, pin_memory=self.device.type == "cuda")
                        for _ in range(2)]
        self.graphs: DecodeGraphs | None = None
        if static_decode or (cuda_graphs and self.device.type == "cuda"):
            self.graphs = DecodeGraphs(self, use_graphs=cuda_graphs)

    # ---- rows and their block tables ------------------------------------------------------------------------
    def start_row(self, req: Request) -> None:
        """``req`` has just taken its row: its whole block list goes to the device with the next step."""
        self._synced[req.row] = 0

    def _sync_tables(self, reqs: list[Request]) -> None:
        """Send the block-table entries that appeared since the last step (one copy, one scatter)."""
        width = self.table_width
        flat: list[int] = []
        values: list[int] = []
        for req in reqs:
            have, n = self._synced[req.row], len(req.block_ids)
            if n > have:
                base = req.row * width
                flat.extend(range(base + have, base + n))
                values.extend(req.block_ids[have:n])
                self._synced[req.row] = n
        if not flat:
            return
        self._update_flip ^= 1
        host = self._updates[self._update_flip]
        arr = host.numpy()
        k = len(flat)
        arr[:k] = flat
        arr[k:2 * k] = values
        dev = host[:2 * k].to(self.device, non_blocking=True)
        self.block_table.view(-1).index_copy_(0, dev[:k], dev[k:])

    # ---- a step ---------------------------------------------------------------------------------------------------
    def prepare(self, step: Step, pad_to: int = 0) -> StepInputs:
        """Fill and send the step buffers. ``pad_to`` (decode steps through graphs) adds padding sequences (token
        0 at position 0 written to the scratch block, attending to it alone) up to that many rows."""
        started = time.perf_counter()
        reqs, counts = step.requests, step.counts
        self._sync_tables(reqs)
        h = self.buffers.host()
        bs = self.block_size
        n, nd = len(reqs), step.num_decode
        rows = max(n, pad_to)
        starts = [r.num_computed for r in reqs]
        # decodes (one token each) in one pass over lists
        dec_pos = starts[:nd]
        h["input_ids"][:nd] = [r.tokens[p] if p < len(r.tokens) else 0 for r, p in zip(reqs, dec_pos)]
        in_flight = [(i, r.row) for i, (r, p) in enumerate(zip(reqs[:nd], dec_pos)) if p >= len(r.tokens)]
        h["positions"][:nd] = dec_pos
        h["slots"][:nd] = [r.block_ids[p // bs] * bs + p % bs for r, p in zip(reqs, dec_pos)]
        t = nd
        for req, start, count in zip(reqs[nd:], starts[nd:], counts[nd:]):  # prompt chunks
            pos = np.arange(start, start + count)
            blocks = np.asarray(req.block_ids[start // bs:(start + count - 1) // bs + 1], dtype=np.int64)
            h["input_ids"][t:t + count] = req.tokens[start:start + count]
            h["positions"][t:t + count] = pos
            h["slots"][t:t + count] = blocks[pos // bs - start // bs] * bs + pos % bs
            t += count
        h["input_ids"][t:t + rows - n] = 0
        h["positions"][t:t + rows - n] = 0
        h["slots"][t:t + rows - n] = 0
        qs = h["query_start"]
        qs[0] = 0
        np.cumsum(counts, out=qs[1:n + 1])
        qs[n + 1:rows + 1] = np.arange(t + 1, t + 1 + rows - n)
        h["seq_lens"][:n] = [s + c for s, c in zip(starts, counts)]
        h["seq_lens"][n:rows] = 1
        h["block_rows"][:n] = [r.row for r in reqs]
        h["block_rows"][n:rows] = self.scratch_row
        sampled = [i for i in range(n) if step.completes(i)] if not pad_to else list(range(n))
        if pad_to:  # graphs: logits of every row, padding included (the shape is the graph's)
            h["logits_indices"][:rows] = np.arange(rows)
            h["sample_rows"][:n] = h["block_rows"][:n]
        else:
            h["logits_indices"][:len(sampled)] = qs[1:n + 1][sampled] - 1
            h["sample_rows"][:len(sampled)] = h["block_rows"][:n][sampled]
        self.buffers.send()
        if in_flight:
            self._read_in_flight(in_flight)
        inputs = self._inputs(rows, t + rows - n, nd + rows - n, rows if pad_to else len(sampled), list(counts),
                              [reqs[i].row for i in sampled], max((s + c for s, c in zip(starts, counts)), default=1))
        self.last_prepare_seconds = time.perf_counter() - started
        return inputs

    def _read_in_flight(self, in_flight: list[tuple[int, int]]) -> None:
        """Decode inputs sampled by the step still running: copied on the device from the sampler's last tokens
        (stream order puts this after that step's sampling), never through the host."""
        host = self._fixups[self.buffers.flip]
        arr, k = host.numpy(), len(in_flight)
        arr[:k] = [i for i, _ in in_flight]
        arr[k:2 * k] = [row for _, row in in_flight]
        dev = host[:2 * k].to(self.device, non_blocking=True)
        self.buffers.dev["input_ids"].index_copy_(0, dev[:k], self.last_tokens[dev[k:]])

    def _inputs(self, rows: int, tokens: int, num_decode: int, num_logits: int, query_lens: list[int],
                sample_host_rows: list[int], max_seq_len: int, gather_blocks: int = 0) -> StepInputs:
        d = self.buffers.dev
        query_lens = query_lens + [1] * (rows - len(query_lens))
        width = gather_blocks or bucket(self.blocks.blocks_for(max_seq_len), self.table_width)
        meta = AttentionMetadata(self.attention, self.block_size, self.block_table, d["block_rows"][:rows],
                                 d["seq_lens"][:rows], d["query_start"][:rows + 1], d["slots"][:tokens],
                                 d["logits_indices"][:num_logits], num_decode, query_lens, gather_blocks=width)
        return StepInputs(d["input_ids"][:tokens], d["positions"][:tokens], meta,
                          d["sample_rows"][:len(sample_host_rows)], sample_host_rows)

    def warm_up(self) -> None:
        """Compile, before serving, the attention kernels of the step shapes graph capture does not run: a prompt
        chunk alone and decodes beside chunks (their launch counts are data, so these cover every later step)."""
        for counts in ([17], ([1] * min(2, self.max_rows - 1) + [17, 5])[:self.max_rows]):
            step = scratch_step(counts, self.block_size)
            for req in step.requests:
                self.start_row(req)
            self.run(step)

    def run(self, step: Step) -> tuple[torch.Tensor, StepInputs]:
        """Logits [S, V] of the sequences this step completes (``StepInputs.sample_rows`` says whose)."""
        if self.graphs is not None and step.kind == "decode" and len(step.requests) <= self.graphs.max_batch:
            return self.graphs.run(step)
        inputs = self.prepare(step)
        return self.model.forward(inputs.input_ids, inputs.positions, inputs.meta), inputs
