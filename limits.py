"""The server's limits, applied in price order: counts and sizes of the raw input first (before pydantic parses
it), then the size of a prompt before it is tokenized, then its token count.

Every check here is cheap (O(1) per item, at C speed where it walks text) so that it can run on the event loop;
what it admits then goes to the worker pool (``workers.py``) for the expensive part.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

from jsonrpc import RpcError
from models import ErrorCode, GenerateRequestParams, ToolDefinition
from shared import Settings


def invalid(field: str, msg: str) -> RpcError:
    return RpcError(ErrorCode.INVALID_PARAMS, "Invalid params", [{"loc": [field], "msg": msg, "type": "limit"}])


# ---- raw input, before validation ------------------------------------------------------------------------------------
def too_many_tools(settings: Settings, raw_tools: Any) -> str | None:
    """Why a raw ``tools`` list is refused by count alone (O(1): 40,000 tools are not parsed to find out)."""
    if isinstance(raw_tools, list) and len(raw_tools) > settings.max_tools:
        return f"at most {settings.max_tools} tools"
    return None


def _long_string(value: Any, limit: int) -> bool:
    return isinstance(value, str) and len(value) > limit


def precheck_generate(settings: Settings, params: dict[str, Any]) -> None:
    """The size limits of ``generate`` on its raw params; raises -32602 before pydantic sees them."""
    if problem := too_many_tools(settings, params.get("tools")):
        raise invalid("tools", problem)
    if _long_string(params.get("message"), settings.max_message_chars):
        raise invalid("message", f"longer than {settings.max_message_chars} characters")
    history = params.get("history")
    if isinstance(history, list):
        if len(history) > settings.max_history_messages:
            raise invalid("history", f"more than {settings.max_history_messages} messages")
        if any(isinstance(m, dict) and _long_string(m.get("content"), settings.max_message_chars) for m in history):
            raise invalid("history", f"a message is longer than {settings.max_message_chars} characters")


def precheck_tool_result(settings: Settings, params: dict[str, Any]) -> None:
    """A text result over the per-result limit is refused before validation (other shapes are measured after)."""
    results = params.get("results")
    if isinstance(results, list):
        for i, item in enumerate(results):
            if isinstance(item, dict) and _long_string(item.get("result"), settings.max_tool_result_chars):
                raise invalid(f"results[{i}]", f"longer than {settings.max_tool_result_chars} characters")


# ---- validated input ---------------------------------------------------------------------------------------------------
def tools_problem(settings: Settings, tools: list[ToolDefinition]) -> str | None:
    """Why ``tools`` exceed the configured limits, or None."""
    if len(tools) > settings.max_tools:
        return f"at most {settings.max_tools} tools"
    for tool in tools:
        if len(json.dumps(tool.model_dump(mode="json"))) > settings.max_tool_schema_bytes:
            return f"tool {tool.name!r} is larger than {settings.max_tool_schema_bytes} bytes"
    return None


def check_generate_limits(settings: Settings, p: GenerateRequestParams) -> None:
    """What the prechecks could not see: ``max_new_tokens``, the size of each validated tool."""
    if p.max_new_tokens is not None and p.max_new_tokens > settings.max_new_tokens_cap:
        raise invalid("max_new_tokens", f"must be <= {settings.max_new_tokens_cap}")
    if p.tools is not None and (problem := tools_problem(settings, p.tools)):
        raise invalid("tools", problem)


def text_chars_at_least(value: Any) -> int:
    """A lower bound of the length of ``value`` as the text the model reads (a string as is, anything else as
    JSON): its strings' lengths plus one per value. Walked without recursion; pure Python, so that on a worker
    thread it never holds the event loop for long (``json.dumps`` of 14 MiB would, in one C call)."""
    if isinstance(value, str):
        return len(value)
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        total += len(item) if isinstance(item, str) else 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return total


def check_tool_round(settings: Settings, contents: Sequence[str | int], round_chars: int) -> None:
    """Each tool result at most ``max_tool_result_chars``; a round's results (``round_chars`` already accepted)
    at most ``max_tool_round_chars``. ``contents`` are the results' texts, or lower bounds of their lengths
    (``text_chars_at_least``). Tool results stay in the conversation: an oversized one would make every later
    turn of the session too long."""
    sizes = [c if isinstance(c, int) else len(c) for c in contents]  # texts, or lower bounds of their lengths
    for i, size in enumerate(sizes):
        if size > settings.max_tool_result_chars:
            raise invalid(f"results[{i}]", f"{size} characters or more; at most {settings.max_tool_result_chars} "
                                           "per result")
    total = round_chars + sum(sizes)
    if total > settings.max_tool_round_chars:
        raise invalid("results", f"this round's results have {total} characters; at most "
                                 f"{settings.max_tool_round_chars} per round")


# ---- prompts -------------------------------------------------------------------------------------------------------------
class PromptTooLong(Exception):
    """The prompt exceeds the token limit: counted, or known from its size before tokenizing."""

    def __init__(self, limit: int, tokens: int | None = None, at_least: int | None = None) -> None:
        if tokens is not None:
            message = f"prompt has {tokens} tokens; at most {limit} are accepted"
        else:
            message = f"prompt has at least {at_least} tokens (known from its size); at most {limit} are accepted"
        super().__init__(message)
        self.limit, self.tokens, self.at_least = limit, tokens, at_least

    def data(self) -> dict[str, int]:
        counted = {"prompt_tokens": self.tokens} if self.tokens is not None else {"min_prompt_tokens": self.at_least}
        return {**counted, "max_prompt_tokens": self.limit}


@functools.lru_cache(maxsize=8)
def max_token_chars(tokenizer: Any) -> int:
    """The most characters one token can stand for: the longest vocabulary entry (byte-level BPE writes one
    character per byte, so this bounds bytes too). A text of N characters has at least N / this many tokens."""
    vocab = tokenizer.get_vocab()
    return max(1, max(map(len, vocab)), *(len(t) for t in tokenizer.get_added_vocab()))


def prompt_chars(messages: Sequence[dict[str, Any]], tools: Sequence[ToolDefinition]) -> int:
    """Characters of the conversation that the chat template renders verbatim (a lower bound of the prompt's
    length): contents, tool-call arguments, tool definitions."""
    total = 0
    for m in messages:
        content = m.get("content")
        total += len(content) if isinstance(content, str) else 0
        for call in m.get("tool_calls") or ():
            total += len(json.dumps(call.get("function", {}).get("arguments"), ensure_ascii=False))
    for tool in tools:
        total += len(tool.name) + len(tool.description) + len(json.dumps(tool.parameters, ensure_ascii=False))
    return total


def check_prompt_size(tokenizer: Any, messages: Sequence[dict[str, Any]], tools: Sequence[ToolDefinition],
                      max_tokens: int) -> None:
    """Refuse, without tokenizing, a conversation too long for ``max_tokens`` whatever its tokens: tokenizing
    12 MiB took 29 s and 1.7 GB. What passes is at most ``max_tokens`` x the longest token in characters."""
    at_least = -(-prompt_chars(messages, tools) // max_token_chars(tokenizer))
    if at_least > max_tokens:
        raise PromptTooLong(max_tokens, at_least=at_least)
