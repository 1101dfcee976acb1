"""Client-supplied JSON Schemas (the ``parameters`` of tools): checked once when a tool is defined, then run
against the model's arguments with every regular expression on RE2, a linear-time engine, within a depth limit
and a work budget.

jsonschema runs ``pattern`` and ``patternProperties`` with Python's backtracking ``re`` (``^(a+)+$`` against 28
characters took 17 s). It has no hook for the regex engine: its keyword modules call ``re.search`` directly, so
those modules' ``re`` is pointed at an RE2 shim here (jsonschema is pinned; ``test_attacks`` proves the shim is
in effect). Patterns RE2 cannot run (lookaround, backreferences) are refused when the tool is defined, with a
message that says so, rather than run on a backtracking engine.

A ``$ref`` resolves inside the schema only: jsonschema's default registry fetches any other with ``urlopen``
(``http://`` to internal hosts, ``file://`` to local files, whose contents then appear in validation errors).
"""
from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jsonschema._keywords
import jsonschema._legacy_keywords
import jsonschema._utils
import re2
from jsonschema import validators
from jsonschema.exceptions import SchemaError, best_match
from jsonschema_specifications import REGISTRY as SPECIFICATIONS  # the metaschemas, bundled: retrieves nothing
from referencing.exceptions import Unresolvable

MAX_DEPTH = 64  # nested objects/arrays in one schema; jsonschema recurses per level (RecursionError past ~150)
MAX_STEPS = 100_000  # keyword evaluations allowed for one validation of the model's arguments
MAX_PATTERN_MEMORY = 1 << 20  # bytes RE2 may use for one compiled pattern (bigger ones are refused)
_REF_KEYWORDS = ("$ref", "$dynamicRef", "$recursiveRef")


class SchemaTooComplex(Exception):
    """Validation needed more than ``MAX_STEPS`` keyword evaluations."""


# ---- regular expressions on RE2 -------------------------------------------------------------------------------------
def _options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # a refused pattern is reported to the client, not printed to stderr
    options.max_mem = MAX_PATTERN_MEMORY
    return options


@functools.lru_cache(maxsize=128)
def compile_pattern(pattern: str) -> Any:
    """``pattern`` compiled by RE2; raises ValueError, saying why, when RE2 cannot run it."""
    try:
        return re2.compile(pattern, _options())
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ValueError(f"pattern {clip_repr(pattern)} is not supported ({reason}); patterns run on RE2, a "
                         "linear-time engine: no lookaround and no backreferences") from None


class _Re2Search:
    """Stands in for the ``re`` module inside jsonschema, which only calls ``re.search``."""

    @staticmethod
    def search(pattern: str, string: str) -> Any:
        return compile_pattern(pattern).search(string)


for _module in (jsonschema._keywords, jsonschema._legacy_keywords, jsonschema._utils):
    _module.re = _Re2Search  # type: ignore[attr-defined]


def clip_repr(value: str, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ---- checking a schema ----------------------------------------------------------------------------------------------
def _nodes(schema: Any) -> Iterator[tuple[Any, int]]:
    """Every container of ``schema`` with its depth, without recursion (a 400-deep schema is just refused)."""
    stack = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        yield node, depth
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def check_schema(schema: dict[str, Any], what: str = "parameters") -> None:
    """Raise ValueError, saying why, unless ``schema`` is a JSON Schema this server can run: at most
    ``MAX_DEPTH`` levels deep, every pattern runnable on RE2, valid against its metaschema, and not a ``$ref``
    loop. ``what`` names it in the messages."""
    for node, depth in _nodes(schema):
        if depth > MAX_DEPTH:
            raise ValueError(f"{what} is nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, dict):
            for keyword in _REF_KEYWORDS:
                if isinstance(ref := node.get(keyword), str) and not ref.startswith("#"):
                    raise ValueError(f"{what}: {keyword} {clip_repr(ref)} is not supported; only references inside "
                                     "the schema (\"#/$defs/...\") are")
            if isinstance(node.get("pattern"), str):
                compile_pattern(node["pattern"])
            if isinstance(node.get("patternProperties"), dict):
                for pattern in node["patternProperties"]:
                    compile_pattern(pattern)
    cls = validators.validator_for(schema)
    try:  # format_checker=None: the metaschema's "format": "regex" would compile patterns with Python's re
        cls.check_schema(schema, format_checker=None)
    except SchemaError as exc:
        raise ValueError(f"{what} is not a valid JSON Schema: {clip_text(exc.message)}") from None
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply") from None
    try:  # a schema that refers to itself without consuming input ({"allOf": [{"$ref": "#"}]}) never ends
        argument_problems(schema, {})
    except (RecursionError, SchemaTooComplex):
        raise ValueError(f"{what} refers to itself without end, or is too complex to check") from None
    except Unresolvable as exc:
        raise ValueError(f"{what}: $ref {clip_repr(str(exc.ref))} does not resolve inside the schema") from None


def check_tool_schema(schema: dict[str, Any]) -> None:
    """``check_schema``, and the schema must be of an object (a tool's arguments)."""
    if schema.get("type", "object") != "object":
        raise ValueError('parameters must be a JSON Schema of "type": "object"')
    check_schema(schema)


def clip_text(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# ---- validating arguments ---------------------------------------------------------------------------------------------
_budget = threading.local()


def _counted(keyword: Callable[..., Any]) -> Callable[..., Any]:
    def run(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        _budget.left -= 1
        if _budget.left < 0:
            raise SchemaTooComplex
        return keyword(validator, value, instance, schema)
    return run


@functools.lru_cache(maxsize=None)
def _budgeted(cls: type) -> type:
    """``cls`` with every keyword counted against the thread's budget."""
    return validators.extend(cls, {name: _counted(fn) for name, fn in cls.VALIDATORS.items()})


def argument_problems(schema: dict[str, Any], arguments: Any) -> str | None:
    """The most relevant way ``arguments`` break ``schema``, or None. Raises RecursionError or SchemaTooComplex
    when the work runs out of bounds."""
    _budget.left = MAX_STEPS
    validator = _budgeted(validators.validator_for(schema))(schema, registry=SPECIFICATIONS)
    error = best_match(validator.iter_errors(arguments))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    message = error.message
    if len(message) > 300:  # jsonschema quotes the value: quote less of it, keep the rest of the sentence
        quoted = repr(error.instance)
        message = message.replace(quoted, quoted[:60] + "..." if len(quoted) > 60 else quoted)
    return clip_text(message) + (f" (at {clip_text(where, 100)})" if where else "")


def argument_error(schema: dict[str, Any], arguments: Any) -> str | None:
    """Like ``argument_problems``, but work out of bounds is a validation error too (never an exception)."""
    try:
        return argument_problems(schema, arguments)
    except RecursionError:
        return "the arguments are nested too deeply to check"
    except SchemaTooComplex:
        return "the arguments are too complex to check against the schema"
    except Unresolvable as exc:  # a $ref outside the schema (only reachable for schemas not checked on the way in)
        return f"$ref {clip_repr(str(exc.ref))} does not resolve inside the schema"
    except ValueError as exc:  # a pattern RE2 cannot run (only reachable for schemas not checked on the way in)
        return clip_text(str(exc))
