"""The client of one server: ``create_session`` over HTTP, then a WebSocket per session."""
from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from .events import ApiError
from .session import Session
from .tools import Tool, ToolsArg, as_tools


class Client:
    """Talks to one server. ``url``: ``http(s)://host:port`` (or ``host:port``); ``api_key`` is sent as
    ``Authorization: Bearer`` on every HTTP request and WebSocket handshake. ``timeout``: seconds to wait for
    any one response. ``reconnect_s``: how long a session whose socket dropped keeps trying to resume (0: never)."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 60.0,
                 reconnect_s: float = 60.0) -> None:
        url = url if "://" in url else f"http://{url}"
        self.url = url.rstrip("/").replace("ws://", "http://", 1).replace("wss://", "https://", 1)
        self.ws_url = self.url.replace("http", "ws", 1)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.reconnect_s = reconnect_s
        self.sessions: list[Session] = []

    async def create_session(self, tools: ToolsArg = None) -> Session:
        """Create a session with ``tools`` (functions with handlers, Tools or dicts) and connect to it."""
        tool_list = as_tools(tools)
        body = await asyncio.to_thread(self._post, "/create_session", {"tools": [t.definition() for t in tool_list]})
        return await self._connect(body["session_id"], tool_list)

    async def model(self) -> dict[str, Any]:
        """The served model, as ``GET /v1/models`` describes it (``id``, ``device``, ``quantization``, ``note``)."""
        body = await asyncio.to_thread(self._request, "/v1/models")
        return (body.get("data") or [{}])[0] if isinstance(body, dict) else {}

    async def attach(self, session_id: str, tools: ToolsArg = None) -> Session:
        """Reconnect to an existing session (the server kept its conversation); ``tools`` register handlers."""
        return await self._connect(session_id, as_tools(tools))

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.sessions), return_exceptions=True)
        self.sessions.clear()

    async def __aenter__(self) -> Client:  # noqa: PYI034
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _post(self, path: str, payload: Any) -> Any:
        return self._request(path, payload)

    def _request(self, path: str, payload: Any = None) -> Any:
        """GET ``path`` (POST with a JSON body when ``payload`` is given); the parsed body, or ApiError."""
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, method="GET" if data is None else "POST",
                                         headers={"Content-Type": "application/json", **self.headers})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            raise ApiError.from_body(exc.code, str(exc.reason), exc.read().decode(errors="replace")) from None

    async def _open(self, session_id: str, resume_from: int | None = None) -> ClientConnection:
        query = "" if resume_from is None else f"?resume_from={resume_from}"
        return await connect(f"{self.ws_url}/ws/{session_id}{query}", additional_headers=self.headers,
                             max_size=None, compression=None, open_timeout=self.timeout)

    async def _connect(self, session_id: str, tools: list[Tool]) -> Session:
        try:
            ws = await self._open(session_id)
        except InvalidStatus as exc:
            response = exc.response
            raise ApiError.from_body(response.status_code, response.reason_phrase,
                                     (response.body or b"").decode(errors="replace")) from None
        session = Session(session_id, ws, tools, self.timeout,
                          lambda seq: self._open(session_id, seq), self.reconnect_s)
        self.sessions.append(session)
        return session
