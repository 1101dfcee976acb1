"""An asyncio client for the server's WebSocket JSON-RPC protocol, and a terminal chat.

    python inference_client.py --url http://localhost:8000 [--tools tools.json] [--api-key KEY]

Library use::

    async with Client("http://localhost:8000") as client:
        session = await client.create_session(tools=[get_weather])   # plain functions become tools
        async for event in session.generate(message="Weather in London?"):
            ...                                                       # TextChunk, ToolCalls, FinalText, Error, End

A session whose socket drops reconnects by itself (``Client(reconnect_s=...)``) with ``?resume_from=<last seq>``:
the server sends what was missed, then the live stream goes on; requests still unanswered are sent again.

Only ``websockets`` and the standard library are used.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import signal
import sys
import threading
import types
import typing
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

SESSION_BUSY, UNKNOWN_TASK, NOT_AWAITING, TASK_LOST = -32001, -32003, -32007, -32011
SUPERSEDED = 4000  # the server closed this socket: a newer one resumed the session
FINAL_STATUSES = (400, 401, 403, 404)  # a refused reconnect that trying again cannot fix


# ---- errors and events ----------------------------------------------------------------------------------------
class RpcError(Exception):
    """A JSON-RPC error response (``code`` as in the README's table)."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"[{code}] {message}")
        self.code, self.message, self.data = code, message, data


class ApiError(Exception):
    """An HTTP error from the server: ``create_session`` refused, or the WebSocket handshake refused."""

    def __init__(self, status: int, message: str, body: str = "") -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.body = status, message, body

    @classmethod
    def from_body(cls, status: int, reason: str, body: str) -> ApiError:
        """The error, with the message of the server's ``{"error": {"message": ...}}`` body when there is one."""
        with contextlib.suppress(ValueError, KeyError, TypeError):
            reason = str(json.loads(body)["error"]["message"])
        return cls(status, reason, body)


class ClientClosed(ConnectionError):
    """The session's socket closed: every pending request and event wait ends with this."""


@dataclass
class ToolCall:
    """One call of a ``function_call_request``; ``answered`` when a registered handler already replied."""

    call_id: str
    tool: str
    parameters: dict[str, Any]
    answered: bool = False
    result: Any = None
    error: str | None = None
    validation_error: str | None = None  # the server found the call invalid (no such tool, or bad parameters)

    def reply(self, result: Any = None, error: str | None = None) -> dict[str, Any]:
        """This call's item for ``tool_result``: a result, or an error message (sent with ``isError``)."""
        return {"tool_name": self.tool, "call_id": self.call_id, "result": result,
                "isError": error is not None, "error_message": error}


@dataclass
class TextChunk:
    text: str


@dataclass
class ToolCalls:
    """The model called tools. Calls whose ``answered`` is False are yours to answer with
    ``session.tool_result(task_id, [call.reply(...)])``."""

    task_id: str
    calls: list[ToolCall]

    @property
    def pending(self) -> list[ToolCall]:
        return [c for c in self.calls if not c.answered]


@dataclass
class FinalText:
    text: str


@dataclass
class Error:
    code: int
    message: str
    data: Any = None


@dataclass
class End:
    finish_reason: str
    usage: dict[str, int] = field(default_factory=dict)


Event = TextChunk | ToolCalls | FinalText | Error | End


# ---- tools ----------------------------------------------------------------------------------------------------
_JSON_TYPES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean",
                               list: "array", tuple: "array", set: "array", dict: "object"}


def _schema_of(annotation: Any) -> dict[str, Any]:
    """The JSON schema of a simple type hint (``{}``, meaning anything, for the rest)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return _schema_of(rest[0]) if len(rest) == 1 else {}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (list, set) and args:
        return {"type": "array", "items": _schema_of(args[0])}
    kind = _JSON_TYPES.get(origin or annotation)
    return {"type": kind} if kind else {}


@dataclass
class Tool:
    """A tool definition in the server's shape, with an optional local ``handler`` that answers its calls."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    handler: Callable[..., Any] | None = None

    @classmethod
    def from_function(cls, fn: Callable[..., Any], name: str | None = None) -> Tool:
        """A tool from a function: name, first docstring paragraph, a schema from its signature and hints."""
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # noqa: BLE001 (unresolvable hints: the parameters count as untyped)
            hints = {}
        properties, required = {}, []
        for param in inspect.signature(fn).parameters.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            properties[param.name] = _schema_of(hints.get(param.name, Any))
            if param.default is param.empty:
                required.append(param.name)
        doc = (inspect.getdoc(fn) or "").split("\n\n")[0].strip()
        schema = {"type": "object", "properties": properties, **({"required": required} if required else {})}
        return cls(name or fn.__name__, doc, schema, fn)

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any], handler: Callable[..., Any] | None = None) -> Tool:
        """A tool from the server's shape (OpenAI's ``{"type": "function", "function": {...}}`` too)."""
        if spec.get("type") == "function" and isinstance(spec.get("function"), Mapping):
            spec = spec["function"]
        params = spec.get("parameters") or {"type": "object", "properties": {}}
        return cls(spec["name"], spec.get("description", ""), dict(params), handler)

    def definition(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


ToolsArg = Iterable[Tool | Mapping[str, Any] | Callable[..., Any]] | Mapping[str, Any] | None


def as_tools(tools: ToolsArg) -> list[Tool]:
    """Normalise ``tools``: a list of Tools, dicts or functions, or a ``{name: function or dict}`` mapping."""
    if tools is None:
        return []
    if isinstance(tools, Mapping):
        return [Tool.from_function(v, name) if callable(v) else v if isinstance(v, Tool)
                else Tool.from_dict({**v, "name": name}) for name, v in tools.items()]
    return [t if isinstance(t, Tool) else Tool.from_dict(t) if isinstance(t, Mapping) else Tool.from_function(t)
            for t in tools]


# ---- a session: one socket, one reader task --------------------------------------------------------------------
_CLOSED = object()  # put into every event queue when the socket closes


class Generation:
    """One ``generate`` task. ``await`` it to start it (raises RpcError), or iterate it directly; iteration
    yields its events and stops after ``End``. ``text``, ``final_text``, ``finish_reason`` and ``usage``
    fill in as events arrive."""

    def __init__(self, session: Session, params: dict[str, Any]) -> None:
        self.session, self.params = session, params
        self.task_id: str | None = None
        self.text, self.final_text, self.finish_reason = "", None, None
        self.usage: dict[str, int] = {}
        self._queue: asyncio.Queue[Any] | None = None
        self._done = False

    async def start(self) -> Generation:
        if self.task_id is None:
            result = await self.session.call("generate", self.params)
            self.task_id = result["task_id"]
            self.session._claimed.add(self.task_id)
            self._queue = self.session._queue_for(self.task_id)
        return self

    def __await__(self) -> Any:
        return self.start().__await__()

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        await self.start()
        while True:
            message = await self._queue.get()
            if message is _CLOSED:
                self._done = True
                raise ClientClosed("the socket closed before the task ended")
            event = await self._event(message.get("method"), message.get("params") or {})
            if event is not None:
                return event

    async def _event(self, method: str | None, p: dict[str, Any]) -> Event | None:
        if method == "text_chunk":
            self.text += p["chunk"]
            return TextChunk(p["chunk"])
        if method == "function_call_request":
            calls = [ToolCall(c["call_id"], c["tool"], c.get("parameters") or {},
                              validation_error=c.get("validation_error")) for c in p["tool_calls"]]
            await self.session._answer(self.task_id, calls)
            return ToolCalls(self.task_id, calls)
        if method == "final_text":
            self.final_text = p["final_text"]
            return FinalText(p["final_text"])
        if method == "error":
            e = p.get("error") or {}
            return Error(e.get("code", 0), e.get("message", ""), e.get("data"))
        if method == "end":
            self._done = True
            self.session._queues.pop(self.task_id, None)
            self.session._answers.clear()
            self.finish_reason, self.usage = p["finish_reason"], p.get("usage") or {}
            return End(self.finish_reason, self.usage)
        return None  # a notification this client does not know: skipped


@dataclass
class _Pending:
    """A request waiting for its response: resent on a new socket if the old one dropped first."""

    method: str
    text: str
    future: asyncio.Future[dict[str, Any]]
    socket_no: int = -1  # the socket it was last sent on
    resent: bool = False


class Session:
    """A server session over its WebSocket. Make one with ``Client.create_session`` or ``Client.attach``."""

    def __init__(self, session_id: str, ws: ClientConnection, tools: list[Tool], timeout: float,
                 reopen: Callable[[int], Awaitable[ClientConnection]] | None = None, reconnect_s: float = 0.0) -> None:
        self.session_id, self.timeout = session_id, timeout
        self.tools: dict[str, Tool] = {t.name: t for t in tools}
        self._ws = ws
        self._override = False  # tools were added after creation: send them with each generate
        self._next_id = 0
        self._pending: dict[int, _Pending] = {}
        self._queues: dict[str, asyncio.Queue[Any]] = {}
        self.closed = False  # the session's socket is gone for good (closed by us, or reconnecting failed)
        # resuming: ``reopen(last_seq)`` opens a new socket with ?resume_from=; tried for ``reconnect_s``
        self._reopen, self.reconnect_s = reopen, reconnect_s
        self.last_seq = 0  # the seq of the last notification received
        self.reconnects = 0
        self._socket_no = 0  # which socket a request was last sent on
        self._connected = asyncio.Event()
        self._connected.set()
        self._closing = False
        self._resumed: asyncio.Future[dict[str, Any]] | None = None
        self._claimed: set[str] = set()  # task ids a Generation of ours owns
        self._ended: set[str] = set()  # ...and those whose end has arrived
        self._answers: dict[str, dict[str, Any]] = {}  # call_id -> the reply sent (a resent request reuses it)
        self._reader = asyncio.get_running_loop().create_task(self._read())

    def tool(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Register ``fn`` as the handler of the tool of its name (a decorator). A tool the session was not
        created with is described from ``fn`` and sent with every later ``generate``."""
        if fn.__name__ in self.tools:
            self.tools[fn.__name__].handler = fn
        else:
            self.tools[fn.__name__], self._override = Tool.from_function(fn), True
        return fn

    def generate(self, message: str | None = None, *, history: list[dict[str, Any]] | None = None,
                 tools: ToolsArg = None, **sampling: Any) -> Generation:
        """Start a task: ``message`` appends a user turn, ``history`` replaces the conversation. ``sampling``:
        max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, do_sample, stop, seed, ..."""
        params: dict[str, Any] = {k: v for k, v in sampling.items() if v is not None}
        if message is not None:
            params["message"] = message
        if history is not None:
            params["history"] = history
        if tools is not None:
            request_tools = as_tools(tools)
            self.tools.update((t.name, t) for t in request_tools)
            params["tools"] = [t.definition() for t in request_tools]
        elif self._override:
            params["tools"] = [t.definition() for t in self.tools.values()]
        return Generation(self, params)

    async def ask(self, message: str, **sampling: Any) -> str:
        """Send ``message`` and return the final text. Calls without a handler are answered with an error;
        a task that fails raises RpcError."""
        gen, error = self.generate(message, **sampling), None
        async for event in gen:
            if isinstance(event, ToolCalls) and event.pending:
                await self.tool_result(event.task_id, [c.reply(error=f"no handler for tool {c.tool!r}")
                                                       for c in event.pending])
            elif isinstance(event, Error):
                error = RpcError(event.code, event.message, event.data)
        if error is not None:
            raise error
        return gen.final_text if gen.final_text is not None else gen.text

    async def tool_result(self, task_id: str, results: list[dict[str, Any]]) -> dict[str, Any]:
        """Answer tool calls by hand (``ToolCall.reply`` builds the items)."""
        return await self.call("tool_result", {"task_id": task_id, "results": results})

    async def cancel(self, task_id: str | None = None) -> dict[str, Any]:
        """Cancel the running task (RpcError -32002 when there is none); its events end with End("cancelled")."""
        return await self.call("cancel", {"task_id": task_id} if task_id else {})

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Send one JSON-RPC request and return its result; an error response raises RpcError."""
        if self.closed:
            raise ClientClosed("the session's socket is closed")
        self._next_id += 1
        rid = self._next_id
        text = json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params or {}}, default=str)
        pending = self._pending[rid] = _Pending(method, text, asyncio.get_running_loop().create_future())
        try:
            if self._connected.is_set():
                await self._send(pending)
            reply = await asyncio.wait_for(pending.future, self.timeout)
        except ConnectionClosed as exc:
            raise ClientClosed(f"the socket closed: {exc}") from None
        finally:
            self._pending.pop(rid, None)
        if "error" in reply:
            e = reply["error"]
            raise RpcError(e.get("code", 0), e.get("message", ""), e.get("data"))
        return reply.get("result")

    async def close(self) -> None:
        """Close the socket (the server cancels a running task; the session itself stays, see ``attach``)."""
        self._closing = True
        await self._ws.close()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

    def _queue_for(self, task_id: str) -> asyncio.Queue[Any]:
        queue = self._queues.setdefault(task_id, asyncio.Queue())
        if self.closed and queue.empty():
            queue.put_nowait(_CLOSED)
        return queue

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
            for queue in self._queues.values():
                queue.put_nowait(_CLOSED)

    async def _reconnect(self) -> bool:
        """After the socket dropped: open a new one with ?resume_from=, retrying for ``reconnect_s``."""
        if self._closing or self._reopen is None or self.reconnect_s <= 0 \
                or self._ws.close_code in (1008, SUPERSEDED):
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
        are sent again. A ``generate`` whose task the replay shows is not: it is that task."""
        socket_no = self._socket_no
        try:
            info = await asyncio.wait_for(asyncio.shield(self._resumed), self.timeout)
        except asyncio.TimeoutError:
            info = {}
        for task_id in self._claimed - self._ended:
            if info and info.get("task_id") != task_id:  # it ended while we were away, and its end was not kept
                queue = self._queue_for(task_id)
                queue.put_nowait({"method": "error", "params": {"task_id": task_id, "error": {
                    "code": TASK_LOST, "message": "the task is no longer running and its outcome was lost with the "
                    "socket; the conversation holds whatever it completed"}}})
                queue.put_nowait({"method": "end", "params": {"task_id": task_id, "finish_reason": "error"}})
                self._ended.add(task_id)
        for pending in list(self._pending.values()):
            if pending.future.done() or pending.socket_no == socket_no:
                continue
            if pending.method == "generate":
                task_id = info.get("task_id") or next((t for t in self._queues if t not in self._claimed), None)
                if task_id is not None:
                    pending.future.set_result({"result": {"status": "processing", "task_id": task_id}})
                    continue
            pending.resent = True
            with contextlib.suppress(ConnectionClosed):  # dropped again: the next reconnect resends it
                await self._send(pending)

    async def _send(self, pending: _Pending) -> None:
        socket_no = self._socket_no
        await self._ws.send(pending.text)
        pending.socket_no = socket_no

    def _route(self, message: Any) -> None:
        if not isinstance(message, dict):
            return
        if "method" in message:  # a notification: to its task's events
            params = message.get("params") or {}
            if message["method"] == "resumed":
                if self._resumed is not None and not self._resumed.done():
                    self._resumed.set_result(params)
                return
            seq = params.get("seq")
            if isinstance(seq, int):
                if seq <= self.last_seq:
                    return  # already received (a replay can overlap what arrived before the drop)
                self.last_seq = seq
            task_id = params.get("task_id")
            if task_id is not None:
                if message["method"] == "end":
                    self._ended.add(task_id)
                self._queue_for(task_id).put_nowait(message)
        elif (pending := self._pending.get(message.get("id"))) is not None and not pending.future.done():
            error = message.get("error") or {}
            task_id = (error.get("data") or {}).get("task_id") if isinstance(error.get("data"), dict) else None
            if pending.resent and pending.method == "generate" and error.get("code") == SESSION_BUSY \
                    and task_id is not None and task_id not in self._claimed:
                message = {"result": {"status": "processing", "task_id": task_id}}  # the original got through
            pending.future.set_result(message)

    async def _answer(self, task_id: str, calls: list[ToolCall]) -> None:
        """Run the registered handlers of ``calls`` (concurrently; sync ones in threads) and send one
        ``tool_result`` with all their results."""
        handled = [c for c in calls if (t := self.tools.get(c.tool)) is not None and t.handler is not None]
        if not handled:
            return
        fresh = [c for c in handled if c.call_id not in self._answers]  # a resent request: answered already
        await asyncio.gather(*(self._run(self.tools[c.tool].handler, c) for c in fresh))
        for call in handled:
            if call in fresh:
                self._answers[call.call_id] = call.reply(call.result, call.error)
            else:
                reply = self._answers[call.call_id]
                call.result, call.error, call.answered = reply.get("result"), reply.get("error_message"), True
        try:
            await self.tool_result(task_id, [self._answers[c.call_id] for c in handled])
        except RpcError as exc:
            if exc.code not in (UNKNOWN_TASK, NOT_AWAITING):  # the task ended meanwhile, or had them already
                raise

    @staticmethod
    async def _run(handler: Callable[..., Any], call: ToolCall) -> None:
        if call.validation_error:  # parameters that break the tool's schema: the handler is not run
            call.error, call.answered = call.validation_error, True
            return
        try:
            if inspect.iscoroutinefunction(handler):
                call.result = await handler(**call.parameters)
            else:
                call.result = await asyncio.to_thread(handler, **call.parameters)
                if inspect.isawaitable(call.result):
                    call.result = await call.result
        except Exception as exc:  # noqa: BLE001 (any failure goes back to the model, which may recover)
            call.error = f"{type(exc).__name__}: {exc}"
        call.answered = True


class Client:
    """Talks to one server. ``url``: ``http(s)://host:port`` (or ``host:port``); ``api_key`` is sent as
    ``Authorization: Bearer`` on every HTTP request and WebSocket handshake. ``timeout``: seconds to wait for
    any one response."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 60.0,
                 reconnect_s: float = 60.0) -> None:
        url = url if "://" in url else f"http://{url}"
        self.url = url.rstrip("/").replace("ws://", "http://", 1).replace("wss://", "https://", 1)
        self.ws_url = self.url.replace("http", "ws", 1)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.reconnect_s = reconnect_s  # how long a dropped session socket keeps trying to resume (0: never)
        self.sessions: list[Session] = []

    async def create_session(self, tools: ToolsArg = None) -> Session:
        """Create a session with ``tools`` (functions with handlers, Tools or dicts) and connect to it."""
        tool_list = as_tools(tools)
        body = await asyncio.to_thread(self._post, "/create_session", {"tools": [t.definition() for t in tool_list]})
        return await self._connect(body["session_id"], tool_list)

    async def attach(self, session_id: str, tools: ToolsArg = None) -> Session:
        """Reconnect to an existing session (the server kept its conversation); ``tools`` register handlers."""
        return await self._connect(session_id, as_tools(tools))

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.sessions), return_exceptions=True)
        self.sessions.clear()

    async def __aenter__(self) -> Client:  # noqa: PYI034
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _post(self, path: str, payload: Any) -> Any:
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(), method="POST",
                                         headers={"Content-Type": "application/json", **self.headers})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            raise ApiError.from_body(exc.code, str(exc.reason), exc.read().decode(errors="replace")) from None

    async def _open(self, session_id: str, resume_from: int | None = None) -> ClientConnection:
        query = "" if resume_from is None else f"?resume_from={resume_from}"
        return await connect(f"{self.ws_url}/ws/{session_id}{query}", additional_headers=self.headers,
                             max_size=None, compression=None, open_timeout=self.timeout)

    async def _connect(self, session_id: str, tools: list[Tool]) -> Session:
        try:
            ws = await self._open(session_id)
        except InvalidStatus as exc:
            response = exc.response
            raise ApiError.from_body(response.status_code, response.reason_phrase,
                                     (response.body or b"").decode(errors="replace")) from None
        session = Session(session_id, ws, tools, self.timeout,
                          lambda seq: self._open(session_id, seq), self.reconnect_s)
        self.sessions.append(session)
        return session


# ---- the terminal chat ------------------------------------------------------------------------------------------
class Terminal:
    """Lines from stdin (read by a daemon thread, so a pending read never blocks exit) and Ctrl-C as an event."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.loop = out, asyncio.get_running_loop()
        self.lines: asyncio.Queue[str | None] = asyncio.Queue()
        self.interrupt = asyncio.Event()
        self.eof, self.fresh_line = False, True
        threading.Thread(target=self._read_stdin, daemon=True).start()
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows: Ctrl-C raises there
            self.loop.add_signal_handler(signal.SIGINT, self.interrupt.set)

    def _read_stdin(self) -> None:
        for line in sys.stdin:
            self.loop.call_soon_threadsafe(self.lines.put_nowait, line.rstrip("\n"))
        self.loop.call_soon_threadsafe(self.lines.put_nowait, None)

    def write(self, text: str, *, own_line: bool = False) -> None:
        """Write ``text`` now; ``own_line``: start it on a fresh line."""
        text = "\n" + text if own_line and not self.fresh_line else text
        if text:
            self.out.write(text)
            self.out.flush()
            self.fresh_line = text.endswith("\n")

    async def readline(self, prompt: str) -> str | None:
        """The next line, or None at EOF or on Ctrl-C."""
        self.write(prompt)
        if self.eof:
            return None
        self.interrupt.clear()
        line, stop = asyncio.ensure_future(self.lines.get()), asyncio.ensure_future(self.interrupt.wait())
        done, _ = await asyncio.wait({line, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if line in done:
            self.eof = line.result() is None
            self.fresh_line = not self.eof  # the user's Enter ended the line
            return line.result()
        line.cancel()
        return None


async def _cancel_on_interrupt(session: Session, term: Terminal) -> None:
    while True:
        await term.interrupt.wait()
        term.interrupt.clear()
        with contextlib.suppress(RpcError, ClientClosed):  # the task may have just ended
            await session.cancel()


async def _turn(session: Session, term: Terminal, text: str, sampling: dict[str, Any]) -> None:
    """One question: stream the answer, show tool calls, answer the ones without a canned result by hand."""
    term.interrupt.clear()
    watcher = asyncio.create_task(_cancel_on_interrupt(session, term))
    gen = session.generate(text, **sampling)
    try:
        async for event in gen:
            if isinstance(event, TextChunk):
                term.write(event.text)
            elif isinstance(event, ToolCalls):
                for call in event.calls:
                    shown = f"error: {call.error}" if call.error else json.dumps(call.result, ensure_ascii=False,
                                                                                   default=str)
                    term.write(f"[tool] {call.tool}({json.dumps(call.parameters, ensure_ascii=False)})"
                               + (f" -> {shown}\n" if call.answered else "\n"), own_line=True)
                replies = []
                for call in event.pending:
                    line = await term.readline(f"result of {call.tool} (JSON)> ")
                    if line is None:  # Ctrl-C (the watcher cancels) or EOF
                        replies = []
                        if term.eof:
                            await session.cancel()
                        break
                    try:
                        replies.append(call.reply(json.loads(line)))
                    except ValueError:
                        replies.append(call.reply(line))
                if replies:
                    await session.tool_result(event.task_id, replies)
            elif isinstance(event, Error):
                term.write(f"[error {event.code}] {event.message}\n", own_line=True)
            elif isinstance(event, End):
                term.write("" if event.finish_reason == "stop" else f"[{event.finish_reason}]\n", own_line=True)
    except RpcError as exc:
        term.write(f"[error {exc.code}] {exc.message}\n", own_line=True)
        if gen.task_id is not None and gen.finish_reason is None:  # a refused tool_result: end the task
            with contextlib.suppress(RpcError):
                await session.cancel(gen.task_id)
    finally:
        watcher.cancel()


def load_tools(path: str) -> list[Tool]:
    """Tools from a JSON list of definitions; one with a ``"result"`` is answered with it, always."""
    def canned(value: Any) -> Callable[..., Any]:
        return lambda **_: value

    with open(path, encoding="utf-8") as f:
        specs = json.load(f)
    return [Tool.from_dict({k: v for k, v in spec.items() if k != "result"},
                           canned(spec["result"]) if "result" in spec else None) for spec in specs]


async def chat(args: argparse.Namespace, tools: list[Tool], out: TextIO = sys.stdout) -> int:
    """The terminal chat loop; returns the exit status."""
    term = Terminal(out)
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    try:
        async with Client(args.url, args.api_key) as client:
            session = await client.create_session(tools)
            while (line := await term.readline("> ")) is not None:
                if line.strip():
                    await _turn(session, term, line, sampling)
    except (ApiError, ClientClosed, OSError) as exc:
        term.write(f"error: {exc}\n", own_line=True)
        return 1
    term.write("", own_line=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Chat with the inference server in a terminal.")
    parser.add_argument("--url", default="http://localhost:8000", help="the server (default: %(default)s)")
    parser.add_argument("--tools", help="a JSON list of tool definitions; a tool's optional \"result\" is a canned "
                                        "answer, else you are asked for a JSON result")
    parser.add_argument("--api-key", default=os.environ.get("INFERENCE_API_KEY") or None,
                        help="API key (default: $INFERENCE_API_KEY)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    args = parser.parse_args(argv)
    try:
        tools = load_tools(args.tools) if args.tools else []
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        parser.error(f"--tools {args.tools}: {exc!r}")
    try:
        return asyncio.run(chat(args, tools))
    except KeyboardInterrupt:  # where no signal handler could be installed
        return 130


if __name__ == "__main__":
    sys.exit(main())
