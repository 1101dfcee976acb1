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
from jsonrpc import Dispatcher, Method, RpcError, clip
from limits import (PromptTooLong, check_generate_limits, check_tool_round, precheck_generate, precheck_tool_result,
                    text_chars_at_least)
from models import CancelParams, ErrorCode, GenerateRequestParams, ToolResultParams
from shared import Runtime, session_var
from structured_outputs import SchemaRefused, choices, plan, prompt_tools, refusal_data
from tasks import Session, Task, TaskFailure, tool_content
from workers import off_loop
from utils import (context_data, generate_interactive_stream_ws, history_to_messages, open_stream, sampling_params,
                   tokenize_prompt)

log = logging.getLogger("inference.server")
GOING_AWAY = 1001
POLICY_VIOLATION = 1008


@dataclass
class Context:
    rt: Runtime
    session: Session
    caller: str  # who is rate-limited: the key id, or the client address without keys


def ensure_idle(session: Session) -> None:
    if session.active_task is not None:
        raise RpcError(ErrorCode.SESSION_BUSY, "the session already has an active task; cancel it or wait for its end",
                       {"task_id": session.active_task.task_id})


def precheck_generate_frame(ctx: Context, params: dict[str, Any]) -> None:
    """Before the params are validated (which can be costly): a busy session, then the size limits."""
    ensure_idle(ctx.session)
    precheck_generate(ctx.rt.settings, params)


async def rpc_generate(ctx: Context, p: GenerateRequestParams) -> dict[str, Any]:
    rt, session, settings = ctx.rt, ctx.session, ctx.rt.settings
    if rt.draining:
        raise RpcError(ErrorCode.ENGINE_UNAVAILABLE, "the server is shutting down")
    ensure_idle(session)
    check_generate_limits(settings, p)
    if retry := rt.limiter.acquire(ctx.caller):
        raise RpcError(ErrorCode.RATE_LIMITED, "too many requests", {"retry_after_s": round(retry, 2)})
    max_new = p.max_new_tokens or min(settings.default_max_new_tokens, settings.max_new_tokens_cap)
    choice, fmt = choices(p.tool_choice, p.response_format, p.parallel_tool_calls)
    tools = prompt_tools(session.tools if p.tools is None else p.tools, choice)
    if p.history is not None:
        messages = history_to_messages(p.history)
    else:
        messages = [*session.messages, {"role": "user", "content": p.message}]
    try:  # priced and compiled on the worker pool
        turns = await plan(rt, tools, choice, fmt)
    except SchemaRefused as exc:
        raise RpcError(ErrorCode.INVALID_PARAMS, clip(str(exc), 500), refusal_data(exc)) from None
    try:  # priced, then tokenized on the worker pool
        prompt_ids = await tokenize_prompt(rt, messages, tools)
    except PromptTooLong as exc:
        raise RpcError(ErrorCode.CONTEXT_LENGTH_EXCEEDED, str(exc), context_data(rt, exc)) from None
    except Exception as exc:  # the template rejects the conversation (e.g. roles out of order)
        raise RpcError(ErrorCode.INVALID_PARAMS,
                       clip(f"the chat template cannot render this conversation: {exc}", 300)) from None
    if rt.draining:  # what may have changed while the prompt was tokenized
        raise RpcError(ErrorCode.ENGINE_UNAVAILABLE, "the server is shutting down")
    ensure_idle(session)
    params = sampling_params(p, rt.model.defaults, max_new, rt.model.stop_token_ids)
    task = Task(session, tools, params, p.stop or [], on_error=lambda code: rt.metrics.errors.labels(code).inc(),
                turns=turns)
    try:
        open_stream(rt, task, prompt_ids)
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
        raise RpcError(ErrorCode.UNKNOWN_TASK, f"this session has no active task {clip(repr(p.task_id))}",
                       {"active_task_id": task.task_id if task else None})
    settings = ctx.rt.settings
    at_least = await off_loop(lambda: [text_chars_at_least(i.error_message if i.isError else i.result)
                                       for i in p.results])
    check_tool_round(settings, at_least, task.round_chars)  # refused before anything is serialized
    contents = [tool_content(item) for item in p.results]  # bounded now: a few hundred KB at most
    check_tool_round(settings, contents, task.round_chars)
    if ctx.session.active_task is not task:
        raise RpcError(ErrorCode.UNKNOWN_TASK, f"task {task.task_id} has ended")
    task.submit_tool_results(p.results, contents)
    return {"status": "received"}


async def rpc_cancel(ctx: Context, p: CancelParams) -> dict[str, Any]:
    task = ctx.session.active_task
    if task is None:
        raise RpcError(ErrorCode.NOTHING_TO_CANCEL, "no active task to cancel")
    if p.task_id is not None and p.task_id != task.task_id:
        raise RpcError(ErrorCode.UNKNOWN_TASK, f"this session has no active task {clip(repr(p.task_id))}",
                       {"active_task_id": task.task_id})
    task.cancel()  # delivered at the task's next await, after this response is queued
    return {"status": "cancelled", "task_id": task.task_id}


METHODS = {  # cancel is validated inline: it must never wait behind costly work
    "generate": Method(GenerateRequestParams, rpc_generate, precheck=precheck_generate_frame, heavy=True),
    "tool_result": Method(ToolResultParams, rpc_tool_result,
                          precheck=lambda ctx, params: precheck_tool_result(ctx.rt.settings, params), heavy=True),
    "cancel": Method(CancelParams, rpc_cancel),
}


# ---- the connection ---------------------------------------------------------------------------------------------
class _Close:
    def __init__(self, code: int, reason: str) -> None:
        self.code, self.reason = code, reason


def encode(message: dict[str, Any] | list[Any]) -> tuple[str, int]:
    """A message as JSON text, and its size in bytes. Text that is not Unicode (a lone surrogate that slipped
    through) is sent \\u-escaped rather than failing the sender: the connection never goes silent."""
    text = json.dumps(message, ensure_ascii=False)
    try:
        return text, len(text.encode("utf-8"))
    except UnicodeEncodeError:
        text = json.dumps(message)
        return text, len(text)


class Connection:
    """Outgoing messages of one socket, sent in order by one sender task, through a queue bounded in messages
    and in bytes.

    A client that stops reading fills the queue; the connection then counts as stalled (``overflowed``)
    and is dropped, so the server never buffers without bound for it.
    """

    def __init__(self, websocket: WebSocket, max_queue: int, max_bytes: int = 8 << 20) -> None:
        self.websocket = websocket
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
        text, size = encode(message)
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
    conn = Connection(websocket, rt.settings.ws_send_queue, rt.settings.ws_send_queue_bytes)
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
                 " (client stopped reading)" if conn.stalled else "")


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
