"""Security, limits, backpressure, observability and failure handling, over real sockets."""
from __future__ import annotations

import asyncio
import base64
import os
import re
import socket
import time
from dataclasses import replace

import httpx
import pytest
import torch
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from auth import ApiKeys, RateLimiter, TicketBook, key_id, origin_allowed
from shared import Settings
from support import WsClient, create_session, running_server, scripted_loader

KEY_A, KEY_B = "key-a-" + "x" * 30, "key-b-" + "y" * 30


def respond(prompt: str) -> str:
    last = prompt.rsplit("<|im_start|>user\n", 1)[-1].split("<|im_end|>")[0]
    if "long story" in last:
        return "once upon a time " * 300
    if "huge story" in last:
        return "and then " * 1500
    return "short answer."


@pytest.fixture(scope="module")
def base_settings(tiny_model_dir, tmp_path_factory) -> Settings:
    return Settings(model_id=str(tiny_model_dir), log_file=str(tmp_path_factory.mktemp("log") / "server.log"),
                    kv_block_size=16, max_context=4096, max_batch=8, prefill_chunk=256)


@pytest.fixture(scope="module")
def keyed(base_settings, tmp_path_factory):
    """A server with two API keys (from a keys file)."""
    keys_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys_file.write_text(f"# comment\n{KEY_A}  alice\n\n{KEY_B}\n")
    settings = replace(base_settings, api_keys_file=str(keys_file), ticket_ttl_s=2.0)
    holder: dict = {}
    with running_server(settings, scripted_loader(respond, step_delay=0.002, holder=holder)) as app:
        app.model = holder["model"]
        yield app


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def post(app, path: str, key: str | None = None, headers: dict | None = None, **kw) -> httpx.Response:
    return httpx.post(f"http://{app.base}{path}", headers={**(auth(key) if key else {}), **(headers or {})},
                      timeout=10, **kw)


def new_session(app, key: str, tools: list | None = None) -> str:
    r = post(app, "/create_session", key, json={"tools": tools or []})
    assert r.status_code == 200, r.text
    return r.json()["session_id"]


async def handshake_status(url: str, **kw) -> int:
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, **kw):
            pass
    return info.value.response.status_code


# ---- pure pieces -----------------------------------------------------------------------------------------------------
def test_api_keys_check():
    keys = ApiKeys([KEY_A, KEY_B])
    assert keys.check(KEY_A) == key_id(KEY_A) and keys.check(KEY_B) == key_id(KEY_B)
    for wrong in (None, "", KEY_A[:-1], KEY_A + "x", KEY_B.upper()):
        assert keys.check(wrong) is None
    assert keys.from_header(f"Bearer {KEY_A}") == key_id(KEY_A)
    assert keys.from_header(f"Basic {KEY_A}") is None and keys.from_header(None) is None
    assert ApiKeys([]).from_header(None) == "anonymous"
    assert KEY_A not in key_id(KEY_A)


def test_tickets_are_single_use_short_lived_and_bound():
    book = TicketBook(ttl_s=0.2)
    t = book.issue("owner", "s1")
    assert book.redeem(t, "s2") is None  # bound to s1 (and now used up)
    t = book.issue("owner", "s1")
    assert book.redeem(t, "s1") == "owner" and book.redeem(t, "s1") is None
    t = book.issue("owner", None)
    time.sleep(0.25)
    assert book.redeem(t, "s1") is None


@pytest.mark.parametrize("origin, host, allowed, ok", [
    (None, "h:1", (), True),
    ("http://h:1", "h:1", (), True),
    ("http://evil.example", "h:1", (), False),
    ("http://h:1.evil.example", "h:1", (), False),
    ("https://app.example", "h:1", ("https://app.example",), True),
    ("http://h:1", "h:1", ("https://app.example",), False),
    ("http://anything", "h:1", ("*",), True),
])
def test_origin_allowed(origin, host, allowed, ok):
    assert origin_allowed(origin, host, allowed) is ok


def test_rate_limiter_token_bucket():
    limiter = RateLimiter(per_minute=3)
    assert [limiter.acquire("a") for _ in range(3)] == [0, 0, 0]
    wait = limiter.acquire("a")
    assert 0 < wait <= 20.0 and limiter.acquire("b") == 0
    assert RateLimiter(0).acquire("a") == 0


# ---- authentication on every route and the handshake -----------------------------------------------------------------
def test_http_routes_require_a_valid_key(keyed):
    assert post(keyed, "/create_session").status_code == 401
    assert post(keyed, "/create_session", "wrong").status_code == 401
    assert post(keyed, "/create_session", KEY_A).status_code == 200
    assert post(keyed, "/auth/ticket").status_code == 401
    assert httpx.get(f"http://{keyed.base}/metrics").status_code == 401
    assert httpx.get(f"http://{keyed.base}/metrics", headers=auth(KEY_B)).status_code == 200
    assert httpx.get(f"http://{keyed.base}/health").status_code == 200  # liveness needs no key
    assert httpx.get(f"http://{keyed.base}/ready").json()["status"] == "ready"
    r = post(keyed, "/create_session", headers={"Authorization": "Bearer"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_websocket_handshake_needs_the_owning_key(keyed):
    sid = new_session(keyed, KEY_A)
    url = f"ws://{keyed.base}/ws/{sid}"

    async def go():
        assert await handshake_status(url) == 401
        assert await handshake_status(url, additional_headers=auth("nope")) == 401
        assert await handshake_status(url, additional_headers=auth(KEY_B)) == 403  # not B's session
        async with connect(url, additional_headers=auth(KEY_A)) as ws:
            await ws.send('{"jsonrpc": "2.0", "method": "cancel", "id": 1}')
            assert '"code": -32002' in await ws.recv()
    run(go())


def test_ticket_flow_for_browsers(keyed):
    sid = new_session(keyed, KEY_A)

    async def go():
        ticket = post(keyed, "/auth/ticket", KEY_A, json={"session_id": sid}).json()
        assert ticket["expires_in_s"] == 2.0
        url = f"ws://{keyed.base}/ws/{sid}?ticket={ticket['ticket']}"
        async with connect(url) as ws:
            await ws.send('{"jsonrpc": "2.0", "method": "cancel", "id": 1}')
            assert '"code": -32002' in await ws.recv()
        assert await handshake_status(url) == 401  # single use
        assert post(keyed, "/auth/ticket", KEY_B, json={"session_id": sid}).status_code == 403
        other = post(keyed, "/auth/ticket", KEY_B, json={}).json()["ticket"]  # B's ticket cannot open A's session
        assert await handshake_status(f"ws://{keyed.base}/ws/{sid}?ticket={other}") == 403
        late = post(keyed, "/auth/ticket", KEY_A, json={"session_id": sid}).json()["ticket"]
        await asyncio.sleep(2.1)
        assert await handshake_status(f"ws://{keyed.base}/ws/{sid}?ticket={late}") == 401  # expired
    run(go())


def test_keys_never_reach_the_log(keyed, base_settings):
    new_session(keyed, KEY_A)
    post(keyed, "/create_session", "a-wrong-key-that-should-not-be-logged")
    text = open(base_settings.log_file, encoding="utf-8").read()
    assert KEY_A not in text and KEY_B not in text and "a-wrong-key" not in text


def test_session_ids_are_unguessable(keyed):
    ids = {new_session(keyed, KEY_A) for _ in range(20)}
    assert len(ids) == 20
    for sid in ids:  # uuid4: 122 random bits
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", sid)


def test_warning_without_keys_beyond_loopback(base_settings, caplog):
    from server_starlette import build_runtime
    from shared import load_model

    loaded = load_model(base_settings)
    with caplog.at_level("WARNING", logger="inference.server"):
        build_runtime(replace(base_settings, host="0.0.0.0"), loaded)
        build_runtime(replace(base_settings, host="127.0.0.1"), loaded)
        build_runtime(replace(base_settings, host="0.0.0.0", api_key="k" * 20), loaded)
    warnings = [r for r in caplog.records if "no API key" in r.getMessage()]
    assert len(warnings) == 1


# ---- Origin and Host -------------------------------------------------------------------------------------------------
def test_foreign_origin_is_refused_before_accept(keyed):
    sid = new_session(keyed, KEY_A)
    url = f"ws://{keyed.base}/ws/{sid}"

    async def go():
        assert await handshake_status(url, origin="http://evil.example", additional_headers=auth(KEY_A)) == 403
        async with connect(url, origin=f"http://{keyed.base}", additional_headers=auth(KEY_A)):
            pass  # same-origin (the playground) is fine
    run(go())


def test_origin_and_host_allow_lists(base_settings):
    settings = replace(base_settings, allowed_origins=("https://app.example",), allowed_hosts=("127.0.0.1",))
    with running_server(settings, scripted_loader(respond)) as app:
        sid = create_session(app)
        url = f"ws://{app.base}/ws/{sid}"

        async def go():
            assert await handshake_status(url, origin=f"http://{app.base}") == 403  # not on the list
            async with connect(url, origin="https://app.example"):
                pass
        run(go())
        r = httpx.post(f"http://{app.base}/create_session", headers={"Host": "evil.example"})
        assert r.status_code == 400


# ---- limits and backpressure -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def limited(base_settings):
    settings = replace(base_settings, max_tools=2, max_tool_schema_bytes=300, max_message_chars=2000,
                       max_history_messages=3, max_prompt_tokens=1200, max_sessions_per_key=1000,
                       ws_max_message_bytes=64 * 1024, max_queue=2, max_batch=1, session_idle_timeout_s=1.0)
    holder: dict = {}
    with running_server(settings, scripted_loader(respond, step_delay=0.01, holder=holder)) as app:
        app.model = holder["model"]
        yield app


def test_tool_limits_at_create_session(limited):
    tool = {"name": "t", "parameters": {"type": "object", "properties": {}}}
    many = [{**tool, "name": f"t{i}"} for i in range(3)]
    big = {**tool, "description": "x" * 400}
    for tools in (many, [big]):
        r = httpx.post(f"http://{limited.base}/create_session", json={"tools": tools})
        assert r.status_code == 422 and "limits" in r.json()["error"]["message"]
    r = httpx.post(f"http://{limited.base}/create_session", content=b"[" + b" " * 70_000 + b"]")
    assert r.status_code == 413


@pytest.mark.parametrize("params, code", [
    ({"message": "x" * 2001}, -32602),
    ({"history": [{"role": "user", "content": "a"}] * 4}, -32602),
    ({"history": [{"role": "user", "content": "a" * 2001}]}, -32602),
    ({"message": "hi", "tools": [{"name": f"t{i}"} for i in range(3)]}, -32602),
    ({"message": "1 " * 999}, -32004),  # within the characters limit, over max_prompt_tokens
])
def test_generate_limits(limited, params, code):
    sid = create_session(limited)

    async def go():
        async with WsClient.connect(limited, sid) as client:
            response = await client.call("generate", params)
            assert response["error"]["code"] == code, response
    run(go())


def test_oversize_frame_closes_the_socket_with_1009(limited):
    sid = create_session(limited)

    async def go():
        async with connect(f"ws://{limited.base}/ws/{sid}", max_size=None) as ws:
            await ws.send("x" * (64 * 1024 + 1))
            with pytest.raises(ConnectionClosed) as info:
                await ws.recv()
            assert info.value.rcvd.code == 1009
    run(go())


def test_full_queue_answers_overloaded_at_once(limited):
    sids = [create_session(limited) for _ in range(5)]

    async def go():
        clients, stack = [], []
        for sid in sids:
            cm = WsClient.connect(limited, sid)
            stack.append(cm)
            clients.append(await cm.__aenter__())
        try:
            codes = []
            for client in clients:  # 1 running + 2 queued fit; the rest are refused at once
                started = time.monotonic()
                response = await client.call("generate", {"message": "tell me a long story", "max_new_tokens": 500})
                assert time.monotonic() - started < 2
                codes.append(response.get("error", {}).get("code"))
            assert codes.count(None) == 3 and codes.count(-32006) == 2, codes
            for client in clients:
                await client.call("cancel")
        finally:
            for cm in stack:
                await cm.__aexit__(None, None, None)
    run(go())
    engine = limited.state.runtime.engine.engine
    deadline = time.monotonic() + 10
    while engine.stats()["running"] or engine.stats()["queued"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_rate_limits(base_settings):
    with running_server(replace(base_settings, rate_limit_per_min=3), scripted_loader(respond)) as app:
        statuses = [httpx.post(f"http://{app.base}/create_session").status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        r = httpx.post(f"http://{app.base}/create_session")
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["details"]["retry_after_s"] > 0
        sid = app.state.runtime.sessions.create([], "anonymous").session_id

        async def go():
            async with WsClient.connect(app, sid) as client:
                response = await client.call("generate", {"message": "hi"})
                assert response["error"]["code"] == -32009 and response["error"]["data"]["retry_after_s"] > 0
        run(go())


def test_sessions_per_key(base_settings):
    with running_server(replace(base_settings, api_key=KEY_A, max_sessions_per_key=2), scripted_loader(respond)) as app:
        assert [post(app, "/create_session", KEY_A).status_code for _ in range(3)] == [200, 200, 429]


def test_idle_session_expires_and_releases_its_cache(limited):
    sid = create_session(limited)

    async def go():
        async with WsClient.connect(limited, sid) as client:
            task = (await client.call("generate", {"message": "hi", "max_new_tokens": 5}))["result"]["task_id"]
            await client.until("end", task_id=task)
    run(go())
    engine = limited.state.runtime.engine.engine
    assert sid in engine.blocks.tails  # warm while the session lives
    rt = limited.state.runtime
    time.sleep(1.1)
    rt.sessions.expire_idle()
    assert rt.sessions.get(sid) is None
    deadline = time.monotonic() + 5
    while sid in engine.blocks.tails:
        assert time.monotonic() < deadline
        time.sleep(0.01)

    async def gone():
        assert await handshake_status(f"ws://{limited.base}/ws/{sid}") == 404
    run(gone())


def _raw_websocket(host: str, port: int, path: str) -> socket.socket:
    """A WebSocket client on a socket with a tiny receive buffer, that will never read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.connect((host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert b" 101 " in response.split(b"\r\n")[0], response
    return sock


def _masked_text_frame(text: str) -> bytes:
    payload, mask = text.encode(), os.urandom(4)
    header = bytes([0x81]) + (bytes([0x80 | len(payload)]) if len(payload) < 126
                              else bytes([0x80 | 126]) + len(payload).to_bytes(2, "big"))
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_stalled_reader_is_dropped_and_its_task_cancelled(base_settings):
    settings = replace(base_settings, ws_send_queue=16, max_new_tokens_cap=8192)
    with running_server(settings, scripted_loader(respond)) as app:
        sid = create_session(app)
        session = app.state.runtime.sessions.get(sid)
        host, port = app.base.split(":")
        sock = _raw_websocket(host, int(port), f"/ws/{sid}")
        # a slow link: the server's socket buffer is small, so the stalled client is felt after a few KB
        for protocol in list(app.server.server_state.connections):
            protocol.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        try:
            sock.sendall(_masked_text_frame('{"jsonrpc": "2.0", "method": "generate", "id": 1, "params": '
                                            '{"message": "a huge story", "max_new_tokens": 3000}}'))
            deadline = time.monotonic() + 30
            while session.emitter is not None or session.active_task is not None:
                assert time.monotonic() < deadline, "the stalled client was not dropped"
                time.sleep(0.05)
            engine = app.state.runtime.engine.engine
            while engine.stats()["running"]:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert len(app.state.runtime.connections) == 0
            other = create_session(app)  # the server goes on serving others

            async def go():
                async with WsClient.connect(app, other) as client:
                    task = (await client.call("generate", {"message": "hi"}))["result"]["task_id"]
                    await client.until("end", task_id=task)
            run(go())
        finally:
            sock.close()


# ---- observability ---------------------------------------------------------------------------------------------------
def test_ready_and_metrics(keyed):
    sid = new_session(keyed, KEY_A)

    async def talk():
        async with connect(f"ws://{keyed.base}/ws/{sid}", additional_headers=auth(KEY_A)) as ws:
            client = WsClient(ws)
            task = (await client.call("generate", {"message": "hi", "max_new_tokens": 8}))["result"]["task_id"]
            await client.until("end", task_id=task)
            await client.send("not json")
            await client.recv()
    run(talk())
    text = httpx.get(f"http://{keyed.base}/metrics", headers=auth(KEY_A)).text
    for name in ("inference_requests_total", "inference_active_sessions", "inference_queue_depth",
                 "inference_decode_batch_size", "inference_time_to_first_token_seconds",
                 "inference_inter_token_seconds", "inference_prompt_tokens_total", "inference_generated_tokens_total",
                 "inference_kv_cache_usage_ratio", "inference_active_tasks"):
        assert name in text, name
    assert re.search(r'inference_requests_total\{method="generate",outcome="ok"\} [1-9]', text)
    assert re.search(r'inference_requests_total\{method="-",outcome="-32700"\} [1-9]', text)
    assert re.search(r"inference_generated_tokens_total [1-9]", text)


# ---- failures --------------------------------------------------------------------------------------------------------
def test_injected_out_of_memory_fails_only_that_step(keyed):
    sid = new_session(keyed, KEY_A)
    model = keyed.model
    original = model.forward

    def oom_once(*args, **kwargs):
        model.forward = original
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")

    async def go():
        async with connect(f"ws://{keyed.base}/ws/{sid}", additional_headers=auth(KEY_A)) as ws:
            client = WsClient(ws)
            model.forward = oom_once
            task = (await client.call("generate", {"message": "hi"}))["result"]["task_id"]
            error = await client.until("error", task_id=task)
            assert error["params"]["error"]["code"] == -32000 and "out of memory" in error["params"]["error"]["message"]
            assert (await client.until("end", task_id=task))["params"]["finish_reason"] == "error"
            task = (await client.call("generate", {"message": "hi"}))["result"]["task_id"]
            assert (await client.until("end", task_id=task))["params"]["finish_reason"] == "stop"
    try:
        run(go())
    finally:
        model.forward = original


class EngineKilled(BaseException):
    """Not an Exception: escapes the per-step handler and takes the engine thread down."""


def test_engine_death_fails_every_task_at_once_and_ready_turns_503(base_settings):
    holder: dict = {}
    with running_server(base_settings, scripted_loader(respond, step_delay=0.005, holder=holder)) as app:
        model = holder["model"]
        sids = [create_session(app) for _ in range(3)]
        assert httpx.get(f"http://{app.base}/ready").status_code == 200

        async def go():
            clients = []
            for sid in sids:
                cm = WsClient.connect(app, sid)
                clients.append((cm, await cm.__aenter__()))
            tasks = []
            for _, client in clients:
                tasks.append((await client.call("generate", {"message": "tell me a long story",
                                                            "max_new_tokens": 800}))["result"]["task_id"])
            await clients[0][1].until("text_chunk", task_id=tasks[0])
            original = model.forward

            def die(*a, **k):
                model.forward = original
                raise EngineKilled()
            model.forward = die
            started = time.monotonic()
            for (_, client), task in zip(clients, tasks):
                error = await client.until("error", task_id=task, timeout=5)
                assert error["params"]["error"]["code"] == -32000
                assert (await client.until("end", task_id=task))["params"]["finish_reason"] == "error"
            assert time.monotonic() - started < 5
            refused = await clients[0][1].call("generate", {"message": "again"})
            assert refused["error"]["code"] == -32008
            for cm, _ in clients:
                await cm.__aexit__(None, None, None)
        run(go())
        r = httpx.get(f"http://{app.base}/ready")
        assert r.status_code == 503 and "engine failure" in r.json()["reason"]
