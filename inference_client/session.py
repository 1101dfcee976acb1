"""A session over its WebSocket (a ``Link``, which resumes after a drop): notifications go to their task's
``Generation``; registered tool handlers answer calls as they arrive, and a call the server asks again after a
resume gets the same answer."""
from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from websockets.asyncio.client import ClientConnection

from .events import (NOT_AWAITING, SESSION_BUSY, TASK_LOST, UNKNOWN_TASK, ClientClosed, End, Error, Event,
                     FinalText, RpcError, TextChunk, ToolCall, ToolCalls)
from .link import Link, Pending
from .tools import Tool, ToolsArg, as_tools

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


class Session:
    """A server session over its WebSocket. Make one with ``Client.create_session`` or ``Client.attach``."""

    def __init__(self, session_id: str, ws: ClientConnection, tools: list[Tool], timeout: float,
                 reopen: Callable[[int], Awaitable[ClientConnection]] | None = None, reconnect_s: float = 0.0) -> None:
        self.session_id, self.timeout = session_id, timeout
        self.tools: dict[str, Tool] = {t.name: t for t in tools}
        self._override = False  # tools were added after creation: send them with each generate
        self._queues: dict[str, asyncio.Queue[Any]] = {}
        self._claimed: set[str] = set()  # task ids a Generation of ours owns
        self._ended: set[str] = set()  # ...and those whose end has arrived
        self._answers: dict[str, dict[str, Any]] = {}  # call_id -> the reply sent (a resent request reuses it)
        # ``reopen(last_seq)`` opens a new socket with ?resume_from=; tried for ``reconnect_s`` after a drop
        self._link = Link(ws, self, timeout, reopen, reconnect_s)

    @property
    def closed(self) -> bool:
        """The session's socket is gone for good (closed by us, or reconnecting failed)."""
        return self._link.closed

    @property
    def reconnects(self) -> int:
        """How many times a dropped socket was reopened and resumed."""
        return self._link.reconnects

    @property
    def last_seq(self) -> int:
        """The seq of the last notification received (where a resumed socket starts)."""
        return self._link.last_seq

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
        reply = await self._link.request(method, params)
        if "error" in reply:
            e = reply["error"] if isinstance(reply["error"], dict) else {"message": str(reply["error"])}
            raise RpcError(e.get("code", 0), e.get("message", ""), e.get("data"))
        return reply.get("result")

    async def close(self) -> None:
        """Close the socket (the server cancels a running task; the session itself stays, see ``attach``)."""
        await self._link.close()

    def _queue_for(self, task_id: str) -> asyncio.Queue[Any]:
        queue = self._queues.setdefault(task_id, asyncio.Queue())
        if self.closed and queue.empty():
            queue.put_nowait(_CLOSED)
        return queue

    # ---- what the link reports (LinkOwner) ----------------------------------------------------------------------
    def on_notification(self, method: str, params: dict[str, Any]) -> None:
        """A notification: to its task's events."""
        task_id = params.get("task_id")
        if isinstance(task_id, str):
            if method == "end":
                self._ended.add(task_id)
            self._queue_for(task_id).put_nowait({"method": method, "params": params})

    def on_resumed(self, info: dict[str, Any]) -> None:
        """A task of ours that the replay does not name ended while we were away, and its end was not kept: it
        ends here with TASK_LOST."""
        for task_id in self._claimed - self._ended:
            if info and info.get("task_id") != task_id:
                queue = self._queue_for(task_id)
                queue.put_nowait({"method": "error", "params": {"task_id": task_id, "error": {
                    "code": TASK_LOST, "message": "the task is no longer running and its outcome was lost with the "
                    "socket; the conversation holds whatever it completed"}}})
                queue.put_nowait({"method": "end", "params": {"task_id": task_id, "finish_reason": "error"}})
                self._ended.add(task_id)

    def settled_by_replay(self, pending: Pending, info: dict[str, Any]) -> dict[str, Any] | None:
        """A ``generate`` whose task the replay shows (named by ``resumed``, or one whose notifications came and
        no Generation claims) did start: it is that task, not sent again."""
        if pending.method != "generate":
            return None
        task_id = info.get("task_id") or next((t for t in self._queues if t not in self._claimed), None)
        return {"result": {"status": "processing", "task_id": task_id}} if task_id is not None else None

    def on_response(self, pending: Pending, message: dict[str, Any]) -> dict[str, Any]:
        """A resent ``generate`` answered "session busy" with a task no Generation claims: the original got
        through before the drop, and that task is its."""
        error = message.get("error")
        if pending.resent and pending.method == "generate" and isinstance(error, dict) \
                and error.get("code") == SESSION_BUSY and isinstance(error.get("data"), dict):
            task_id = error["data"].get("task_id")
            if isinstance(task_id, str) and task_id not in self._claimed:
                return {"result": {"status": "processing", "task_id": task_id}}
        return message

    def on_closed(self) -> None:
        for queue in self._queues.values():
            queue.put_nowait(_CLOSED)

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
