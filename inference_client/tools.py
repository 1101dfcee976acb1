"""Tools: definitions in the server's shape, built from plain functions (schema from the signature and type
hints) or dicts, with an optional local handler that answers the model's calls."""
from __future__ import annotations

import inspect
import json
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


_JSON_TYPES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean",
                               list: "array", tuple: "array", set: "array", dict: "object"}


def _schema_of(annotation: Any) -> dict[str, Any]:
    """The JSON schema of a simple type hint (``{}``, meaning anything, for the rest)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return _schema_of(rest[0]) if len(rest) == 1 else {}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (list, set) and args:
        return {"type": "array", "items": _schema_of(args[0])}
    kind = _JSON_TYPES.get(origin or annotation)
    return {"type": kind} if kind else {}


@dataclass
class Tool:
    """A tool definition in the server's shape, with an optional local ``handler`` that answers its calls."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    handler: Callable[..., Any] | None = None

    @classmethod
    def from_function(cls, fn: Callable[..., Any], name: str | None = None) -> Tool:
        """A tool from a function: name, first docstring paragraph, a schema from its signature and hints."""
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # noqa: BLE001 (unresolvable hints: the parameters count as untyped)
            hints = {}
        properties, required = {}, []
        for param in inspect.signature(fn).parameters.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            properties[param.name] = _schema_of(hints.get(param.name, Any))
            if param.default is param.empty:
                required.append(param.name)
        doc = (inspect.getdoc(fn) or "").split("\n\n")[0].strip()
        schema = {"type": "object", "properties": properties, **({"required": required} if required else {})}
        return cls(name or fn.__name__, doc, schema, fn)

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any], handler: Callable[..., Any] | None = None) -> Tool:
        """A tool from the server's shape (OpenAI's ``{"type": "function", "function": {...}}`` too)."""
        if spec.get("type") == "function" and isinstance(spec.get("function"), Mapping):
            spec = spec["function"]
        params = spec.get("parameters") or {"type": "object", "properties": {}}
        return cls(spec["name"], spec.get("description", ""), dict(params), handler)

    def definition(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


ToolsArg = Iterable[Tool | Mapping[str, Any] | Callable[..., Any]] | Mapping[str, Any] | None


def as_tools(tools: ToolsArg) -> list[Tool]:
    """Normalise ``tools``: a list of Tools, dicts or functions, or a ``{name: function or dict}`` mapping."""
    if tools is None:
        return []
    if isinstance(tools, Mapping):
        return [Tool.from_function(v, name) if callable(v) else v if isinstance(v, Tool)
                else Tool.from_dict({**v, "name": name}) for name, v in tools.items()]
    return [t if isinstance(t, Tool) else Tool.from_dict(t) if isinstance(t, Mapping) else Tool.from_function(t)
            for t in tools]


def load_tools(path: str) -> list[Tool]:
    """Tools from a JSON list of definitions; one with a ``"result"`` is answered with it, always."""
    def canned(value: Any) -> Callable[..., Any]:
        return lambda **_: value

    with open(path, encoding="utf-8") as f:
        specs = json.load(f)
    return [Tool.from_dict({k: v for k, v in spec.items() if k != "result"},
                           canned(spec["result"]) if "result" in spec else None) for spec in specs]
