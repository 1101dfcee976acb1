"""Cheap limits on the JSON Schemas a request would compile into a grammar, walked before any compiling: nesting
depth, node count, and the regexes (count, length, nested counted repetitions). Linear scans with no recursion, so
a client's schema cannot make the pricing itself expensive."""
from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any


class SchemaRefused(ValueError):
    """A tool set, tool choice or response format that cannot be constrained; ``where`` says which part
    (``tools[2].parameters``, ``response_format``, ``tool_choice``) and ``keyword`` the JSON Schema keyword, if any."""

    def __init__(self, where: str, reason: str, keyword: str | None = None) -> None:
        super().__init__(f"{where}: {reason}")
        self.where, self.reason, self.keyword = where, reason, keyword


# ---- limits -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SchemaLimits:
    max_depth: int = 32  # nesting of schemas inside schemas
    max_nodes: int = 20_000  # schema objects in one request, all tools together
    max_patterns: int = 64  # distinct regexes (pattern, patternProperties) in one request
    max_pattern_chars: int = 1_000
    max_nested_repeat: int = 1_000  # counted repetitions in one regex: nested multiply, in sequence add (nested_repeat)
    max_grammar_chars: int = 1 << 20  # the Lark text, all schemas included


def _subschemas(node: Any) -> Iterator[Any]:
    if isinstance(node, Mapping):
        yield from node.values()
    elif isinstance(node, list):
        yield from node


# Spaces inside the braces are allowed: llguidance's regex syntax reads "{1, 50}" as a repetition (RE2 as text).
_COUNT = re.compile(r"\{\s*(\d{1,9})\s*(,\s*(\d{0,9})\s*)?\}")


def nested_repeat(regex: str) -> int:
    """The weight of the counted repetitions ({n}, {m,n}, {m,}) in ``regex``: nested ones multiply, ones in sequence
    add up (the largest alternative of a ``|`` counts): (a{1,100}){1,100} is 10,000, [a-z]{1,999}[a-z]{1,999} 1,998.
    A derivative-based lexer builds such regexes term by term; past a few hundred (with ambiguous splits, nested or
    side by side) llguidance gives up mid-stream. Cheap and conservative: a linear scan, no regex engine."""
    frames = [[0, 0]]  # per open group: [the weight of its current alternative so far, its largest alternative]
    i, n = 0, len(regex)
    unit, added = 1, 0  # the item just closed: its weight as a quantifier's operand, and what it added to its frame
    while i < n:
        c = regex[i]
        if c == "\\":
            i += 2
            if i < n + 1 and regex[i - 1:i] in ("p", "P", "x", "u") and regex[i:i + 1] == "{":
                i = regex.find("}", i) + 1 or n
            unit, added = 1, 0
            continue
        if c == "[":
            j = i + 1 + (regex[i + 1:i + 2] == "^")
            j += regex[j:j + 1] == "]"
            while j < n and regex[j] != "]":
                j += 2 if regex[j] == "\\" else 1
            i, unit, added = j + 1, 1, 0
            continue
        if c == "(":
            frames.append([0, 0])
            i += 1
            continue
        if c == "|":
            frame = frames[-1]
            frame[1], frame[0] = max(frame), 0
            unit, added = 1, 0
            i += 1
            continue
        if c == ")" and len(frames) > 1:
            inner = max(frames.pop())
            frames[-1][0] += inner
            unit, added = max(1, inner), inner
            i += 1
            continue
        if c == "{" and (m := _COUNT.match(regex, i)):
            low, high = int(m.group(1)), m.group(3)
            weight = unit * max(1, int(high) if high else low)
            frames[-1][0] += weight - added
            unit, added = weight, weight
            i = m.end()
            continue
        unit, added = 1, 0
        i += 1
    while len(frames) > 1:  # unbalanced: the open groups count as closed
        inner = max(frames.pop())
        frames[-1][0] += inner
    return max(1, *frames[0])


@dataclass
class Pricing:
    """What the schemas of one request add up to so far."""

    nodes: int = 0
    patterns: dict[str, str] = field(default_factory=dict)  # regex -> where it is first used


def price_schema(schema: Any, where: str, limits: SchemaLimits, total: Pricing) -> None:
    """Walk ``schema`` iteratively (no recursion for a client to exhaust), counting into ``total``: depth, node
    count and regexes within ``limits``, else SchemaRefused."""
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limits.max_depth:
            raise SchemaRefused(where, f"nested deeper than {limits.max_depth} levels")
        total.nodes += 1
        if total.nodes > limits.max_nodes:
            raise SchemaRefused(where, f"the schemas have more than {limits.max_nodes} nodes in all")
        if isinstance(node, Mapping):
            regexes = [node.get("pattern")]
            if isinstance(node.get("patternProperties"), Mapping):
                regexes += list(node["patternProperties"])
            for regex in regexes:
                if not isinstance(regex, str):
                    continue
                if len(regex) > limits.max_pattern_chars:
                    raise SchemaRefused(where, f"a pattern is longer than {limits.max_pattern_chars} characters",
                                        "pattern")
                if (weight := nested_repeat(regex)) > limits.max_nested_repeat:
                    raise SchemaRefused(where, f"pattern {regex[:80]!r} has counted repetitions weighing {weight} in "
                                        f"all, nested ones multiplied (at most {limits.max_nested_repeat})", "pattern")
                total.patterns.setdefault(regex, where)
                if len(total.patterns) > limits.max_patterns:
                    raise SchemaRefused(where, f"more than {limits.max_patterns} distinct patterns", "pattern")
        stack.extend((child, depth + 1) for child in _subschemas(node) if isinstance(child, (Mapping, list)))


# ---- the Lark text -----------------------------------------------------------------------------------------------
