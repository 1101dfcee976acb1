"""The schema set the structured-output proofs run over: one schema per JSON Schema feature the issue lists, plus the
server's own example tool. Strings carry maxLength where a random model would otherwise write until max_new_tokens."""
from __future__ import annotations

from typing import Any

WEATHER: dict[str, Any] = {
    "type": "object",
    "properties": {"location": {"type": "string", "maxLength": 24, "description": "City name, e.g. London"},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["location"]}

SCHEMAS: dict[str, dict[str, Any]] = {
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 12},
            "address": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 12},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False}},
            "required": ["name", "address"], "additionalProperties": False}},
        "required": ["user"], "additionalProperties": False},
    "arrays": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3},
        "pairs": {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": -99,
                                                                       "maximum": 99},
                                             "minItems": 2, "maxItems": 2}, "maxItems": 2}},
        "required": ["tags", "pairs"], "additionalProperties": False},
    "enums": {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]}, "size": {"type": "integer", "enum": [1, 2, 3]},
        "mode": {"const": "fast"}, "flag": {"enum": [True, None, 2.5, "x"]}},
        "required": ["color", "size", "mode", "flag"], "additionalProperties": False},
    "numbers": {"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "score": {"type": "number", "minimum": -1.5, "maximum": 1.5},
        "count": {"type": "integer", "exclusiveMinimum": 0, "maximum": 1000},
        "ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}},
        "required": ["age", "score", "count", "ratio"], "additionalProperties": False},
    "required_strict": {"type": "object", "properties": {
        "a": {"type": "boolean"}, "b": {"type": "null"}, "c": {"type": "string", "maxLength": 5},
        "d": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["a", "c"], "additionalProperties": False},
    "formats": {"type": "object", "properties": {
        "day": {"type": "string", "format": "date"},
        "when": {"type": "string", "format": "date-time"},
        "id": {"type": "string", "format": "uuid"},
        "email": {"type": "string", "format": "email", "maxLength": 24},
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2,4}$"}},
        "required": ["day", "when", "id", "email", "code"], "additionalProperties": False},
    "any_of": {"type": "object", "properties": {
        "target": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                             {"type": "string", "enum": ["all", "none"]},
                             {"type": "object", "properties": {"ids": {"type": "array", "maxItems": 3,
                                                                       "items": {"type": "integer", "minimum": 0,
                                                                                 "maximum": 99}}},
                              "required": ["ids"], "additionalProperties": False}]}},
        "required": ["target"], "additionalProperties": False},
}

# Formats jsonschema only checks with optional packages: the tests check these regexes themselves.
FORMAT_CHECKS = {
    "date": r"^\d{4}-\d{2}-\d{2}$",
    "date-time": r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$",  # RFC 3339: t, z too
    "uuid": r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
    "email": r"^[^@\s]+@[^@\s]+$",
}

# A keyword the grammar engine cannot enforce -> a schema using it (each must be refused, naming the keyword).
UNSUPPORTED: dict[str, dict[str, Any]] = {
    "if": {"type": "object", "properties": {"a": {"type": "integer"}}, "if": {"required": ["a"]},
           "then": {"required": ["b"]}},
    "not": {"type": "object", "properties": {"a": {"not": {"type": "string"}}}},
    "uniqueItems": {"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}},
    "dependentRequired": {"type": "object", "properties": {"a": {"type": "integer"}},
                          "dependentRequired": {"a": ["b"]}},
    "contains": {"type": "object", "properties": {"a": {"type": "array", "contains": {"type": "integer"}}}},
    "format": {"type": "object", "properties": {"a": {"type": "string", "format": "frobnicate"}}},
    "pattern": {"type": "object", "properties": {"a": {"type": "string", "pattern": "^(?=a)a+$"}}},
    "minimum/maximum": {"type": "object", "properties": {"a": {"type": "number", "minimum": 1e300}}},
}
