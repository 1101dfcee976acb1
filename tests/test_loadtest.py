"""scripts/loadtest.py against the real server (scripted model double that calls get_weather), smaller N."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import sys

from conftest import REPO_ROOT
from shared import Settings
from support import running_server, scripted_loader

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"location": "London"}}\n</tool_call>'


def respond(prompt: str) -> str:
    last = prompt.rsplit("<|im_start|>user\n", 1)[-1]
    if "<tool_response>" in last:
        return "It is 15°C there. " * 3
    return CALL if "weather" in last else "Here is a one-line summary of both cities, as asked."


def load():
    if "loadtest" not in sys.modules:
        spec = importlib.util.spec_from_file_location("loadtest", REPO_ROOT / "scripts" / "loadtest.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["loadtest"] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return sys.modules["loadtest"]


def test_loadtest_against_the_tiny_server(tiny_model_dir, tmp_path):
    settings = Settings(model_id=str(tiny_model_dir), log_file=str(tmp_path / "log"), log_level="WARNING",
                        kv_block_size=16, max_context=4096, max_batch=16, rate_limit_per_min=0)
    with running_server(settings, scripted_loader(respond, step_delay=0.001)) as app:
        report = asyncio.run(load().run(f"http://{app.base}", sessions=24, turns=3, max_new=64))
    assert report["ok"], report
    assert report["tasks"] == 72 and report["tool_calls"] == 24  # the first turn of each session asks the weather
    assert report["finish_reasons"] == {"stop": 72} and report["ttft_p99_ms"] >= report["ttft_p50_ms"]
    assert not app.state.runtime.sessions.active_tasks


class FakeSocket:
    """Plays back server messages (given as dicts) and records what the client sends."""

    def __init__(self, messages: list[dict]) -> None:
        self.messages, self.sent = [json.dumps(m) for m in messages], []

    async def send(self, text: str) -> None:
        self.sent.append(text)

    async def recv(self) -> str:
        return self.messages.pop(0)


def note(method: str, **params) -> dict:
    return {"jsonrpc": "2.0", "method": method, "params": {"session_id": "s", "task_id": "t", **params}}


def test_the_checker_catches_broken_streams():
    module = load()
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3, "cached_tokens": 0}
    cases = {
        "chunks do not concatenate": [note("text_chunk", chunk="a"), note("final_text", final_text="ab"),
                                      note("end", finish_reason="stop", usage=usage)],
        "notification for session": [{**note("text_chunk", chunk="a"), "params": {
            "session_id": "other", "task_id": "t", "chunk": "a"}}, note("final_text", final_text="a"),
            note("end", finish_reason="stop", usage=usage)],
        "unknown task": [{"jsonrpc": "2.0", "method": "text_chunk", "params": {
            "session_id": "s", "task_id": "zzz", "chunk": "a"}}, note("final_text", final_text=""),
            note("end", finish_reason="stop", usage=usage)],
    }
    for expected, messages in cases.items():
        stats = module.Stats()
        ws = FakeSocket([{"jsonrpc": "2.0", "result": {"status": "processing", "task_id": "t"}, "id": 1}, *messages])
        asyncio.run(module.one_task(ws, "s", "hi", 8, stats, 1))
        assert any(expected in v for v in stats.violations), (expected, stats.violations)
    good = module.Stats()
    ws = FakeSocket([{"jsonrpc": "2.0", "result": {"status": "processing", "task_id": "t"}, "id": 1},
                     note("text_chunk", chunk="a"), note("final_text", final_text="a"),
                     note("end", finish_reason="stop", usage=usage)])
    asyncio.run(module.one_task(ws, "s", "hi", 8, good, 1))
    assert not good.violations and good.tasks == 1
