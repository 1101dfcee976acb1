"""The transports' side of structured outputs: a request's ``tools``, ``tool_choice`` and ``response_format`` ->
the grammars of its model calls (``grammars.TurnGrammars``), compiled on the worker pool. Both APIs call ``plan``
and map ``SchemaRefused`` to their invalid-params error (-32602 / HTTP 400).

With ``INFERENCE_STRUCTURED_OUTPUTS=off`` there is no grammar: ``required`` and a named tool still force the
call's opening through the prompt, ``none`` still hides the tools, tool calls are validated after the fact, and
``response_format`` is refused (nothing would enforce it).
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from grammars import ResponseFormat, ToolChoice, ToolSpec, TurnGrammars, forced_prefix
from models import ResponseFormatParam, ToolChoiceParam, ToolDefinition, tool_choice_plain
from schema_limits import SchemaRefused
from workers import off_loop

if TYPE_CHECKING:
    from shared import Runtime


def tool_specs(tools: Sequence[ToolDefinition]) -> list[ToolSpec]:
    return [ToolSpec(t.name, t.parameters, t.strict) for t in tools]


def choices(tool_choice: ToolChoiceParam | None, response_format: ResponseFormatParam | None,
            parallel_tool_calls: bool | None = None) -> tuple[ToolChoice, ResponseFormat]:
    """The wire shapes (already validated by pydantic) as the grammar builder reads them."""
    fmt = ResponseFormat.parse(response_format.plain() if response_format is not None else None)
    return ToolChoice.parse(tool_choice_plain(tool_choice), parallel_tool_calls), fmt


def prompt_tools(tools: list[ToolDefinition], choice: ToolChoice) -> list[ToolDefinition]:
    """The tools the chat template shows the model: none for ``"none"`` (it is not asked to call one)."""
    return [] if choice.mode == "none" else tools


async def plan(rt: Runtime, tools: Sequence[ToolDefinition], choice: ToolChoice,
               fmt: ResponseFormat) -> TurnGrammars:
    """The grammars of a task's model calls, compiled off the event loop (cached per distinct grammar).
    Raises SchemaRefused."""
    specs = tool_specs(tools)
    if choice.mode in ("required", "function") and not specs:
        raise SchemaRefused("tool_choice", f'"{choice.mode}" needs tools')
    if choice.mode == "function" and choice.name not in {s.name for s in specs}:
        raise SchemaRefused("tool_choice", f"names no tool of the request: {choice.name!r}")
    if rt.grammars is None:
        if fmt.is_json:
            raise SchemaRefused("response_format", "needs structured outputs, which are off on this server "
                                                   "(INFERENCE_STRUCTURED_OUTPUTS=off)")
        return TurnGrammars(prefix=forced_prefix(specs, choice))
    return await off_loop(_compile, rt, specs, choice, fmt)


def _compile(rt: Runtime, specs: list[ToolSpec], choice: ToolChoice, fmt: ResponseFormat) -> TurnGrammars:
    limit = rt.settings.max_tool_schema_bytes  # the response schema is held to a tool's size limit
    if fmt.schema is not None and len(json.dumps(fmt.schema, ensure_ascii=False)) > limit:
        raise SchemaRefused("response_format", f"the schema is larger than {limit} bytes")
    return rt.grammars.for_turns(specs, choice, fmt)


def refusal_data(exc: SchemaRefused) -> list[dict[str, Any]]:
    """-32602's data, in the shape of the other invalid-params errors (``loc``, ``msg``, ``type``)."""
    loc: list[Any] = []
    for part in re.sub(r" \([^)]*\)", "", exc.where).split("."):  # "tools[2] (name).parameters"
        name, _, index = part.partition("[")
        loc += [name, int(index.rstrip("]"))] if index.rstrip("]").isdigit() else [part]
    detail: dict[str, Any] = {"loc": loc, "msg": exc.reason, "type": "structured_output"}
    if exc.keyword:
        detail["keyword"] = exc.keyword
    return [detail]


__all__ = ["SchemaRefused", "TurnGrammars", "choices", "plan", "prompt_tools", "refusal_data", "tool_specs"]
