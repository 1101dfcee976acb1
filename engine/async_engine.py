"""The engine's events on an asyncio event loop: a ``RequestStream`` per request, and the in-process bridge.

A ``RequestStream`` is a collector, not a queue (vLLM v1's output collector): events delivered while its reader is
busy are merged into one (their tokens joined, the latest counters and finish kept), so a reader that falls behind
catches up in one wake-up with one piece of text instead of one per token; a reader that keeps up sees every
event as it came. The engine's events reach the loop once per step, in one call, whichever side of the boundary
the engine runs on (``AsyncEngine``: a thread of this process; ``engine.mp_client``: its own process).
"""
from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable

from engine.core import Engine, call_sinks
from engine.request import EventSink, SamplingParams, TokenEvent


class RequestStream:
    """The token events of one request, as an async iterator. Leaving it early aborts the request.

    Use as ``async with engine.generate(...) as stream: async for event in stream: ...`` so that the
    request is aborted on every path (break, cancellation, error).
    """

    __slots__ = ("_abort", "_loop", "_tokens", "_last", "_waiter", "request_id", "finished", "submitted_at",
                 "merged")

    def __init__(self, abort: Callable[[str], None], loop: asyncio.AbstractEventLoop) -> None:
        self._abort = abort
        self._loop = loop
        self._tokens: list[int] = []
        self._last: TokenEvent | None = None  # the latest event not read yet (its tokens: ``_tokens``)
        self._waiter: asyncio.Future[None] | None = None
        self.request_id = ""
        self.finished = False  # the reader has the final event, or the request was aborted
        self.submitted_at = time.perf_counter()
        self.merged = 0  # events merged into others because the reader was behind

    def deliver(self, event: TokenEvent) -> None:
        """Event loop: one event of this request (merged into the unread one if there is one)."""
        if self._last is not None:
            self.merged += 1
            if self._last.finished:  # nothing follows a final event
                return
        self._tokens.extend(event.token_ids)
        self._last = event
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _take(self) -> TokenEvent:
        last, tokens = self._last, self._tokens
        self._last, self._tokens = None, []
        if len(tokens) == len(last.token_ids):
            return last
        return TokenEvent(last.request_id, tuple(tokens), last.finish_reason, last.error, last.prompt_tokens,
                          last.cached_tokens, last.completion_tokens)

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        while not self.finished:
            if self._last is None:
                self._waiter = self._loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
            event = self._take()
            self.finished = event.finished
            yield event

    def abort(self) -> None:
        if not self.finished and self.request_id:
            self._abort(self.request_id)
            self.finished = True

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.abort()


def dispatch(batch: Iterable[tuple[RequestStream, TokenEvent]]) -> None:
    """Event loop: a step's events to their streams."""
    for stream, event in batch:
        stream.deliver(event)


class AsyncEngine:
    """The engine on a thread of this process, for asyncio callers. Streams of this loop get a step's events in one
    ``call_soon_threadsafe``; other sinks (direct ``Engine.submit`` callers) are called on the engine thread."""

    in_process = True

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        engine.deliver = self._deliver

    def _deliver(self, batch: list[tuple[EventSink, TokenEvent]]) -> None:  # engine thread
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, TokenEvent]]] = {}
        others = []
        for sink, event in batch:
            if type(sink) is RequestStream:
                by_loop.setdefault(sink._loop, []).append((sink, event))
            else:
                others.append((sink, event))
        if others:
            call_sinks(others)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(dispatch, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    # ---- what the transport uses (the same on both sides of a process boundary) --------------------------------
    def generate(self, prompt_ids: list[int], params: SamplingParams, session_key: str | None = None,
                 cache_salt: str = "") -> RequestStream:
        """Submit a request (errors of ``Engine.submit`` are raised here, synchronously)."""
        stream = RequestStream(self.engine.abort, asyncio.get_running_loop())
        stream.request_id = self.engine.submit(prompt_ids, params, stream, session_key, cache_salt)  # type: ignore
        return stream

    def release_session(self, session_key: str) -> None:
        self.engine.release_session(session_key)

    @property
    def on_step(self) -> Callable[[str, int, float], None] | None:
        return self.engine.on_step

    @on_step.setter
    def on_step(self, hook: Callable[[str, int, float], None] | None) -> None:
        self.engine.on_step = hook

    @property
    def alive(self) -> bool:
        return self.engine.alive

    @property
    def dead_reason(self) -> str | None:
        return self.engine.dead_reason

    @property
    def max_context(self) -> int:
        return self.engine.max_context

    @property
    def vocab_size(self) -> int:
        return self.engine.model.vocab_size

    def stats(self) -> dict[str, int]:
        return self.engine.stats()

    async def start(self) -> None:
        await asyncio.to_thread(self.engine.start)  # captures the decode graphs (CUDA) before /ready

    async def stop(self) -> None:
        await asyncio.to_thread(self.engine.stop)

    def engine_thread(self) -> tuple[int, int]:
        """(process id, thread id) of the engine thread (benchmarks read its scheduler figures)."""
        return os.getpid(), self.engine._thread.native_id

    def counters(self) -> dict[str, float]:
        """The engine's step counters and its thread's CPU seconds (benchmarks read these)."""
        stats, thread = self.engine.step_stats, self.engine._thread
        cpu = time.clock_gettime(time.pthread_getcpuclockid(thread.ident)) if thread and thread.is_alive() else 0.0
        return {"steps": stats.steps, "seconds": stats.seconds, "host_seconds": stats.host_seconds,
                "cpu_seconds": cpu}
