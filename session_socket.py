"""The WebSocket side of a session: handshake checks, attaching (resuming a dropped stream with
``?resume_from=``), the receive loop, detaching (a running task gets INFERENCE_RESUME_GRACE_S for the client to
come back), and the JSON-RPC methods ``generate``, ``tool_result`` and ``cancel``. Sending is ``connection.py``'s."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from auth import origin_allowed
from connection import Connection
from jsonrpc import Dispatcher, Method, RpcError, clip, notification
from limits import (PromptTooLong, check_generate_limits, check_tool_round, precheck_generate, precheck_tool_result,
                    text_chars_at_least)
from log_context import session_var
from models import (CancelParams, EndParams, ErrorCode, ErrorNotificationParams, FunctionCallRequestParams,
                    GenerateRequestParams, JsonRpcError, ResumedParams, ToolResultParams, Usage)
from resume import Replay, ResumeRefused, parse_resume_from
from session_store import StoreError
from shared import Runtime
from structured_outputs import SchemaRefused, choices, plan, prompt_tools, refusal_data
from tasks import Session, Task, TaskFailure, tool_content
from utils import (context_data, generate_interactive_stream_ws, history_to_messages, open_stream, sampling_params,
                   tokenize_prompt)
from workers import off_loop

log = logging.getLogger("inference.server")
GOING_AWAY = 1001
POLICY_VIOLATION = 1008
SUPERSEDED = 4000  # a socket closed because a newer one resumed its session
REPLICA_HEADER = "X-Inference-Replica"


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
    if session.too_large and p.history is None:
        raise RpcError(ErrorCode.SESSION_TOO_LARGE, f"this conversation is larger than the {settings.session_max_bytes} "
                       "bytes a stored session may hold: start a new session, or send a shorter history")
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
                base=0 if p.history is not None else len(session.messages), turns=turns)
    try:
        open_stream(rt, task, prompt_ids)
    except TaskFailure as failure:
        raise failure.error from None
    session.messages = messages
    if p.history is not None:
        session.synced = 0  # a new conversation: stored whole
    session.lost_task = None
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


# ---- the socket ------------------------------------------------------------------------------------------------
async def refuse(websocket: WebSocket, status: int, message: str) -> None:
    """Refuse a handshake with an HTTP status and a JSON body where the server supports it (else a 403)."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(JSONResponse({"error": {"message": message}}, status_code=status))
    else:
        await websocket.close(code=POLICY_VIOLATION, reason=message[:120])


async def admit(websocket: WebSocket, rt: Runtime, resume_from: int | None) -> Session | None:
    """Check the handshake (before accept): shutting down, Origin, credentials, session (held here or in the
    store), ownership, a socket already attached (a resuming one replaces it)."""
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
    try:
        session = await rt.sessions.attach(session_id)
    except (StoreError, RpcError) as exc:  # the store failed, or this process holds too many sessions
        log.warning("could not attach session %s: %s", clip(session_id, 100), exc)
        await refuse(websocket, 503, "the session cannot be attached now; retry")
        return None
    if session is None or (rt.keys.enabled and session.owner != owner):
        await refuse(websocket, 404 if session is None else 403, "no such session" if session is None
                     else "this session belongs to another key")
        return None
    if session.connection is not None and resume_from is None:
        await refuse(websocket, 409, "this session already has a connected socket")
        return None
    if resume_from is not None and session.active_task is not None and resume_from > session.seq:
        await refuse(websocket, 400, f"resume_from is ahead of this session's stream (its last notification is "
                     f"{session.seq})")
        return None
    return session


async def ws_session(websocket: WebSocket) -> None:
    rt: Runtime = websocket.app.state.runtime
    try:
        resume_from = parse_resume_from(websocket.query_params.get("resume_from"))
    except ResumeRefused as exc:
        await refuse(websocket, 400, str(exc))
        return
    session = await admit(websocket, rt, resume_from)
    if session is None:
        return
    session_var.set(session.session_id)
    replica = rt.settings.replica_id
    await websocket.accept(headers=[(REPLICA_HEADER.lower().encode(), replica.encode())] if replica else None)
    if session.connection is not None and resume_from is None:  # another socket attached while this one opened
        await websocket.close(POLICY_VIOLATION, "this session already has a connected socket")
        return
    conn = attach(rt, session, websocket, resume_from)
    client = websocket.client.host if websocket.client else "-"
    caller = session.owner if rt.keys.enabled else f"addr:{client}"
    log.info("websocket connected from %s%s", client, "" if resume_from is None else f", resuming after {resume_from}")
    reader = asyncio.create_task(receive_loop(websocket, conn, Context(rt, session, caller)))
    stalled = asyncio.create_task(conn.overflowed.wait())
    started = time.monotonic()
    try:
        await asyncio.wait({reader, stalled}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in (reader, stalled):
            waiter.cancel()
        if session.connection is conn:  # (not when a resumed socket replaced this one)
            task = detach(rt, session)
            if task is not None:
                await task.wait()
        await conn.stop()
        rt.connections.discard(conn)
        session.touch()
        log.info("websocket closed after %.1f s%s", time.monotonic() - started,
                 " (client stopped reading)" if conn.stalled else "")


def attach(rt: Runtime, session: Session, websocket: WebSocket, resume_from: int | None) -> Connection:
    """Make this socket the session's. Resuming, it is first sent every kept notification after ``resume_from``.
    No await in here: nothing can be emitted between the replay and the switch, so nothing is lost or doubled."""
    if session.grace is not None:
        session.grace.cancel()
        session.grace = None
    replay = None
    if resume_from is not None:
        if resume_from > session.seq and session.active_task is None:
            session.seq = resume_from  # (a restarted process's count is behind): number what comes next above it
        replay = session.replay.since(resume_from)
    settings = rt.settings
    conn = Connection(websocket, settings.ws_send_queue, settings.ws_send_queue_bytes,
                      backlog=replay.texts if replay else ())
    rt.connections.add(conn)
    old, session.connection, session.emitter = session.connection, conn, conn.send_text
    session.touch()
    if old is not None:
        old.close(SUPERSEDED, "a newer socket resumed this session")
    if resume_from is not None and replay is not None:
        resumed(rt, session, conn, resume_from, replay)
    return conn


def resumed(rt: Runtime, session: Session, conn: Connection, resume_from: int, replay: Replay) -> None:
    """After the replay: say what could not be replayed, end a task that was lost with its process, resend tool
    calls still waiting for results, and tell the client the replay is over (``resumed``)."""
    sid, task = session.session_id, session.active_task
    rt.metrics.resumes.labels("complete" if replay.missing_from is None else "incomplete").inc()
    if replay.missing_from is not None:
        session.emit("error", ErrorNotificationParams(session_id=sid, task_id=task.task_id if task else None,
                                                      error=JsonRpcError(
            code=ErrorCode.RESUME_INCOMPLETE, message=f"notifications from seq {replay.missing_from} to "
            f"{replay.floor} are no longer kept: this stream has a gap (final_text will be complete)",
            data={"missing_from": replay.missing_from, "missing_to": replay.floor})))
    if session.lost_task is not None:
        lost, session.lost_task = session.lost_task, None
        session.emit("error", ErrorNotificationParams(session_id=sid, task_id=lost, error=JsonRpcError(
            code=ErrorCode.TASK_LOST, message="the task was lost with the process that ran it (a restart, or its "
            "replica died); the conversation is as it was before the task: send it again", data={"retry": True})))
        session.emit("end", EndParams(session_id=sid, task_id=lost, finish_reason="error", usage=Usage()))
    if task is not None and task.calls_request is not None and task.calls_seq <= max(resume_from, replay.floor):
        unanswered = [p.request for p in task.unanswered]  # the client saw them (or they are gone): once more
        if unanswered:
            task.request_tools(FunctionCallRequestParams(session_id=sid, task_id=task.task_id, tool_calls=unanswered))
    conn.send(notification("resumed", ResumedParams(session_id=sid, resume_from=resume_from, seq=session.seq,
                                                    task_id=task.task_id if task else None)))


def detach(rt: Runtime, session: Session) -> Task | None:
    """The session's socket went away. Its running task goes on for INFERENCE_RESUME_GRACE_S (buffering) for the
    client to resume; with 0, or while shutting down, it is cancelled now (returned, to be awaited)."""
    session.connection = session.emitter = None
    task = session.active_task
    if task is None:
        return None
    grace = rt.settings.resume_grace_s
    if grace <= 0 or rt.draining:
        task.cancel()  # frees its engine slot now
        return task
    log.info("socket gone: task %s runs on for up to %.0f s for the client to resume", task.task_id, grace)

    def give_up() -> None:
        session.grace = None
        if session.active_task is task and session.connection is None:
            log.info("no client resumed task %s within %.0f s: cancelling it", task.task_id, grace)
            task.cancel()
    session.grace = asyncio.get_running_loop().call_later(grace, give_up)
    return None


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
