"""The engine: the only owner of the model. One worker thread runs schedule -> run -> postprocess.

Callers on any thread ``submit()`` token ids and sampling params and get ``TokenEvent``s through the
sink they pass. A step's events are handed over together, once, when the step ends (``deliver``: by default
each sink is called on the engine thread and must not block; the asyncio bridge and the engine process
replace it with one hand-off per step). Everything that reaches the engine thread goes through one inbox,
so adds, aborts and session releases are applied between steps, in order: a cancel takes effect within one
step.
"""
from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.attention import resolve_backend, self_check
from engine.block_manager import BlockManager
from engine.config import ContextLengthExceeded, EngineConfig, EngineOverloaded, EngineStopped
from engine.memory import auto_kv_cache_bytes
from engine.model_runner import ModelRunner, PagedModel
from engine.request import EventSink, FinishReason, Request, RequestStatus, SamplingParams, TokenEvent
from engine.sampler import Sampler
from engine.structured import MaskBatch, unpack_bitmask
from engine.scheduler import Scheduler, Step

log = logging.getLogger(__name__)


@dataclass
class Launched:
    """A step whose forward pass and sampling are queued on the device; its tokens have not been read yet."""

    step: Step
    kind: str
    sampled: list[Request]  # the requests a token was sampled for, in order
    tokens: torch.Tensor | None  # [len(sampled)] on the device
    started: float
    host_seconds: float  # scheduling and preparing it


@dataclass
class StepStats:
    """Where the engine thread's time goes (the benchmark reads and resets these)."""

    steps: int = 0
    seconds: float = 0.0  # whole steps
    host_seconds: float = 0.0  # scheduling, building and sending the inputs, and postprocessing
    by_kind: dict[str, int] = field(default_factory=dict)


Delivery = Callable[[list[tuple[EventSink, TokenEvent]]], None]


def call_sinks(batch: list[tuple[EventSink, TokenEvent]]) -> None:
    """The default delivery: each event to its request's sink, on the engine thread."""
    for sink, event in batch:
        try:
            sink(event)
        except Exception:  # a consumer's failure must not take the engine down
            log.exception("event sink failed for %s", event.request_id)


class Engine:
    def __init__(self, model: PagedModel, config: EngineConfig) -> None:
        self.model = model
        self.config = config
        bs = config.block_size
        self.attention = resolve_backend(config.attention, model.device)
        if self.attention == "paged" and model.device.type == "cuda":
            self._verify_paged_attention()
        step_tokens = max(config.max_step_tokens, config.prefill_chunk)
        self.sampler = Sampler(model.vocab_size, config.max_running, model.device)
        self.masks = MaskBatch(model.vocab_size, config.max_running, model.device)  # rows with a grammar
        kv_bytes = config.kv_cache_bytes
        if not config.num_blocks and not kv_bytes:  # auto: measure the largest step and the graphs, then size
            if model.device.type != "cuda":
                raise ValueError("kv_cache_bytes=0 (size the KV cache from free GPU memory) needs a CUDA device")
            kv_bytes = auto_kv_cache_bytes(model, config.max_running, step_tokens, bs, self.attention)
        num_blocks = config.num_blocks or kv_bytes // (model.kv_bytes_per_token() * bs) + 1
        self.blocks = BlockManager(num_blocks, bs)
        self.scheduler = Scheduler(self.blocks, config.max_running, config.prefill_chunk, config.max_step_tokens,
                                   config.mixed_steps)
        self.max_context = min(config.max_context, self.blocks.num_usable * bs)
        if self.max_context < config.max_context:
            log.warning("KV cache holds %d tokens: max context lowered from %d", self.max_context,
                        config.max_context)
        self.runner = ModelRunner(model, self.blocks, max_blocks_per_seq=self.blocks.blocks_for(self.max_context),
                                  max_rows=config.max_running, max_step_tokens=step_tokens,
                                  attention=self.attention, cuda_graphs=config.cuda_graphs,
                                  static_decode=config.static_decode)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0
        self._thread: threading.Thread | None = None
        self.dead_reason: str | None = None
        self.steps = 0
        self.on_step: Callable[[str, int, float], None] | None = None  # (kind, batch size, seconds), engine thread
        self.deliver: Delivery = call_sinks  # a step's events, once per step (engine thread)
        self._outbox: list[tuple[EventSink, TokenEvent]] = []
        self.runner.last_tokens = self.sampler.last
        self._in_flight: Launched | None = None  # async scheduling: the step the device is running
        self._last_done = 0.0
        self.overlapped = 0  # steps launched while the one before was still on the device
        self.step_stats = StepStats()
        log.info("engine: %d KV blocks x %d tokens (%.2f GiB), max context %d, max batch %d, %s attention, %s steps",
                 num_blocks, bs, num_blocks * bs * model.kv_bytes_per_token() / 2**30, self.max_context,
                 config.max_running, self.attention, "mixed" if config.mixed_steps else "alternating")

    # ---- any thread ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Compile the attention kernels and capture the decode graphs (CUDA, paged attention: all of them, now,
        before anything is served), then start the engine thread."""
        if self.attention == "paged" and self.model.device.type == "cuda":
            self._warm_up()
        if self.runner.graphs is not None:
            self.runner.graphs.capture_all()
        # The engine thread needs the GIL back quickly between forward passes while the event loop streams
        # tokens; the default 5 ms switch interval can cost that much per step (measured: halves the
        # transport overhead per token on a CPU).
        if sys.getswitchinterval() > 0.001:
            sys.setswitchinterval(0.001)
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def _verify_paged_attention(self) -> None:
        """Self-check the kernels on this GPU against the reference, on the model's shapes (before anything else runs
        them: the KV sizing's profile does); fall back to the reference path, with a log line saying why, rather
        than serve from kernels that fail or disagree."""
        shape = getattr(self.model, "attention_shape", None)
        why = self_check(*shape(), self.config.block_size, self.model.device) if shape is not None else None
        if why is None:
            log.info("paged attention: self-check passed")
        else:
            self._fall_back_to_reference(why)

    def _warm_up(self) -> None:
        """Compile the kernels of the step shapes graph capture does not run (so no request waits for a compile)."""
        try:
            self.runner.warm_up()
        except Exception as exc:
            self._fall_back_to_reference(f"warm-up failed: {type(exc).__name__}: {exc}")

    def _fall_back_to_reference(self, why: str) -> None:
        log.warning("paged attention not used (%s): falling back to the reference path", why)
        self.attention = "reference"
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.attention = "reference"
            if runner.graphs is not None:
                runner.graphs.by_context = True

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._inbox.put(("stop", None))
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead_reason is None

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: EventSink,
               session_key: str | None = None, cache_salt: str = "", request_id: str | None = None) -> str:
        """Queue a request; returns its id (``request_id`` if given: the caller's, unique). Raises
        ContextLengthExceeded, EngineOverloaded, EngineStopped. Its prompt shares cached KV blocks only with
        requests of the same ``cache_salt``."""
        if not prompt_ids:
            raise ValueError("empty prompt")
        vocab = self.model.vocab_size
        if not all(0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(prompt_ids) >= self.max_context:
            raise ContextLengthExceeded(len(prompt_ids), self.max_context)
        req = Request(list(prompt_ids), params, sink, session_key, cache_salt=cache_salt)
        if request_id is not None:
            req.request_id = request_id
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
        stats = {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                 "queued": self._queued, "kv_blocks_total": self.blocks.num_usable,
                 "kv_blocks_used": self.blocks.num_in_use, "steps": self.steps}
        if self.model.device.type == "cuda":  # read here: the front end may be a process that never touches CUDA
            stats["gpu_allocated_bytes"] = torch.cuda.memory_allocated(self.model.device)
            stats["gpu_reserved_bytes"] = torch.cuda.memory_reserved(self.model.device)
        return stats

    # ---- engine thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._drain(block=not self.scheduler.has_work and self._in_flight is None):
                self._flush()  # what the inbox finished (aborts)
                if self.scheduler.has_work or self._in_flight is not None:
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

    def admit(self) -> list[Request]:
        """Give waiting requests rows and KV blocks while they fit, and their rows' device state (engine thread)."""
        admitted = self.scheduler.admit()
        for req in admitted:
            if req.queued:  # first admission: what the prompt found in the cache (not a re-admission's)
                req.cached_tokens = req.num_computed
            self._dequeue(req)
            try:
                if req.noise_seed is None:
                    req.noise_seed = req.params.seed if req.params.seed is not None else self.sampler.new_seed()
                self.runner.start_row(req)
                self.sampler.start_row(req.row, req.params, req.tokens, req.output_ids, req.noise_seed)
                if req.params.grammar is not None and req.matcher is None:  # kept across preemption
                    req.matcher = req.params.grammar.matcher()
            except Exception as exc:
                log.exception("could not start %s", req.request_id)
                self._finish(req, FinishReason.ERROR, error=f"could not start the request: {exc!r}")
        return admitted

    def step(self) -> None:
        """One step; its events are delivered when it ends (on every path)."""
        try:
            self._step()
        finally:
            if self._outbox:  # handing the events over is host time of the step too
                started = time.perf_counter()
                self._flush()
                spent = time.perf_counter() - started
                self.step_stats.host_seconds += spent
                self.step_stats.seconds += spent
                self._last_done += spent  # (the next overlapped step's time starts after this hand-off)

    def _step(self) -> None:
        """Launch the next step, then finish the one before: with async scheduling, step N+1 is scheduled and its
        inputs sent while the device still runs step N (its decode inputs are N's tokens, read on the device), and
        N's tokens are read (the one sync) with N+1 already queued behind it, so the host's postprocessing and
        scheduling hide behind the device. A request's finish is then known one step late: a row that stopped
        at N computes one more token at N+1, dropped. Grammar rows need N's token before N+1's mask: any in the
        batch, and the steps run one at a time."""
        if self._in_flight is not None and not self._may_overlap():
            self._complete(self._take_in_flight())
        launched = self._launch()
        if self._in_flight is not None:
            if launched is not None:
                self.overlapped += 1
            self._complete(self._take_in_flight())
        if launched is not None:
            if self.config.async_scheduling and self._may_overlap():
                self._in_flight = launched
            else:
                self._complete(launched)

    def _take_in_flight(self) -> Launched:
        launched, self._in_flight = self._in_flight, None
        return launched

    def _may_overlap(self) -> bool:
        return not any(req.matcher is not None for req in self.scheduler.running)

    def _launch(self) -> Launched | None:
        """Schedule a step, send its inputs, queue its forward pass and sampling; None when there is nothing to run
        (or it failed to launch)."""
        started = time.perf_counter()
        self.admit()
        step, _preempted = self.scheduler.schedule()
        if step is None:
            return None
        self.steps += 1
        scheduled = time.perf_counter()
        kind = step.kind
        sampled = [req for i, req in enumerate(step.requests) if step.completes(i)]
        try:
            logits, inputs = self.runner.run(step)
            # Grammar masks are filled on the CPU (llguidance's threads, without the GIL) while the device runs the
            # step: nothing above waited for it. Rows without a grammar pay nothing; a step without any, not this.
            bitmask = self.masks.fill([req.matcher for req in sampled]) if sampled else None
            allowed = unpack_bitmask(bitmask, self.sampler.vocab_size) if bitmask is not None else None
            tokens = self.sampler.sample(logits, inputs.sample_rows, inputs.sample_host_rows, allowed) \
                if sampled else None
        except Exception as exc:  # fails this step's requests only; the engine goes on
            self._step_failed(step, exc)
            return None
        for req, count in zip(step.requests, step.counts):
            req.num_computed += count  # (being) computed: the next step is scheduled past it
        for req in sampled:
            req.in_flight += 1
        return Launched(step, kind, sampled, tokens, started, scheduled - started + self.runner.last_prepare_seconds)

    def _complete(self, launched: Launched) -> None:
        """Read a launched step's tokens (the step's one read from the device) and postprocess them."""
        step, sampled = launched.step, launched.sampled
        try:
            tokens = launched.tokens.tolist() if sampled else []
        except Exception as exc:  # an error the device reports late: every request of the step ends with it
            log.exception("forward step failed on the device (%d requests)", len(step.requests))
            for req in sampled:
                req.in_flight -= 1
            for req in step.requests:
                if req.status is not RequestStatus.FINISHED:  # (aborted, or stopped a step ago: it has its end)
                    self._finish(req, FinishReason.ERROR, error=f"generation failed: {exc!r}")
            return
        computed = time.perf_counter()
        for req in step.requests:
            if req.status is RequestStatus.RUNNING:
                self.blocks.on_computed(req)
        for req, token in zip(sampled, tokens):
            req.in_flight -= 1
            if req.status is not RequestStatus.FINISHED:  # (finished meanwhile: aborted, or stopped a step ago)
                self._append(req, token)
        self._account(launched, computed, time.perf_counter())

    def _step_failed(self, step: Step, exc: Exception) -> None:
        """A failed mixed step fails its prompt chunks' requests (the likely cause: a big chunk running out of
        memory) and leaves its decodes to run again next step, unchanged (nothing of the step was kept); a step of
        decodes only, or of prompts only, fails all its requests."""
        log.exception("forward step failed (%d requests)", len(step.requests))
        if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()  # give back what the failed step held before the next one
        decodes = {id(r) for r, n in zip(step.requests, step.counts) if n == r.num_pending == 1}
        mixed = 0 < len(decodes) < len(step.requests)
        for req in step.requests:
            if not (mixed and id(req) in decodes):
                self._finish(req, FinishReason.ERROR, error=f"generation failed: {exc!r}")

    def _account(self, launched: Launched, computed: float, done: float) -> None:
        stats = self.step_stats
        stats.steps += 1
        wall = done - max(launched.started, self._last_done)  # (overlapped: from the step before's end)
        self._last_done = done
        stats.seconds += wall
        stats.host_seconds += launched.host_seconds + (done - computed)
        stats.by_kind[launched.kind] = stats.by_kind.get(launched.kind, 0) + 1
        if self.on_step is not None:
            try:
                self.on_step(launched.kind, len(launched.step.requests), wall)
            except Exception:
                log.exception("on_step hook failed")

    def _append(self, req: Request, token: int) -> None:
        params = req.params
        stop = token in params.stop_token_ids
        # A matcher fails when its mask could not be computed (a lexer limit) or refuses what its mask allowed.
        # With ignore_eos a stop token is output like any other and the grammar never sees it (it would end there).
        if req.matcher is not None and not (stop and params.ignore_eos) \
                and (req.matcher.error or not req.matcher.accept(token)):
            self._finish(req, FinishReason.ERROR, error=f"structured output failed: {req.matcher.error}")
            return
        if stop and not params.ignore_eos:
            self._finish(req, FinishReason.STOP, completion=req.num_output_tokens + 1)
            return
        req.tokens.append(token)
        if req.matcher is not None and req.matcher.done:  # the grammar is complete: only a stop token could follow
            self._finish(req, FinishReason.STOP, (token,))
        elif req.num_output_tokens >= params.max_new_tokens or len(req.tokens) >= req.max_tokens:
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
        self._outbox.append((req.sink, TokenEvent(req.request_id, token_ids, reason, error, req.num_prompt_tokens,
                                                  req.cached_tokens, completion)))

    def _flush(self) -> None:
        """Hand the events so far over, in one call (they are in the order they happened)."""
        if self._outbox:
            batch, self._outbox = self._outbox, []
            try:
                self.deliver(batch)
            except Exception:  # a consumer's failure must not take the engine down
                log.exception("event delivery failed (%d events)", len(batch))

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
        self._flush()
