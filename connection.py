"""One WebSocket's outgoing side: messages sent in order by one sender task, through a queue bounded in
messages and in bytes, so a client that stops reading is dropped instead of buffered for without bound."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
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
        self.sender = asyncio.get_running_loop().create_task(self._send_loop())

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
