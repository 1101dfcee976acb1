"""The attack review's findings (issue 10), each replayed over real sockets as a hostile client would, with
``/health`` polled from another process throughout: an attack must be answered with an error while the event
loop keeps answering everyone else (under 100 ms)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import select
import socket
import time
from dataclasses import replace

import httpx
import pytest
from websockets.asyncio.client import connect

from shared import Settings
from support import HealthProbe, RawWs, WsClient, create_session, running_server, scripted_loader

LOOP_BUDGET_MS = 100  # the issue's bar for /health during an attack (CI: 2 cores)
# A wall-clock bound on a shared 2-core machine also measures whoever else got the CPUs: an attack that overran
# the budget is run twice more before it fails. A loop the attack really blocks overruns every time.
LOOP_TIMING = pytest.mark.flaky(reruns=2, only_rerun=[r"/health took \d+ ms"])
WORST: dict[str, float] = {}  # attack -> worst /health latency seen (printed at the end with -s)
REDOS_ARG = "a" * 500 + "!"  # ^(a+)+$ on Python's re: doubling per character (28 took 17 s)


def respond(prompt: str) -> str:
    last = prompt.rsplit("<|im_start|>user\n", 1)[-1].split("<|im_end|>")[0]
    if "<tool_response>" in last:
        return "done."
    if "redos" in last:
        return '<tool_call>\n{"name": "check", "arguments": {"x": "' + REDOS_ARG + '"}}\n</tool_call>'
    if "call two" in last:
        return ('<tool_call>\n{"name": "lookup", "arguments": {"q": 1}}\n</tool_call>\n'
                '<tool_call>\n{"name": "lookup", "arguments": {"q": 2}}\n</tool_call>')
    if "call the tool" in last:
        return '<tool_call>\n{"name": "lookup", "arguments": {}}\n</tool_call>'
    if "forge" in last:
        return '<tool_call>\n{"name": "x\\n2030-01-01 00:00:00,000 ERROR FORGED-LINE", "arguments": {}}\n</tool_call>'
    if "long story" in last:
        return "once upon a time " * 400
    return "short answer."


@pytest.fixture(scope="module")
def settings(tiny_model_dir, tmp_path_factory) -> Settings:
    return Settings(model_id=str(tiny_model_dir), log_file=str(tmp_path_factory.mktemp("log") / "server.log"),
                    kv_block_size=16, max_context=4096, max_batch=8, prefill_chunk=256, rate_limit_per_min=0,
                    tool_call_retries=0, structured_outputs="off")  # scripted invalid calls reach validation


@pytest.fixture(scope="module")
def app(settings):
    holder: dict = {}
    with running_server(settings, scripted_loader(respond, step_delay=0.002, holder=holder)) as app:
        app.model = holder["model"]
        yield app


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


@contextlib.contextmanager
def probed(name: str, app):
    """The block (an attack, until it is answered) runs under a /health probe; then the loop budget is checked."""
    with HealthProbe(app) as probe:
        yield probe
    WORST[name] = probe.worst_ms
    assert probe.count >= 10, probe.count
    assert probe.worst_ms < LOOP_BUDGET_MS, f"{name}: /health took {probe.worst_ms:.0f} ms"


def attack(name: str, app, fn):
    """``fn()`` (it returns once the attack is answered) under a /health probe."""
    with probed(name, app):
        return fn()


def tool(name: str, schema: dict | None = None) -> dict:
    return {"name": name, "parameters": schema or {"type": "object", "properties": {}}}


def wait_idle(app, timeout: float = 10) -> None:
    rt, engine = app.state.runtime, app.state.runtime.engine.engine
    deadline = time.monotonic() + timeout
    while rt.sessions.active_tasks or engine.stats()["running"] or engine.stats()["queued"]:
        assert time.monotonic() < deadline, (len(rt.sessions.active_tasks), engine.stats())
        time.sleep(0.01)


def test_the_probe_sees_a_blocked_loop(app):
    """The probe itself is tested: a loop blocked for 300 ms shows as such."""
    with HealthProbe(app) as probe:
        app.server.loop.call_soon_threadsafe(time.sleep, 0.3)
        time.sleep(0.4)
    assert probe.worst_ms > 250


# ---- 1. a cancel before the task's first step -----------------------------------------------------------------------
GENERATE = {"jsonrpc": "2.0", "id": 101, "method": "generate",
            "params": {"message": "tell me a long story", "max_new_tokens": 8000, "ignore_eos": True}}
CANCEL = {"jsonrpc": "2.0", "id": 102, "method": "cancel"}


@pytest.mark.parametrize("batched", [True, False], ids=["batch", "back-to-back"])
def test_cancel_before_first_step_ends_the_task_exactly_once(app, batched):
    sid = create_session(app)

    async def go():
        async with WsClient.connect(app, sid) as client:
            if batched:
                await client.send([GENERATE, CANCEL])
                replies = await client.recv()
            else:
                await client.ws.send(json.dumps(GENERATE))
                await client.ws.send(json.dumps(CANCEL))
                replies = [await client.recv(), await client.recv()]
                client.responses.clear()
            task = replies[0]["result"]["task_id"]
            assert replies[1]["result"] == {"status": "cancelled", "task_id": task}
            end = await client.until("end", task_id=task)
            assert end["params"]["finish_reason"] == "cancelled"
            again = await client.call("generate", {"message": "hi"})  # the session is free
            await client.until("end", task_id=again["result"]["task_id"])
            await asyncio.sleep(0.2)
            assert len(client.of_task(task, "end")) == 1
    run(go())
    wait_idle(app, timeout=5)  # the engine request was aborted, not left generating 8000 tokens


# ---- 2. nothing blocks the event loop before a limit applies -----------------------------------------------------------
@pytest.mark.parametrize("count, status", [(40_000, 413), (8_000, 422)])
@LOOP_TIMING
def test_many_tools_at_create_session_are_refused_without_stalling(app, count, status):
    body = json.dumps({"tools": [tool(f"t{i}") for i in range(count)]}).encode()
    r = attack(f"create_session with {count} tools", app, lambda: httpx.post(
        f"http://{app.base}/create_session", content=body, headers={"Content-Type": "application/json"}, timeout=60))
    assert r.status_code == status, r.text


def rpc(method: str, params: dict, request_id: int = 1) -> dict:
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}


@LOOP_TIMING
def test_many_tools_in_generate_are_refused_without_stalling(app):
    ws = RawWs(app, create_session(app))
    frame = ws.frame(rpc("generate", {"message": "hi", "tools": [tool(f"t{i}") for i in range(15_000)]}))
    with probed("generate with 15,000 tools", app):
        ws.send(frame)
        reply = ws.response(1)
    assert reply["error"]["code"] == -32602 and "at most" in reply["error"]["data"][0]["msg"]
    ws.close()


@pytest.mark.parametrize("shape", ["12 x 1M characters", "2000 x 6K characters"])
@LOOP_TIMING
def test_huge_history_is_priced_before_tokenizing(app, shape):
    ws = RawWs(app, create_session(app))
    count, size = (12, 1_000_000) if shape.startswith("12") else (2000, 6_000)
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": "x" * size} for i in range(count)]
    frame = ws.frame(rpc("generate", {"history": history}))
    with probed(f"12 MiB history ({shape})", app):
        ws.send(frame)
        reply = ws.response(1)
    assert reply["error"]["code"] == -32004 and "known from its size" in reply["error"]["message"]
    ws.close()


@LOOP_TIMING
def test_a_prompt_tokenized_near_the_limit_does_not_stall_the_loop(app):
    """What the size check lets through (up to max_prompt_tokens x the longest token) is tokenized off the loop."""
    ws = RawWs(app, create_session(app))
    words = " ".join(f"w{i}" for i in range(30_000))[:120_000]  # 120K characters: over the token limit
    frame = ws.frame(rpc("generate", {"message": words}))
    with probed("tokenizing 120K characters", app):
        ws.send(frame)
        reply = ws.response(1)
    assert reply["error"]["code"] == -32004 and reply["error"]["data"]["prompt_tokens"] > 4095
    ws.close()


def awaiting_tools(ws: RawWs, tools: list[dict] | None = None, message: str = "call the tool") -> tuple[str, dict]:
    ws.send(ws.frame(rpc("generate", {"message": message, "tools": tools or [tool("lookup")]}, 50)))
    task = ws.response(50)["result"]["task_id"]
    return task, ws.until("function_call_request", task_id=task)["params"]["tool_calls"][0]


@pytest.mark.parametrize("shape", ["text", "object"])
@LOOP_TIMING
def test_huge_tool_result_is_refused_and_the_task_keeps_waiting(app, shape):
    ws = RawWs(app, create_session(app))
    task, call = awaiting_tools(ws)
    result = "r" * (14 << 20) if shape == "text" else {"rows": ["r" * 1000] * (14 << 10)}
    item = {"tool_name": "lookup", "call_id": call["call_id"]}
    frame = ws.frame(rpc("tool_result", {"task_id": task, "results": [{**item, "result": result}]}))
    with probed(f"14 MiB tool_result ({shape})", app):
        ws.send(frame)
        reply = ws.response(1)
    assert reply["error"]["code"] == -32602 and "100000" in reply["error"]["data"][0]["msg"]
    ws.send(ws.frame(rpc("tool_result", {"task_id": task, "results": [{**item, "result": "small"}]}, 2)))
    assert ws.response(2)["result"] == {"status": "received"}
    assert ws.until("end", task_id=task)["params"]["finish_reason"] == "stop"
    ws.close()


@LOOP_TIMING
def test_catastrophic_pattern_runs_in_linear_time(app):
    ws = RawWs(app, create_session(app))
    check = tool("check", {"type": "object", "properties": {"x": {"type": "string", "pattern": "^(a+)+$"}}})
    frame = ws.frame(rpc("generate", {"message": "redos", "tools": [check], "max_new_tokens": 4000}))
    with probed("pattern ^(a+)+$ on a 501-character argument", app):
        ws.send(frame)
        task = ws.response(1)["result"]["task_id"]
        call = ws.until("function_call_request", task_id=task)["params"]["tool_calls"][0]
    assert "does not match" in call["validation_error"] and "^(a+)+$" in call["validation_error"]
    ws.send(ws.frame(rpc("cancel", {}, 2)))
    ws.until("end", task_id=task)
    ws.close()


def test_the_re2_shim_is_in_effect():
    """jsonschema calls re.search itself: tool_schemas points its modules at RE2 (if a jsonschema upgrade moved
    the call, this fails rather than the server hanging on a pattern)."""
    import jsonschema._keywords

    from tool_schemas import argument_error

    assert jsonschema._keywords.re.__name__ == "_Re2Search"
    schema = {"type": "object", "properties": {"x": {"pattern": "^(a+)+$"}},
              "patternProperties": {"^(b+)+$": {}}, "additionalProperties": False}
    started = time.perf_counter()
    assert "does not match" in argument_error(schema, {"x": "a" * 40 + "!"})
    assert "does not match any of the regexes" in argument_error(schema, {"b" * 40 + "!": 1})
    assert argument_error(schema, {"x": "aaa", "bbb": 1}) is None
    assert time.perf_counter() - started < 0.5


def test_patterns_re2_cannot_run_are_refused_when_the_tool_is_defined(app):
    for pattern in ("(?=a)b", "(a)\\1"):
        r = httpx.post(f"http://{app.base}/create_session", json={"tools": [
            tool("t", {"type": "object", "properties": {"x": {"type": "string", "pattern": pattern}}})]})
        assert r.status_code == 422 and "RE2" in json.dumps(r.json())


def test_validation_work_is_bounded():
    from tool_schemas import argument_error

    # anyOf of two branches that both descend, then fail: 2^depth keyword evaluations without a budget
    node = {"anyOf": [{"type": "object", "properties": {"x": {"$ref": "#/$defs/n"}}, "required": ["q"]},
                      {"type": "object", "properties": {"x": {"$ref": "#/$defs/n"}}, "required": ["r"]}]}
    schema = {"type": "object", "$defs": {"n": node}, "properties": {"x": {"$ref": "#/$defs/n"}}}
    arguments: dict = {}
    cur = arguments
    for _ in range(40):
        cur["x"] = {}
        cur = cur["x"]
    started = time.perf_counter()
    assert argument_error(schema, arguments) == "the arguments are too complex to check against the schema"
    assert time.perf_counter() - started < 10
    deep: dict = {}
    cur = deep
    for _ in range(900):
        cur["a"] = {}
        cur = cur["a"]
    assert "nested too deeply" in argument_error({"type": "object", "additionalProperties": {"$ref": "#"}}, deep)


def test_schema_refs_never_leave_the_schema(app, tmp_path):
    """jsonschema fetches a ``$ref`` it cannot resolve locally with urlopen (http://, file://): a tool's schema made
    the server request internal URLs and read local files, quoting them in validation errors. Only references
    inside the schema resolve; any other is refused when the tool is defined, and never fetched."""
    import http.server
    import threading

    from tool_schemas import argument_error, check_schema

    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            body = b'{"type": "object", "properties": {"leak": {"enum": ["SECRET-HTTP"]}}}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    secret = tmp_path / "secret.json"
    secret.write_text('{"type": "object", "properties": {"leak": {"enum": ["SECRET-FILE"]}}}')
    try:
        for ref in (f"http://127.0.0.1:{httpd.server_address[1]}/internal.json", secret.as_uri()):
            top = {"type": "object", "$ref": ref}
            inner = {"type": "object", "properties": {"a": {"$ref": ref}}}
            for schema in (top, inner):
                with pytest.raises(ValueError, match=r"\$ref"):
                    check_schema(schema)
                problem = argument_error(schema, {"leak": "x", "a": {"leak": "x"}}) or ""
                assert "SECRET" not in problem and "$ref" in problem
            r = httpx.post(f"http://{app.base}/create_session", json={"tools": [tool("t", top)]})
            assert r.status_code == 422 and "$ref" in json.dumps(r.json()), r.text
        local = {"type": "object", "$defs": {"n": {"type": "integer"}}, "properties": {"a": {"$ref": "#/$defs/n"}}}
        check_schema(local)
        assert "is not of type 'integer'" in argument_error(local, {"a": "x"})
        assert hits == []
    finally:
        httpd.shutdown()


# ---- 3. JSON-RPC batches ------------------------------------------------------------------------------------------------
def test_batches_are_limited_and_their_replies_bounded(app):
    ws = RawWs(app, create_session(app))
    ws.send(ws.frame("[" + ",".join(["1"] * (1 << 19)) + "]"))  # 1 MiB of [1,1,...]: 54 MiB of replies before
    reply = ws.recv()
    assert reply["id"] is None and reply["error"]["code"] == -32600 and "JSON values" in reply["error"]["message"]
    ws.send(ws.frame([{"jsonrpc": "2.0", "id": i, "method": "cancel"} for i in range(33)]))
    reply = ws.recv()  # refused whole: one error, no entry run
    assert isinstance(reply, dict) and reply["error"]["code"] == -32600 and reply["error"]["data"]["max_batch"] == 32
    ws.send(ws.frame([{"jsonrpc": "2.0", "id": i, "method": "m" * 100_000} for i in range(32)]))
    reply = ws.recv()
    assert [r["error"]["code"] for r in reply] == [-32601] * 32
    assert len(json.dumps(reply)) < 32 * 600  # every echo of the 100 KB method name is clipped
    ws.send(ws.frame([{"jsonrpc": "2.0", "id": 1, "method": "cancel"}] * 32))
    assert [r["error"]["code"] for r in ws.recv()] == [-32002] * 32  # a full batch is still served
    ws.close()


# ---- 4. tool results ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(settings):
    limited = replace(settings, max_tool_result_chars=1000, max_tool_round_chars=1500, rate_limit_per_min=3,
                      max_sessions_per_key=2, http_header_timeout_s=0.5, max_connections=6)
    with running_server(limited, scripted_loader(respond)) as app:
        yield app


def test_tool_results_are_limited_per_result_and_per_round(small):
    ws = RawWs(small, small.state.runtime.sessions.create([], "anonymous").session_id)
    ws.send(ws.frame(rpc("generate", {"message": "call two", "tools": [tool("lookup")]}, 50)))
    task = ws.response(50)["result"]["task_id"]
    first, second = ws.until("function_call_request", task_id=task)["params"]["tool_calls"]

    def result(call, text, request_id):
        ws.send(ws.frame(rpc("tool_result", {"task_id": task, "results": [
            {"tool_name": "lookup", "call_id": call["call_id"], "result": text}]}, request_id)))
        return ws.response(request_id)
    assert "at most 1000 per result" in result(first, {"rows": ["x" * 600, "y" * 600]}, 1)["error"]["data"][0]["msg"]
    assert result(first, "x" * 900, 2)["result"] == {"status": "received"}
    assert "at most 1500 per round" in result(second, "y" * 900, 3)["error"]["data"][0]["msg"]
    assert result(second, "y" * 500, 4)["result"] == {"status": "received"}  # the task was still waiting
    assert ws.until("end", task_id=task)["params"]["finish_reason"] == "stop"
    ws.close()


# ---- 5. DNS rebinding, cross-site POSTs -----------------------------------------------------------------------------------
def test_rebinding_host_is_refused_without_an_allow_list(app):
    port = app.base.split(":")[1]
    sid = create_session(app)

    def handshake(host: str, origin: str) -> bytes:  # the browser's, after its name was re-pointed here
        with socket.create_connection(("127.0.0.1", int(port)), timeout=10) as sock:
            sock.sendall(f"GET /ws/{sid} HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\nUpgrade: websocket\r\n"
                         "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                         "Sec-WebSocket-Version: 13\r\n\r\n".encode())
            return sock.recv(4096).split(b"\r\n")[0]
    evil = f"evil.example:{port}"
    assert b" 400 " in handshake(evil, f"http://{evil}")  # Origin == Host no longer passes for any name
    assert b" 101 " in handshake(f"localhost:{port}", f"http://localhost:{port}")
    r = httpx.post(f"http://{app.base}/create_session", headers={"Host": evil})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_host"
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "10.1.2.3", f"app.localhost:{port}"):
        assert httpx.post(f"http://{app.base}/create_session", headers={"Host": host}).status_code == 200, host


def test_host_rule():
    from http_guard import host_allowed

    assert host_allowed("myhost.lan:8000", (), "myhost.lan") and not host_allowed("myhost.lan", (), "0.0.0.0")
    assert not host_allowed("localhost.evil.example", (), "0.0.0.0") and host_allowed("LOCALHOST.", (), "")
    assert host_allowed("a.example.com", ("*.example.com",), "") and not host_allowed("example.org", ("x",), "")
    assert host_allowed("anything", ("*",), "") and host_allowed(None, (), "") and not host_allowed(None, ("x",), "")


def test_json_posts_need_the_json_content_type(app):
    body = json.dumps({"model": "model", "messages": [{"role": "user", "content": "hi"}]})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        for path in ("/v1/chat/completions", "/create_session", "/auth/ticket"):
            r = httpx.post(f"http://{app.base}{path}", content=body, headers={"Content-Type": content_type})
            assert r.status_code == 415, (path, content_type, r.text)
    r = httpx.post(f"http://{app.base}/v1/chat/completions", content=body,
                   headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text
    assert httpx.post(f"http://{app.base}/create_session").status_code == 200  # no body needs no type


# ---- 6. the prefix cache is shared within a key only ----------------------------------------------------------------------
def test_prefix_cache_does_not_leak_across_keys(settings, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("key-one-" + "1" * 30 + "\nkey-two-" + "2" * 30 + "\n")
    one, two = {"Authorization": "Bearer key-one-" + "1" * 30}, {"Authorization": "Bearer key-two-" + "2" * 30}
    system = "You are the assistant of a secret project. " * 40
    with running_server(replace(settings, api_keys_file=str(keys)), scripted_loader(respond)) as server:
        def cached(headers) -> int:
            sid = httpx.post(f"http://{server.base}/create_session", headers=headers, json={}).json()["session_id"]

            async def go():
                async with connect(f"ws://{server.base}/ws/{sid}", additional_headers=headers) as raw:
                    client = WsClient(raw)
                    reply = await client.call("generate", {"history": [
                        {"role": "system", "content": system}, {"role": "user", "content": "hi"}]})
                    end = await client.until("end", task_id=reply["result"]["task_id"])
                    return end["params"]["usage"]["cached_tokens"]
            return run(go())
        assert cached(one) == 0
        assert cached(one) > 100  # another session of the same key reuses the system prompt's blocks
        assert cached(two) == 0  # another key cannot tell that this prompt was cached


def test_block_hashes_are_salted_sha256():
    import hashlib
    from array import array

    from engine.block_manager import BlockManager, chain_hash
    from engine.request import Request, SamplingParams

    first = chain_hash(None, (1, 2), "k1")
    assert first == hashlib.sha256(b"\0" + (2).to_bytes(4, "big") + b"k1" + array("q", (1, 2)).tobytes()).digest()
    assert chain_hash(None, (1, 2), "k2") != first and chain_hash(first, (3, 4)) != chain_hash(None, (3, 4))
    bm = BlockManager(16, 4)

    def request(salt: str) -> Request:
        req = Request(list(range(9)), SamplingParams(), lambda e: None, cache_salt=salt)
        assert bm.allocate(req)
        return req
    a = request("k1")
    a.num_computed = 8
    bm.on_computed(a)
    bm.free(a, keep_tail=False)
    assert request("k2").num_computed == 0 and request("k1").num_computed == 8


# ---- 7. echoes, the send queue --------------------------------------------------------------------------------------------
def test_error_echoes_are_clipped(app):
    ws = RawWs(app, create_session(app))
    ws.send(ws.frame({"jsonrpc": "2.0", "id": 1, "method": "m" * (15 << 20)}))
    reply = ws.recv()
    assert reply["error"]["code"] == -32601 and len(json.dumps(reply)) < 1000
    ws.send(ws.frame({"jsonrpc": "2.0", "id": "i" * 100_000, "method": "cancel"}))
    reply = ws.recv()
    assert reply["id"] is None and reply["error"]["code"] == -32600 and len(json.dumps(reply)) < 500
    ws.send(ws.frame(rpc("tool_result", {"task_id": "t" * 100_000, "results": [{"tool_name": "n" * 100_000}]})))
    reply = ws.recv()
    assert reply["error"]["code"] == -32003 and len(json.dumps(reply)) < 1000
    ws.send(ws.frame(rpc("generate", {"message": "hi", "tools": [{"name": "t", "z" * 100_000: 1}]})))
    reply = ws.recv()
    assert reply["error"]["code"] == -32602 and len(json.dumps(reply)) < 2000
    ws.close()


def test_send_queue_is_bounded_in_bytes():
    from session_socket import Connection

    class NeverSends:
        async def send_text(self, text):
            await asyncio.Event().wait()

    async def go():
        conn = Connection(NeverSends(), max_queue=10_000, max_bytes=100_000)
        for _ in range(20):
            conn.send({"chunk": "x" * 10_000})
            await asyncio.sleep(0)
        assert conn.stalled and conn.overflowed.is_set() and conn.queue.qsize() < 12
        conn.sender.cancel()
    asyncio.run(go())


# ---- 8. a non-streaming completion stops when its client goes away -----------------------------------------------------------
def test_non_streaming_completion_stops_on_disconnect(settings):
    with running_server(settings, scripted_loader(respond, step_delay=0.01)) as server:
        body = json.dumps({"model": "model", "max_tokens": 3000,
                           "messages": [{"role": "user", "content": "tell me a long story"}]}).encode()
        host, port = server.base.split(":")
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + server.base.encode() + b"\r\nContent-Type: "
                     b"application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        engine = server.state.runtime.engine.engine
        deadline = time.monotonic() + 10
        while not engine.stats()["running"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        sock.close()  # ~1,500 tokens (15 s) still to go
        started = time.monotonic()
        while engine.stats()["running"]:
            assert time.monotonic() - started < 2, "still generating for a client that left"
            time.sleep(0.01)


# ---- 9. the body limit applies while reading ------------------------------------------------------------------------------
def _post_head(app, extra: str) -> socket.socket:
    host, port = app.base.split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(f"POST /create_session HTTP/1.1\r\nHost: {app.base}\r\nContent-Type: application/json\r\n"
                 f"{extra}\r\n".encode())
    return sock


def test_oversized_bodies_are_refused_while_reading(app):
    sock = _post_head(app, f"Content-Length: {300 << 20}\r\n")  # nothing of the body is sent
    assert sock.recv(4096).startswith(b"HTTP/1.1 413")
    sock.close()
    sock = _post_head(app, "Transfer-Encoding: chunked\r\n")  # no length announced: counted as it comes
    chunk, sent = b"%x\r\n%s\r\n" % (65536, b" " * 65536), 0
    while sent < (64 << 20) and not select.select([sock], [], [], 0)[0]:
        try:
            sock.sendall(chunk)
        except OSError:  # the server stopped reading
            break
        sent += 65536
    answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413") and sent < (32 << 20), (answer[:40], sent)
    sock.close()


# ---- 10. tickets -------------------------------------------------------------------------------------------------------------
def test_ticket_issue_is_rate_limited(small):
    statuses = [httpx.post(f"http://{small.base}/auth/ticket", json={},
                           headers={"X-Forwarded-For": "10.9.9.9"}).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]


def test_ticket_book_costs_do_not_grow_with_live_tickets():
    from auth import TicketBook, TicketBookFull

    book = TicketBook(ttl_s=60)
    for _ in range(50_000):
        book.issue("owner", None)
    started = time.perf_counter()
    for _ in range(1000):
        book.issue("owner", None)
    assert time.perf_counter() - started < 0.5  # rebuilding 50,000 entries per issue took seconds
    short = TicketBook(ttl_s=0.05, max_live=3)
    for _ in range(3):
        short.issue("o", None)
    with pytest.raises(TicketBookFull):
        short.issue("o", None)
    time.sleep(0.06)
    short.issue("o", None)
    assert len(short) == 1  # the expired ones went from the front


# ---- 11. lone surrogates -------------------------------------------------------------------------------------------------------
def test_lone_surrogates_are_answered(app):
    ws = RawWs(app, create_session(app))
    for text in ('{"jsonrpc": "2.0", "method": "cancel", "id": "\\ud800"}',
                 '{"jsonrpc": "2.0", "method": "generate", "id": 1, "params": {"message": "a\\udc00b"}}',
                 '[{"jsonrpc": "2.0", "method": "cancel", "id": 1, "params": {"task_id": "\\ud83d"}}]'):
        ws.send(ws.frame(text))
        reply = ws.recv()
        assert reply["error"]["code"] == -32700 and "surrogate" in reply["error"]["message"], text
    ws.send(ws.frame('{"jsonrpc": "2.0", "method": "generate", "id": 2, "params": {"message": "hi \\ud83d\\ude00"}}'))
    task = ws.response(2)["result"]["task_id"]  # a pair (an emoji from an ASCII-only client) is fine
    assert ws.until("end", task_id=task)["params"]["finish_reason"] == "stop"
    ws.close()


def test_the_sender_escapes_what_utf8_cannot_carry():
    from jsonrpc import encode

    text, size = encode({"id": "\ud800"})
    assert json.loads(text) == {"id": "\ud800"} and text.isascii() and size == len(text)


# ---- 12. log lines cannot be forged -------------------------------------------------------------------------------------------
def test_model_text_cannot_forge_log_lines(app, settings):
    ws = RawWs(app, create_session(app))
    task, call = awaiting_tools(ws, message="forge")
    assert "no tool named" in call["validation_error"]
    ws.send(ws.frame(rpc("cancel", {}, 2)))
    ws.until("end", task_id=task)
    ws.close()
    lines = open(settings.log_file, encoding="utf-8").read().splitlines()
    assert not [line for line in lines if line.startswith("2030-01-01")]
    assert any("x\\n2030-01-01 00:00:00,000 ERROR FORGED-LINE" in line for line in lines)


# ---- 13. deep schemas ------------------------------------------------------------------------------------------------------------
def test_deep_schema_is_invalid_params_not_a_traceback(app, settings):
    deep: dict = {"type": "object"}
    for _ in range(400):
        deep = {"type": "object", "properties": {"a": deep}}
    r = httpx.post(f"http://{app.base}/create_session", json={"tools": [tool("deep", deep)]})
    assert r.status_code == 422 and "nested more than 64 levels" in json.dumps(r.json())
    ws = RawWs(app, create_session(app))
    ws.send(ws.frame(rpc("generate", {"message": "hi", "tools": [tool("deep", deep)]})))
    reply = ws.recv()
    assert reply["error"]["code"] == -32602 and "nested more than 64 levels" in json.dumps(reply)
    ws.close()
    text = open(settings.log_file, encoding="utf-8").read()
    assert "Traceback" not in text and "RecursionError" not in text


# ---- 14. keyless sessions per address; half-open connections -------------------------------------------------------------------
def test_keyless_sessions_are_counted_per_client_address(small):
    def create(address: str) -> int:
        return httpx.post(f"http://{small.base}/create_session", headers={"X-Forwarded-For": address}).status_code
    assert [create("10.0.0.1") for _ in range(3)] == [200, 200, 429]
    assert create("10.0.0.2") == 200  # another client still gets a session


def test_slow_headers_are_cut_off_and_connections_capped(small):
    host, port = small.base.split(":")
    slow = socket.create_connection((host, int(port)), timeout=5)
    slow.sendall(b"GET /health HTTP/1.1\r\nHost: " + small.base.encode() + b"\r\n")
    started = time.monotonic()
    with pytest.raises((ConnectionError, OSError)):
        while time.monotonic() - started < 5:  # slowloris: a header byte every 100 ms
            slow.sendall(b"X")
            time.sleep(0.1)
            slow.setblocking(False)
            try:
                if slow.recv(1) == b"":
                    raise ConnectionError("closed by the server")
            except BlockingIOError:
                pass
            slow.setblocking(True)
    assert time.monotonic() - started < 2  # INFERENCE_HTTP_HEADER_TIMEOUT_S=0.5, not never
    idle = [socket.create_connection((host, int(port))) for _ in range(6)]
    time.sleep(0.1)
    assert httpx.get(f"http://{small.base}/health").status_code == 503  # INFERENCE_MAX_CONNECTIONS=6
    time.sleep(0.8)  # the idle ones sent no headers in time: closed, and the slots are free again
    assert httpx.get(f"http://{small.base}/health").status_code == 200
    for sock in idle:
        sock.close()


def test_the_header_deadline_spares_websockets(small):
    ws = RawWs(small, small.state.runtime.sessions.create([], "anonymous").session_id)
    time.sleep(1.0)  # twice the header deadline: the socket is past its headers, it stays open
    ws.send(ws.frame({"jsonrpc": "2.0", "id": 1, "method": "cancel"}))
    assert ws.response(1)["error"]["code"] == -32002
    ws.close()


def test_report_worst_latencies(capsys):
    """Not a check: prints the worst /health latency seen under each attack (run with -s)."""
    with capsys.disabled():
        for name, worst in WORST.items():
            print(f"\n  worst /health during {name}: {worst:.1f} ms", end="")
