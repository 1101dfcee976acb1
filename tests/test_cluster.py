"""Replicas behind HAProxy (issue 12, the cluster proof): Redis, 2 replica processes and HAProxy with
deploy/haproxy.cfg, started by scripts/cluster.py's Cluster. Never mocked: without redis-server or haproxy the
test skips, and under CI=true it fails (scripts/install_services.sh installs them).

40 sessions through the proxy: every turn of a session lands on the replica that created it (the WebSocket
upgrade's X-Inference-Replica says which). Then one replica is SIGKILLed, some of its tasks still running:
every session goes on, with its whole history (the echo model's reply lists every user message), on the
survivor; the running tasks end for their clients with -32011 and a retry works.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from conftest import REPO_ROOT
from services import require

HERE = Path(__file__).resolve().parent


def load_cluster_module() -> Any:
    spec = importlib.util.spec_from_file_location("cluster", REPO_ROOT / "scripts" / "cluster.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["cluster"] = module
    spec.loader.exec_module(module)
    return module


async def open_socket(base: str, sid: str, query: str = "", timeout: float = 30) -> Any:
    """A socket through the proxy; while a dead replica is not yet marked down, HAProxy may answer 503: retry."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await connect(f"ws://{base}/ws/{sid}{query}", max_size=None, open_timeout=10)
        except (InvalidStatus, OSError) as exc:
            if isinstance(exc, InvalidStatus) and exc.response.status_code not in (502, 503):
                raise
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def turn(base: str, sid: str, message: str) -> tuple[str, dict[str, Any]]:
    """One generate on a fresh socket through the proxy: (replica that served it, {method: last params})."""
    ws = await open_socket(base, sid)
    async with ws:
        replica = ws.response.headers["X-Inference-Replica"]
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "generate", "params": {"message": message}}))
        got: dict[str, Any] = {}
        while "end" not in got:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 60))
            got[msg.get("method", "response")] = msg.get("params", msg)
        return replica, got


def test_sessions_stay_on_their_replica_and_survive_its_death(tiny_model_dir, tmp_path):
    require("redis-server")
    require("haproxy")
    cluster_module = load_cluster_module()
    cluster = cluster_module.Cluster(tmp_path / "cluster", tiny_model_dir, replicas=2,
                                     launcher=HERE / "scripted_server.py", env={"SCRIPTED_STEP_DELAY_S": "0.01"})
    with cluster:
        cluster.start()
        base = cluster.url
        homes: dict[str, str] = {}
        for _ in range(40):
            r = httpx.post(f"http://{base}/create_session", timeout=20)
            r.raise_for_status()
            sid, home = r.json()["session_id"], r.headers["X-Inference-Replica"]
            assert sid.startswith(f"{home}.")
            homes[sid] = home
        assert set(Counter(homes.values())) == {"r0", "r1"}, Counter(homes.values())
        history: dict[str, list[str]] = {sid: [] for sid in homes}

        async def two_turns(sid: str) -> None:
            for k in range(2):
                message = f"{sid[-6:]} m{k}"
                replica, got = await turn(base, sid, message)
                assert replica == homes[sid], "a turn left its session's replica"
                history[sid].append(message)
                assert got["final_text"]["final_text"] == "heard: " + " | ".join(history[sid])

        async def before() -> None:
            await asyncio.gather(*(two_turns(sid) for sid in homes))
        asyncio.run(asyncio.wait_for(before(), 180))

        victim = "r0"
        running = [sid for sid in homes if homes[sid] == victim][:3]

        async def kill_mid_task() -> dict[str, int]:
            sockets, last_seq = {}, {}
            for sid in running:
                ws = await open_socket(base, sid)
                await ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "generate",
                                          "params": {"message": "a long one", "max_new_tokens": 2000}}))
                sockets[sid] = ws
            for sid, ws in sockets.items():
                while True:
                    msg = json.loads(await ws.recv())
                    if msg.get("method") == "text_chunk":
                        last_seq[sid] = msg["params"]["seq"]
                        break
            cluster.kill(victim)  # SIGKILL: no drain, no goodbye
            for ws in sockets.values():
                await ws.close()
            return last_seq
        last_seq = asyncio.run(asyncio.wait_for(kill_mid_task(), 120))

        async def lost_then_retry(sid: str) -> None:
            ws = await open_socket(base, sid, f"?resume_from={last_seq[sid]}")
            async with ws:
                assert ws.response.headers["X-Inference-Replica"] == "r1"
                notes = []
                while (msg := json.loads(await ws.recv())).get("method") != "resumed":
                    notes.append(msg)
                assert [n["method"] for n in notes] == ["error", "end"]
                assert notes[0]["params"]["error"]["code"] == -32011 and notes[1]["params"]["finish_reason"] == "error"

        async def after(sid: str) -> None:
            if sid in running:
                await lost_then_retry(sid)
            message = f"{sid[-6:]} m2"
            replica, got = await turn(base, sid, message)
            assert replica == "r1", "every session goes on on the survivor"
            history[sid].append(message)
            assert got["final_text"]["final_text"] == "heard: " + " | ".join(history[sid])

        async def everyone() -> None:
            await asyncio.gather(*(after(sid) for sid in homes))
        asyncio.run(asyncio.wait_for(everyone(), 180))
        ready = httpx.get(f"http://{base}/ready", timeout=10)
        assert ready.status_code == 200 and ready.headers["X-Inference-Replica"] == "r1"
