"""Sessions and tasks: their state, ownership of the conversation, tool-result hand-off, cancellation,
expiry. A task is one ``generate`` call; everything it holds is released in ``Task.run``'s ``finally``."""
from __future__ import annotations

import asyncio
import enum
import json
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from engine import RequestStream, SamplingParams
from jsonrpc import RpcError, notification
from models import (EndParams, ErrorCode, ErrorNotificationParams, JsonRpcError, ToolCallRequest, ToolDefinition,
                    ToolResultItem, Usage)
from shared import task_var

log = logging.getLogger("inference.tasks")

Emitter = Callable[[dict[str, Any]], None]  # puts one outgoing JSON-RPC message on a connection


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
    messages: list[dict[str, Any]] = field(default_factory=list)  # the conversation, chat-template shaped
    active_task: Task | None = None
    emitter: Emitter | None = None  # the attached WebSocket's sender, if any
    last_active: float = field(default_factory=time.monotonic)

    def touch(self) -> None:
        self.last_active = time.monotonic()

    def emit(self, method: str, params: BaseModel) -> None:
        if self.emitter is not None:
            self.emitter(notification(method, params))

    def emit_raw(self, method: str, params: dict[str, Any]) -> None:
        if self.emitter is not None:
            self.emitter({"jsonrpc": "2.0", "method": method, "params": params})


@dataclass
class PendingCall:
    request: ToolCallRequest
    result: ToolResultItem | None = None


class Task:
    """One ``generate``: runs the turn loop, waits for tool results, ends with exactly one ``end``."""

    def __init__(self, session: Session, tools: list[ToolDefinition], params: SamplingParams,
                 stop: list[str], first_stream: RequestStream | None = None,
                 on_error: Callable[[int], None] | None = None) -> None:
        self.task_id = new_id("task-")
        self.session = session
        self.tools = tools
        self.params = params
        self.stop = stop
        self.first_stream = first_stream
        self.status = TaskStatus.GENERATING
        self.usage = Usage()
        self.pending: list[PendingCall] = []
        self._results_ready = asyncio.Event()
        self._aio: asyncio.Task[None] | None = None
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.on_error = on_error

    def emit(self, method: str, params: BaseModel) -> None:
        self.session.emit(method, params)

    def start(self, body: Callable[[Task], Any]) -> None:
        """Run ``body(task)`` (the turn loop) as an asyncio task."""
        self.session.active_task = self
        self._aio = asyncio.get_running_loop().create_task(self.run(body), name=self.task_id)

    def cancel(self) -> None:
        if self._aio is not None and not self._aio.done():
            self._aio.cancel()

    async def wait(self) -> None:
        if self._aio is not None:
            await asyncio.gather(self._aio, return_exceptions=True)

    async def run(self, body: Callable[[Task], Any]) -> None:
        task_var.set(self.task_id)
        reason = "error"
        try:
            reason = await body(self)
        except asyncio.CancelledError:
            reason = "cancelled"
        except TaskFailure as failure:
            self._report(failure.error)
        except Exception as exc:  # a bug or a model failure: this task ends, the server goes on
            log.exception("task failed")
            self._report(RpcError(ErrorCode.GENERATION_FAILED, f"generation failed: {exc}"))
        finally:
            if self.first_stream is not None:
                self.first_stream.abort()
            self._close_unanswered(reason)
            self.status = TaskStatus.FINISHED
            self.usage.total_tokens = self.usage.prompt_tokens + self.usage.completion_tokens
            self.emit("end", EndParams(session_id=self.session.session_id, task_id=self.task_id,
                                       finish_reason=reason, usage=self.usage))
            if self.session.active_task is self:
                self.session.active_task = None
            self.session.touch()
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
        self._results_ready.clear()
        self.status = TaskStatus.AWAITING_TOOLS
        try:
            await asyncio.wait_for(self._results_ready.wait(), timeout)
        except TimeoutError:
            raise TaskFailure(ErrorCode.TOOL_RESULT_TIMEOUT,
                              f"no tool_result for {len(self.unanswered)} tool call(s) within {timeout:g} s") from None
        self.status = TaskStatus.GENERATING
        answered, self.pending = self.pending, []
        return answered

    @property
    def unanswered(self) -> list[PendingCall]:
        return [p for p in self.pending if p.result is None]

    def submit_tool_results(self, items: list[ToolResultItem]) -> None:
        """Match results to pending calls (by call_id, else the first unanswered call of that tool)."""
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
                               {"pending": expected})
            if call.request.tool != item.tool_name:
                raise RpcError(ErrorCode.INVALID_PARAMS, f"results[{i}]: call {call.request.call_id} is for tool "
                               f"{call.request.tool!r}, not {item.tool_name!r}")
            open_calls.remove(call)
            matches.append((call, item))
        for call, item in matches:
            call.result = item
        if not self.unanswered:
            self._results_ready.set()

    def _close_unanswered(self, reason: str) -> None:
        """Keep the conversation well-formed: every tool call of the assistant gets a tool message."""
        if not self.pending:
            return
        note = "cancelled by the client" if reason == "cancelled" else "no result (the task ended)"
        for call in self.pending:
            item = call.result or ToolResultItem(tool_name=call.request.tool, isError=True, error_message=note)
            self.session.messages.append(tool_message(call.request, item))
        self.pending = []


def tool_message(call: ToolCallRequest, item: ToolResultItem) -> dict[str, Any]:
    """The chat-template message for one tool result."""
    if item.isError:
        content = json.dumps({"error": item.error_message or item.result or "the tool failed"}, ensure_ascii=False)
    elif isinstance(item.result, str):
        content = item.result
    else:
        content = json.dumps(item.result, ensure_ascii=False)
    return {"role": "tool", "content": content, "tool_call_id": call.call_id, "name": call.tool}


class SessionStore:
    """All sessions; idle ones (no task, no socket) expire and release their warm KV cache."""

    def __init__(self, max_sessions: int, idle_timeout_s: float,
                 on_remove: Callable[[Session], None] = lambda s: None) -> None:
        self.sessions: dict[str, Session] = {}
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self.on_remove = on_remove

    def __len__(self) -> int:
        return len(self.sessions)

    def create(self, tools: list[ToolDefinition], owner: str = "anonymous", per_owner: int | None = None) -> Session:
        self.expire_idle()
        if len(self.sessions) >= self.max_sessions:
            raise RpcError(ErrorCode.OVERLOADED, f"session limit reached ({self.max_sessions})")
        if per_owner is not None and sum(s.owner == owner for s in self.sessions.values()) >= per_owner:
            raise RpcError(ErrorCode.RATE_LIMITED, f"this key already has {per_owner} sessions")
        session = Session(str(uuid.uuid4()), tools, owner)  # 122 random bits, in the seed's uuid shape
        self.sessions[session.session_id] = session
        return session

    def get(self, session_id: str) -> Session | None:
        return self.sessions.get(session_id)

    def remove(self, session: Session) -> None:
        if self.sessions.pop(session.session_id, None) is not None:
            if session.active_task is not None:
                session.active_task.cancel()
            self.on_remove(session)

    def expire_idle(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        idle = [s for s in self.sessions.values() if s.active_task is None and s.emitter is None
                and now - s.last_active > self.idle_timeout_s]
        for session in idle:
            log.info("session %s expired after %.0f s idle", session.session_id, now - session.last_active)
            self.remove(session)
        return len(idle)

    @property
    def active_tasks(self) -> list[Task]:
        return [s.active_task for s in self.sessions.values() if s.active_task is not None]

    async def close_all(self) -> None:
        tasks = self.active_tasks
        for task in tasks:
            task.cancel()
        await asyncio.gather(*(t.wait() for t in tasks))
