"""What the client raises and what a generation yields: errors, tool calls and the task's events."""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Any


# Error codes the client acts on (the README's table): a generate refused because a task runs, a task the
# server no longer knows, tool results it no longer waits for, and a task whose outcome a dropped socket lost.
SESSION_BUSY, UNKNOWN_TASK, NOT_AWAITING, TASK_LOST = -32001, -32003, -32007, -32011


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
