"""OpenAI-compatible endpoints on the same engine, limits and keys: ``GET /v1/models`` and
``POST /v1/chat/completions`` (server-sent events with ``stream: true``). One model call per request:
an OpenAI client runs its own tool loop."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from engine import SamplingParams
from http_guard import BodyError, read_json_body
from jsonrpc import clip, strict_json_loads
from limits import PromptTooLong, too_many_tools, tools_problem
from grammars import TurnGrammars
from models import TOP_K_MAX, ErrorCode, ResponseFormatParam, ToolChoiceParam, ToolDefinition, Usage
from shared import Runtime
from structured_outputs import SchemaRefused, choices, plan, prompt_tools
from tasks import TaskFailure
from utils import TurnOutput, model_turn, submit, tokenize_prompt
from workers import off_loop

log = logging.getLogger("inference.openai")
STATUS_OF = {ErrorCode.CONTEXT_LENGTH_EXCEEDED: (400, "invalid_request_error", "context_length_exceeded"),
             ErrorCode.OVERLOADED: (503, "server_error", "overloaded"),
             ErrorCode.ENGINE_UNAVAILABLE: (503, "server_error", "engine_unavailable"),
             ErrorCode.GENERATION_FAILED: (500, "server_error", "generation_failed")}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = \
            status, message, type_, param, code, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ---- the request -----------------------------------------------------------------------------------------------------
class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def text(self) -> str | None:
        if self.content is None or isinstance(self.content, str):
            return self.content
        if any(p.type != "text" for p in self.content):
            raise OpenAIError(400, "only text content parts are supported", param="messages")
        return "".join(p.text or "" for p in self.content)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoiceParam | None = None
    response_format: ResponseFormatParam | None = None
    parallel_tool_calls: bool | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    n: int = 1
    logprobs: bool | None = None
    top_k: int | None = Field(default=None, ge=0, le=TOP_K_MAX)  # extensions other servers accept too (via extra_body)
    min_p: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    repetition_penalty: float | None = Field(default=None, gt=0, allow_inf_nan=False)

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, value: Any) -> Any:
        stops = [value] if isinstance(value, str) else [] if value is None else value
        if isinstance(stops, list) and (len(stops) > 16 or any(not s for s in stops)):
            raise ValueError("at most 16 non-empty stop strings")
        return stops


# ---- request -> engine -----------------------------------------------------------------------------------------------
def to_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "assistant" and m.tool_calls:
            calls = []
            for call in m.tool_calls:
                fn = call.get("function") or {}
                args = fn.get("arguments", "{}")
                try:
                    args = strict_json_loads(args) if isinstance(args, str) else args
                except ValueError:
                    raise OpenAIError(400, "tool call arguments must be a JSON object", param="messages") from None
                calls.append({"id": call.get("id"), "type": "function",
                              "function": {"name": fn.get("name"), "arguments": args}})
            out.append({"role": "assistant", "content": m.text() or "", "tool_calls": calls})
        elif m.role == "tool":
            out.append({"role": "tool", "content": m.text() or "", "tool_call_id": m.tool_call_id, "name": m.name})
        else:
            text = m.text()
            if text is None:
                raise OpenAIError(400, f"a {m.role} message needs content", param="messages")
            out.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    return out


async def constraints(rt: Runtime, req: ChatRequest) -> tuple[list[ToolDefinition], TurnGrammars]:
    """The tools to show the model, and the grammar (and forced opening) of tool_choice / response_format."""
    choice, fmt = choices(req.tool_choice, req.response_format, req.parallel_tool_calls)
    tools = prompt_tools(req.tools or [], choice)
    try:
        return tools, await plan(rt, tools, choice, fmt)
    except SchemaRefused as exc:
        param = exc.where.split(".")[0].split("[")[0]
        raise OpenAIError(400, clip(str(exc), 500), param=param, code="unsupported_schema" if exc.keyword else None) \
            from None


def check_limits(rt: Runtime, req: ChatRequest) -> int:
    """Apply the server's limits; the max_new_tokens to use."""
    s = rt.settings
    if req.n != 1:
        raise OpenAIError(400, "only n=1 is supported", param="n")
    if req.logprobs:
        raise OpenAIError(400, "logprobs are not supported", param="logprobs")
    if len(req.messages) > s.max_history_messages:
        raise OpenAIError(400, f"at most {s.max_history_messages} messages", param="messages")
    if any(len(m.text() or "") > s.max_message_chars for m in req.messages):
        raise OpenAIError(400, f"a message is longer than {s.max_message_chars} characters",
                          param="messages")
    if req.tools and (problem := tools_problem(s, req.tools)):
        raise OpenAIError(400, f"tools exceed the server's limits: {problem}", param="tools")
    wanted = req.max_completion_tokens or req.max_tokens
    if wanted is not None and wanted > s.max_new_tokens_cap:
        raise OpenAIError(400, f"max_tokens must be <= {s.max_new_tokens_cap}", param="max_tokens")
    return wanted or min(s.default_max_new_tokens, s.max_new_tokens_cap)


def sampling(rt: Runtime, req: ChatRequest, max_new: int) -> SamplingParams:
    d = rt.model.defaults
    temperature = d.temperature if req.temperature is None else req.temperature
    greedy = (req.temperature is None and not d.do_sample) or temperature == 0
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return SamplingParams(
        max_new_tokens=max_new, temperature=0.0 if greedy else temperature, top_p=pick(req.top_p, d.top_p) or 1.0,
        top_k=pick(req.top_k, d.top_k), min_p=pick(req.min_p, d.min_p),
        repetition_penalty=pick(req.repetition_penalty, d.repetition_penalty),
        presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
        seed=req.seed, stop_token_ids=rt.model.stop_token_ids)


# ---- responses -------------------------------------------------------------------------------------------------------
def tool_calls_of(result: TurnOutput) -> list[dict[str, Any]]:
    return [{"id": f"call_{secrets.token_hex(12)}", "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
            for c in result.calls]


def finish_reason(result: TurnOutput) -> str:
    return "tool_calls" if result.calls else result.finish_reason.value


def usage_of(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


async def chat_completions(request: Request) -> Response:
    rt: Runtime = request.app.state.runtime
    try:
        return await _chat_completions(request, rt)
    except OpenAIError as exc:
        rt.metrics.count("chat.completions", exc.status)
        return exc.response()
    except Exception:  # a bug: the client gets OpenAI's error shape, the server goes on
        log.exception("chat completion failed")
        rt.metrics.count("chat.completions", 500)
        return OpenAIError(500, "internal error", "server_error").response()


def precheck(rt: Runtime, payload: Any) -> None:
    """Counts of the raw request, before it is validated: 40,000 tools are refused, not parsed."""
    if not isinstance(payload, dict):
        return
    messages = payload.get("messages")
    if isinstance(messages, list) and len(messages) > rt.settings.max_history_messages:
        raise OpenAIError(400, f"at most {rt.settings.max_history_messages} messages", param="messages")
    if problem := too_many_tools(rt.settings, payload.get("tools")):
        raise OpenAIError(400, f"tools exceed the server's limits: {problem}", param="tools")


def parse_request(payload: Any) -> ChatRequest:
    """Validation (tool schemas included): costly, run on the worker pool."""
    try:
        return ChatRequest.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise OpenAIError(400, clip(f"{'.'.join(map(str, first['loc']))}: {first['msg']}", 300),
                          param=clip(str(first["loc"][0]), 64) if first["loc"] else None) from None
    except RecursionError:
        raise OpenAIError(400, "the request is nested too deeply") from None


async def _chat_completions(request: Request, rt: Runtime) -> Response:
    if rt.draining:
        raise OpenAIError(503, "the server is shutting down", "server_error")
    owner = rt.keys.from_header(request.headers.get("authorization"))
    if owner is None:
        raise OpenAIError(401, "missing or invalid API key", code="invalid_api_key")
    caller = owner if rt.keys.enabled else f"addr:{request.client.host if request.client else '-'}"
    if retry := rt.limiter.acquire(caller):
        raise OpenAIError(429, "rate limit reached", code="rate_limit_exceeded",
                          headers={"Retry-After": str(max(1, round(retry)))})
    try:
        payload = await read_json_body(request, rt.settings)
    except BodyError as exc:
        raise OpenAIError(exc.status, exc.message) from None
    precheck(rt, payload)
    req = await off_loop(parse_request, payload)
    if req.model not in served_names(rt):
        raise OpenAIError(404, f"the model {clip(repr(req.model))} does not exist; this server serves "
                          f"{rt.model.name!r}", param="model", code="model_not_found")
    max_new = check_limits(rt, req)
    tools, turns = await constraints(rt, req)
    prefix = turns.prefix
    try:
        prompt_ids = await tokenize_prompt(rt, to_messages(req.messages), tools)
    except OpenAIError:
        raise
    except PromptTooLong as exc:
        raise OpenAIError(400, str(exc), param="messages", code="context_length_exceeded") from None
    except Exception as exc:
        raise OpenAIError(400, clip(f"the chat template cannot render these messages: {exc}", 300),
                          param="messages") from None
    if prefix:
        prompt_ids += rt.tokenizer.encode(prefix, add_special_tokens=False)
    limit = rt.settings.max_prompt_tokens
    if limit and len(prompt_ids) > limit:
        raise OpenAIError(400, f"prompt has {len(prompt_ids)} tokens; at most {limit} are accepted",
                          param="messages", code="context_length_exceeded")
    try:
        stream = submit(rt, prompt_ids, replace(sampling(rt, req, max_new), grammar=turns.first), None,
                        cache_salt=owner)
    except TaskFailure as failure:
        status, type_, code = STATUS_OF.get(failure.error.code, (500, "server_error", None))
        raise OpenAIError(status, failure.error.message, type_, code=code) from None
    rt.metrics.count("chat.completions")
    completion_id, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
    log.info("chat completion %s: prompt %d tokens, max_tokens %d, stream %s", completion_id, len(prompt_ids),
             max_new, req.stream)
    if req.stream:
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(sse(rt, req, stream, prefix, completion_id, created, include_usage, bool(tools)),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    usage, result = Usage(), TurnOutput()

    async def whole_turn() -> None:
        async for _ in model_turn(rt, stream, req.stop, usage, result, prefix):
            pass
    try:
        if not await unless_disconnected(request, whole_turn()):
            log.info("chat completion %s: the client went away; generation stopped", completion_id)
            return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
    except TaskFailure as failure:
        status, type_, code = STATUS_OF.get(failure.error.code, (500, "server_error", None))
        raise OpenAIError(status, failure.error.message, type_, code=code) from None
    finally:
        stream.abort()  # every path: a disconnect, an error, even a cancel before the turn's first step
    if not tools:
        unoffered(result, completion_id)
    message: dict[str, Any] = {"role": "assistant", "content": result.text or (None if result.calls else "")}
    if result.calls:
        message["tool_calls"] = tool_calls_of(result)
    return JSONResponse({"id": completion_id, "object": "chat.completion", "created": created, "model": rt.model.name,
                         "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(result),
                                      "logprobs": None}],
                         "usage": usage_of(usage)})


def unoffered(result: TurnOutput, completion_id: str) -> None:
    """The request offered the model no tools (none given, or tool_choice "none" without a grammar to enforce it):
    calls it wrote anyway name functions the client never defined. They are dropped (their markup is not text)."""
    if result.calls:
        log.info("chat completion %s: %d tool call(s) dropped: the request offered no tools", completion_id,
                 len(result.calls))
        result.calls = []


async def sse(rt: Runtime, req: ChatRequest, stream: Any, prefix: str, completion_id: str, created: int,
              include_usage: bool, offered_tools: bool = True) -> AsyncIterator[str]:
    """The stream as server-sent events; the engine request is aborted if the client goes away."""
    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": rt.model.name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        if include_usage:
            body.setdefault("usage", None)
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    usage, result = Usage(), TurnOutput()
    yield chunk({"role": "assistant", "content": ""})
    try:
        async for text in model_turn(rt, stream, req.stop, usage, result, prefix):
            yield chunk({"content": text})
    except TaskFailure as failure:
        status, type_, code = STATUS_OF.get(failure.error.code, (500, "server_error", None))
        yield f"data: {json.dumps(OpenAIError(status, failure.error.message, type_, code=code).body())}\n\n"
        yield "data: [DONE]\n\n"
        return
    if not offered_tools:
        unoffered(result, completion_id)
    if result.calls:
        calls = [{"index": i, **call} for i, call in enumerate(tool_calls_of(result))]
        yield chunk({"tool_calls": calls})
    yield chunk({}, finish_reason(result))
    if include_usage:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": rt.model.name,
                "choices": [], "usage": usage_of(usage)}
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read: only http.disconnect is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, None]) -> bool:
    """Run ``work`` unless the client goes away first: then cancel it (its engine request is aborted) and
    return False. A non-streaming response is only sent at the end, so without this a client that hung up
    kept its request generating to the last token."""
    job = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not job.done():
            job.cancel()
        await asyncio.gather(job, gone, return_exceptions=True)
    if job.cancelled():
        return False
    job.result()  # raises what the work raised
    return True


def served_names(rt: Runtime) -> set[str]:
    """What a request's ``model`` may say: the served name (``/v1/models``), or the configured
    ``INFERENCE_MODEL_ID`` (as written, normalised, or its last part: the directory name, which
    ``INFERENCE_SERVED_MODEL_NAME`` replaces in ``/v1/models`` but not here)."""
    model_id = rt.settings.model_id
    aliases = {model_id, os.path.normpath(model_id), os.path.basename(os.path.normpath(model_id))}
    return {rt.model.name} | (aliases - {"", ".", "/"})


async def list_models(request: Request) -> Response:
    rt: Runtime = request.app.state.runtime
    if rt.keys.from_header(request.headers.get("authorization")) is None:
        return OpenAIError(401, "missing or invalid API key", code="invalid_api_key").response()
    return JSONResponse({"object": "list", "data": [{
        "id": rt.model.name, "object": "model", "created": int(rt.started_at), "owned_by": "local",
        "root": rt.settings.model_id, "max_model_len": rt.engine.max_context, **rt.model.serving_info}]})
