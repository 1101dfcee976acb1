"""Bridge from the engine thread to asyncio: one queue per request, filled with call_soon_threadsafe."""
from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import AsyncIterator

from engine.core import Engine
from engine.request import SamplingParams, TokenEvent


class _Wakeups:
    """Delivers events from the engine thread to one event loop with one wake-up per batch of events
    (one per engine step) instead of one per token per request."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[tuple[asyncio.Queue[TokenEvent], TokenEvent]] = []

    def push(self, queue: asyncio.Queue[TokenEvent], event: TokenEvent) -> None:  # engine thread
        with self.lock:
            self.pending.append((queue, event))
            if len(self.pending) > 1:
                return  # a flush is already scheduled
        try:
            self.loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            with self.lock:
                self.pending.clear()

    def _flush(self) -> None:  # event loop
        with self.lock:
            items, self.pending = self.pending, []
        for queue, event in items:
            queue.put_nowait(event)


_wakeups: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Wakeups] = weakref.WeakKeyDictionary()


def _wakeups_for(loop: asyncio.AbstractEventLoop) -> _Wakeups:
    if loop not in _wakeups:
        _wakeups[loop] = _Wakeups(loop)
    return _wakeups[loop]


class RequestStream:
    """The token events of one request, as an async iterator. Leaving it early aborts the request.

    Use as ``async with engine.generate(...) as stream: async for event in stream: ...`` so that the
    request is aborted on every path (break, cancellation, error).
    """

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop) -> None:
        self._engine = engine
        self._wakeups = _wakeups_for(loop)
        self._queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.request_id = ""
        self.finished = False
        self.submitted_at = time.perf_counter()

    def _sink(self, event: TokenEvent) -> None:  # engine thread
        self._wakeups.push(self._queue, event)

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        while not self.finished:
            event = await self._queue.get()
            self.finished = event.finished
            yield event

    def abort(self) -> None:
        if not self.finished and self.request_id:
            self._engine.abort(self.request_id)
            self.finished = True

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.abort()


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def generate(self, prompt_ids: list[int], params: SamplingParams, session_key: str | None = None,
                 cache_salt: str = "") -> RequestStream:
        """Submit a request (errors of ``Engine.submit`` are raised here, synchronously)."""
        stream = RequestStream(self.engine, asyncio.get_running_loop())
        stream.request_id = self.engine.submit(prompt_ids, params, stream._sink, session_key, cache_salt)
        return stream
