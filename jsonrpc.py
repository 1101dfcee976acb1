"""JSON-RPC 2.0 framing and dispatch: parse, validate the envelope and params, map every error to a code.

Pure and transport-agnostic: the WebSocket loop hands it text and sends back whatever it returns.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from pydantic import BaseModel, ValidationError

from models import JSONRPC_VERSION, ErrorCode

log = logging.getLogger(__name__)
MAX_ECHO = 200  # characters of client input an error message may quote
MAX_ID_CHARS = 256  # a request id longer than this (as JSON) is refused rather than echoed
MAX_DETAILS = 10  # validation errors listed in one error's data


class RpcError(Exception):
    """An error that becomes a JSON-RPC error object (response, or ``error`` notification)."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code, self.message, self.data = int(code), message, data

    def to_dict(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number out of range: {text}")
    return value


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json_loads(text: str | bytes) -> Any:
    """``json.loads`` that refuses what is not JSON (NaN, Infinity) and numbers that overflow a float."""
    return json.loads(text, parse_float=_finite, parse_constant=_no_constants)


def clip(text: str, limit: int = MAX_ECHO) -> str:
    """``text`` cut to ``limit`` characters: what an error message may quote of client input."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


class JsonRefused(ValueError):
    """The text is refused before or after parsing; ``code`` is the JSON-RPC error to answer with."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE_ESCAPE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]")


def structure_count(text: str | bytes, start: int = 0, end: int | None = None) -> int:
    """An upper bound on the JSON values in ``text[start:end]`` (every value but the first follows a comma or
    opens a container), counted at C speed: the price of parsing it, known before parsing."""
    if isinstance(text, bytes):
        return text.count(b",", start, end) + text.count(b"[", start, end) + text.count(b"{", start, end)
    return text.count(",", start, end) + text.count("[", start, end) + text.count("{", start, end)


def parse_json(text: str | bytes, max_values: int) -> Any:
    """Parse a message or request body, cheapest refusals first.

    ``json.loads`` holds the GIL for its whole run (a worker thread would not help), and its cost grows with
    the number of values, faster than linearly (the garbage collector runs as containers pile up): so the
    values are counted first, and more than ``max_values`` are refused unparsed. A string with an unpaired
    UTF-16 surrogate escape (``"\\ud800"``) parses in Python but is not Unicode: it could not be tokenized,
    logged or sent back, so it is refused too. Raises JsonRefused, or ValueError/RecursionError (not JSON).
    """
    if len(text) > max_values and structure_count(text) > max_values:
        raise _too_many_values(max_values)
    payload = strict_json_loads(text)
    if _surrogate_pattern(text).search(text):
        _refuse_lone_surrogates(payload)
    return payload


async def parse_json_yielding(text: str | bytes, max_values: int, step: int = 1 << 20) -> Any:
    """``parse_json`` for the event loop: a big text's scans run ``step`` characters at a time, letting the
    loop serve everyone else in between; only ``json.loads`` itself (bounded by the value count) runs whole."""
    if len(text) <= step:
        return parse_json(text, max_values)
    count = 0
    for start in range(0, len(text), step):
        await asyncio.sleep(0)
        count += structure_count(text, start, start + step)
        if count > max_values:
            raise _too_many_values(max_values)
    await asyncio.sleep(0)
    payload = strict_json_loads(text)
    pattern = _surrogate_pattern(text)
    for start in range(0, len(text), step):
        await asyncio.sleep(0)
        if pattern.search(text, start, start + step + 5):  # +5: an escape that straddles the boundary
            _refuse_lone_surrogates(payload)
            break
    return payload


def _too_many_values(max_values: int) -> JsonRefused:
    return JsonRefused(-32600, f"Invalid Request: the message holds more than {max_values} JSON values")


def _surrogate_pattern(text: str | bytes) -> re.Pattern:
    return _SURROGATE_ESCAPE_BYTES if isinstance(text, bytes) else _SURROGATE_ESCAPE


def _refuse_lone_surrogates(payload: Any) -> None:
    """Escapes of surrogates were seen: paired ones (emoji from ASCII-only clients) are fine, lone ones not."""
    try:
        json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise JsonRefused(-32700, "Parse error: the message contains an unpaired UTF-16 surrogate escape "
                                  "(\\ud800-\\udfff alone), which is not Unicode") from None


def result_response(request_id: Any, result: Any) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC_VERSION, "result": result, "id": request_id}


def error_response(request_id: Any, error: RpcError) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC_VERSION, "error": error.to_dict(), "id": request_id}


def encode(message: dict[str, Any] | list[Any]) -> tuple[str, int]:
    """A message as JSON text, and its size in bytes. Text that is not Unicode (a lone surrogate that slipped
    through) is sent \\u-escaped rather than failing the sender: the connection never goes silent."""
    text = json.dumps(message, ensure_ascii=False)
    try:
        return text, len(text.encode("utf-8"))
    except UnicodeEncodeError:
        text = json.dumps(message)
        return text, len(text)


_json_string = msgspec.json.Encoder().encode
_CHUNK_HEAD = b'{"jsonrpc": "2.0", "method": "text_chunk", "params": {"session_id": '


def encode_text_chunk(session_id: str, task_id: str, chunk: str, seq: int) -> tuple[str, int]:
    """``encode`` of a ``text_chunk`` notification, the same text byte for byte (json.dumps' separators and
    escapes), at a fraction of its cost: the strings are escaped by msgspec (C) and the frame around them is
    constant. This is the message sent once per piece of streamed text."""
    try:
        data = b"".join((_CHUNK_HEAD, _json_string(session_id), b', "task_id": ', _json_string(task_id),
                         b', "chunk": ', _json_string(chunk), b', "seq": ', str(seq).encode(), b"}}"))
    except UnicodeEncodeError:  # a lone surrogate: json.dumps' escaped form
        return encode({"jsonrpc": "2.0", "method": "text_chunk",
                       "params": {"session_id": session_id, "task_id": task_id, "chunk": chunk, "seq": seq}})
    return data.decode("utf-8"), len(data)


def notification(method: str, params: BaseModel | dict[str, Any]) -> dict[str, Any]:
    if isinstance(params, BaseModel):
        params = params.model_dump(mode="json")
    return {"jsonrpc": JSONRPC_VERSION, "method": method, "params": params}


def validation_details(exc: ValidationError) -> list[dict[str, Any]]:
    """The first ``MAX_DETAILS`` errors, each clipped: keys and messages may quote client input."""
    return [{"loc": [clip(p, 64) if isinstance(p, str) else p for p in e["loc"]], "msg": clip(e["msg"], 300),
             "type": e["type"]} for e in exc.errors(include_url=False, include_input=False)[:MAX_DETAILS]]


@dataclass(frozen=True)
class Method:
    params: type[BaseModel]
    handler: Callable[[Any, Any], Awaitable[Any]]  # (context, validated params) -> result
    precheck: Callable[[Any, dict[str, Any]], None] | None = None  # cheap limits on the raw params, first
    heavy: bool = False  # validating the params can be costly (tools, histories): done off the event loop


Offload = Callable[[Callable[[], Any]], Awaitable[Any]]


class Dispatcher:
    def __init__(self, methods: dict[str, Method], observe: Callable[[str, int | None], None] | None = None,
                 max_batch: int = 32, max_values: int = 100_000, offload: Offload | None = None) -> None:
        self.methods = methods
        self.observe = observe  # called with (method, error code or None) for every request handled
        self.max_batch = max_batch  # requests in one batch
        self.max_values = max_values  # JSON values in one message (see parse_json)
        self.offload = offload  # runs a heavy method's params validation away from the event loop

    async def handle_text(self, text: str, context: Any) -> dict[str, Any] | list[dict[str, Any]] | None:
        """The response(s) to one incoming message, or None when nothing is to be sent back."""
        try:
            payload = await parse_json_yielding(text, self.max_values)
        except JsonRefused as exc:
            self._observe("-", exc.code)
            return error_response(None, RpcError(exc.code, exc.message))
        except (ValueError, RecursionError):
            self._observe("-", ErrorCode.PARSE_ERROR)
            return error_response(None, RpcError(ErrorCode.PARSE_ERROR, "Parse error: the message is not valid JSON"))
        if isinstance(payload, list):
            if not payload:
                return error_response(None, RpcError(ErrorCode.INVALID_REQUEST, "Invalid Request: empty batch"))
            if len(payload) > self.max_batch:  # refused whole, before any entry runs: the reply stays small
                self._observe("-", ErrorCode.INVALID_REQUEST)
                return error_response(None, RpcError(
                    ErrorCode.INVALID_REQUEST, f"Invalid Request: a batch holds at most {self.max_batch} requests",
                    {"batch_size": len(payload), "max_batch": self.max_batch}))
            responses = [r for item in payload if (r := await self.handle_one(item, context)) is not None]
            return responses or None
        return await self.handle_one(payload, context)

    async def handle_one(self, obj: Any, context: Any) -> dict[str, Any] | None:
        if not isinstance(obj, dict):
            return error_response(None, RpcError(ErrorCode.INVALID_REQUEST, "Invalid Request: expected an object"))
        request_id = obj.get("id")
        if isinstance(request_id, bool) or not isinstance(request_id, (str, int, float, type(None))):
            return error_response(None, RpcError(ErrorCode.INVALID_REQUEST,
                                                 "Invalid Request: id must be a string, a number or null"))
        if isinstance(request_id, (str, int)) and len(json.dumps(request_id)) > MAX_ID_CHARS:
            return error_response(None, RpcError(ErrorCode.INVALID_REQUEST,
                                                 f"Invalid Request: id is longer than {MAX_ID_CHARS} characters"))
        method = obj.get("method") if isinstance(obj.get("method"), str) else "-"
        try:
            result = await self._call(obj, context)
        except RpcError as exc:
            self._observe(method if method in self.methods else "-", exc.code)
            if exc.code == ErrorCode.INVALID_REQUEST:  # a malformed envelope is answered even without an id
                return error_response(request_id, exc)
            return error_response(request_id, exc) if "id" in obj else None
        except RecursionError:  # nesting beyond what the checks can walk: the client's problem, one log line
            log.warning("request %s: input nested too deeply", clip(repr(method), 64))
            self._observe(method if method in self.methods else "-", ErrorCode.INVALID_PARAMS)
            error = RpcError(ErrorCode.INVALID_PARAMS, "Invalid params: nested too deeply")
            return error_response(request_id, error) if "id" in obj else None
        except Exception:
            log.exception("internal error in %s", clip(repr(method), 64))
            self._observe(method, ErrorCode.INTERNAL_ERROR)
            error = RpcError(ErrorCode.INTERNAL_ERROR, "Internal error")
            return error_response(request_id, error) if "id" in obj else None
        self._observe(method, None)
        return result_response(request_id, result) if "id" in obj else None

    def _observe(self, method: str, code: int | None) -> None:
        if self.observe is not None:
            self.observe(method, code)

    async def _call(self, obj: dict[str, Any], context: Any) -> Any:
        if obj.get("jsonrpc") != JSONRPC_VERSION:
            raise RpcError(ErrorCode.INVALID_REQUEST, 'Invalid Request: "jsonrpc" must be "2.0"')
        method = obj.get("method")
        if not isinstance(method, str):
            raise RpcError(ErrorCode.INVALID_REQUEST, 'Invalid Request: "method" must be a string')
        params = obj.get("params")
        if "params" in obj and not isinstance(params, (dict, list)):
            raise RpcError(ErrorCode.INVALID_REQUEST, 'Invalid Request: "params" must be an object or an array')
        entry = self.methods.get(method)
        if entry is None:
            raise RpcError(ErrorCode.METHOD_NOT_FOUND, f"Method not found: {clip(method, 100)}",
                           {"methods": sorted(self.methods)})
        if isinstance(params, list):
            if params:
                raise RpcError(ErrorCode.INVALID_PARAMS, "Invalid params: pass params by name (an object)")
            params = None
        if entry.precheck is not None:
            entry.precheck(context, params or {})
        validate = functools.partial(entry.params.model_validate, params or {})
        try:
            parsed = await self.offload(validate) if entry.heavy and self.offload is not None else validate()
        except ValidationError as exc:
            raise RpcError(ErrorCode.INVALID_PARAMS, "Invalid params", validation_details(exc)) from None
        return await entry.handler(context, parsed)
