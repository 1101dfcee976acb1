"""Pydantic schemas of everything on the wire: tools, history, JSON-RPC params and notifications."""
from __future__ import annotations

import enum
import json
from collections import Counter
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tool_schemas import check_schema, check_tool_schema

JSONRPC_VERSION = "2.0"
TOOL_NAME_PATTERN = r"^[A-Za-z0-9_.:\-]{1,64}$"


class ErrorCode(enum.IntEnum):
    """JSON-RPC error codes: the standard ones, then one server code per condition."""

    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603
    GENERATION_FAILED = -32000  # the model failed while generating (e.g. CUDA out of memory)
    SESSION_BUSY = -32001  # generate while the session already has an active task
    NOTHING_TO_CANCEL = -32002  # cancel with no active task
    UNKNOWN_TASK = -32003  # tool_result/cancel naming a task this session does not have
    CONTEXT_LENGTH_EXCEEDED = -32004  # the prompt does not fit the model's context
    TOOL_RESULT_TIMEOUT = -32005  # no tool_result arrived in time
    OVERLOADED = -32006  # the engine's queue is full; retry later
    NOT_AWAITING_TOOL_RESULTS = -32007  # tool_result while the task is not waiting for one
    ENGINE_UNAVAILABLE = -32008  # the engine is stopped, or the server is shutting down
    RATE_LIMITED = -32009  # this key (or address) sent too many requests; retry after data.retry_after_s
    RESUME_INCOMPLETE = -32010  # a resumed stream: notifications from data.missing_from on were no longer kept
    TASK_LOST = -32011  # the task's process or replica died; the conversation is as before it: retry it
    SESSION_TOO_LARGE = -32012  # the stored session would exceed INFERENCE_SESSION_MAX_BYTES


class JsonRpcError(BaseModel):
    code: int
    message: str
    data: Any = None


# ---- tools ---------------------------------------------------------------------------------------------
class ToolDefinition(BaseModel):
    """A tool in the seed's shape. OpenAI's ``{"type": "function", "function": {...}}`` is accepted too."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None  # OpenAI's flag, accepted so that OpenAI-shaped tools validate

    @model_validator(mode="before")
    @classmethod
    def _unwrap_openai(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict):
            return value["function"]
        return value

    @field_validator("parameters")
    @classmethod
    def _json_schema_object(cls, schema: dict[str, Any]) -> dict[str, Any]:
        check_tool_schema(schema)  # depth, RE2-runnable patterns, metaschema, "type": "object"
        return schema

    def for_template(self) -> dict[str, Any]:
        """The shape chat templates (and Qwen2.5's training data) use."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


def _unique_tool_names(tools: list[ToolDefinition] | None) -> list[ToolDefinition] | None:
    if tools:
        dupes = sorted(name for name, n in Counter(t.name for t in tools).items() if n > 1)
        if dupes:
            raise ValueError(f"tool names must be unique; repeated: {', '.join(dupes[:10])}")
    return tools


class CreateSessionRequest(BaseModel):
    tools: list[ToolDefinition] = Field(default_factory=list)

    _unique = field_validator("tools")(_unique_tool_names)


class CreateSessionResponse(BaseModel):
    session_id: str


# ---- conversation -----------------------------------------------------------------------------------------
class HistoryToolCall(BaseModel):
    """A tool call in a history: our own shape (``tool``/``parameters``/``call_id``, as sent in
    ``function_call_request``), or OpenAI's (``id``, ``function.name``, ``function.arguments``)."""

    tool: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    call_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, value: Any) -> Any:
        if not isinstance(value, dict) or "tool" in value:
            return value
        fn = value.get("function") if isinstance(value.get("function"), dict) else value
        args = fn.get("arguments", fn.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                raise ValueError("tool call arguments must be a JSON object") from None
        return {"tool": fn.get("name"), "parameters": args, "call_id": value.get("id", value.get("call_id"))}


class HistoryMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    tool_calls: list[HistoryToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _tool_content_as_text(cls, value: Any) -> Any:
        if not isinstance(value, dict) or value.get("role") != "tool":
            return value
        content = value.get("content")
        if content is not None and not isinstance(content, str):
            value = {**value, "content": json.dumps(content, ensure_ascii=False)}
        return value

    @model_validator(mode="after")
    def _content_required(self) -> HistoryMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self


# ---- structured outputs (OpenAI's shapes) --------------------------------------------------------------------
class FunctionName(BaseModel):
    name: str = Field(pattern=TOOL_NAME_PATTERN)


class NamedToolChoice(BaseModel):
    """``{"type": "function", "function": {"name": ...}}``: the answer is exactly one call of that tool."""

    type: Literal["function"] = "function"
    function: FunctionName


ToolChoiceParam = Literal["auto", "required", "none"] | NamedToolChoice


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _runnable(cls, schema: dict[str, Any]) -> dict[str, Any]:
        check_schema(schema, "json_schema.schema")  # depth, RE2-runnable patterns, metaschema
        return schema


class ResponseFormatParam(BaseModel):
    """``{"type": "text" | "json_object"}`` or ``{"type": "json_schema", "json_schema": {"name", "schema"}}``: the
    answer is a JSON document (of that schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormatParam:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('"type": "json_schema" needs "json_schema": {"name": ..., "schema": {...}}')
        return self

    def plain(self) -> dict[str, Any]:
        """The shape ``grammars.ResponseFormat.parse`` reads."""
        if self.json_schema is None:
            return {"type": self.type}
        return {"type": self.type, "json_schema": {"name": self.json_schema.name, "schema": self.json_schema.schema_}}


def tool_choice_plain(choice: ToolChoiceParam | None) -> Any:
    """The shape ``grammars.ToolChoice.parse`` reads."""
    return choice.model_dump() if isinstance(choice, NamedToolChoice) else choice


TOP_K_MAX = 2**31 - 1  # past any vocabulary (0 and k >= vocab both mean "no top-k"); the engine's wire is int64

# ---- client -> server params ----------------------------------------------------------------------------------
class GenerateRequestParams(BaseModel):
    message: str | None = None
    history: list[HistoryMessage] | None = Field(default=None, min_length=1)
    tools: list[ToolDefinition] | None = None
    max_new_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    do_sample: bool | None = None
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=0, le=TOP_K_MAX)
    min_p: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    repetition_penalty: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    stop: list[str] | None = Field(default=None, max_length=16)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    ignore_eos: bool = False  # keep generating past end-of-turn until max_new_tokens (benchmarks, load tests)
    tool_choice: ToolChoiceParam | None = None  # the task's first model call: auto (default), required, none, named
    response_format: ResponseFormatParam | None = None  # final_text is then a JSON document (of that schema)
    parallel_tool_calls: bool | None = None  # false: at most one tool call per model call

    _unique = field_validator("tools")(_unique_tool_names)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _stop_non_empty(cls, value: list[str] | None) -> list[str] | None:
        if value and any(not s for s in value):
            raise ValueError("stop strings must be non-empty")
        return value

    @model_validator(mode="after")
    def _message_xor_history(self) -> GenerateRequestParams:
        if (self.message is None) == (self.history is None):
            raise ValueError("give exactly one of 'message' (appends a user turn) or 'history' "
                             "(replaces the conversation)")
        return self


class ToolResultItem(BaseModel):
    tool_name: str
    result: Any = None
    isError: bool = False
    error_message: str | None = None
    call_id: str | None = None


class ToolResultParams(BaseModel):
    task_id: str
    results: list[ToolResultItem] = Field(min_length=1)


class CancelParams(BaseModel):
    task_id: str | None = None


# ---- server -> client notifications ------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0


class TextChunkParams(BaseModel):
    session_id: str
    task_id: str
    chunk: str
    seq: int | None = None  # the session's notification number (set when sent); resume with ?resume_from=


class ToolCallRequest(BaseModel):
    call_id: str
    tool: str
    parameters: dict[str, Any]
    # set only when the call names no tool of the request or its parameters break the tool's JSON Schema and
    # INFERENCE_TOOL_CALL_RETRIES corrections did not fix it (valid calls carry no such field)
    validation_error: str | None = Field(default=None, exclude_if=lambda v: v is None)


class FunctionCallRequestParams(BaseModel):
    session_id: str
    task_id: str
    tool_calls: list[ToolCallRequest]
    seq: int | None = None  # the session's notification number (set when sent); resume with ?resume_from=


class FinalTextParams(BaseModel):
    session_id: str
    task_id: str
    final_text: str
    seq: int | None = None  # the session's notification number (set when sent); resume with ?resume_from=


class EndParams(BaseModel):
    session_id: str
    task_id: str
    finish_reason: Literal["stop", "length", "cancelled", "error"]
    usage: Usage
    seq: int | None = None  # the session's notification number (set when sent); resume with ?resume_from=


class ErrorNotificationParams(BaseModel):
    session_id: str
    task_id: str | None = None
    error: JsonRpcError
    seq: int | None = None  # the session's notification number (set when sent); resume with ?resume_from=


class ResumedParams(BaseModel):
    """Sent (without a seq) to a socket opened with ?resume_from=, once every missed notification has been sent:
    requests still unanswered from the old socket can go again; ``task_id`` is the running task, if any."""

    session_id: str
    resume_from: int
    seq: int  # the session's latest notification number
    task_id: str | None = None
