"""Helpers for end-to-end tests: the real app under uvicorn on a free port, and a JSON-RPC WebSocket client."""
from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import httpx
import uvicorn
from websockets.asyncio.client import ClientConnection, connect

from http_guard import uvicorn_options
from server_starlette import create_app, make_server_class
from shared import LoadedModel, Settings, load_model


@contextlib.contextmanager
def running_server(settings: Settings, loader: Callable[[Settings], LoadedModel] = load_model) -> Iterator[Any]:
    """Serve ``create_app(settings, loader=loader)`` on 127.0.0.1:<free port>; yields the app (``app.base``)."""
    app = create_app(settings, loader=loader)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="on",
                            **uvicorn_options(settings))
    server = make_server_class()(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    app.base = f"127.0.0.1:{port}"
    app.server = server
    try:
        yield app
    finally:
        server.should_exit = True
        thread.join(30)


def create_session(app: Any, tools: list[dict] | None = None) -> str:
    body = {"tools": tools} if tools is not None else None
    r = httpx.post(f"http://{app.base}/create_session", json=body, timeout=10)
    r.raise_for_status()
    return r.json()["session_id"]


class WsClient:
    """A JSON-RPC client over one WebSocket; keeps every notification it receives, in order."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.notifications: list[dict[str, Any]] = []
        self.responses: dict[Any, dict[str, Any]] = {}
        self._next_id = 0

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, app: Any, session_id: str):
        async with connect(f"ws://{app.base}/ws/{session_id}", max_size=None) as ws:
            yield cls(ws)

    async def send(self, payload: Any) -> None:
        await self.ws.send(payload if isinstance(payload, (str, bytes)) else json.dumps(payload))

    async def recv(self, timeout: float = 20) -> Any:
        message = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        if isinstance(message, dict) and "method" in message:
            self.notifications.append(message)
        elif isinstance(message, dict):
            self.responses[message.get("id")] = message
        return message

    async def call(self, method: str, params: dict | None = None, timeout: float = 20) -> dict[str, Any]:
        """Send a request and return its response (notifications that arrive meanwhile are kept)."""
        self._next_id += 1
        rid = self._next_id
        payload: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": rid}
        if params is not None:
            payload["params"] = params
        await self.send(payload)
        while rid not in self.responses:
            await self.recv(timeout)
        return self.responses.pop(rid)

    async def until(self, method: str, timeout: float = 20, **match: Any) -> dict[str, Any]:
        """Wait for the next notification ``method`` (whose params contain ``match``) not yet consumed."""
        while True:
            for note in self.notifications:
                if note["method"] == method and not note.get("_seen") and all(
                        note["params"].get(k) == v for k, v in match.items()):
                    note["_seen"] = True
                    return note
            await self.recv(timeout)

    def of_task(self, task_id: str, method: str | None = None) -> list[dict[str, Any]]:
        return [n for n in self.notifications if n["params"].get("task_id") == task_id
                and (method is None or n["method"] == method)]

    def chunks(self, task_id: str) -> str:
        return "".join(n["params"]["chunk"] for n in self.of_task(task_id, "text_chunk"))


def scripted_loader(respond: Callable[[str], str], step_delay: float = 0.0, holder: dict | None = None):
    """A loader that loads the real (tiny) model directory, then swaps in the scripted model double."""
    from scripted_model import ScriptedModel

    def load(settings: Settings) -> LoadedModel:
        loaded = load_model(settings)
        model = ScriptedModel(loaded.tokenizer, respond, step_delay)
        if holder is not None:
            holder["model"] = model
        return replace(loaded, paged_model=model)

    return load
