"""The HTTP door: what a request must pass before a route handles it, and how uvicorn bounds connections.

* ``Host`` (DNS rebinding): with ``INFERENCE_ALLOWED_HOSTS`` unset, only IP literals, ``localhost`` and the
  configured bind name are accepted, as Jupyter Server does; a page on ``evil.example`` that re-points its name
  at this machine sends ``Host: evil.example`` and is refused.
* JSON bodies: ``Content-Type: application/json`` (a cross-site form or ``text/plain`` POST is refused; a
  JSON one forces a CORS preflight, which this server does not grant), the size enforced while reading, a
  deadline for the body, and the JSON value budget before parsing.
* uvicorn: a deadline for each request's headers (slowloris), keep-alive, and a connection cap.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from jsonrpc import JsonRefused, clip, parse_json_yielding
from shared import Settings

log = logging.getLogger("inference.http")
ANY_ADDRESS = ("0.0.0.0", "::", "")


# ---- Host ------------------------------------------------------------------------------------------------------------
def host_name(header: str) -> str:
    """The name in a Host header, without port, brackets or trailing dot, lower-cased."""
    value = header.strip().lower()
    if value.startswith("["):
        value = value[1:value.find("]")] if "]" in value else value[1:]
    elif value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def host_allowed(header: str | None, allowed: tuple[str, ...], bind_host: str = "") -> bool:
    """Whether a request with this Host header may be served.

    With an allow-list: ``*`` (any), exact names, ``*.example.com`` (subdomains). Without one: IP literals,
    ``localhost`` (and ``*.localhost``, which browsers resolve to loopback) and the configured bind name. A
    request without Host (HTTP/1.0, not a browser) cannot be a rebinding attack and passes when no list is set.
    """
    if header is None:
        return not allowed or "*" in allowed
    name = host_name(header)
    if allowed:
        return any(p == "*" or name == p.lower() or (p.startswith("*.") and name.endswith(p[1:].lower()))
                   for p in allowed)
    bind = host_name(bind_host)
    return (_is_ip(name) or name == "localhost" or name.endswith(".localhost")
            or (bind not in ANY_ADDRESS and name == bind))


class HostGuard:
    """ASGI middleware: refuses (400) HTTP requests and WebSocket handshakes whose Host is not allowed."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...], bind_host: str) -> None:
        self.app, self.allowed, self.bind_host = app, allowed, bind_host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            host = Headers(scope=scope).get("host")
            if not host_allowed(host, self.allowed, self.bind_host):
                log.warning("refused Host %s (set INFERENCE_ALLOWED_HOSTS to serve it)", clip(repr(host), 100))
                response = JSONResponse({"error": {"type": "invalid_host", "message": "Invalid host header"}}, 400)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---- JSON bodies -----------------------------------------------------------------------------------------------------
class BodyError(Exception):
    """A request body refused: the HTTP status, an error type, a message."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def _is_json_type(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, read chunk by chunk: refused (413) as soon as it passes ``limit`` bytes (or says it will, in
    Content-Length), and (408) when it takes longer than ``timeout_s``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise BodyError(400, "invalid_request", "invalid Content-Length")
        if int(declared) > limit:
            raise BodyError(413, "too_large", f"the body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BodyError(413, "too_large", f"the body is larger than {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise BodyError(408, "timeout", f"the body did not arrive within {timeout_s:g} s") from None
    return b"".join(chunks)


async def read_json_body(request: Request, settings: Settings) -> Any:
    """The JSON body ({} when empty). A body must come as ``Content-Type: application/json``; raises BodyError."""
    content_type = request.headers.get("content-type")
    if content_type is not None and not _is_json_type(content_type):
        raise BodyError(415, "unsupported_media_type", "Content-Type must be application/json")
    raw = await read_body(request, settings.ws_max_message_bytes, settings.http_body_timeout_s)
    if not raw.strip():
        return {}
    if content_type is None:
        raise BodyError(415, "unsupported_media_type", "Content-Type must be application/json")
    try:
        payload = await parse_json_yielding(raw, settings.max_json_values)
    except JsonRefused as exc:
        raise BodyError(413 if exc.code == -32600 else 400, "invalid_json", exc.message) from None
    except (ValueError, RecursionError):
        raise BodyError(400, "invalid_json", "the request body is not valid JSON") from None
    return {} if payload is None else payload


# ---- uvicorn -----------------------------------------------------------------------------------------------------------
def header_deadline_protocol(timeout_s: float) -> Any:
    """uvicorn's httptools protocol with a deadline for each request's headers.

    uvicorn has no such timeout: its keep-alive timer is reset by every byte received, so a client that sends
    a header line now and then (slowloris) holds a connection, and a slot of ``limit_concurrency``, forever.
    """
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # without httptools (uvicorn[standard] has it): uvicorn's own protocol, no deadline
        log.warning("httptools is not installed: no deadline for request headers")
        return "auto"

    class HeaderDeadlineProtocol(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's headers

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _headers_too_slow(self) -> None:
            self._deadline = None
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a request is being served (its headers came in time)
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadlineProtocol


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """What ``uvicorn.Config`` needs besides app, host and port."""
    # Small JSON frames (one per token) gain nothing from permessage-deflate, and compressing each one was the
    # largest cost on the event loop when streaming (measured with py-spy): servers run with it off.
    return {"http": header_deadline_protocol(settings.http_header_timeout_s), "ws_per_message_deflate": False,
            "ws_max_size": settings.ws_max_message_bytes, "timeout_keep_alive": settings.http_keep_alive_s,
            "limit_concurrency": settings.max_connections}
