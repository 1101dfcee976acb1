"""JSON-RPC 2.0 framing and dispatch: parse, validate the envelope and params, map every error to a code.

Pure and transport-agnostic: the WebSocket loop hands it text and sends back whatever it returns.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from models import JSONRPC_VERSION, ErrorCode

log = logging.getLogger(__name__)


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


def result_response(request_id: Any, result: Any) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC_VERSION, "result": result, "id": request_id}


def error_response(request_id: Any, error: RpcError) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC_VERSION, "error": error.to_dict(), "id": request_id}


def notification(method: str, params: BaseModel | dict[str, Any]) -> dict[str, Any]:
    if isinstance(params, BaseModel):
        params = params.model_dump(mode="json")
    return {"jsonrpc": JSONRPC_VERSION, "method": method, "params": params}


def validation_details(exc: ValidationError) -> list[dict[str, Any]]:
    return [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors(include_url=False)]


@dataclass(frozen=True)
class Method:
    params: type[BaseModel]
    handler: Callable[[Any, Any], Awaitable[Any]]  # (context, validated params) -> result


class Dispatcher:
    def __init__(self, methods: dict[str, Method],
                 observe: Callable[[str, int | None], None] | None = None) -> None:
        self.methods = methods
        self.observe = observe  # called with (method, error code or None) for every request handled

    async def handle_text(self, text: str, context: Any) -> dict[str, Any] | list[dict[str, Any]] | None:
        """The response(s) to one incoming message, or None when nothing is to be sent back."""
        try:
            payload = strict_json_loads(text)
        except (ValueError, RecursionError):
            self._observe("-", ErrorCode.PARSE_ERROR)
            return error_response(None, RpcError(ErrorCode.PARSE_ERROR, "Parse error: the message is not valid JSON"))
        if isinstance(payload, list):
            if not payload:
                return error_response(None, RpcError(ErrorCode.INVALID_REQUEST, "Invalid Request: empty batch"))
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
        method = obj.get("method") if isinstance(obj.get("method"), str) else "-"
        try:
            result = await self._call(obj, context)
        except RpcError as exc:
            self._observe(method if method in self.methods else "-", exc.code)
            if exc.code == ErrorCode.INVALID_REQUEST:  # a malformed envelope is answered even without an id
                return error_response(request_id, exc)
            return error_response(request_id, exc) if "id" in obj else None
        except Exception:
            log.exception("internal error in %r", method)
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
            raise RpcError(ErrorCode.METHOD_NOT_FOUND, f"Method not found: {method}",
                           {"methods": sorted(self.methods)})
        if isinstance(params, list):
            if params:
                raise RpcError(ErrorCode.INVALID_PARAMS, "Invalid params: pass params by name (an object)")
            params = None
        try:
            parsed = entry.params.model_validate(params or {})
        except ValidationError as exc:
            raise RpcError(ErrorCode.INVALID_PARAMS, "Invalid params", validation_details(exc)) from None
        return await entry.handler(context, parsed)
