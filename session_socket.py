"""The WebSocket side of a session: handshake checks, the receive loop, ordered and bounded sending, and
the JSON-RPC methods ``generate``, ``tool_result`` and ``cancel``."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from auth import origin_allowed
from jsonrpc import Dispatcher, Method, RpcError
from models import CancelParams, ErrorCode, GenerateRequestParams, ToolDefinition, ToolResultParams
from shared import Runtime, Settings, session_var
from tasks import Session, Task, TaskFailure
from utils import build_prompt_ids, generate_interactive_stream_ws, history_to_messages, open_stream, sampling_params

log = logging.getLogger("inference.server")
GOING_AWAY = 1001
POLICY_VIOLATION = 1008


@dataclass
class Context:
    rt: Runtime
    session: Session
    caller: str  # who is rate-limited: the key id, or the client address without keys


def invalid(field: str, msg: str) -> RpcError:
    return RpcError(ErrorCode.INVALID_PARAMS, "Invalid params", [{"loc": [field], "msg": msg, "type": "limit"}])


def tools_problem(settings: Settings, tools: list[ToolDefinition]) -> str | None:
    """Why ``tools`` exceed the configured limits, or None."""
    if len(tools) > settings.max_tools:
        return f"at most {settings.max_tools} tools"
    for tool in tools:
        if len(json.dumps(tool.model_dump(mode="json"))) > settings.max_tool_schema_bytes:
            return f"tool {tool.name!r} is larger than {settings.max_tool_schema_bytes} bytes"
    return None


def check_generate_limits(settings: Settings, p: GenerateRequestParams) -> None:
    if p.max_new_tokens is not None and p.max_new_tokens > settings.max_new_tokens_cap:
        raise invalid("max_new_tokens", f"must be <= {settings.max_new_tokens_cap}")
    if p.message is not None and len(p.message) > settings.max_message_chars:
        raise invalid("message", f"longer than {settings.max_message_chars} characters")
    if p.history is not None:
        if len(p.history) > settings.max_history_messages:
            raise invalid("history", f"more than {settings.max_history_messages} messages")
        if any(len(m.content or "") > settings.max_message_chars for m in p.history):
            raise invalid("history", f"a message is longer than {settings.max_message_chars} characters")
    if p.tools is not None and (problem := tools_problem(settings, p.tools)):
        raise invalid("tools", problem)


async def rpc_generate(ctx: Context, p: GenerateRequestParams) -> dict[str, Any]:
    rt, session, settings = ctx.rt, ctx.session, ctx.rt.settings
    if rt.draining:
        raise RpcError(ErrorCode.ENGINE_UNAVAILABLE, "the server is shutting down")
    if session.active_task is not None:
        raise RpcError(ErrorCode.SESSION_BUSY, "the session already has an active task; cancel it or wait for its end",
                       {"task_id": session.active_task.task_id})
    check_generate_limits(settings, p)
    if retry := rt.limiter.acquire(ctx.caller):
        raise RpcError(ErrorCode.RATE_LIMITED, "too many requests", {"retry_after_s": round(retry, 2)})
    max_new = p.max_new_tokens or min(settings.default_max_new_tokens, settings.max_new_tokens_cap)
    tools = session.tools if p.tools is None else p.tools
    if p.history is not None:
        messages = history_to_messages(p.history)
    else:
        messages = [*session.messages, {"role": "user", "content": p.message}]
    try:
        prompt_ids = build_prompt_ids(rt.tokenizer, messages, tools)
    except Exception as exc:  # the template rejects the conversation (e.g. roles out of order)
        raise RpcError(ErrorCode.INVALID_PARAMS, f"the chat template cannot render this conversation: {exc}") from None
    if settings.max_prompt_tokens and len(prompt_ids) > settings.max_prompt_tokens:
        raise RpcError(ErrorCode.CONTEXT_LENGTH_EXCEEDED, f"prompt has {len(prompt_ids)} tokens; at most "
                       f"{settings.max_prompt_tokens} are accepted",
                       {"prompt_tokens": len(prompt_ids), "max_prompt_tokens": settings.max_prompt_tokens})
    params = sampling_params(p, rt.model.defaults, max_new, rt.model.stop_token_ids)
    task = Task(session, tools, params, p.stop or [], on_error=lambda code: rt.metrics.errors.labels(code).inc())
    try:
        task.first_stream = open_stream(rt, task, prompt_ids)
    except TaskFailure as failure:
        raise failure.error from None
    session.messages = messages
    # The response is queued by the dispatcher before this task first runs (it starts at the next await).
    task.start(lambda t: generate_interactive_stream_ws(t, rt))
    log.info("generate: task %s, prompt %d tokens, max_new_tokens %d, %d tools", task.task_id, len(prompt_ids),
             max_new, len(tools))
    if log.isEnabledFor(logging.DEBUG):
        log.debug("prompt: %r", rt.tokenizer.decode(prompt_ids))
    return {"status": "processing", "task_id": task.task_id}


async def rpc_tool_result(ctx: Context, p: ToolResultParams) -> dict[str, Any]:
    task = ctx.session.active_task
    if task is None or task.task_id != p.task_id:
        raise RpcError(ErrorCode.UNKNOWN_TASK, f"this session has no active task {p.task_id!r}",
                       {"active_task_id": task.task_id if task else None})
    task.submit_tool_results(p.results)
    return {"status": "received"}


async def rpc_cancel(ctx: Context, p: CancelParams) -> dict[str, Any]:
    task = ctx.session.active_task
    if task is None:
        raise RpcError(ErrorCode.NOTHING_TO_CANCEL, "no active task to cancel")
    if p.task_id is not None and p.task_id != task.task_id:
        raise RpcError(ErrorCode.UNKNOWN_TASK, f"this session has no active task {p.task_id!r}",
                       {"active_task_id": task.task_id})
    task.cancel()  # delivered at the task's next await, after this response is queued
    return {"status": "cancelled", "task_id": task.task_id}


METHODS = {
    "generate": Method(GenerateRequestParams, rpc_generate),
    "tool_result": Method(ToolResultParams, rpc_tool_result),
    "cancel": Method(CancelParams, rpc_cancel),
}


# ---- the connection ---------------------------------------------------------------------------------------------
class Connection:
    """Outgoing messages of one socket, sent in order by one sender task, through a bounded queue.

    A client that stops reading fills the queue; the connection then counts as stalled (``overflowed``)
    and is dropped, so the server never buffers without bound for it.
    """

    def __init__(self, websocket: WebSocket, max_queue: int) -> None:
        self.websocket = websocket
        self.queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=max_queue)
        self.overflowed = asyncio.Event()
        self.closing = False
        self.sender = asyncio.get_running_loop().create_task(self._send_loop())

    def send(self, message: dict[str, Any] | list[Any]) -> None:
        if self.overflowed.is_set() or self.closing:
            return
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            log.warning("client is not reading: %d messages queued; dropping the connection", self.queue.qsize())
            self.overflowed.set()

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Close after everything queued so far is sent."""
        if not self.closing:
            self.closing = True
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(("close", code, reason))

    async def _send_loop(self) -> None:
        with contextlib.suppress(Exception):  # the peer went away: the reader sees the disconnect
            while True:
                message = await self.queue.get()
                if isinstance(message, tuple):
                    await self.websocket.close(message[1], message[2])
                    return
                await self.websocket.send_text(json.dumps(message, ensure_ascii=False))

    async def stop(self) -> None:
        if not self.overflowed.is_set():
            self.close()
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self.sender), 5)
        self.sender.cancel()


# ---- the socket ------------------------------------------------------------------------------------------------
async def refuse(websocket: WebSocket, status: int, message: str) -> None:
    """Refuse a handshake with an HTTP status and a JSON body where the server supports it (else a 403)."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(JSONResponse({"error": {"message": message}}, status_code=status))
    else:
        await websocket.close(code=POLICY_VIOLATION, reason=message[:120])


async def admit(websocket: WebSocket, rt: Runtime) -> Session | None:
    """Check the handshake (before accept): shutting down, Origin, credentials, session, ownership."""
    session_id = websocket.path_params["session_id"]
    if rt.draining:
        await refuse(websocket, 503, "the server is shutting down")
        return None
    if not origin_allowed(websocket.headers.get("origin"), websocket.headers.get("host"),
                          rt.settings.allowed_origins):
        log.warning("refused a WebSocket from Origin %r", websocket.headers.get("origin"))
        await refuse(websocket, 403, "this Origin is not allowed")
        return None
    ticket = websocket.query_params.get("ticket")
    owner = rt.tickets.redeem(ticket, session_id) if ticket else rt.keys.from_header(
        websocket.headers.get("authorization"))
    if owner is None:
        await refuse(websocket, 401, "missing or invalid credentials (Authorization: Bearer <key>, or ?ticket=)")
        return None
    session = rt.sessions.get(session_id)
    if session is None or (rt.keys.enabled and session.owner != owner):
        await refuse(websocket, 404 if session is None else 403, "no such session" if session is None
                     else "this session belongs to another key")
        return None
    if session.emitter is not None:
        await refuse(websocket, 409, "this session already has a connected socket")
        return None
    return session


async def ws_session(websocket: WebSocket) -> None:
    rt: Runtime = websocket.app.state.runtime
    session = await admit(websocket, rt)
    if session is None:
        return
    session_var.set(session.session_id)
    await websocket.accept()
    conn = Connection(websocket, rt.settings.ws_send_queue)
    rt.connections.add(conn)
    session.emitter = conn.send
    session.touch()
    client = websocket.client.host if websocket.client else "-"
    caller = session.owner if rt.keys.enabled else f"addr:{client}"
    log.info("websocket connected from %s", client)
    reader = asyncio.create_task(receive_loop(websocket, conn, Context(rt, session, caller)))
    stalled = asyncio.create_task(conn.overflowed.wait())
    started = time.monotonic()
    try:
        await asyncio.wait({reader, stalled}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in (reader, stalled):
            waiter.cancel()
        session.emitter = None
        task = session.active_task
        if task is not None:  # a client that goes away cancels its task and frees its engine slot now
            task.cancel()
            await task.wait()
        await conn.stop()
        rt.connections.discard(conn)
        session.touch()
        log.info("websocket closed after %.1f s%s", time.monotonic() - started,
                 " (client stopped reading)" if conn.overflowed.is_set() else "")


async def receive_loop(websocket: WebSocket, conn: Connection, ctx: Context) -> None:
    dispatcher: Dispatcher = websocket.app.state.dispatcher
    with contextlib.suppress(WebSocketDisconnect):
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                try:
                    text = (message.get("bytes") or b"").decode("utf-8")
                except UnicodeDecodeError:
                    text = "\x00not json"  # answered as a parse error
            ctx.session.touch()
            reply = await dispatcher.handle_text(text, ctx)
            if reply is not None:
                conn.send(reply)
