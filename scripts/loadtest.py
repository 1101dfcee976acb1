"""Load test: N concurrent sessions over real WebSockets, each a multi-turn conversation with a tool call.

    python scripts/loadtest.py --url http://localhost:8000 [--sessions 100] [--turns 2] [--api-key KEY]

Every session registers ``get_weather``, asks about the weather (answering any tool call with a stand-in
result), then asks follow-ups. It checks the protocol invariants as it goes: every task gets exactly one
``end`` (last), the ``text_chunk``s of a completed task concatenate to its ``final_text``, every
notification carries this session's id and a task id it started, nothing arrives for another session.
Prints one JSON object (TTFT p50/p99, tasks, tokens, throughput, violations); exits 1 on any violation.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import connect

TOOL = {"name": "get_weather", "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}
QUESTIONS = ["What is the weather like in London?", "And in Paris?", "Thanks! Summarise both in one line."]


@dataclass
class Stats:
    ttfts: list[float] = field(default_factory=list)
    tasks: int = 0
    tool_calls: int = 0
    completion_tokens: int = 0
    finish: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def http_json(url: str, body: dict[str, Any], api_key: str | None) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


async def one_task(ws: Any, sid: str, message: str, max_new: int, stats: Stats, n: int) -> None:
    """One generate, answered to its end; checks the invariants of that task's notifications."""
    sent = time.perf_counter()
    await ws.send(json.dumps({"jsonrpc": "2.0", "id": n, "method": "generate",
                              "params": {"message": message, "max_new_tokens": max_new}}))
    task_id, chunks, first, final, ends = None, [], None, None, 0
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 120))
        if "id" in msg and "method" not in msg:  # a response
            if "error" in msg:
                stats.errors.append(f"generate: {msg['error']}")
                return
            if msg["id"] == n:
                task_id = msg["result"]["task_id"]
            continue
        params = msg.get("params", {})
        if params.get("session_id") != sid:
            stats.violations.append(f"{sid}: notification for session {params.get('session_id')}")
        if task_id is None or params.get("task_id") != task_id:
            stats.violations.append(f"{sid}: notification for unknown task {params.get('task_id')}")
            continue
        if ends:
            stats.violations.append(f"{sid}: {msg['method']} after end")
        method = msg["method"]
        if method == "text_chunk":
            first = first or time.perf_counter()
            chunks.append(params["chunk"])
        elif method == "function_call_request":
            first = first or time.perf_counter()
            stats.tool_calls += len(params["tool_calls"])
            results = [{"tool_name": c["tool"], "call_id": c["call_id"], "isError": False,
                        "result": {"location": c["parameters"].get("location", "?"), "temperature": "15°C"}}
                       for c in params["tool_calls"]]
            await ws.send(json.dumps({"jsonrpc": "2.0", "id": f"tr-{n}", "method": "tool_result",
                                      "params": {"task_id": task_id, "results": results}}))
        elif method == "final_text":
            final = params["final_text"]
        elif method == "end":
            ends += 1
            reason = params["finish_reason"]
            stats.finish[reason] = stats.finish.get(reason, 0) + 1
            stats.completion_tokens += params["usage"]["completion_tokens"]
            if reason in ("stop", "length") and final != "".join(chunks):
                stats.violations.append(f"{sid}: chunks do not concatenate to final_text")
            break
    stats.tasks += 1
    if first is not None:
        stats.ttfts.append(first - sent)


async def one_session(base: str, turns: int, max_new: int, stats: Stats, api_key: str | None) -> None:
    try:
        sid = http_json(f"{base}/create_session", {"tools": [TOOL]}, api_key)["session_id"]
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        ws_url = base.replace("http", "ws", 1) + f"/ws/{sid}"
        async with connect(ws_url, additional_headers=headers, max_size=None) as ws:
            for turn in range(turns):
                await one_task(ws, sid, QUESTIONS[turn % len(QUESTIONS)], max_new, stats, turn + 1)
    except Exception as exc:  # counted, not fatal: the report says what went wrong
        stats.errors.append(f"{type(exc).__name__}: {exc}")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))] if values else float("nan")


async def run(base: str, sessions: int, turns: int, max_new: int, api_key: str | None = None) -> dict[str, Any]:
    stats = Stats()
    started = time.perf_counter()
    await asyncio.gather(*(one_session(base, turns, max_new, stats, api_key) for _ in range(sessions)))
    wall = time.perf_counter() - started
    return {"sessions": sessions, "turns": turns, "tasks": stats.tasks, "expected_tasks": sessions * turns,
            "tool_calls": stats.tool_calls, "finish_reasons": stats.finish,
            "ttft_p50_ms": round(pct(stats.ttfts, 50) * 1000, 1), "ttft_p99_ms": round(pct(stats.ttfts, 99) * 1000, 1),
            "completion_tokens": stats.completion_tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(stats.completion_tokens / wall, 1), "violations": stats.violations[:20],
            "errors": stats.errors[:20], "ok": not stats.violations and not stats.errors
            and stats.tasks == sessions * turns}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://localhost:8000")
    p.add_argument("--sessions", type=int, default=100)
    p.add_argument("--turns", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--api-key", default=None)
    args = p.parse_args(argv)
    report = asyncio.run(run(args.url.rstrip("/"), args.sessions, args.turns, args.max_new_tokens, args.api_key))
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
