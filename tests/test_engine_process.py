"""The engine in its own process (INFERENCE_ENGINE_PROCESS=on), end to end over real sockets: ordering, exactly one
``end`` per task, cancel and disconnect across the boundary, warm session KV, the engine process killed mid-stream
(every waiting task fails at once, /ready turns 503), and the front end dying (the engine process stops with it).
Plus the boundary's pure parts: the message codec and the framing."""
from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace

import httpx
import pytest

from conftest import REPO_ROOT
from engine.mp_client import EngineProcess
from engine.protocol import (Abort, Add, FrameReader, Outputs, decode_from_engine, decode_to_engine, event_from_wire,
                             event_to_wire, frame, params_from_wire, params_to_wire)
from engine.request import FinishReason, SamplingParams, TokenEvent
from engine_loaders import scripted_dying, scripted_echo, scripted_slow_story, scripted_story
from shared import Settings
from support import WsClient, create_session, running_server

pytestmark = pytest.mark.slow


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


# ---- the codec and the framing ------------------------------------------------------------------------------------
def test_sampling_params_survive_the_wire():
    params = SamplingParams(max_new_tokens=9, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05,
                            repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=-0.5, seed=2**63 + 5,
                            stop_token_ids=frozenset({3, 1, 2}), ignore_eos=True)
    add = decode_to_engine(frame(Add("r1", [1, 2, 3], params_to_wire(params), "s", "salt"))[4:])
    assert isinstance(add, Add) and add.prompt_ids == [1, 2, 3] and add.session_key == "s"
    assert params_from_wire(add.params) == params
    assert params_from_wire(params_to_wire(SamplingParams())) == SamplingParams()


def test_a_param_that_cannot_be_sent_is_refused_in_the_front_end():
    params = SamplingParams()
    object.__setattr__(params, "seed", object())  # e.g. a compiled object riding on the params
    with pytest.raises(TypeError, match="cannot be sent"):
        params_to_wire(params)


def test_events_survive_the_wire():
    events = [TokenEvent("a", (5,), None, None, 10, 4, 1), TokenEvent("b", (), FinishReason.ERROR, "boom", 3, 0, 0),
              TokenEvent("a", (6, 7), FinishReason.LENGTH, None, 10, 4, 3)]
    out = decode_from_engine(frame(Outputs([event_to_wire(e) for e in events], {"running": 1.0}))[4:])
    assert isinstance(out, Outputs) and [event_from_wire(w) for w in out.events] == events


def test_frames_split_anywhere_are_read_back_whole_and_in_order():
    messages = [Abort(f"r{i}") for i in range(50)] + [Add("x", list(range(3000)), params_to_wire(SamplingParams()))]
    data = b"".join(frame(m) for m in messages)
    rng, reader, got, i = random.Random(0), FrameReader(), [], 0
    while i < len(data):
        n = rng.randint(1, 700)
        got += [decode_to_engine(p) for p in reader.feed(data[i:i + n])]
        i += n
    assert got == messages and not reader.buffer


# ---- end to end -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def settings(tiny_model_dir, tmp_path_factory) -> Settings:
    return Settings(model_id=str(tiny_model_dir), log_file=str(tmp_path_factory.mktemp("log") / "server.log"),
                    kv_block_size=16, max_context=2048, max_batch=8, prefill_chunk=64, engine_process="on",
                    resume_grace_s=0)


@pytest.fixture(scope="module")
def echo_server(settings):
    with running_server(settings, scripted_echo) as app:
        yield app


def wait_until(predicate, timeout: float = 10, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_the_engine_runs_in_another_process(echo_server):
    engine = echo_server.state.runtime.engine
    assert isinstance(engine, EngineProcess) and engine.alive and engine.pid not in (None, os.getpid())
    assert httpx.get(f"http://{echo_server.base}/ready").json()["status"] == "ready"


def test_metrics_come_from_the_engine_process(echo_server):
    async def go():
        async with WsClient.connect(echo_server, create_session(echo_server)) as client:
            task = (await client.call("generate", {"message": "count me"}))["result"]["task_id"]
            await client.until("end", task_id=task)
    run(go())
    text = httpx.get(f"http://{echo_server.base}/metrics").text
    steps = [line for line in text.splitlines() if line.startswith("inference_step_seconds_count")]
    assert steps and sum(float(line.split()[-1]) for line in steps) > 0  # the engine's steps, sent with its outputs
    total = next(line for line in text.splitlines() if line.startswith('inference_kv_cache_blocks{state="total"}'))
    assert float(total.split()[-1]) > 0


def test_streams_arrive_in_order_with_one_end_per_task_and_warm_kv(echo_server):
    async def one(message: str) -> tuple[list[dict], list[dict]]:
        sid = create_session(echo_server)
        async with WsClient.connect(echo_server, sid) as client:
            first = (await client.call("generate", {"message": message}))["result"]["task_id"]
            await client.until("end", task_id=first)
            second = (await client.call("generate", {"message": message + " again"}))["result"]["task_id"]
            await client.until("end", task_id=second)
            await asyncio.sleep(0.2)  # nothing may follow an end
            return client.notifications, [first, second]

    async def both():
        return await asyncio.gather(one("hello there"), one("a second session"))
    for (notes, tasks), message in zip(run(both()), ("hello there", "a second session")):
        seqs = [n["params"]["seq"] for n in notes]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        for task, text in zip(tasks, (message, message + " again")):
            mine = [n for n in notes if n["params"].get("task_id") == task]
            assert [n["method"] for n in mine].count("end") == 1 and mine[-1]["method"] == "end"
            assert "".join(n["params"]["chunk"] for n in mine if n["method"] == "text_chunk") == f"echo: {text[::-1]}"
            final = next(n for n in mine if n["method"] == "final_text")["params"]["final_text"]
            assert final == f"echo: {text[::-1]}"
        end = next(n for n in notes if n["method"] == "end" and n["params"]["task_id"] == tasks[1])
        assert end["params"]["usage"]["cached_tokens"] > 0  # the first turn's KV, kept warm in the engine process


def test_a_request_the_wire_cannot_carry_leaves_no_stream_behind(echo_server):
    # top_k = 2**64 passes the API's checks (ge=0) but msgpack cannot carry it: the refused request must not stay
    # registered, or each such request counts against the queue until the server refuses everyone as overloaded
    engine = echo_server.state.runtime.engine

    async def go():
        async with WsClient.connect(echo_server, create_session(echo_server)) as client:
            for _ in range(3):
                assert "error" in await client.call("generate", {"message": "hi", "top_k": 2**64})
            task = (await client.call("generate", {"message": "still served"}))["result"]["task_id"]
            await client.until("end", task_id=task)
    run(go())
    assert engine.streams == {}


def test_requests_the_front_end_admits_in_a_burst_are_not_refused_by_the_engine(settings):
    # the front end admits while fewer than max_batch + max_queue requests are in flight, and refuses the rest
    # synchronously (EngineOverloaded: the client's "overloaded, retry"); the engine process must not then refuse
    # some of them itself (its queue counts requests it has not admitted yet, a burst within one step among them):
    # that refusal arrives as an error event, a "generation failed" with no retry
    async def go():
        client = EngineProcess(replace(settings, max_batch=4, max_queue=2), scripted_slow_story)
        loaded = await client.start()
        try:
            ids = loaded.tokenizer.encode("go")
            first = client.generate(ids, SamplingParams(max_new_tokens=100))
            async for _ in first:
                break  # running: the engine is in its steps
            burst = [client.generate(ids, SamplingParams(max_new_tokens=2)) for _ in range(5)]
            errors = []
            for stream in burst:
                async for event in stream:
                    errors += [event.error] if event.error else []
            assert errors == []
            first.abort()
        finally:
            await client.stop()
    run(go())


@pytest.fixture(scope="module")
def story_server(settings):
    # async scheduling on (auto is off on a CPU): cancel and disconnect with a step in flight in the engine process
    with running_server(replace(settings, max_batch=4, async_scheduling="on"), scripted_story) as app:
        yield app


def running(app) -> int:
    return app.state.runtime.engine.stats()["running"]


def test_cancel_across_the_boundary_frees_the_engine(story_server):
    async def go():
        async with WsClient.connect(story_server, create_session(story_server)) as client:
            task = (await client.call("generate", {"message": "go", "max_new_tokens": 1000}))["result"]["task_id"]
            await client.until("text_chunk", task_id=task)
            assert (await client.call("cancel", {"task_id": task}))["result"]["status"] == "cancelled"
            end = await client.until("end", task_id=task)
            assert end["params"]["finish_reason"] == "cancelled"
            await asyncio.sleep(0.2)
            assert [n["method"] for n in client.of_task(task)].count("end") == 1
    run(go())
    wait_until(lambda: running(story_server) == 0, 5, "the cancelled request still runs in the engine")


def test_disconnect_across_the_boundary_frees_the_engine(story_server):
    async def go():
        async with WsClient.connect(story_server, create_session(story_server)) as client:
            task = (await client.call("generate", {"message": "go", "max_new_tokens": 1000}))["result"]["task_id"]
            await client.until("text_chunk", task_id=task)
            assert running(story_server) == 1
    run(go())  # the socket closes with the task mid-stream
    wait_until(lambda: running(story_server) == 0, 5, "the request of a client that left still runs")


def test_engine_killed_mid_stream_fails_every_task_and_ready_turns_503(settings):
    with running_server(replace(settings, max_batch=4), scripted_story) as app:
        engine = app.state.runtime.engine

        async def go():
            clients = []
            async with WsClient.connect(app, create_session(app)) as a, \
                    WsClient.connect(app, create_session(app)) as b:
                for client in (a, b):
                    task = (await client.call("generate", {"message": "go", "max_new_tokens": 1000}))["result"]
                    clients.append((client, task["task_id"]))
                for client, task in clients:
                    await client.until("text_chunk", task_id=task)
                killed = time.monotonic()
                os.kill(engine.pid, signal.SIGKILL)
                for client, task in clients:
                    error = await client.until("error", timeout=10, task_id=task)
                    end = await client.until("end", timeout=10, task_id=task)
                    assert "engine" in error["params"]["error"]["message"]
                    assert end["params"]["finish_reason"] == "error"
                assert time.monotonic() - killed < 5  # at once, not after some timeout
                await asyncio.sleep(0.2)
                for client, task in clients:
                    assert [n["method"] for n in client.of_task(task)].count("end") == 1
                refused = await a.call("generate", {"message": "again"})
                assert refused["error"]["code"] == -32008  # engine unavailable
        run(go())
        r = httpx.get(f"http://{app.base}/ready")
        assert r.status_code == 503 and "engine process died" in r.json()["reason"]


def test_engine_thread_dying_in_the_process_fails_every_task_and_ready_turns_503(settings):
    with running_server(replace(settings, max_batch=4), scripted_dying) as app:
        async def go():
            async with WsClient.connect(app, create_session(app)) as a, \
                    WsClient.connect(app, create_session(app)) as b:
                first = (await a.call("generate", {"message": "go", "max_new_tokens": 1000}))["result"]["task_id"]
                await a.until("text_chunk", task_id=first)
                second = (await b.call("generate", {"message": "now die", "max_new_tokens": 50}))["result"]
                for client, task in ((a, first), (b, second["task_id"])):
                    error = await client.until("error", timeout=10, task_id=task)
                    end = await client.until("end", timeout=10, task_id=task)
                    assert "engine" in error["params"]["error"]["message"]
                    assert end["params"]["finish_reason"] == "error"
        run(go())
        r = httpx.get(f"http://{app.base}/ready")
        assert r.status_code == 503 and "the engine thread dies" in r.json()["reason"]


_FRONT_END = r"""
import sys, uvicorn
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from dataclasses import replace
from server_starlette import create_app
from shared import Settings
from engine_loaders import scripted_story
settings = Settings(model_id=sys.argv[2], log_file=sys.argv[3], kv_block_size=16, max_context=2048, max_batch=2,
                    prefill_chunk=64, engine_process="on")
uvicorn.run(create_app(settings, loader=scripted_story), host="127.0.0.1", port=int(sys.argv[4]), log_config=None)
"""


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_front_end_that_crashes_takes_its_engine_requests_with_it(tiny_model_dir, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", _FRONT_END, str(REPO_ROOT), str(tiny_model_dir),
                               str(tmp_path / "log"), str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"http://{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "the server did not start"
            time.sleep(0.2)
        engines = [pid for pid in _children(server.pid) if b"spawn_main" in open(f"/proc/{pid}/cmdline", "rb").read()]
        assert len(engines) == 1, "no engine process"

        class App:
            pass
        app = App()
        app.base = base

        async def go():
            async with WsClient.connect(app, create_session(app)) as client:
                task = (await client.call("generate", {"message": "go", "max_new_tokens": 1000}))["result"]["task_id"]
                await client.until("text_chunk", task_id=task)
                server.send_signal(signal.SIGKILL)  # the front end dies mid-stream, with no chance to clean up
        run(go())
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in engines):
            assert time.monotonic() < deadline, "the engine process outlived its front end"
            time.sleep(0.05)
    finally:
        server.kill()
        server.wait(10)


def test_a_front_end_that_dies_while_its_engine_loads_leaves_no_engine_behind(tiny_model_dir, tmp_path):
    # the engine process would otherwise load on (minutes on a GPU, holding its memory: a restarted server's engine
    # then sizes its KV cache from what the orphan left free, or fails to load) and only then notice
    script = _FRONT_END.replace("scripted_story", "slow_to_load")
    server = subprocess.Popen([sys.executable, "-c", script, str(REPO_ROOT), str(tiny_model_dir), str(tmp_path / "log"),
                               "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (engines := [pid for pid in _children(server.pid)
                               if b"spawn_main" in open(f"/proc/{pid}/cmdline", "rb").read()]):
            assert time.monotonic() < deadline and server.poll() is None, "no engine process"
            time.sleep(0.1)
        while not (tmp_path / "log.loading").exists():  # the engine process is loading its model
            assert time.monotonic() < deadline, "the engine process did not start"
            time.sleep(0.1)
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in engines):
            assert time.monotonic() < deadline, "the engine process loads on for a front end that is gone"
            time.sleep(0.05)
    finally:
        server.kill()
        server.wait(10)
        for pid in engines if "engines" in locals() else ():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)  # (it ignores SIGTERM)



def test_the_engine_process_logs_into_the_current_log_file_after_a_rotation(settings, tmp_path):
    # both processes log to one file: were both to rotate it, the engine process would write on into the renamed
    # file (deleted a few rotations later: its lines, the engine thread's death among them, lost) and rename the
    # front end's current file under it
    import logging

    log = tmp_path / "server.log"
    with running_server(replace(settings, max_batch=4, log_file=str(log)), scripted_dying) as app:
        rotating = [h for h in logging.getLogger().handlers if isinstance(h, logging.handlers.RotatingFileHandler)
                    and h.baseFilename == str(log)]
        assert len(rotating) == 1
        rotating[0].doRollover()  # the front end's file reached its size: rotated

        async def go():
            async with WsClient.connect(app, create_session(app)) as client:
                task = (await client.call("generate", {"message": "now die", "max_new_tokens": 5}))["result"]
                await client.until("end", timeout=10, task_id=task["task_id"])
        run(go())
        wait_until(lambda: "engine thread died" in log.read_text(errors="replace"), 5,
                   "the engine process' log line is not in the current log file")
