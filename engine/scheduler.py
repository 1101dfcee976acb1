"""Decides what the next engine step computes: a prefill chunk of one request, or one decode token for
every running request. Prefill of long prompts is chunked and alternates with decode steps so that a
new request never stalls the running streams for more than one chunk."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.block_manager import BlockManager
from engine.request import Request, RequestStatus


@dataclass(frozen=True)
class Step:
    """One forward pass: a prefill of ``counts[i]`` tokens of each request, or (counts None) one decode token each."""

    requests: list[Request]
    counts: list[int] | None = None

    @property
    def is_prefill(self) -> bool:
        return self.counts is not None

    def tokens_of(self, i: int) -> int:
        return 1 if self.counts is None else self.counts[i]

    def completes(self, i: int) -> bool:
        """Whether request i's tokens end at its last token this step (so a token is sampled for it)."""
        return self.tokens_of(i) == self.requests[i].num_pending


class Scheduler:
    def __init__(self, blocks: BlockManager, max_running: int, prefill_budget: int) -> None:
        self.blocks = blocks
        self.max_running = max_running
        self.prefill_budget = prefill_budget  # tokens per prefill step, padding included
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.free_rows = list(range(max_running - 1, -1, -1))
        self._last_was_decode = False

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def find(self, request_id: str) -> Request | None:
        for req in self.running:
            if req.request_id == request_id:
                return req
        for req in self.waiting:
            if req.request_id == request_id:
                return req
        return None

    def admit(self) -> list[Request]:
        """Move waiting requests into the running set while rows and KV blocks allow (FIFO)."""
        admitted = []
        while self.waiting and self.free_rows:
            req = self.waiting[0]
            # keep one block of headroom per running sequence so decodes rarely need to preempt
            if not self.blocks.allocate(req, reserve=len(self.running)):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            req.row = self.free_rows.pop()
            self.running.append(req)
            admitted.append(req)
        return admitted

    def schedule(self) -> tuple[Step | None, list[Request]]:
        """The next step, and requests preempted (sent back to waiting) to make room for it."""
        prefills = [r for r in self.running if r.num_pending > 1]
        decodes = [r for r in self.running if r.num_pending == 1]
        if prefills and (not decodes or self._last_was_decode):
            self._last_was_decode = False
            return self._prefill_step(prefills), []
        preempted: list[Request] = []
        for req in list(decodes):
            if req in preempted:
                continue
            while not self.blocks.ensure_slot(req):
                victim = self.running[-1]
                self.preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
        decodes = [r for r in decodes if r not in preempted]
        self._last_was_decode = bool(decodes)
        return (Step(decodes) if decodes else None), preempted

    def _prefill_step(self, prefills: list[Request]) -> Step:
        """Chunks of the oldest prefilling requests; rows are padded to the longest, so the padded total
        (rows x longest chunk) stays within the budget."""
        chosen: list[Request] = []
        counts: list[int] = []
        for req in prefills:
            n = min(req.num_pending, self.prefill_budget)
            if chosen and (len(chosen) + 1) * max(n, *counts) > self.prefill_budget:
                break
            chosen.append(req)
            counts.append(n)
        return Step(chosen, counts)

    def preempt(self, req: Request) -> None:
        """Give up ``req``'s KV (its full blocks stay cached) and requeue it to be recomputed first."""
        self.remove(req, keep_tail=False)
        req.status = RequestStatus.WAITING
        req.num_computed = 0
        self.waiting.appendleft(req)

    def remove(self, req: Request, keep_tail: bool) -> None:
        """Take ``req`` out of the scheduler and free its KV blocks and row."""
        if req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
            return
        self.running.remove(req)
        self.blocks.free(req, keep_tail=keep_tail)
        self.free_rows.append(req.row)
        req.row = -1
