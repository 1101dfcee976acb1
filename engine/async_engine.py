"""Bridge from the engine thread to asyncio: one queue per request, filled with call_soon_threadsafe."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from engine.core import Engine
from engine.request import SamplingParams, TokenEvent


class RequestStream:
    """The token events of one request, as an async iterator. Leaving it early aborts the request.

    Use as ``async with engine.generate(...) as stream: async for event in stream: ...`` so that the
    request is aborted on every path (break, cancellation, error).
    """

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop) -> None:
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.request_id = ""
        self.finished = False

    def _sink(self, event: TokenEvent) -> None:  # engine thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

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

    def generate(self, prompt_ids: list[int], params: SamplingParams, session_key: str | None = None) -> RequestStream:
        """Submit a request (errors of ``Engine.submit`` are raised here, synchronously)."""
        stream = RequestStream(self.engine, asyncio.get_running_loop())
        stream.request_id = self.engine.submit(prompt_ids, params, stream._sink, session_key)
        return stream
