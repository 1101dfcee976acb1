"""Decides what the next engine step computes.

Mixed steps (the default, vLLM v1's shape): every step carries one decode token for each running sequence that
is generating, then chunks of the prompts still being prefilled, oldest first, up to a token budget, so a new
prompt never stops the running streams; it only makes their steps a little longer. A prompt gets at most
``prefill_chunk`` tokens per step, so one long prompt cannot take the whole budget from those behind it; when no
sequence is decoding, the step's budget is ``prefill_chunk`` (nobody is waiting on its latency).

Alternating steps (``mixed=False``, kept for comparison and A/B runs): a step is either prefill chunks only or
decodes only, and the two alternate while both are pending.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.block_manager import BlockManager
from engine.request import Request, RequestStatus


@dataclass(frozen=True)
class Step:
    """One forward pass: ``counts[i]`` tokens of ``requests[i]``. Sequences with one token come first
    (``num_decode`` of them: decodes, and prompts down to their last token)."""

    requests: list[Request]
    counts: list[int]

    @property
    def num_decode(self) -> int:
        n = 0
        for c in self.counts:
            if c != 1:
                break
            n += 1
        return n

    @property
    def num_tokens(self) -> int:
        return sum(self.counts)

    @property
    def kind(self) -> str:
        """"decode" (one token per sequence), "prefill" (prompt chunks only) or "mixed"."""
        decodes = sum(1 for r, c in zip(self.requests, self.counts) if c == r.num_pending == 1)
        return "decode" if decodes == len(self.requests) else "prefill" if decodes == 0 else "mixed"

    def completes(self, i: int) -> bool:
        """Whether request i's tokens end at its last token this step (so a token is sampled for it)."""
        return self.counts[i] == self.requests[i].num_pending


class Scheduler:
    def __init__(self, blocks: BlockManager, max_running: int, prefill_chunk: int, max_step_tokens: int,
                 mixed: bool = True) -> None:
        self.blocks = blocks
        self.max_running = max_running
        self.prefill_chunk = prefill_chunk  # prompt tokens of one sequence per step; a step's budget when alone
        self.max_step_tokens = max_step_tokens  # tokens per step while sequences are decoding
        self.mixed = mixed
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
            if req.in_flight:  # preempted while its token was in flight: admitted once that token is known
                break
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
        decodes = [r for r in self.running if r.num_pending == 1 and not (r.in_flight and r.at_limit)]
        if not self.mixed and prefills and (not decodes or self._last_was_decode):
            self._last_was_decode = False
            return self._chunks([], prefills, self.prefill_chunk), []
        preempted = self._make_room(decodes)
        if preempted:
            decodes = [r for r in decodes if r.status is RequestStatus.RUNNING]
            prefills = [r for r in prefills if r.status is RequestStatus.RUNNING]
        if not self.mixed:
            self._last_was_decode = bool(decodes)
            return (Step(decodes, [1] * len(decodes)) if decodes else None), preempted
        budget = self.max_step_tokens - len(decodes) if decodes else self.prefill_chunk
        step = self._chunks(decodes, prefills, budget)
        return (step if step.requests else None), preempted

    def _make_room(self, decodes: list[Request]) -> list[Request]:
        """Give every decoding sequence the slot its next token needs, preempting the newest if the pool is dry."""
        preempted: list[Request] = []
        for req in decodes:
            if req.status is not RequestStatus.RUNNING:
                continue
            while not self.blocks.ensure_slot(req):
                victim = self.running[-1]
                self.preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
        return preempted

    def _chunks(self, decodes: list[Request], prefills: list[Request], budget: int) -> Step:
        """Decodes, then the oldest prompts' next chunks while the budget lasts."""
        requests, counts = list(decodes), [1] * len(decodes)
        for req in prefills:
            if budget <= 0:
                break
            n = min(req.num_pending, self.prefill_chunk, budget)
            requests.append(req)
            counts.append(n)
            budget -= n
        return Step(requests, counts)

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
        req.num_computed = min(req.num_computed, len(req.tokens))  # KV of a token never known is not kept
        self.blocks.free(req, keep_tail=keep_tail)
        self.free_rows.append(req.row)
        req.row = -1
