"""Durable sessions, measured: the session store's write latency per turn (SQLite and Redis) and the resume
latency of a dropped stream (reconnect with ?resume_from= until the first missed notification arrives).

    python scripts/bench_sessions.py [--sessions 20] [--turns 10] [--redis redis://127.0.0.1:6379/0] [--out f.json]

Without --redis a redis-server of its own is started on a free port (Debian's redis-server). A turn's write is
what the server writes after a completed model call: the user message and the assistant's answer appended to
the stored conversation, and the session's meta. Latency is from the write being queued (on the event loop)
to its commit (on the store's worker thread), so it includes any queueing behind other sessions' writes.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from session_store import SessionRecord, SessionStore  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(x: float) -> float:
    return round(x * 1000, 3)


async def store_writes(url: str, sessions: int, turns: int, answer_chars: int) -> dict[str, Any]:
    """``sessions`` conversations of ``turns`` turns each, their writes interleaved as concurrent tasks' are."""
    store = SessionStore.open(url, max_bytes=64 * 2**20, idle_s=3600)
    records = [SessionRecord(session_id=f"bench-{os.urandom(8).hex()}", owner="bench", quota="bench",
                             tools=[{"name": "get_weather", "parameters": {"type": "object"}}])
               for _ in range(sessions)]
    for record in records:
        await store.save(record, 0)
    store.write_seconds.clear()
    started = time.perf_counter()
    for turn in range(turns):
        pending = []
        for record in records:
            start = len(record.messages)
            record.messages = [*record.messages, {"role": "user", "content": f"question {turn} " * 20},
                               {"role": "assistant", "content": "x" * answer_chars}]
            record.version += 1
            pending.append(store.save(SessionRecord(**record.__dict__), start))
        assert all(result is None for result in await asyncio.gather(*pending))
    elapsed = time.perf_counter() - started
    latencies = list(store.write_seconds)
    for record in records:
        await store.delete(record.session_id)
    await store.close()
    return {"writes": len(latencies), "p50_ms": ms(statistics.median(latencies)), "p99_ms": ms(pct(latencies, 0.99)),
            "mean_ms": ms(statistics.fmean(latencies)), "writes_per_s": round(len(latencies) / elapsed, 1)}


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/bin"]))
    if binary is None:
        raise SystemExit("redis-server is not installed: bash scripts/install_services.sh, or pass --redis URL")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("redis-server did not start") from None
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def resume_latency(trials: int, tmp: Path) -> dict[str, Any]:
    """The tiny model (CPU) streaming; its socket is dropped (no close frame) mid-answer and, 100 ms later, a new
    one opened with ?resume_from=: time from starting the new handshake to the first missed notification, and
    to ``resumed`` (every missed one sent)."""
    import threading

    import uvicorn

    sys.path.insert(0, str(REPO / "scripts"))
    from make_tiny_model import build_tiny_model
    from server_starlette import UVICORN_WS, create_app
    from shared import Settings

    model_dir = build_tiny_model(tmp / "tiny")
    settings = Settings(model_id=str(model_dir), host="127.0.0.1", log_file=os.devnull, log_level="ERROR",
                        max_context=4096,
                        kv_block_size=16, session_store=f"sqlite:///{tmp}/resume.db")
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_config=None,
                                           lifespan="on", **UVICORN_WS))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base = f"127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"

    async def one() -> tuple[float, float]:
        import urllib.request

        from websockets.asyncio.client import connect

        request = urllib.request.Request(f"http://{base}/create_session", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        sid = json.loads(await asyncio.to_thread(lambda: urllib.request.urlopen(request).read()))["session_id"]
        ws = await connect(f"ws://{base}/ws/{sid}")
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "generate", "params": {
            "message": "hello", "max_new_tokens": 400, "ignore_eos": True}}))
        seq = 0
        while seq < 20:  # some of the answer, then the link dies
            msg = json.loads(await ws.recv())
            seq = msg.get("params", {}).get("seq", seq)
        ws.transport.abort()
        await asyncio.sleep(0.1)  # the answer goes on meanwhile: there is something to replay
        started = time.perf_counter()
        ws = await connect(f"ws://{base}/ws/{sid}?resume_from={seq}")
        first = resumed = None
        while resumed is None:
            msg = json.loads(await ws.recv())
            now = time.perf_counter()
            if msg.get("method") == "resumed":
                resumed = now - started
            elif first is None and msg.get("params", {}).get("seq", 0) > seq:
                first = now - started
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": 2, "method": "cancel", "params": {}}))
        while json.loads(await ws.recv()).get("method") != "end":
            pass
        await ws.close()
        if first is None:
            raise RuntimeError("nothing was replayed: the answer did not go on while the socket was away")
        return first, resumed

    try:
        results = [asyncio.run(one()) for _ in range(trials)]
    finally:
        server.should_exit = True
        thread.join(60)
    firsts, dones = [r[0] for r in results], [r[1] for r in results]
    return {"trials": trials, "p50_ms": ms(statistics.median(firsts)), "p99_ms": ms(pct(firsts, 0.99)),
            "resumed_p50_ms": ms(statistics.median(dones))}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--answer-chars", type=int, default=2000, help="size of each turn's answer")
    parser.add_argument("--redis", default=None, help="a Redis URL (default: start a redis-server)")
    parser.add_argument("--resume", type=int, default=0, help="also measure N resumes on a scripted server")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out: dict[str, Any] = {"cpu_count": os.cpu_count(), "sessions": args.sessions, "turns": args.turns}
    with tempfile.TemporaryDirectory() as tmp:
        out["sqlite"] = asyncio.run(store_writes(f"sqlite:///{tmp}/bench.db", args.sessions, args.turns,
                                                 args.answer_chars))
        proc, url = (None, args.redis) if args.redis else start_redis(Path(tmp))
        try:
            out["redis"] = asyncio.run(store_writes(url, args.sessions, args.turns, args.answer_chars))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait()
        if args.resume:
            out["resume"] = resume_latency(args.resume, Path(tmp))
    line = (f"store write per turn: sqlite p50 {out['sqlite']['p50_ms']} ms p99 {out['sqlite']['p99_ms']} ms; "
            f"redis p50 {out['redis']['p50_ms']} ms p99 {out['redis']['p99_ms']} ms")
    if "resume" in out:
        line += f"; resume p50 {out['resume']['p50_ms']} ms p99 {out['resume']['p99_ms']} ms"
    print(line)
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
