"""The engine: the only owner of the model. One worker thread runs schedule -> run -> postprocess.

Callers on any thread ``submit()`` token ids and sampling params and get ``TokenEvent``s through the
sink they pass (called on the engine thread; it must not block). Everything that reaches the engine
thread goes through one inbox, so adds, aborts and session releases are applied between steps, in
order: a cancel takes effect within one step.
"""
from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from engine.block_manager import BlockManager
from engine.model_runner import ModelRunner, PagedModel
from engine.request import EventSink, FinishReason, Request, RequestStatus, SamplingParams, TokenEvent
from engine.sampler import Sampler
from engine.structured import MaskBatch, masked_logits
from engine.scheduler import Scheduler, Step

log = logging.getLogger(__name__)


class EngineError(Exception):
    """Base of the errors ``submit()`` raises synchronously."""


class ContextLengthExceeded(EngineError):
    def __init__(self, prompt_tokens: int, max_context: int) -> None:
        super().__init__(f"prompt has {prompt_tokens} tokens; the context holds {max_context} "
                         f"(prompt plus at least one new token)")
        self.prompt_tokens, self.max_context = prompt_tokens, max_context


class EngineOverloaded(EngineError):
    pass


class EngineStopped(EngineError):
    pass


@dataclass(frozen=True)
class EngineConfig:
    max_running: int = 32  # sequences decoded together in one step
    max_context: int = 4096  # prompt + generated tokens of one sequence
    block_size: int = 64
    kv_cache_bytes: int = 1 << 30  # KV pool size, unless num_blocks is given
    num_blocks: int = 0
    prefill_chunk: int = 2048  # prompt tokens per prefill step (all its requests together, padding included)
    max_queue: int = 256  # requests waiting for a slot before submit() refuses more
    cuda_graphs: bool = True  # replay decode steps as CUDA graphs (on CUDA devices)
    static_decode: bool = False  # CPU tests: run decode through the padded static buffers graphs use


class Engine:
    def __init__(self, model: PagedModel, config: EngineConfig) -> None:
        self.model = model
        self.config = config
        bs = config.block_size
        num_blocks = config.num_blocks or config.kv_cache_bytes // (model.kv_bytes_per_token() * bs) + 1
        self.blocks = BlockManager(num_blocks, bs)
        self.max_context = min(config.max_context, self.blocks.num_usable * bs)
        if self.max_context < config.max_context:
            log.warning("KV cache holds %d tokens: max context lowered from %d", self.max_context,
                        config.max_context)
        self.runner = ModelRunner(model, self.blocks, max_blocks_per_seq=self.blocks.blocks_for(self.max_context),
                                  max_batch=config.max_running, cuda_graphs=config.cuda_graphs,
                                  static_decode=config.static_decode)
        self.scheduler = Scheduler(self.blocks, config.max_running, config.prefill_chunk)
        self.sampler = Sampler(model.vocab_size, config.max_running, model.device)
        self.masks = MaskBatch(model.vocab_size, config.max_running, model.device)  # rows with a grammar
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0
        self._thread: threading.Thread | None = None
        self.dead_reason: str | None = None
        self.steps = 0
        self.on_step: Callable[[str, int, float], None] | None = None  # (kind, batch size, seconds), engine thread
        log.info("engine: %d KV blocks x %d tokens (%.2f GiB), max context %d, max batch %d", num_blocks, bs,
                 num_blocks * bs * model.kv_bytes_per_token() / 2**30, self.max_context, config.max_running)

    # ---- any thread ----------------------------------------------------------------------------------
    def start(self) -> None:
        # The engine thread needs the GIL back quickly between forward passes while the event loop streams
        # tokens; the default 5 ms switch interval can cost that much per step (measured: halves the
        # transport overhead per token on a CPU).
        if sys.getswitchinterval() > 0.001:
            sys.setswitchinterval(0.001)
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._inbox.put(("stop", None))
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead_reason is None

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: EventSink,
               session_key: str | None = None, cache_salt: str = "") -> str:
        """Queue a request; returns its id. Raises ContextLengthExceeded, EngineOverloaded, EngineStopped.
        Its prompt shares cached KV blocks only with requests of the same ``cache_salt``."""
        if not prompt_ids:
            raise ValueError("empty prompt")
        vocab = self.model.vocab_size
        if not all(0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(prompt_ids) >= self.max_context:
            raise ContextLengthExceeded(len(prompt_ids), self.max_context)
        req = Request(list(prompt_ids), params, sink, session_key, cache_salt=cache_salt)
        req.max_tokens = min(len(prompt_ids) + params.max_new_tokens, self.max_context)
        with self._lock:
            if not self.alive:
                raise EngineStopped(self.dead_reason or "engine is not running")
            if self._queued >= self.config.max_queue:
                raise EngineOverloaded(f"{self._queued} requests are waiting")
            self._queued += 1
            self._inbox.put(("add", req))
        return req.request_id

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def release_session(self, session_key: str) -> None:
        """Forget a session's warm KV tail (its shared full blocks stay cached until evicted)."""
        self._inbox.put(("release", session_key))

    def stats(self) -> dict[str, int]:
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "queued": self._queued, "kv_blocks_total": self.blocks.num_usable,
                "kv_blocks_used": self.blocks.num_in_use, "steps": self.steps}

    # ---- engine thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._drain(block=not self.scheduler.has_work):
                if self.scheduler.has_work:
                    self.step()
            self._fail_all(FinishReason.CANCELLED, None)
        except BaseException as exc:  # the loop itself broke: nobody may wait forever
            log.exception("engine thread died")
            with self._lock:
                self.dead_reason = f"engine failure: {exc!r}"
            self._fail_all(FinishReason.ERROR, self.dead_reason)

    def _drain(self, block: bool) -> bool:
        """Apply inbox messages; False when asked to stop."""
        while True:
            try:
                kind, arg = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if kind == "stop":
                return False
            if kind == "add":
                self.scheduler.add(arg)
            elif kind == "abort":
                req = self.scheduler.find(arg)
                if req is not None:
                    self._finish(req, FinishReason.CANCELLED)
            elif kind == "release":
                self.blocks.drop_tail(arg)

    def step(self) -> None:
        for req in self.scheduler.admit():
            if req.queued:  # first admission: what the prompt found in the cache (not a re-admission's)
                req.cached_tokens = req.num_computed
            self._dequeue(req)
            try:
                self.sampler.start_row(req.row, req.tokens, req.output_ids)
                if req.params.grammar is not None and req.matcher is None:  # kept across preemption
                    req.matcher = req.params.grammar.matcher()
                if req.params.seed is not None and req.generator is None:
                    req.generator = self.sampler.make_generator(req.params.seed)
            except Exception as exc:
                log.exception("could not start %s", req.request_id)
                self._finish(req, FinishReason.ERROR, error=f"could not start the request: {exc!r}")
        step, _preempted = self.scheduler.schedule()
        if step is None:
            return
        self.steps += 1
        sampled = [i for i in range(len(step.requests)) if step.completes(i)]
        started = time.perf_counter()
        try:
            tokens = self._execute(step, sampled)
        except Exception as exc:  # fails this step's requests only; the engine goes on
            log.exception("forward step failed (%d requests)", len(step.requests))
            if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()  # give back what the failed step held before the next one
            for req in step.requests:
                self._finish(req, FinishReason.ERROR, error=f"generation failed: {exc!r}")
            return
        if self.on_step is not None:
            try:
                self.on_step("prefill" if step.is_prefill else "decode", len(step.requests),
                             time.perf_counter() - started)
            except Exception:
                log.exception("on_step hook failed")
        for i, req in enumerate(step.requests):
            req.num_computed += step.tokens_of(i)
            self.blocks.on_computed(req)
        for i, token in zip(sampled, tokens):
            self._append(step.requests[i], token)

    def _execute(self, step: Step, sampled: list[int]) -> list[int]:
        reqs = step.requests
        if step.is_prefill:
            logits = self.runner.prefill(reqs, step.counts)
        else:
            logits = self.runner.decode(reqs)
        if not sampled:
            return []
        if len(sampled) < len(reqs):
            logits = logits[sampled]
        rows = [reqs[i] for i in sampled]
        # Grammar masks are filled on the CPU (llguidance's threads, no GIL) while the device still runs the
        # step: nothing above waited for it. Rows without a grammar pay nothing; a step without any, not even this.
        bitmask = self.masks.fill([r.matcher for r in rows])
        if bitmask is not None:
            logits = masked_logits(logits, bitmask)
        return self.sampler.sample(logits, [r.row for r in rows], [r.params for r in rows],
                                   [r.generator for r in rows])

    def _append(self, req: Request, token: int) -> None:
        params = req.params
        # A matcher fails when its mask could not be computed (a lexer limit) or refuses what its mask allowed.
        if req.matcher is not None and (req.matcher.error or not req.matcher.accept(token)):
            self._finish(req, FinishReason.ERROR, error=f"structured output failed: {req.matcher.error}")
            return
        if token in params.stop_token_ids and not params.ignore_eos:
            self._finish(req, FinishReason.STOP, completion=req.num_output_tokens + 1)
            return
        req.tokens.append(token)
        if req.matcher is not None and req.matcher.done:  # the grammar is complete: only a stop token could follow
            self._finish(req, FinishReason.STOP, (token,))
        elif req.num_output_tokens >= params.max_new_tokens or req.num_tokens >= req.max_tokens:
            self._finish(req, FinishReason.LENGTH, (token,))
        else:
            self._emit(req, (token,), None, None, req.num_output_tokens)

    def _finish(self, req: Request, reason: FinishReason, token_ids: tuple[int, ...] = (),
                error: str | None = None, completion: int | None = None) -> None:
        self._dequeue(req)
        if req.status is not RequestStatus.FINISHED:
            self.scheduler.remove(req, keep_tail=reason is not FinishReason.ERROR)
            req.status = RequestStatus.FINISHED
        self._emit(req, token_ids, reason, error, req.num_output_tokens if completion is None else completion)

    def _dequeue(self, req: Request) -> None:
        if req.queued:
            req.queued = False
            with self._lock:
                self._queued -= 1

    def _emit(self, req: Request, token_ids: tuple[int, ...], reason: FinishReason | None, error: str | None,
              completion: int) -> None:
        event = TokenEvent(req.request_id, token_ids, reason, error, req.num_prompt_tokens, req.cached_tokens,
                           completion)
        try:
            req.sink(event)
        except Exception:  # a consumer's failure must not take the engine down
            log.exception("event sink failed for %s", req.request_id)

    def _fail_all(self, reason: FinishReason, error: str | None) -> None:
        with self._lock:
            self.dead_reason = self.dead_reason or "engine stopped"
        pending = list(self.scheduler.running) + list(self.scheduler.waiting)
        while True:
            try:
                kind, arg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                pending.append(arg)
        for req in pending:
            req.status = RequestStatus.FINISHED
            self._dequeue(req)
            self._emit(req, (), reason, error, req.num_output_tokens)
