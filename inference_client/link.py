"""A session's WebSocket that outlives a dropped connection: JSON-RPC requests wait for their responses; a dropped
socket is reopened with ``?resume_from=<last seq>`` for ``reconnect_s``, notifications already received are dropped,
and requests still unanswered are sent again once the server has replayed what was missed (its ``resumed``).

What the notifications and responses mean is the session's business (``LinkOwner``): this module only keeps the
socket, the order and the requests."""
from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from .events import ClientClosed

POLICY_VIOLATION = 1008  # the server refused this socket (auth, origin): reopening it cannot help
SUPERSEDED = 4000  # the server closed this socket: a newer one resumed the session
FINAL_STATUSES = (400, 401, 403, 404)  # a refused reconnect that trying again cannot fix


@dataclass
class Pending:
    """A request waiting for its response: resent on a new socket if the old one dropped first."""

    method: str
    text: str
    future: asyncio.Future[dict[str, Any]]
    socket_no: int = -1  # the socket it was last sent on
    resent: bool = False


class LinkOwner(Protocol):
    """What a ``Link`` tells the session it carries."""

    def on_notification(self, method: str, params: dict[str, Any]) -> None:
        """A notification not seen before (``resumed`` excluded)."""

    def on_resumed(self, info: dict[str, Any]) -> None:
        """A new socket's replay is over (``info``: the ``resumed`` params; ``{}`` if none came in time)."""

    def settled_by_replay(self, pending: Pending, info: dict[str, Any]) -> dict[str, Any] | None:
        """The response a request sent on the old socket got, as the replay shows it (then it is not resent)."""

    def on_response(self, pending: Pending, message: dict[str, Any]) -> dict[str, Any]:
        """The response to ``pending``, as the session reads it (a resent request's answer may need reading)."""

    def on_closed(self) -> None:
        """The socket is gone for good: every wait on the session ends."""


class Link:
    """The socket of one session. ``reopen(last_seq)`` opens a new one with ``?resume_from=``; ``reconnect_s``:
    how long a dropped socket keeps trying (0: never)."""

    def __init__(self, ws: ClientConnection, owner: LinkOwner, timeout: float,
                 reopen: Callable[[int], Awaitable[ClientConnection]] | None = None, reconnect_s: float = 0.0) -> None:
        self._ws, self._owner, self.timeout = ws, owner, timeout
        self._reopen, self.reconnect_s = reopen, reconnect_s
        self.closed = False  # the socket is gone for good (closed by us, or reconnecting failed)
        self.last_seq = 0  # the seq of the last notification received
        self.reconnects = 0
        self._next_id = 0
        self._pending: dict[int, Pending] = {}
        self._socket_no = 0  # which socket a request was last sent on
        self._connected = asyncio.Event()
        self._connected.set()
        self._closing = False
        self._resumed: asyncio.Future[dict[str, Any]] | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one JSON-RPC request and return its response message (with ``result`` or ``error``). While the
        socket is being reopened the request waits, and goes out once the server has replayed."""
        if self.closed:
            raise ClientClosed("the session's socket is closed")
        self._next_id += 1
        rid = self._next_id
        text = json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params or {}}, default=str)
        pending = self._pending[rid] = Pending(method, text, asyncio.get_running_loop().create_future())
        try:
            if self._connected.is_set():
                # A socket that closed before the reader noticed: the request stays pending, sent again on the
                # resumed socket (or failed with ClientClosed when there is none).
                with contextlib.suppress(ConnectionClosed):
                    await self._send(pending)
            return await asyncio.wait_for(pending.future, self.timeout)
        finally:
            self._pending.pop(rid, None)

    async def close(self) -> None:
        self._closing = True
        await self._ws.close()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

    async def _read(self) -> None:
        try:
            while True:
                with contextlib.suppress(ConnectionClosed):
                    async for raw in self._ws:
                        with contextlib.suppress(ValueError):  # not JSON: nothing to route it to
                            message = json.loads(raw)
                            for item in message if isinstance(message, list) else [message]:
                                self._route(item)
                if not await self._reconnect():
                    return
        finally:
            self.closed = True
            self._connected.set()
            for pending in self._pending.values():
                if not pending.future.done():
                    pending.future.set_exception(ClientClosed("the socket closed before the response came"))
            self._owner.on_closed()

    async def _reconnect(self) -> bool:
        """After the socket dropped: open a new one with ?resume_from=, retrying for ``reconnect_s``."""
        if self._closing or self._reopen is None or self.reconnect_s <= 0 \
                or self._ws.close_code in (POLICY_VIOLATION, SUPERSEDED):
            return False
        self._connected.clear()
        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + self.reconnect_s, 0.1
        while not self._closing:
            try:
                self._ws = await self._reopen(self.last_seq)
                break
            except InvalidStatus as exc:
                if exc.response.status_code in FINAL_STATUSES:
                    return False
            except (OSError, InvalidHandshake, asyncio.TimeoutError):
                pass
            if loop.time() + delay > deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(2 * delay, 2.0)
        if self._closing:
            return False
        self.reconnects += 1
        self._socket_no += 1
        self._resumed = loop.create_future()
        self._connected.set()
        loop.create_task(self._resend())
        return True

    async def _resend(self) -> None:
        """Once the server has replayed what was missed (its ``resumed`` notification): requests still waiting
        are sent again, unless the replay shows they were answered (a ``generate`` whose task is running)."""
        socket_no = self._socket_no
        try:
            info = await asyncio.wait_for(asyncio.shield(self._resumed), self.timeout)
        except asyncio.TimeoutError:
            info = {}
        self._owner.on_resumed(info)
        for pending in list(self._pending.values()):
            if pending.future.done() or pending.socket_no == socket_no:
                continue
            if (reply := self._owner.settled_by_replay(pending, info)) is not None:
                pending.future.set_result(reply)
                continue
            pending.resent = True
            with contextlib.suppress(ConnectionClosed):  # dropped again: the next reconnect resends it
                await self._send(pending)

    async def _send(self, pending: Pending) -> None:
        socket_no = self._socket_no
        await self._ws.send(pending.text)
        pending.socket_no = socket_no

    def _route(self, message: Any) -> None:
        if not isinstance(message, dict):
            return
        if "method" in message:  # a notification
            params = message.get("params")
            params = params if isinstance(params, dict) else {}
            if message["method"] == "resumed":
                if self._resumed is not None and not self._resumed.done():
                    self._resumed.set_result(params)
                return
            seq = params.get("seq")
            if isinstance(seq, int):
                if seq <= self.last_seq:
                    return  # already received (a replay can overlap what arrived before the drop)
                self.last_seq = seq
            self._owner.on_notification(message["method"], params)
        elif (pending := self._pending.get(message.get("id"))) is not None and not pending.future.done():
            pending.future.set_result(self._owner.on_response(pending, message))
