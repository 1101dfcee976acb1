"""Graceful shutdown: SIGTERM drains (running tasks finish within the grace period, the rest are cancelled
with their end), sockets close with 1001 (going away), the process exits 0."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from conftest import REPO_ROOT
from shared import Settings
from support import WsClient, create_session, running_server, scripted_loader


def respond(prompt: str) -> str:
    return "once upon a time " * 300 if "long" in prompt.rsplit("user\n", 1)[-1] else "short answer."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def collect_until_closed(ws) -> tuple[list[dict], int | None]:
    messages = []
    try:
        async for raw in ws:
            messages.append(json.loads(raw))
    except ConnectionClosed:
        pass
    return messages, ws.close_code


def test_drain_in_process(tiny_model_dir, tmp_path):
    """The DrainingServer's signal path, in-process: new work refused, a short task finishes, a long one is
    cancelled when the grace period ends, every socket gets 1001."""
    settings = Settings(model_id=str(tiny_model_dir), log_file=str(tmp_path / "log"), shutdown_grace_s=0.6,
                        kv_block_size=16, max_context=4096)
    with running_server(settings, scripted_loader(respond, step_delay=0.01)) as app:
        short_sid, long_sid = create_session(app), create_session(app)

        async def go():
            async with connect(f"ws://{app.base}/ws/{short_sid}") as short_ws, \
                    connect(f"ws://{app.base}/ws/{long_sid}") as long_ws:
                short, long_ = WsClient(short_ws), WsClient(long_ws)
                long_task = (await long_.call("generate", {"message": "a long story", "max_new_tokens": 3000}))
                await long_.until("text_chunk", task_id=long_task["result"]["task_id"])
                short_task = (await short.call("generate", {"message": "hi", "max_new_tokens": 30}))
                app.server.handle_exit(signal.SIGTERM, None)
                await asyncio.sleep(0.1)
                assert httpx.post(f"http://{app.base}/create_session").status_code == 503
                assert httpx.get(f"http://{app.base}/ready").status_code == 503
                refused = await short.call("cancel")  # still talking while draining
                assert refused["error"]["code"] in (-32002, -32003) or refused.get("result")
                (short_msgs, short_code), (long_msgs, long_code) = await asyncio.gather(
                    collect_until_closed(short_ws), collect_until_closed(long_ws))
                return short_task["result"]["task_id"], short, short_msgs, short_code, long_msgs, long_code

        short_task, short, short_msgs, short_code, long_msgs, long_code = asyncio.run(asyncio.wait_for(go(), 30))
        everything = short.notifications + short_msgs
        ends = [m for m in everything if m.get("method") == "end" and m["params"]["task_id"] == short_task]
        assert [e["params"]["finish_reason"] for e in ends] in (["stop"], ["cancelled"])
        long_ends = [m for m in long_msgs if m.get("method") == "end"]
        assert len(long_ends) == 1 and long_ends[0]["params"]["finish_reason"] == "cancelled"
        assert short_code == 1001 and long_code == 1001
        deadline = time.monotonic() + 10
        while app.server.started and not app.server.should_exit:
            assert time.monotonic() < deadline
            time.sleep(0.05)


@pytest.mark.parametrize("grace, new_tokens, finish", [(0.5, 4000, "cancelled"), (20, 40, None)])
def test_sigterm_on_a_real_server_process(tiny_model_dir, tmp_path, grace, new_tokens, finish):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_")}
    env.update(INFERENCE_MODEL_ID=str(tiny_model_dir), INFERENCE_PORT=str(port), INFERENCE_HOST="127.0.0.1",
               INFERENCE_SHUTDOWN_GRACE_S=str(grace), INFERENCE_LOG_FILE=str(tmp_path / "server.log"),
               INFERENCE_MAX_CONTEXT="4096", INFERENCE_KV_CACHE_GB="0.05", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "server_starlette.py")], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.1)
        sid = httpx.post(f"http://127.0.0.1:{port}/create_session").json()["session_id"]

        async def go():
            async with connect(f"ws://127.0.0.1:{port}/ws/{sid}") as ws:
                await ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "generate", "params": {
                    "message": "hello", "max_new_tokens": new_tokens, "do_sample": True, "seed": 3,
                    "ignore_eos": finish == "cancelled"}}))
                first = [json.loads(await ws.recv()) for _ in range(2)]  # the response and a first chunk
                proc.send_signal(signal.SIGTERM)
                rest, code = await collect_until_closed(ws)
                return first + rest, code

        messages, code = asyncio.run(asyncio.wait_for(go(), 60))
        ends = [m for m in messages if m.get("method") == "end"]
        assert len(ends) == 1, messages[-3:]
        if finish is not None:
            assert ends[0]["params"]["finish_reason"] == finish
        else:  # the grace period let it finish normally
            assert ends[0]["params"]["finish_reason"] in ("stop", "length")
            assert any(m.get("method") == "final_text" for m in messages)
        assert code == 1001
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
