"""Grammars for structured outputs: tool calls (``tool_choice``) and JSON answers (``response_format``) written as
llguidance Lark grammars, priced before they are compiled, compiled once per distinct grammar and cached.

Plain values in (tool names and their JSON Schemas, a parsed tool choice and response format), a compiled
``engine.structured.Grammar`` out, or ``SchemaRefused`` naming what cannot be honoured. No web code: the transport
maps ``SchemaRefused`` to -32602 / HTTP 400. Compiling is CPU work: call ``GrammarCompiler.compile`` off the event
loop.

The grammars, by tool choice (``tools`` non-empty; ``T`` is free text without a tool call, ``C`` one call):
  auto      ``T (C T)*``   free text stays unconstrained until the model opens ``<tool_call>`` (a lazy grammar)
  required  ``C (\\n C)*``  the answer is one or more calls
  function  ``C_name``     exactly one call of that tool
  none      ``T``          no call possible
With a JSON ``response_format`` the free text becomes the JSON document: auto ``calls | JSON``, none ``JSON``.
A call is ``<tool_call>\\n{"name": "<tool>", "arguments": <its parameters schema>}\\n</tool_call>``, the shape Qwen2.5's
chat template writes, JSON in ``json.dumps``' default style (", " and ": ", no other whitespace): what the model was
trained on, and no room for a random model to pad forever.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from engine.structured import Grammar, GrammarCompileError, GrammarTokenizer
from schema_limits import Pricing, SchemaLimits, SchemaRefused, price_schema

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT: dict[str, Any] = {"type": "object"}


# ---- what the client asked for -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToolSpec:
    name: str
    parameters: Mapping[str, Any] = field(default_factory=lambda: dict(ANY_OBJECT))
    strict: bool | None = None  # False: arguments need only be a JSON object (its schema is not compiled)


@dataclass(frozen=True)
class ToolChoice:
    mode: Literal["auto", "required", "none", "function"] = "auto"
    name: str | None = None
    parallel: bool = True  # OpenAI's parallel_tool_calls: false allows one call per model call

    @classmethod
    def parse(cls, value: Any, parallel: bool | None = None) -> ToolChoice:
        """OpenAI's shapes: "auto" | "required" | "none" | {"type": "function", "function": {"name": ...}};
        None means auto."""
        many = parallel is not False
        if value is None:
            return cls(parallel=many)
        if value in ("auto", "required", "none"):
            return cls(value, parallel=many)
        if isinstance(value, Mapping) and value.get("type", "function") == "function":
            fn = value.get("function")
            name = fn.get("name") if isinstance(fn, Mapping) else value.get("name")
            if isinstance(name, str) and name:
                return cls("function", name, many)
        raise SchemaRefused("tool_choice", 'must be "auto", "required", "none" or '
                            '{"type": "function", "function": {"name": ...}}')


@dataclass(frozen=True)
class ResponseFormat:
    kind: Literal["text", "json_object", "json_schema"] = "text"
    schema: Mapping[str, Any] | None = None

    @classmethod
    def parse(cls, value: Any) -> ResponseFormat:
        """OpenAI's shapes: {"type": "text"} | {"type": "json_object"} |
        {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}; None means text."""
        if value is None:
            return cls()
        kind = value.get("type") if isinstance(value, Mapping) else None
        if kind in ("text", "json_object"):
            return cls(kind)
        if kind == "json_schema":
            spec = value.get("json_schema")
            schema = spec.get("schema", ANY_OBJECT) if isinstance(spec, Mapping) else None
            if isinstance(schema, Mapping):
                return cls(kind, schema)
            raise SchemaRefused("response_format", 'json_schema needs {"json_schema": {"name": ..., "schema": {...}}}')
        raise SchemaRefused("response_format", 'type must be "text", "json_object" or "json_schema"')

    @property
    def is_json(self) -> bool:
        return self.kind != "text"


_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")  # name -> schema
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties", "not", "contains", "if", "then", "else", "propertyNames")


def closed_objects(schema: Any) -> Any:
    """A copy of ``schema`` where every object that lists ``properties`` and says nothing of other keys gets
    ``additionalProperties: false``: the model writes the declared keys only (OpenAI's strict mode and xgrammar's
    default do the same). Still valid against the client's schema; without it a model may add keys for ever.
    Recursion is bounded: pricing refused anything deeper than ``max_depth`` before this runs."""
    if not isinstance(schema, Mapping):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(schema.get(key), Mapping):
            out[key] = {name: closed_objects(sub) for name, sub in schema[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            out[key] = [closed_objects(sub) for sub in schema[key]]
    for key in _SCHEMA_VALUES:
        if key in schema:
            out[key] = closed_objects(schema[key])
    if (isinstance(schema.get("properties"), Mapping) and schema["properties"]
            and not {"additionalProperties", "patternProperties", "unevaluatedProperties"} & schema.keys()):
        out["additionalProperties"] = False
    return out


def _json_rule(schema: Mapping[str, Any]) -> str:
    return "%json " + json.dumps({**closed_objects(schema), "x-guidance": JSON_STYLE}, ensure_ascii=False)


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def call_head(name: str) -> str:
    """The call's JSON up to its arguments, as the chat template writes it."""
    return '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '


def lark_grammar(tools: Sequence[ToolSpec], choice: ToolChoice, fmt: ResponseFormat) -> str | None:
    """The grammar for this request, or None when it needs none (no tools in play and a text answer)."""
    if choice.mode in ("required", "function") and not tools:
        raise SchemaRefused("tool_choice", f'"{choice.mode}" needs tools')
    if choice.mode == "function" and choice.name not in {t.name for t in tools}:
        raise SchemaRefused("tool_choice", f"names no tool of the request: {choice.name!r}")
    called = [t for t in tools if choice.mode != "function" or t.name == choice.name]
    calls_possible = bool(tools) and choice.mode != "none"
    if not calls_possible and not fmt.is_json and choice.mode != "none":
        return None
    lines = ["%llguidance {}"]
    if calls_possible:
        alts = []
        for i, tool in enumerate(called):
            args = tool.parameters if tool.strict is not False else ANY_OBJECT
            lines += [f"tool_{i}: {_literal(call_head(tool.name))} args_{i} \"}}\"", f"args_{i}: {_json_rule(args)}"]
            alts.append(f"tool_{i}")
        lines += ["body: " + " | ".join(alts), f'call: {TOOL_OPEN} "\\n" body "\\n" {TOOL_CLOSE}',
                  'calls: call ("\\n" call)*' if choice.parallel else "calls: call"]
    # Free text: anything but a tool call, whether the model opens one with the tag's token or spells it out.
    lines.append("TEXT: /(?s:.*)/ & ~/(?s:.*)<tool_call>(?s:.*)/")
    if fmt.is_json:
        lines.append(f"answer: {_json_rule(fmt.schema or ANY_OBJECT)}")
    if choice.mode == "function":
        start = "call"
    elif choice.mode == "required":
        start = "calls"
    elif fmt.is_json:
        start = "calls | answer" if calls_possible else "answer"
    else:
        start = ("TEXT (call TEXT)*" if choice.parallel else "TEXT (call TEXT)?") if calls_possible else "TEXT"
    lines.append(f"start: {start}")
    return "\n".join(lines)


def forced_prefix(tools: Sequence[ToolSpec], choice: ToolChoice) -> str:
    """Text the prompt's assistant turn starts with to force a call's opening (cheaper as prefill than as
    one decode step per forced token): ``required`` opens a call, a named choice also names the tool."""
    if choice.mode == "required" and tools:
        return TOOL_OPEN + '\n{"name": "'
    if choice.mode == "function" and tools:
        return TOOL_OPEN + "\n" + call_head(choice.name or "")
    return ""


def _schemas(tools: Sequence[ToolSpec], fmt: ResponseFormat) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(where, schema) of every schema the grammar compiles."""
    for i, tool in enumerate(tools):
        if tool.strict is not False:
            yield f"tools[{i}] ({tool.name}).parameters", tool.parameters
    if fmt.schema is not None:
        yield "response_format.json_schema.schema", fmt.schema


@dataclass(frozen=True)
class TurnGrammars:
    """What constrains a task's model calls. ``tool_choice`` applies to the first call (``prefix``: the text its
    prompt ends with, a forced call opening); the calls after tool results are "auto" (or stay "none"), so the
    model can answer once it has the results. ``None`` grammars: unconstrained."""

    first: Grammar | None = None
    later: Grammar | None = None
    prefix: str = ""

    def grammar(self, first: bool) -> Grammar | None:
        return self.first if first else self.later


def later_choice(choice: ToolChoice) -> ToolChoice:
    return choice if choice.mode == "none" else ToolChoice("auto", parallel=choice.parallel)


# ---- compiling ---------------------------------------------------------------------------------------------------
_UNIMPLEMENTED = re.compile(r"Unimplemented keys: \[(.*?)\]")


def explain(message: str) -> tuple[str, str | None]:
    """llguidance's refusal -> (reason, keyword)."""
    if m := _UNIMPLEMENTED.search(message):
        keys = [k.strip().strip('"') for k in m.group(1).split(",") if k.strip()]
        return f"unsupported JSON Schema keyword{'s' if len(keys) > 1 else ''}: {', '.join(keys)}", keys[0]
    lowered = message.lower()
    # (the first marker found names the keyword: "float range" before "regex", which its message also says)
    for keyword, marker in (("format", "unknown format"), ("minimum/maximum", "float range"), ("pattern", "regex"),
                            ("pattern", "lexer"), ("$ref", "resource"), ("minProperties", "min/maxproperties"),
                            ("type", "invalid type")):
        if marker in lowered:
            return f"keyword {keyword!r} cannot be compiled: {message}", keyword
    return message, None


class GrammarCompiler:
    """Turns (tools, tool choice, response format) into a compiled grammar; remembers the last ``cache_size``.

    Thread-safe; blocking (llguidance releases the GIL while it builds): run ``compile`` in a worker thread.
    """

    def __init__(self, tokenizer: GrammarTokenizer, limits: SchemaLimits = SchemaLimits(),
                 cache_size: int = 64) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, tuple[int, ...]], Grammar] = OrderedDict()
        self._lock = threading.Lock()
        self.tags_are_tokens = all(tokenizer.special_token(t) is not None for t in (TOOL_OPEN, TOOL_CLOSE))

    def price(self, tools: Sequence[ToolSpec], fmt: ResponseFormat) -> Pricing:
        """Cheap limits before any compiling (SchemaRefused past them)."""
        total = Pricing()
        for where, schema in _schemas(tools, fmt):
            price_schema(schema, where, self.limits, total)
        return total

    def probe_pattern(self, regex: str) -> str | None:
        """Why llguidance cannot run ``regex`` as a JSON string's pattern, or None. Its lexer builds a regex when a
        string first needs it, so a regex too large to build (nested counted repetitions) would otherwise fail
        mid-stream: here the string is opened and its first mask built."""
        quote = self.tokenizer.encode('"')
        try:
            Grammar(self.tokenizer, "start: " + _json_rule({"type": "string", "pattern": regex}), quote)
        except GrammarCompileError as exc:
            return str(exc)
        return None

    def compile(self, tools: Sequence[ToolSpec], choice: ToolChoice, fmt: ResponseFormat,
                prefix: Sequence[int] = ()) -> Grammar | None:
        """The compiled grammar for the request (None: unconstrained), whose matchers start after ``prefix`` (the
        forced-prefix token ids the prompt ends with). Raises SchemaRefused."""
        if tools and choice.mode != "none" and not self.tags_are_tokens:
            raise SchemaRefused("tools", f"this tokenizer has no single {TOOL_OPEN} token to constrain calls with")
        pricing = self.price(tools, fmt)
        text = lark_grammar(tools, choice, fmt)
        if text is None:
            return None
        if len(text) > self.limits.max_grammar_chars:
            raise SchemaRefused("tools", f"the schemas make a grammar over {self.limits.max_grammar_chars} characters")
        key = (text, tuple(prefix))
        with self._lock:
            if (hit := self._cache.get(key)) is not None and not hit.failed:
                self._cache.move_to_end(key)
                return hit
        try:
            grammar = Grammar(self.tokenizer, text, prefix)
        except GrammarCompileError as exc:
            raise self._locate(tools, fmt, str(exc)) from None
        for regex, where in pricing.patterns.items():
            if (problem := self.probe_pattern(regex)) is not None:
                raise SchemaRefused(where, f"pattern {regex[:80]!r} cannot be used: {problem}", "pattern")
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return grammar

    def for_turns(self, tools: Sequence[ToolSpec], choice: ToolChoice, fmt: ResponseFormat) -> TurnGrammars:
        """The grammars of a task's first and later model calls (see ``TurnGrammars``). Raises SchemaRefused."""
        prefix = forced_prefix(tools, choice)
        first = self.compile(tools, choice, fmt, self.tokenizer.encode(prefix) if prefix else ())
        after = later_choice(choice)
        later = first if after == choice else self.compile(tools, after, fmt)
        return TurnGrammars(first, later, prefix)

    def _locate(self, tools: Sequence[ToolSpec], fmt: ResponseFormat, message: str) -> SchemaRefused:
        """Which schema the whole grammar's refusal came from: each one compiled alone."""
        for where, schema in _schemas(tools, fmt):
            try:
                Grammar(self.tokenizer, f"start: {_json_rule(schema)}")
            except GrammarCompileError as exc:
                reason, keyword = explain(str(exc))
                return SchemaRefused(where, reason, keyword)
        reason, keyword = explain(message)
        return SchemaRefused("tools" if tools else "response_format", reason, keyword)
