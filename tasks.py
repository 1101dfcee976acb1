"""Sessions and tasks: their state, ownership of the conversation, numbered notifications, tool-result hand-off,
cancellation. A task is one ``generate`` call; everything it holds is released in ``Task._ended``, the
done-callback of its asyncio task, which runs exactly once whatever happens (even a cancel before the task's
first step). The live sessions of the process, and their durable copies, are ``sessions.py``'s."""
from __future__ import annotations

import asyncio
import contextvars
import enum
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from engine import RequestStream, SamplingParams
from grammars import TurnGrammars
from jsonrpc import RpcError, clip, encode, encode_text_chunk
from log_context import task_var
from models import (EndParams, ErrorCode, ErrorNotificationParams, FunctionCallRequestParams, JsonRpcError,
                    ToolCallRequest, ToolDefinition, ToolResultItem, Usage)
from resume import ReplayBuffer
from session_store import committed

log = logging.getLogger("inference.tasks")

Emitter = Callable[[str, int], None]  # puts one encoded JSON-RPC message (text, bytes) on a connection


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(16)}"  # 128 random bits: not guessable


class TaskStatus(enum.Enum):
    GENERATING = "generating"
    AWAITING_TOOLS = "awaiting_tools"
    FINISHED = "finished"


class TaskFailure(Exception):
    """Ends a task with ``error`` + ``end``; carries the JSON-RPC error to report."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.error = RpcError(code, message, data)


@dataclass
class Session:
    session_id: str
    tools: list[ToolDefinition]
    owner: str = "anonymous"  # the key id that created it: only that key may attach
    quota: str = ""  # whose session count it counts against: the key id, or the client address without keys
    messages: list[dict[str, Any]] = field(default_factory=list)  # the conversation, chat-template shaped
    active_task: Task | None = None
    connection: Any = None  # the attached WebSocket's connection, if any
    emitter: Emitter | None = None  # ...and its sender
    last_active: float = field(default_factory=time.monotonic)
    # numbered notifications, kept for a client that resumes (see resume.py)
    seq: int = 0  # the last notification number handed out
    replay: ReplayBuffer = field(default_factory=lambda: ReplayBuffer(2**20))
    grace: asyncio.TimerHandle | None = None  # cancels the task of a socket that dropped, unless it resumes
    replay_keep_s: float = 0.0  # how long a finished task's notifications stay for a resuming client
    # the durable copy (sessions.py writes it; session_store.SessionRecord is its shape)
    created_at: float = field(default_factory=time.time)
    version: int = 0  # writes so far
    synced: int = 0  # leading messages the store holds unchanged: the next write starts there
    tools_json: list[dict[str, Any]] | None = None  # ``tools`` as stored (dumped once, off the event loop)
    stored_task: dict[str, Any] | None = None  # the running task as stored: {"task_id", "base"}
    lost_task: str | None = None  # a task the store says was running when its process died
    too_large: bool = False  # the last write was refused: larger than the store allows
    saver: Callable[[Session], asyncio.Future[Any] | None] | None = None
    # text of the running task not sent yet because the socket was behind (sent with the next chunk, when the
    # socket has caught up, or before any other notification)
    held: str = ""
    held_task: str = ""

    def touch(self) -> None:
        self.last_active = time.monotonic()

    def emit(self, method: str, params: BaseModel) -> int:
        return self.emit_raw(method, params.model_dump(mode="json"))

    def emit_chunk(self, task_id: str, text: str, coalesce: bool) -> None:
        """A ``text_chunk``. With ``coalesce``, while the socket is behind (messages already wait to be written)
        the text is held and joined to the next chunk instead: a slow client gets fewer, longer chunks, and the
        server encodes and frames fewer messages. Held text goes out as soon as the socket has caught up, and
        counts against the socket's bounds meanwhile (a client that stopped reading is still dropped)."""
        conn = self.connection
        if coalesce and conn is not None and conn.behind:
            if not self.held:
                conn.on_drained = self.flush_held
            self.held += text
            self.held_task = task_id
            conn.hold(len(text) + 160)  # (the notification's size, about)
            return
        if self.held:
            text, self.held = self.held + text, ""
            if conn is not None:
                conn.released()
        self._emit_chunk(task_id, text)

    def flush_held(self) -> None:
        """Send the held text now (its socket caught up, or another notification must follow it)."""
        if self.held:
            text, self.held = self.held, ""
            if self.connection is not None:
                self.connection.released()
            self._emit_chunk(self.held_task, text)

    def _emit_chunk(self, task_id: str, text: str) -> None:
        self.seq += 1
        self._send(self.seq, *encode_text_chunk(self.session_id, task_id, text, self.seq))

    def emit_raw(self, method: str, params: dict[str, Any]) -> int:
        """Number a notification, keep it for resuming clients, send it to the attached socket; its seq."""
        if self.held and method != "text_chunk":  # held text comes first, in order
            self.flush_held()
        self.seq += 1
        params["seq"] = self.seq
        self._send(self.seq, *encode({"jsonrpc": "2.0", "method": method, "params": params}))
        return self.seq

    def _send(self, seq: int, text: str, size: int) -> None:
        self.replay.add(seq, text, size)
        if self.emitter is not None:
            self.emitter(text, size)

    def forget_replay_later(self) -> None:
        """A task ended: its notifications go ``replay_keep_s`` later, unless another task has begun by then."""
        seq = self.seq

        def forget() -> None:
            if self.active_task is None and self.seq == seq:
                self.replay.clear(seq)
        asyncio.get_running_loop().call_later(self.replay_keep_s, forget)

    def save(self) -> asyncio.Future[Any] | None:
        """Write the session to the store (in order with its earlier writes; never waits)."""
        return None if self.saver is None else self.saver(self)

    async def save_durably(self) -> None:
        """Write the session and wait (up to session_store.WAIT_S) until the store has it: what a client is told
        next survives this process. A failing store is logged and shown in /ready; the task goes on regardless."""
        if problem := await committed(self.save()):
            log.warning("the conversation was not stored (%s); going on", clip(problem, 200))


@dataclass
class PendingCall:
    request: ToolCallRequest
    result: ToolResultItem | None = None
    content: str | None = None  # the result as the tool message's text (measured against the limits)


class Task:
    """One ``generate``: runs the turn loop, waits for tool results, ends with exactly one ``end``."""

    def __init__(self, session: Session, tools: list[ToolDefinition], params: SamplingParams,
                 stop: list[str], stream: RequestStream | None = None,
                 on_error: Callable[[int], None] | None = None, base: int = 0,
                 turns: TurnGrammars | None = None) -> None:
        self.task_id = new_id("task-")
        self.session = session
        self.base = base  # messages of the conversation before this task's own (its user message) begin
        self.tools = tools
        self.params = params
        self.turns = turns or TurnGrammars()  # the grammars of its model calls (structured outputs)
        self.model_calls = 0
        self.stop = stop
        self.stream = stream  # the engine request of the current model call (aborted when the task ends)
        self.reason: str | None = None  # how the body finished: stop, length, cancelled, error
        self.status = TaskStatus.GENERATING
        self.usage = Usage()
        self.pending: list[PendingCall] = []
        self.round_chars = 0  # characters of the tool results accepted in this round
        self._results_ready = asyncio.Event()
        self._aio: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.on_error = on_error
        self.calls_request: FunctionCallRequestParams | None = None  # the tool calls waiting for results
        self.calls_seq = 0  # ...and the seq they were sent with

    def emit(self, method: str, params: BaseModel) -> int:
        return self.session.emit(method, params)

    def request_tools(self, request: FunctionCallRequestParams) -> None:
        """Send ``function_call_request``; kept to send again to a client that resumes after missing it."""
        self.calls_request, self.calls_seq = request, self.emit("function_call_request", request)

    def start(self, body: Callable[[Task], Any]) -> None:
        """Run ``body(task)`` (the turn loop) as an asyncio task.

        The cleanup is the asyncio task's done-callback, not a ``finally`` in ``run``: a task cancelled before
        its first step never enters ``run`` at all, but its done-callbacks always run, exactly once.
        """
        self.session.active_task = self
        # stored with the conversation: a process that finds it there after a crash knows this task was lost,
        # and where the conversation stood before it (``base``: a retry starts from there)
        self.session.stored_task = {"task_id": self.task_id, "base": self.base}
        self.session.save()
        context = contextvars.copy_context()
        context.run(task_var.set, self.task_id)
        self._aio = asyncio.get_running_loop().create_task(self.run(body), name=self.task_id, context=context)
        self._aio.add_done_callback(self._ended, context=context)

    def cancel(self) -> None:
        if self._aio is not None and not self._aio.done():
            self._aio.cancel()

    async def wait(self) -> None:
        """Until the task has ended (its ``end`` emitted and the session freed)."""
        if self._aio is not None:
            await asyncio.gather(self._aio, return_exceptions=True)
            await self._closed.wait()

    async def run(self, body: Callable[[Task], Any]) -> None:
        """The body; records how it finished. The cleanup is ``_ended``."""
        try:
            self.reason = await body(self)
        except asyncio.CancelledError:
            self.reason = "cancelled"
        except TaskFailure as failure:
            self.reason = "error"
            self._report(failure.error)
        except Exception as exc:  # a bug or a model failure: this task ends, the server goes on
            self.reason = "error"
            log.exception("task failed")
            self._report(RpcError(ErrorCode.GENERATION_FAILED, clip(f"generation failed: {exc}", 1000)))

    def _ended(self, _aio: asyncio.Task[None]) -> None:
        """The one place a task ends: abort its engine request, close unanswered tool calls, emit ``end``,
        free the session. Runs once, as the asyncio task's done-callback."""
        if self.status is TaskStatus.FINISHED:
            return
        reason = self.reason or "cancelled"  # no reason: cancelled before its first step
        if self.stream is not None:
            self.stream.abort()
        self._close_unanswered(reason)
        self.status = TaskStatus.FINISHED
        self.usage.total_tokens = self.usage.prompt_tokens + self.usage.completion_tokens
        self.emit("end", EndParams(session_id=self.session.session_id, task_id=self.task_id,
                                   finish_reason=reason, usage=self.usage))
        if self.session.active_task is self:
            self.session.active_task = None
        self.session.stored_task = None
        self.session.save()
        self.session.forget_replay_later()
        self.session.touch()
        self._closed.set()
        ttft = f"{(self.first_token_at - self.started) * 1000:.0f} ms" if self.first_token_at else "-"
        log.info("task end: %s, prompt %d tokens (%d cached), completion %d tokens, ttft %s, total %.2f s",
                 reason, self.usage.prompt_tokens, self.usage.cached_tokens, self.usage.completion_tokens,
                 ttft, time.perf_counter() - self.started)

    def _report(self, error: RpcError) -> None:
        if self.on_error is not None:
            self.on_error(error.code)
        self.emit("error", ErrorNotificationParams(session_id=self.session.session_id, task_id=self.task_id,
                                                   error=JsonRpcError(**error.to_dict())))

    # ---- tool results ----------------------------------------------------------------------------------------
    async def await_tool_results(self, calls: list[ToolCallRequest], timeout: float) -> list[PendingCall]:
        self.pending = [PendingCall(c) for c in calls]
        self.round_chars = 0
        self._results_ready.clear()
        self.status = TaskStatus.AWAITING_TOOLS
        try:
            await asyncio.wait_for(self._results_ready.wait(), timeout)
        except TimeoutError:
            raise TaskFailure(ErrorCode.TOOL_RESULT_TIMEOUT,
                              f"no tool_result for {len(self.unanswered)} tool call(s) within {timeout:g} s") from None
        self.status = TaskStatus.GENERATING
        answered, self.pending = self.pending, []
        self.calls_request = None
        return answered

    @property
    def unanswered(self) -> list[PendingCall]:
        return [p for p in self.pending if p.result is None]

    def submit_tool_results(self, items: list[ToolResultItem], contents: list[str] | None = None) -> None:
        """Match results to pending calls (by call_id, else the first unanswered call of that tool).
        ``contents`` are the results as text (``tool_content``), when the caller has measured them already."""
        if self.status is not TaskStatus.AWAITING_TOOLS:
            raise RpcError(ErrorCode.NOT_AWAITING_TOOL_RESULTS,
                           f"task {self.task_id} is not waiting for tool results (status: {self.status.value})")
        open_calls = self.unanswered
        matches: list[tuple[PendingCall, ToolResultItem]] = []
        for i, item in enumerate(items):
            call = next((p for p in open_calls if (p.request.call_id == item.call_id if item.call_id
                                                   else p.request.tool == item.tool_name)), None)
            if call is None:
                expected = [{"call_id": p.request.call_id, "tool": p.request.tool} for p in open_calls]
                raise RpcError(ErrorCode.INVALID_PARAMS, f"results[{i}] matches no pending tool call",
                               {"pending": expected[:32]})
            if call.request.tool != item.tool_name:
                raise RpcError(ErrorCode.INVALID_PARAMS, f"results[{i}]: call {call.request.call_id} is for tool "
                               f"{clip(repr(call.request.tool))}, not {clip(repr(item.tool_name))}")
            open_calls.remove(call)
            matches.append((call, item))
        for (call, item), content in zip(matches, contents or [None] * len(matches)):
            call.result, call.content = item, content
            self.round_chars += len(content or "")
        if not self.unanswered:
            self._results_ready.set()

    def _close_unanswered(self, reason: str) -> None:
        """Keep the conversation well-formed: every tool call of the assistant gets a tool message."""
        if not self.pending:
            return
        note = "cancelled by the client" if reason == "cancelled" else "no result (the task ended)"
        for call in self.pending:
            item = call.result or ToolResultItem(tool_name=call.request.tool, isError=True, error_message=note)
            self.session.messages.append(tool_message(call.request, item, call.content))
        self.pending = []


def tool_content(item: ToolResultItem) -> str:
    """One tool result as the text the model reads."""
    if item.isError:
        return json.dumps({"error": item.error_message or item.result or "the tool failed"}, ensure_ascii=False)
    if isinstance(item.result, str):
        return item.result
    return json.dumps(item.result, ensure_ascii=False)


def tool_message(call: ToolCallRequest, item: ToolResultItem, content: str | None = None) -> dict[str, Any]:
    """The chat-template message for one tool result (``content``: ``tool_content(item)``, if known)."""
    return {"role": "tool", "content": tool_content(item) if content is None else content,
            "tool_call_id": call.call_id, "name": call.tool}
