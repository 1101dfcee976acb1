"""One WebSocket's outgoing side: messages sent in order by one sender task, through a queue bounded in
messages and in bytes, so a client that stops reading is dropped instead of buffered for without bound."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

from starlette.websockets import WebSocket

from jsonrpc import clip, encode

log = logging.getLogger("inference.server")


class _Close:
    def __init__(self, code: int, reason: str) -> None:
        self.code, self.reason = code, reason


class Connection:
    """Outgoing messages of one socket, sent in order by one sender task, through a queue bounded in messages
    and in bytes.

    A client that stops reading fills the queue; the connection then counts as stalled (``overflowed``)
    and is dropped, so the server never buffers without bound for it.
    """

    def __init__(self, websocket: WebSocket, max_queue: int, max_bytes: int = 8 << 20,
                 backlog: Iterable[str] = ()) -> None:
        self.websocket = websocket
        self.backlog = list(backlog)  # sent first (a resumed stream's replay), outside the queue's bounds
        self.queue: asyncio.Queue[tuple[str, int] | _Close] = asyncio.Queue(maxsize=max_queue)
        self.max_bytes = max_bytes
        self.queued_bytes = 0
        self.overflowed = asyncio.Event()  # the socket is done for: stalled client, or the sender stopped
        self.stalled = False  # ...because the client stopped reading
        self.closing = False
        self.on_drained: Callable[[], None] | None = None  # called once when everything queued has been written
        self.held_messages = 0  # text_chunks held back while behind (coalesced): they count against the bounds
        self.held_bytes = 0
        self.sender = asyncio.get_running_loop().create_task(self._send_loop())

    @property
    def behind(self) -> bool:
        """Messages wait to be written: the client reads slower than the stream comes (the socket's buffer is
        full and the sender waits on it), or the sender has not had its turn yet."""
        return not self.queue.empty()

    def hold(self, size: int) -> None:
        """A message's worth of text is held back (coalescing while behind) instead of queued: it counts against the
        bounds as the message it stands for, so a client that has stopped reading is dropped as soon as it would
        have been without coalescing."""
        self.held_messages += 1
        self.held_bytes += size
        if self.queue.qsize() + self.held_messages >= self.queue.maxsize:
            self._overflow(f"{self.queue.qsize()} messages and {self.held_messages} held")
        elif self.queued_bytes + self.held_bytes > self.max_bytes:
            self._overflow(f"{self.queued_bytes} bytes and {self.held_bytes} held")

    def released(self) -> None:
        """The held text went out (as one message)."""
        self.held_messages = self.held_bytes = 0

    def send(self, message: dict[str, Any] | list[Any]) -> None:
        if self.overflowed.is_set() or self.closing:
            return
        self.send_text(*encode(message))

    def send_text(self, text: str, size: int) -> None:
        """Queue one message already encoded (``jsonrpc.encode``)."""
        if self.overflowed.is_set() or self.closing:
            return
        if self.queued_bytes and self.queued_bytes + size > self.max_bytes:
            self._overflow(f"{self.queued_bytes} bytes")
            return
        try:
            self.queue.put_nowait((text, size))
        except asyncio.QueueFull:
            self._overflow(f"{self.queue.qsize()} messages")
            return
        self.queued_bytes += size

    def _overflow(self, queued: str) -> None:
        log.warning("client is not reading: %s queued; dropping the connection", queued)
        self.stalled = True
        self.overflowed.set()

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Close after everything queued so far is sent."""
        if not self.closing:
            self.closing = True
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(_Close(code, reason))

    async def _send_loop(self) -> None:
        try:
            for text in self.backlog:
                await self.websocket.send_text(text)
            self.backlog = []
            while True:
                if self.on_drained is not None and self.queue.empty():
                    drained, self.on_drained = self.on_drained, None
                    drained()
                item = await self.queue.get()
                if isinstance(item, _Close):
                    await self.websocket.close(item.code, item.reason)
                    return
                await self.websocket.send_text(item[0])
                self.queued_bytes -= item[1]
        except Exception as exc:  # the peer went away (the reader sees the disconnect), or a bug: say which
            if isinstance(exc, (TypeError, ValueError)):
                log.warning("sender failed: %s", clip(repr(exc)))
            self.overflowed.set()  # either way this socket is done: the session lets go of it

    async def stop(self) -> None:
        if not self.overflowed.is_set():
            self.close()
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self.sender), 5)
        self.sender.cancel()
