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


# ---- event-loop responsiveness ------------------------------------------------------------------------------------
_PROBE = r'''
import json, select, socket, sys, time
host, port, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
request = f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
sock, latencies = None, []

def health():
    global sock
    if sock is None:
        sock = socket.create_connection((host, port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 200"), head

print("ready", flush=True)
while not select.select([sys.stdin], [], [], interval)[0]:
    started = time.perf_counter()
    try:
        health()
    except OSError:
        sock = None
        health()
    latencies.append(time.perf_counter() - started)
print(json.dumps({"count": len(latencies), "worst_ms": 1000 * max(latencies, default=0)}), flush=True)
'''


class HealthProbe:
    """Polls ``GET /health`` every ``interval`` s from another process (so it shares no GIL with the server)
    while the ``with`` block runs; ``worst_ms`` is the slowest answer: how long the event loop was blocked."""

    def __init__(self, app: Any, interval: float = 0.005) -> None:
        self.host, self.port = app.base.split(":")
        self.interval = interval
        self.count = 0
        self.worst_ms = 0.0

    def __enter__(self) -> HealthProbe:
        import subprocess
        import sys

        self.proc = subprocess.Popen([sys.executable, "-c", _PROBE, self.host, self.port, str(self.interval)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        time.sleep(0.1)  # a few samples before the attack
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.1)  # and a few after its answer
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        out, _ = self.proc.communicate(timeout=30)
        result = json.loads(out.strip().splitlines()[-1])
        self.count, self.worst_ms = result["count"], result["worst_ms"]


class RawWs:
    """A blocking WebSocket client on a plain socket whose frames are masked with a zero key, so that sending
    even a 14 MiB frame costs this process no CPU (and no GIL, which an in-process server shares): what a
    probe measures is the server's own work. Answers nothing but text frames; for short attack tests."""

    def __init__(self, app: Any, session_id: str, timeout: float = 60) -> None:
        import base64
        import os
        import socket

        host, port = app.base.split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET /ws/{session_id} HTTP/1.1\r\nHost: {app.base}\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert b" 101 " in head.split(b"\r\n")[0], head
        self.notifications: list[dict[str, Any]] = []

    @staticmethod
    def frame(payload: Any) -> bytes:
        """A masked text frame (build it before the attack: the JSON encoding is the client's cost)."""
        data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        n = len(data)
        size = bytes([0x80 | n]) if n < 126 else (bytes([0x80 | 126]) + n.to_bytes(2, "big") if n < 65536
                                                   else bytes([0x80 | 127]) + n.to_bytes(8, "big"))
        return bytes([0x81]) + size + b"\0\0\0\0" + data

    def send(self, frame: bytes) -> None:
        self.sock.sendall(frame)

    def _exact(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(min(n - len(data), 1 << 20))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return bytes(data)

    def recv(self) -> Any:
        """The next text message, parsed (notifications are also kept in ``notifications``)."""
        while True:
            first, second = self._exact(2)
            n = second & 0x7F
            if n == 126:
                n = int.from_bytes(self._exact(2), "big")
            elif n == 127:
                n = int.from_bytes(self._exact(8), "big")
            data = self._exact(n)
            if first & 0x0F == 0x8:
                raise ConnectionError(f"closed by the server: {data[2:]!r}")
            if first & 0x0F == 0x1:
                message = json.loads(data)
                if isinstance(message, dict) and "method" in message:
                    self.notifications.append(message)
                return message

    def response(self, request_id: Any) -> dict[str, Any]:
        """Read until the response to ``request_id``."""
        while True:
            message = self.recv()
            if isinstance(message, dict) and "method" not in message and message.get("id") == request_id:
                return message

    def until(self, method: str, **match: Any) -> dict[str, Any]:
        while True:
            message = self.recv()
            if isinstance(message, dict) and message.get("method") == method and all(
                    message["params"].get(k) == v for k, v in match.items()):
                return message

    def close(self) -> None:
        self.sock.close()
