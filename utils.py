"""Prompt building, streaming text processing (detokenizer, stop strings, tool-call parser) and the
per-task turn loop ``generate_interactive_stream_ws``."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from tokenizers.decoders import DecodeStream

from engine import ContextLengthExceeded, EngineOverloaded, EngineStopped, FinishReason, RequestStream, SamplingParams
from jsonrpc import clip, strict_json_loads
from limits import PromptTooLong, check_prompt_size
from models import (ErrorCode, FinalTextParams, FunctionCallRequestParams, GenerateRequestParams, HistoryMessage,
                    ToolCallRequest, ToolDefinition, Usage)
from tasks import Task, TaskFailure, new_id, tool_message
from tool_schemas import argument_error
from workers import off_loop

if TYPE_CHECKING:
    from shared import GenerationDefaults, Runtime

log = logging.getLogger("inference.generate")
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


# ---- prompt ---------------------------------------------------------------------------------------------------
def assistant_message(text: str, calls: Sequence[ToolCallRequest] = ()) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = [{"id": c.call_id, "type": "function",
                                  "function": {"name": c.tool, "arguments": c.parameters}} for c in calls]
    return message


def history_to_messages(history: Sequence[HistoryMessage]) -> list[dict[str, Any]]:
    """Client history -> chat-template messages (tool calls keep their ids so results can refer to them)."""
    messages = []
    for m in history:
        if m.role == "assistant" and m.tool_calls:
            calls = [ToolCallRequest(call_id=c.call_id or new_id("call-"), tool=c.tool, parameters=c.parameters)
                     for c in m.tool_calls]
            messages.append(assistant_message(m.content or "", calls))
        elif m.role == "tool":
            messages.append({"role": "tool", "content": m.content, "tool_call_id": m.tool_call_id, "name": m.name})
        else:
            messages.append({"role": m.role, "content": m.content})
    return messages


def build_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]], tools: Sequence[ToolDefinition],
                     max_tokens: int | None = None) -> list[int]:
    """Token ids of the conversation rendered by the model's own chat template, ready for the reply.

    With ``max_tokens``, a conversation that cannot fit is refused (PromptTooLong) before it is tokenized when
    its size alone proves it, else after. Costly: call it off the event loop (``tokenize_prompt``)."""
    if max_tokens is not None:
        check_prompt_size(tokenizer, messages, tools, max_tokens)
    encoded = tokenizer.apply_chat_template(messages, tools=[t.for_template() for t in tools] or None,
                                            add_generation_prompt=True, tokenize=True)
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    ids = list(ids[0] if ids and isinstance(ids[0], list) else ids)
    if max_tokens is not None and len(ids) > max_tokens:
        raise PromptTooLong(max_tokens, tokens=len(ids))
    return ids


def max_prompt_tokens(rt: Runtime) -> int:
    """Prompt tokens one model call may have: the configured limit, else the context minus one new token."""
    return rt.settings.max_prompt_tokens or rt.engine.max_context - 1


def context_data(rt: Runtime, exc: PromptTooLong) -> dict[str, int]:
    """The data of a -32004 error: the prompt's size, its limit, the context."""
    return {**exc.data(), "max_context": rt.engine.max_context}


async def tokenize_prompt(rt: Runtime, messages: list[dict[str, Any]], tools: Sequence[ToolDefinition]) -> list[int]:
    """``build_prompt_ids`` on the worker pool, priced against the prompt limit."""
    return await off_loop(build_prompt_ids, rt.tokenizer, list(messages), list(tools), max_prompt_tokens(rt))


def sampling_params(p: GenerateRequestParams, defaults: GenerationDefaults, max_new_tokens: int,
                    stop_token_ids: frozenset[int]) -> SamplingParams:
    """Request values over the model's generation_config defaults; do_sample=false or temperature 0 is greedy."""
    do_sample = defaults.do_sample if p.do_sample is None else p.do_sample
    temperature = defaults.temperature if p.temperature is None else p.temperature
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
        top_p=pick(p.top_p, defaults.top_p) or 1.0, top_k=pick(p.top_k, defaults.top_k),
        min_p=pick(p.min_p, defaults.min_p), repetition_penalty=pick(p.repetition_penalty, defaults.repetition_penalty),
        presence_penalty=p.presence_penalty or 0.0, frequency_penalty=p.frequency_penalty or 0.0,
        seed=p.seed, stop_token_ids=stop_token_ids, ignore_eos=p.ignore_eos)


def call_error(name: str, arguments: dict[str, Any], tools: Sequence[ToolDefinition]) -> str | None:
    """Why a parsed tool call cannot be run as is (no such tool, or arguments that break its JSON Schema)."""
    tool = next((t for t in tools if t.name == name), None)
    if tool is None:
        known = ", ".join(t.name for t in tools[:32]) or "none"
        return f"there is no tool named {clip(repr(name), 100)} (the tools are: {known})"
    error = argument_error(tool.parameters, arguments)  # RE2 patterns, bounded work: may still take a while
    return None if error is None else f"invalid arguments for {name}: {error}"


def correction_message(call: ToolCallRequest, error: str | None) -> dict[str, Any]:
    """The tool message that answers a rejected call, so that the model can call again correctly."""
    note = (f"{error}. Call the tool again with arguments that match its parameters schema." if error else
            "Not run: another tool call of this turn was invalid. Repeat it together with the corrected call.")
    return {"role": "tool", "content": json.dumps({"error": note}, ensure_ascii=False),
            "tool_call_id": call.call_id, "name": call.tool}


# ---- streaming text ------------------------------------------------------------------------------------------------
class IncrementalDetokenizer:
    """Token ids -> text deltas that never split a multi-byte character.

    The tokenizers library's ``DecodeStream`` (Rust: a token costs one short decode, not two Python decodes of a
    growing window) where the tokenizer has a Rust backend; else TGI's prefix/read offsets in Python."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.stream = DecodeStream(skip_special_tokens=True) if self.backend is not None else None
        self.ids: list[int] = []  # (Python path) every id; (Rust path) the last shown one, then those not shown yet
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        if self.stream is not None:
            text = self.stream.step(self.backend, token_id)
            if text is None:
                self.ids.append(token_id)
                return ""
            self.ids = [token_id]
            self.read_offset = 1
            return text
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is left (an incomplete character at the very end decodes as U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if self.stream is not None:  # start again after what is shown now
            self.stream = DecodeStream(skip_special_tokens=True)
            self.ids, self.read_offset = [], 0
        else:
            self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):]


def _partial_suffix(text: str, needle: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``needle`` (such a suffix starts with
    ``needle[0]``: only those places are tried, found at C speed)."""
    start = max(0, len(text) - len(needle) + 1)
    i = text.find(needle[0], start)
    while i >= 0:
        if needle.startswith(text[i:]):
            return len(text) - i
        i = text.find(needle[0], i + 1)
    return 0


class StopMatcher:
    """Cuts the stream at the first stop string, holding back text that may be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.buffer = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        self.buffer += text
        # the stop that completes first wins, as it would token by token, whatever the chunking
        hits = [(i + len(s), i) for s in self.stops if (i := self.buffer.find(s)) >= 0]
        if hits:
            out, self.buffer, self.stopped = self.buffer[:min(hits)[1]], "", True
            return out
        keep = max(_partial_suffix(self.buffer, s) for s in self.stops)
        out, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
        return out

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


@dataclass
class ParsedCall:
    name: str
    arguments: dict[str, Any]


def parse_tool_call(body: str) -> ParsedCall | None:
    """The JSON inside ``<tool_call>...</tool_call>``, or None if it is not a well-formed call."""
    try:
        obj = strict_json_loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = strict_json_loads(args)
        except (ValueError, RecursionError):
            return None
    return ParsedCall(obj["name"], args) if isinstance(args, dict) else None


def _inside_json_string(text: str) -> bool:
    """Whether ``text`` (the start of a JSON document) ends inside a string."""
    inside, escaped = False, False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\" and inside:
            escaped = True
        elif ch == '"':
            inside = not inside
    return inside


def _call_end(buffer: str) -> int:
    """Where the call's ``</tool_call>`` is: the first one outside a JSON string (an argument may contain the
    tag's text), or -1 while none has arrived."""
    end = buffer.find(TOOL_CLOSE)
    while end >= 0 and _inside_json_string(buffer[:end]):
        end = buffer.find(TOOL_CLOSE, end + 1)
    return end


@dataclass
class ToolCallParser:
    """Splits the model's text into visible text and ``<tool_call>`` blocks as it streams.

    Text that may be the start of a tag is held back. Whitespace is held back too until visible text
    follows it, and whitespace that only separates text from a call at the start or end of the turn is
    dropped, so a turn that is just calls shows nothing. A block that is not a valid call is visible
    text, shown verbatim.
    """

    buffer: str = ""
    in_call: bool = False
    calls: list[ParsedCall] = field(default_factory=list)
    held_ws: str = ""  # whitespace not shown yet
    ws_touches_call: bool = False  # a call sits next to the held whitespace
    shown_any: bool = False

    def push(self, text: str) -> str:
        self.buffer += text
        out: list[str] = []
        while True:
            if self.in_call:
                end = _call_end(self.buffer)
                if end < 0:
                    break
                body, self.buffer = self.buffer[:end], self.buffer[end + len(TOOL_CLOSE):]
                self.in_call = False
                call = parse_tool_call(body.strip())
                if call is not None:
                    self.calls.append(call)
                    self.ws_touches_call = True
                else:
                    self._show(TOOL_OPEN + body + TOOL_CLOSE, out)
                continue
            start = self.buffer.find(TOOL_OPEN)
            if start >= 0:
                self._text(self.buffer[:start], out)
                self.buffer, self.in_call = self.buffer[start + len(TOOL_OPEN):], True
                self.ws_touches_call = True
                continue
            keep = _partial_suffix(self.buffer, TOOL_OPEN)  # may be the start of a tag
            self._text(self.buffer[:len(self.buffer) - keep], out)
            self.buffer = self.buffer[len(self.buffer) - keep:]
            break
        return "".join(out)

    def _text(self, text: str, out: list[str]) -> None:
        stripped = text.rstrip()
        if stripped:
            self._show(stripped, out)
        self.held_ws += text[len(stripped):]

    def _show(self, text: str, out: list[str]) -> None:
        lead = len(text) - len(text.lstrip())
        self.held_ws, text = self.held_ws + text[:lead], text[lead:]
        if self.shown_any or not self.ws_touches_call:
            out.append(self.held_ws)
        out.append(text)
        self.held_ws, self.ws_touches_call, self.shown_any = "", False, True

    def flush(self) -> str:
        """End of stream: an unterminated call is kept if its JSON is complete, else shown as text."""
        out: list[str] = []
        if self.in_call and (end := self.buffer.find(TOOL_CLOSE)) >= 0:
            # Every close was inside a string of a call that never parsed: a malformed call, which ends at its
            # first close after all (as text); what follows it is parsed as usual.
            body, rest = self.buffer[:end], self.buffer[end + len(TOOL_CLOSE):]
            self.buffer, self.in_call = "", False
            self._show(TOOL_OPEN + body + TOOL_CLOSE, out)
            out.append(self.push(rest))
            return "".join(out) + self.flush()
        buffer, self.buffer = self.buffer, ""
        if self.in_call:
            self.in_call = False
            call = parse_tool_call(buffer.strip())
            if call is not None:
                self.calls.append(call)
                self.ws_touches_call = True
            else:
                self._show(TOOL_OPEN + buffer, out)
        else:
            self._text(buffer, out)
        if not self.ws_touches_call:
            out.append(self.held_ws)
        self.held_ws = ""
        return "".join(out)


# ---- the turn loop ------------------------------------------------------------------------------------------------
@dataclass
class TurnOutput:
    """What one model call produced (filled in by ``model_turn`` as it ends)."""

    text: str = ""
    calls: list[ParsedCall] = field(default_factory=list)
    finish_reason: FinishReason = FinishReason.STOP
    first_token_at: float | None = None


def submit(rt: Runtime, prompt_ids: list[int], params: SamplingParams, session_key: str | None,
           cache_salt: str = "") -> RequestStream:
    """Submit one model call to the engine, mapping its refusals to JSON-RPC errors. ``cache_salt`` (the
    owning key) keeps prefix-cache sharing within one key."""
    try:
        return rt.engine.generate(prompt_ids, params, session_key=session_key, cache_salt=cache_salt)
    except ContextLengthExceeded as exc:
        raise TaskFailure(ErrorCode.CONTEXT_LENGTH_EXCEEDED, str(exc),
                          {"prompt_tokens": exc.prompt_tokens, "max_context": exc.max_context}) from None
    except EngineOverloaded as exc:
        raise TaskFailure(ErrorCode.OVERLOADED, f"server overloaded: {exc}; retry later",
                          {"retry_after_s": 1}) from None
    except EngineStopped as exc:
        raise TaskFailure(ErrorCode.ENGINE_UNAVAILABLE, f"engine unavailable: {exc}") from None


def open_stream(rt: Runtime, task: Task, prompt_ids: list[int]) -> RequestStream:
    """The task's next model call, under its grammar (the first call's follows tool_choice, after its forced
    prefix); the task aborts it if it ends first."""
    first = task.model_calls == 0
    if first and task.turns.prefix:
        prompt_ids = prompt_ids + rt.tokenizer.encode(task.turns.prefix, add_special_tokens=False)
    params = replace(task.params, grammar=task.turns.grammar(first))
    task.stream = submit(rt, prompt_ids, params, task.session.session_id, task.session.owner)
    task.model_calls += 1
    return task.stream


async def model_turn(rt: Runtime, stream: RequestStream, stop: Sequence[str], usage: Usage, result: TurnOutput,
                     prefix: str = "") -> AsyncIterator[str]:
    """Run one model call; yield its visible text as it streams (tool-call markup parsed out, stop strings
    applied); keep ``usage`` current; fill ``result`` at the end. ``prefix`` is text already in the prompt's
    assistant turn that the parser must see (a forced ``<tool_call>`` opening), never shown.

    Leaving the iteration early (or cancellation) aborts the engine request.
    """
    detok, stops, parser = IncrementalDetokenizer(rt.tokenizer), StopMatcher(stop), ToolCallParser()
    parser.push(prefix)
    pieces: list[str] = []
    completion, first = 0, True
    metrics, last = rt.metrics, stream.submitted_at
    async with stream:
        # Events that came while this task was busy arrive merged (RequestStream): one pass per wake-up.
        async for event in stream:
            if event.error is not None:
                raise TaskFailure(ErrorCode.GENERATION_FAILED, event.error)
            now = time.perf_counter()
            if first:
                first = False
                result.first_token_at = now
                usage.prompt_tokens += event.prompt_tokens
                usage.cached_tokens += event.cached_tokens
                metrics.ttft.observe(now - last)
                metrics.prompt_tokens.inc(event.prompt_tokens)
                metrics.cached_tokens.inc(event.cached_tokens)
            elif event.token_ids:
                metrics.itl.observe(now - last)
            last = now
            new = event.completion_tokens - completion
            metrics.generated_tokens.inc(new)
            usage.completion_tokens += new  # kept current: a cancel may come
            completion = event.completion_tokens
            ids = event.token_ids
            text = detok.push(ids[0]) if len(ids) == 1 else "".join([detok.push(t) for t in ids])
            if text and (text := parser.push(stops.push(text))):
                pieces.append(text)
                yield text
            if stops.stopped:
                break
            if event.finished:
                result.finish_reason = event.finish_reason
    tail = "" if stops.stopped else parser.push(stops.push(detok.flush())) + parser.push(stops.flush())
    if text := tail + parser.flush():
        pieces.append(text)
        yield text
    result.text, result.calls = "".join(pieces), parser.calls


async def stream_turn(rt: Runtime, task: Task, stream: RequestStream, separator: str = "",
                      prefix: str = "") -> TurnOutput:
    """One model call of a task: its text as ``text_chunk``s (``separator`` before the first one); ``prefix``: the
    forced opening its prompt ended with."""
    result = TurnOutput()
    session, coalesce, first = task.session, rt.settings.stream_coalesce == "on", True
    async for text in model_turn(rt, stream, task.stop, task.usage, result, prefix):
        # the hottest notification: built as a plain dict (same shape as models.TextChunkParams); the first chunk
        # of a model call goes out at once, later ones may be joined while the client is behind
        session.emit_chunk(task.task_id, separator + text, coalesce and not first)
        separator, first = "", False
        task.first_token_at = task.first_token_at or result.first_token_at
    session.flush_held()
    task.first_token_at = task.first_token_at or result.first_token_at
    return result


async def generate_interactive_stream_ws(task: Task, rt: Runtime) -> str:
    """The turn loop of one task: model call -> (tool calls -> results ->)* final text. Returns the finish reason.

    Each model call's prompt is the whole conversation rendered by the chat template; the engine's warm
    KV cache makes that cost only the new tokens.
    """
    session, texts = task.session, []
    stream = task.stream  # the first model call, submitted by generate
    corrections = 0
    while True:
        if stream is None:
            try:
                ids = await tokenize_prompt(rt, session.messages, task.tools)
            except PromptTooLong as exc:
                raise TaskFailure(ErrorCode.CONTEXT_LENGTH_EXCEEDED, str(exc), context_data(rt, exc)) from None
            stream = open_stream(rt, task, ids)
        separator = "\n\n" if any(texts) else ""
        turn = await stream_turn(rt, task, stream, separator, task.turns.prefix if task.model_calls == 1 else "")
        stream = None
        texts.append(separator + turn.text if turn.text else "")
        if not turn.calls:
            session.messages.append(assistant_message(turn.text))
            session.stored_task = None  # the task's work is in the conversation: nothing to roll back any more
            await session.save_durably()  # a client that reads final_text can count on the conversation
            task.emit("final_text", FinalTextParams(session_id=session.session_id, task_id=task.task_id,
                                                    final_text="".join(texts)))
            return turn.finish_reason.value
        calls = [ToolCallRequest(call_id=new_id("call-"), tool=c.name, parameters=c.arguments) for c in turn.calls]
        session.messages.append(assistant_message(turn.text, calls))
        errors = await off_loop(lambda: [call_error(c.tool, c.parameters, task.tools) for c in calls])
        if any(errors):
            if corrections < rt.settings.tool_call_retries:
                # The model gets the validation errors as tool responses and calls again; the client never
                # sees calls it could not run. (Text the model wrote before them has been streamed already.)
                corrections += 1
                log.info("tool calls rejected (%s): the model corrects them", "; ".join(e for e in errors if e))
                session.messages.extend(correction_message(c, e) for c, e in zip(calls, errors))
                continue
            calls = [c.model_copy(update={"validation_error": e}) if e else c for c, e in zip(calls, errors)]
        await session.save_durably()  # the calls are stored before the client runs them
        task.request_tools(FunctionCallRequestParams(session_id=session.session_id, task_id=task.task_id,
                                                     tool_calls=calls))
        log.info("tool calls: %s", ", ".join(clip(c.tool, 100) for c in calls))
        answered = await task.await_tool_results(calls, rt.settings.tool_result_timeout_s)
        session.messages.extend(tool_message(p.request, p.result, p.content) for p in answered)
        session.save()
