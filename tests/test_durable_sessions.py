"""Sessions that survive (issue 12): a restarted server continues every conversation from its store; a dropped
socket resumes with ?resume_from= and misses nothing; a task lost with its process ends with a clear error.

The restart proof runs the real server process (tests/scripted_server.py: the scripted echo model, whose reply
lists every user message it was given) and SIGKILLs it. The resume proof drops sockets abruptly (no close
frame) at random points and checks what the server sends, without any de-duplication by the client.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from auth import key_id
from services import Redis, free_port
from shared import Settings
from support import create_session, running_server, scripted_loader
from utils import build_prompt_ids

HERE = Path(__file__).resolve().parent
WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TOOLS = [{"name": "get_weather", "description": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


def story(prompt: str) -> str:
    """Replies of a few dozen tokens (long enough to drop a socket in the middle), a tool call for "weather"."""
    last = prompt.rsplit("<|im_start|>user\n", 1)[-1].split("<|im_end|>")[0]
    if "<tool_response>" in last:
        return "The tool answered, so: " + " ".join(f"sun{i}" for i in range(25))
    if "weather" in last:
        return WEATHER_CALL
    n = int(m.group(1)) if (m := re.search(r"story (\d+)", last)) else 0
    return f"story {n}: " + " ".join(f"w{n}x{i}" for i in range(30 + n % 25))


@pytest.fixture(scope="module")
def base_settings(tiny_model_dir, tmp_path_factory) -> Settings:
    root = tmp_path_factory.mktemp("durable")
    return Settings(model_id=str(tiny_model_dir), log_file=str(root / "server.log"), kv_block_size=16,
                    max_context=4096, max_batch=16, session_store=f"sqlite:///{root}/sessions.db")


def run(coro: Any, timeout: float = 120) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Stream:
    """A session's socket that can be dropped abruptly (no close frame) and resumed. It keeps every
    notification exactly as received: nothing is de-duplicated, so the checks see what the server sent."""

    def __init__(self, base: str, sid: str) -> None:
        self.base, self.sid = base, sid
        self.ws: Any = None
        self.last_seq = 0
        self.notes: list[dict[str, Any]] = []
        self.resumed: list[dict[str, Any]] = []
        self.sockets = 0
        self._id = 0

    async def open(self, resume: bool = False) -> None:
        query = f"?resume_from={self.last_seq}" if resume else ""
        self.ws = await connect(f"ws://{self.base}/ws/{self.sid}{query}", max_size=None)
        self.sockets += 1

    def drop(self) -> None:
        self.ws.transport.abort()  # as a dead Wi-Fi link: no close frame

    async def call(self, method: str, params: dict[str, Any]) -> int:
        self._id += 1
        await self.ws.send(json.dumps({"jsonrpc": "2.0", "id": self._id, "method": method, "params": params}))
        return self._id

    async def recv(self, timeout: float = 60) -> dict[str, Any]:
        message = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        if message.get("method") == "resumed":
            self.resumed.append(message["params"])
        elif "method" in message:
            self.notes.append(message)
            self.last_seq = message["params"]["seq"]
        return message


async def task_with_drops(stream: Stream, message: str, rng: random.Random) -> str:
    """Run one generate, dropping the socket 1-3 times at random points and resuming each time; answer tool
    calls (again, when the server resends them). Returns the task id."""
    await stream.open(resume=stream.last_seq > 0)
    rid = await stream.call("generate", {"message": message, "max_new_tokens": 1500})
    task_id, drops, budget = None, rng.randint(1, 3), rng.randint(0, 25)
    while True:
        if task_id is not None and drops and budget <= 0:
            stream.drop()
            drops, budget = drops - 1, rng.randint(0, 25)
            await asyncio.sleep(rng.uniform(0, 0.15))
            await stream.open(resume=True)
            continue
        try:
            msg = await stream.recv()
        except ConnectionClosed:  # (a socket replaced by our own resumed one cannot reach here: it is aborted)
            raise
        if msg.get("id") == rid:
            task_id = msg["result"]["task_id"]
            continue
        if "method" not in msg or msg["method"] == "resumed":
            continue
        budget -= 1
        if msg["method"] == "function_call_request":
            await stream.call("tool_result", {"task_id": task_id, "results": [
                {"call_id": c["call_id"], "tool_name": c["tool"], "result": {"sky": "clear"}}
                for c in msg["params"]["tool_calls"]]})
        if msg["method"] == "end":
            await stream.ws.close()
            return task_id


def test_fifty_tasks_dropped_and_resumed_miss_nothing(base_settings):
    """Resume proof: 50 tasks (10 sessions x 5, some with a tool call) whose sockets drop 1-3 times each at
    random points: each task's chunks concatenate to its final_text, each seq arrives exactly once and without a
    gap, one end each, and the server ends up idle."""
    with running_server(base_settings, scripted_loader(story, step_delay=0.002)) as app:
        sids = [create_session(app, TOOLS) for _ in range(10)]

        async def session_run(i: int, sid: str) -> list[tuple[Stream, str, int]]:
            rng, stream, done = random.Random(1000 + i), Stream(app.base, sid), []
            for k in range(5):
                first = len(stream.notes)
                message = "what is the weather?" if (i + k) % 4 == 0 else f"tell story {i * 5 + k}"
                done.append((stream, await task_with_drops(stream, message, rng), first))
            return done

        async def all_sessions() -> list[list[tuple[Stream, str, int]]]:
            return await asyncio.gather(*(session_run(i, sid) for i, sid in enumerate(sids)))
        results = run(all_sessions(), timeout=300)
        tasks = 0
        for session_tasks in results:
            stream = session_tasks[0][0]
            seqs = [n["params"]["seq"] for n in stream.notes]
            assert len(seqs) == len(set(seqs)), "a seq arrived twice"
            assert seqs == list(range(1, len(seqs) + 1)), "a gap (or disorder) in the stream"
            assert stream.sockets >= 5 + 5 and stream.resumed, "every task was dropped at least once"
            for n, (_, task_id, _) in enumerate(session_tasks):
                notes = [x for x in stream.notes if x["params"].get("task_id") == task_id]
                ends = [x for x in notes if x["method"] == "end"]
                finals = [x["params"]["final_text"] for x in notes if x["method"] == "final_text"]
                assert len(ends) == 1 and ends[0]["params"]["finish_reason"] == "stop", ends
                assert len(finals) == 1 and finals[0]
                assert "".join(x["params"]["chunk"] for x in notes if x["method"] == "text_chunk") == finals[0]
                assert notes[-1]["method"] == "end"
                tasks += 1
        assert tasks == 50
        rt = app.state.runtime
        assert not rt.sessions.active_tasks and rt.engine.engine.stats()["running"] == 0
        assert rt.metrics.resumes.labels("complete")._value.get() >= 50


def test_a_pending_tool_call_is_sent_again_on_resume(base_settings):
    with running_server(base_settings, scripted_loader(story)) as app:
        sid = create_session(app, TOOLS)

        async def go():
            stream = Stream(app.base, sid)
            await stream.open()
            await stream.call("generate", {"message": "what is the weather?"})
            while (msg := await stream.recv()).get("method") != "function_call_request":
                pass
            call = msg["params"]["tool_calls"][0]
            stream.drop()
            await stream.open(resume=True)  # it saw the request, did not answer: the server asks again
            again = await stream.recv()
            assert again["method"] == "function_call_request" and again["params"]["seq"] == msg["params"]["seq"] + 1
            assert again["params"]["tool_calls"][0]["call_id"] == call["call_id"]
            assert (await stream.recv())["method"] == "resumed"
            await stream.call("tool_result", {"task_id": msg["params"]["task_id"], "results": [
                {"call_id": call["call_id"], "tool_name": "get_weather", "result": "sunny"}]})
            while (msg := await stream.recv()).get("method") != "end":
                pass
            assert msg["params"]["finish_reason"] == "stop"
        run(go())


def test_a_resuming_socket_replaces_one_the_server_still_holds(base_settings):
    with running_server(base_settings, scripted_loader(story, step_delay=0.01)) as app:
        sid = create_session(app)

        async def go():
            old = Stream(app.base, sid)
            await old.open()
            await old.call("generate", {"message": "tell story 7"})
            while (await old.recv()).get("method") != "text_chunk":
                pass
            new = Stream(app.base, sid)
            new.last_seq = resumed_from = old.last_seq
            with pytest.raises(InvalidStatus) as busy:  # without resume_from: refused as before
                await new.open()
            assert busy.value.response.status_code == 409
            await new.open(resume=True)
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await old.recv()
            assert closed.value.rcvd.code == 4000
            while (await new.recv()).get("method") != "end":
                pass
            # The new socket replays everything after the seq it resumed from, once; the old one may have received
            # some of that too before it was replaced (a client keeps the first copy of each seq).
            new_seqs = [n["params"]["seq"] for n in new.notes]
            assert new_seqs == list(range(resumed_from + 1, resumed_from + 1 + len(new_seqs)))
            by_seq = {n["params"]["seq"]: n for n in new.notes + old.notes}
            assert sorted(by_seq) == list(range(1, max(by_seq) + 1))
            text = "".join(by_seq[q]["params"]["chunk"] for q in sorted(by_seq)
                           if by_seq[q]["method"] == "text_chunk")
            assert text == next(n["params"]["final_text"] for n in new.notes if n["method"] == "final_text")
        run(go())


def test_resume_from_is_checked(base_settings):
    with running_server(base_settings, scripted_loader(story, step_delay=0.02)) as app:
        sid = create_session(app)

        async def go():
            for bad in ("abc", "-1", "1.0", "99999999999999999999"):
                with pytest.raises(InvalidStatus) as refused:
                    await connect(f"ws://{app.base}/ws/{sid}?resume_from={bad}")
                assert refused.value.response.status_code == 400
            stream = Stream(app.base, sid)
            await stream.open()
            await stream.call("generate", {"message": "tell story 3"})
            await stream.recv()
            stream.drop()
            with pytest.raises(InvalidStatus) as ahead:  # it claims to have seen what was never sent
                await connect(f"ws://{app.base}/ws/{sid}?resume_from=100000")
            assert ahead.value.response.status_code == 400
        run(go())


@pytest.mark.parametrize("grace", [0.0, 0.4])
def test_without_a_resume_the_task_is_cancelled_after_the_grace_period(base_settings, grace):
    settings = replace(base_settings, resume_grace_s=grace)
    with running_server(settings, scripted_loader(story, step_delay=0.05)) as app:
        sid = create_session(app)
        session = app.state.runtime.sessions.get(sid)

        async def go():
            stream = Stream(app.base, sid)
            await stream.open()
            await stream.call("generate", {"message": "tell story 24", "max_new_tokens": 300})
            while (await stream.recv()).get("method") != "text_chunk":
                pass
            dropped = time.monotonic()
            stream.drop()
            while session.active_task is not None:
                await asyncio.sleep(0.01)
            return time.monotonic() - dropped
        waited = run(go())
        assert waited >= grace and waited < grace + 5
        deadline = time.monotonic() + 5
        while app.state.runtime.engine.engine.stats()["running"]:  # the engine thread lets go of it next step
            assert time.monotonic() < deadline
            time.sleep(0.01)


def test_the_client_library_resumes_by_itself(base_settings):
    from inference_client import Client, End

    with running_server(base_settings, scripted_loader(story, step_delay=0.01)) as app:
        rt = app.state.runtime

        async def go():
            async with Client(f"http://{app.base}", timeout=20) as client:
                session = await client.create_session()
                gen = session.generate("tell story 9")
                await gen.__anext__()
                server_side = rt.sessions.get(session.session_id).connection
                app.server.loop.call_soon_threadsafe(server_side.close, 1001, "going away")
                events = [event async for event in gen]
                assert isinstance(events[-1], End) and gen.finish_reason == "stop"
                assert gen.text == gen.final_text == story("user\ntell story 9<|im_end|>")
                assert session.reconnects == 1
                assert await session.ask("tell story 10") == story("user\ntell story 10<|im_end|>")
        run(go())


def test_a_failing_store_is_shown_in_ready_and_refuses_new_sessions(base_settings, tmp_path):
    (tmp_path / "dir.db").mkdir()  # SQLite cannot open a directory
    settings = replace(base_settings, session_store=f"sqlite:///{tmp_path}/dir.db")
    with running_server(settings, scripted_loader(story)) as app:
        r = httpx.post(f"http://{app.base}/create_session", timeout=20)
        assert r.status_code == 503 and "could not be stored" in r.json()["error"]["message"]
        ready = httpx.get(f"http://{app.base}/ready", timeout=5)
        assert ready.status_code == 503 and "session store failing" in ready.json()["reason"]
        assert ready.json()["session_store"]["ok"] is False
        assert len(app.state.runtime.sessions) == 0


def test_a_store_down_at_start_shows_in_ready_before_any_request(base_settings, caplog):
    """Redis is not there when the server starts: /ready says so (503, the reason) from the start, and it is
    logged, instead of 'ready' until the first client request fails on it."""
    settings = replace(base_settings, session_store=f"redis://127.0.0.1:{free_port()}/0")
    with running_server(settings, scripted_loader(story)) as app:
        deadline = time.monotonic() + 5
        while (ready := httpx.get(f"http://{app.base}/ready", timeout=5)).status_code == 200:
            assert time.monotonic() < deadline, f"/ready says {ready.json()} with the store down"
            time.sleep(0.1)
        assert ready.status_code == 503 and "session store failing" in ready.json()["reason"]
        assert "redis" in ready.json()["session_store"]["error"]
    assert any("session store" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)


def test_a_redis_outage_keeps_held_sessions_going_and_shows_in_ready(base_settings, tmp_path):
    """Redis goes away: a session this replica holds still attaches and answers (its writes fail, logged), /ready
    turns 503 with the reason and create_session refuses; Redis comes back: /ready is 200 again by itself."""
    redis = Redis(tmp_path / "redis").start()
    try:
        settings = replace(base_settings, session_store=redis.url)
        with running_server(settings, scripted_loader(story)) as app:
            sid = create_session(app)
            redis.stop()

            async def go():
                stream = Stream(app.base, sid)
                await stream.open()
                await stream.call("generate", {"message": "tell story 5"})
                while (await stream.recv(timeout=30)).get("method") != "end":
                    pass
                finals = [n for n in stream.notes if n["method"] == "final_text"]
                assert finals and finals[0]["params"]["final_text"].startswith("story 5:")
            run(go())
            ready = httpx.get(f"http://{app.base}/ready", timeout=5)
            assert ready.status_code == 503 and "redis" in ready.json()["reason"]
            assert httpx.post(f"http://{app.base}/create_session", timeout=20).status_code == 503
            redis.start()
            deadline = time.monotonic() + 20
            while httpx.get(f"http://{app.base}/ready", timeout=5).status_code != 200:
                assert time.monotonic() < deadline, "the store did not come back"
                time.sleep(0.2)
            assert httpx.post(f"http://{app.base}/create_session", timeout=20).status_code == 200
    finally:
        redis.stop()


def test_ownership_and_tickets_survive_a_restart(base_settings, tmp_path):
    """The stored owner is the key's id (never the key): after a restart the same key attaches (by header or by a
    ticket issued for a session only the store holds) and another key is refused."""
    key_a, key_b = "key-a-0123456789abcdef", "key-b-0123456789abcdef"
    keys = tmp_path / "keys"
    keys.write_text(f"{key_a}\n{key_b}\n")
    settings = replace(base_settings, api_keys_file=str(keys), session_store=f"sqlite:///{tmp_path}/own.db")
    auth = lambda key: {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}  # noqa: E731
    with running_server(settings, scripted_loader(story)) as app:
        sid = httpx.post(f"http://{app.base}/create_session", headers=auth(key_a), json={}).json()["session_id"]
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("own.db*"))
    assert key_id(key_a).encode() in stored and key_a.encode() not in stored
    with running_server(settings, scripted_loader(story)) as app:  # a new process would see the same
        assert httpx.post(f"http://{app.base}/auth/ticket", headers=auth(key_b),
                          json={"session_id": sid}).status_code == 403
        ticket = httpx.post(f"http://{app.base}/auth/ticket", headers=auth(key_a), json={"session_id": sid}).json()

        async def go():
            with pytest.raises(InvalidStatus) as other:
                await connect(f"ws://{app.base}/ws/{sid}", additional_headers={"Authorization": f"Bearer {key_b}"})
            assert other.value.response.status_code == 403
            got = await turn_with(f"ws://{app.base}/ws/{sid}?ticket={ticket['ticket']}", "tell story 2")
            assert got["final_text"]["final_text"].startswith("story 2:")
        run(go())


async def turn_with(url: str, message: str) -> dict[str, Any]:
    async with connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "generate", "params": {"message": message}}))
        got: dict[str, Any] = {}
        while "end" not in got:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 60))
            got[msg.get("method", "response")] = msg.get("params", msg)
        return got


def test_idle_expiry_deletes_from_the_store(base_settings):
    with running_server(base_settings, scripted_loader(story)) as app:
        rt = app.state.runtime
        sid = create_session(app)
        load = lambda: asyncio.run_coroutine_threadsafe(rt.sessions.store.load(sid), app.server.loop).result(10)
        assert load() is not None
        app.server.loop.call_soon_threadsafe(rt.sessions.expire_idle, time.monotonic() + 10**6)
        deadline = time.monotonic() + 10
        while load() is not None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert rt.sessions.get(sid) is None


# ---- the restart proof: a real server process, SIGKILLed -----------------------------------------------------
class ServerProcess:
    """tests/scripted_server.py on a free port with its own SQLite store."""

    def __init__(self, tiny_model_dir: Path, workdir: Path) -> None:
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_")}
        self.env.update(INFERENCE_MODEL_ID=str(tiny_model_dir), INFERENCE_PORT=str(self.port),
                        INFERENCE_HOST="127.0.0.1", INFERENCE_LOG_FILE=str(workdir / "server.log"),
                        INFERENCE_SESSION_STORE=f"sqlite:///{workdir}/sessions.db", INFERENCE_MAX_CONTEXT="4096",
                        INFERENCE_KV_CACHE_GB="0.05", INFERENCE_KV_BLOCK_SIZE="16", OMP_NUM_THREADS="1",
                        SCRIPTED_STEP_DELAY_S="0.01")
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        self.proc = subprocess.Popen([sys.executable, str(HERE / "scripted_server.py")], env=self.env,
                                     cwd=self.workdir, stdout=open(self.workdir / "out.log", "ab"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while True:
            assert self.proc.poll() is None, (self.workdir / "out.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://{self.base}/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.1)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


async def turn(base: str, sid: str, message: str, resume_from: int | None = None) -> dict[str, Any]:
    """One generate on a fresh socket: its notifications by method (the last of each), and all of them."""
    query = "" if resume_from is None else f"?resume_from={resume_from}"
    async with connect(f"ws://{base}/ws/{sid}{query}", max_size=None) as ws:
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "generate", "params": {"message": message}}))
        got: dict[str, Any] = {"all": []}
        while "end" not in got:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 60))
            got["all"].append(msg)
            got[msg.get("method", "response")] = msg.get("params", msg)
        return got


def test_restart_continues_every_session_with_its_full_history(tiny_model_dir, tiny_tokenizer, tmp_path):
    """Restart proof: 20 sessions with two turns of history, and one more with a task still running; SIGKILL;
    start again. Every session continues with its whole conversation: the echo model's reply lists every user
    message, and the prompt has exactly the tokens of the full conversation (rebuilt by prefill: nothing
    cached). The running task is reported lost (-32011, then its end) to the client that resumes, and the
    conversation is as before it, so retrying it repeats nothing."""
    server = ServerProcess(tiny_model_dir, tmp_path).start()
    try:
        sids = [httpx.post(f"http://{server.base}/create_session", timeout=10).json()["session_id"]
                for _ in range(21)]
        history: dict[str, list[dict[str, str]]] = {sid: [] for sid in sids}

        async def two_turns(i: int, sid: str) -> None:
            for k in range(2):
                got = await turn(server.base, sid, f"s{i} m{k}")
                history[sid] += [{"role": "user", "content": f"s{i} m{k}"},
                                 {"role": "assistant", "content": got["final_text"]["final_text"]}]

        async def before():
            await asyncio.gather(*(two_turns(i, sid) for i, sid in enumerate(sids)))
            async with connect(f"ws://{server.base}/ws/{sids[20]}") as ws:  # a long task, running at the kill
                await ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "generate",
                                          "params": {"message": "s20 long one", "max_new_tokens": 2000}}))
                seen = 0
                while True:
                    msg = json.loads(await ws.recv())
                    seen = msg.get("params", {}).get("seq", seen)
                    if msg.get("method") == "text_chunk" and seen > 20:
                        server.kill()
                        return seen
        last_seen = run(before())
        server.start()
        shared_prefix = build_prompt_ids(tiny_tokenizer, [{"role": "user", "content": "another conversation"}], [])

        async def after(i: int, sid: str) -> None:
            got = await turn(server.base, sid, f"s{i} m2")
            users = [m["content"] for m in history[sid] if m["role"] == "user"] + [f"s{i} m2"]
            assert got["final_text"]["final_text"] == "heard: " + " | ".join(users)
            expected = build_prompt_ids(tiny_tokenizer, [*history[sid], {"role": "user", "content": f"s{i} m2"}], [])
            usage = got["end"]["usage"]
            assert usage["prompt_tokens"] == len(expected)
            # rebuilt by prefill: at most the template's opening (shared by every session) came from the cache
            assert usage["cached_tokens"] <= len(os.path.commonprefix([expected, shared_prefix]))
            seqs = [m["params"]["seq"] for m in got["all"] if "method" in m]
            assert seqs == sorted(set(seqs)) and seqs[0] > 0

        async def lost():
            async with connect(f"ws://{server.base}/ws/{sids[20]}?resume_from={last_seen}") as ws:
                notes = []
                while (msg := json.loads(await ws.recv())).get("method") != "resumed":
                    notes.append(msg)
                assert [n["method"] for n in notes][-2:] == ["error", "end"]
                assert notes[-2]["params"]["error"]["code"] == -32011
                assert notes[-1]["params"]["finish_reason"] == "error"
                assert all(n["params"]["seq"] > last_seen for n in notes)
            got = await turn(server.base, sids[20], "s20 retry")  # no "long one" in the history any more
            assert got["final_text"]["final_text"] == "heard: s20 m0 | s20 m1 | s20 retry"

        async def everything():
            await asyncio.gather(*(after(i, sid) for i, sid in enumerate(sids[:20])), lost())
        run(everything())
        # warm again: the next turn reuses the KV cache the first one rebuilt
        got = run(turn(server.base, sids[0], "s0 m3"))
        assert got["end"]["usage"]["cached_tokens"] > 0
    finally:
        server.stop()
