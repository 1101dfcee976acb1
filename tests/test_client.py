"""The Python client (``inference_client/``) against the real server with the scripted model: events, tool
handlers, manual tool results, cancel, errors, reconnect, concurrency, auth, and the terminal chat run as a
subprocess (stdin lines in, streamed answer out, Ctrl-C)."""
from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from typing import Literal, Optional

import pytest

from conftest import REPO_ROOT
from inference_client import (ApiError, Client, ClientClosed, End, Error, FinalText, RpcError, TextChunk, Tool,
                              ToolCalls)
from shared import Settings
from support import running_server, scripted_loader

TIME_TOOL = {"name": "get_time", "description": "Local time", "parameters": {"type": "object", "properties": {}}}


def tool_call(name: str, **arguments: object) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def respond(prompt: str) -> str:
    """The scripted model, keyed on the last user turn; it echoes the tool responses it is given."""
    last = prompt.rsplit("<|im_start|>user\n", 1)[-1].split("<|im_end|>")[0]
    if "<tool_response>" in last:
        return "Tool said: " + " | ".join(part.split("</tool_response>")[0].strip()
                                          for part in last.split("<tool_response>")[1:])
    if "weather and time" in last:
        return "Checking.\n" + tool_call("get_weather", location="Oslo") + "\n" + tool_call("get_time")
    if "weather" in last:
        return tool_call("get_weather", location="London")
    if "population" in last:
        return tool_call("get_population", city="Paris")
    if "stock" in last:
        return tool_call("get_stock", symbol="ACME")
    if "what time" in last:
        return tool_call("get_time")
    if "long story" in last:
        return "once upon a time " * 150
    if "repeat " in last:
        return (last.split("repeat ", 1)[1].split()[0] + " ") * 60
    return "You said: " + last[:40]


def get_weather(location: str, unit: str = "celsius") -> dict:
    """Current weather for a city.

    (A stand-in: always 15 degrees.)"""
    get_weather.thread = threading.current_thread()
    return {"location": location, "temperature": "15°C" if unit == "celsius" else "59°F"}


@pytest.fixture(scope="module")
def settings(tiny_model_dir, tmp_path_factory) -> Settings:
    return Settings(model_id=str(tiny_model_dir), log_file=str(tmp_path_factory.mktemp("log") / "server.log"),
                    kv_block_size=16, max_context=2048, max_batch=8, prefill_chunk=64)


@pytest.fixture(scope="module")
def server(settings):
    holder: dict = {}
    with running_server(settings, scripted_loader(respond, step_delay=0.002, holder=holder)) as app:
        app.model = holder["model"]
        app.url = f"http://{app.base}"
        yield app


def run(coro, timeout: float = 30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def collect(gen) -> list:
    return [event async for event in gen]


# ---- tools from functions -------------------------------------------------------------------------------------
def test_tool_schema_from_a_function_signature():
    def search(query: str, limit: int = 10, ratio: float = 0.5, exact: bool = False, tags: list[str] | None = None,
               extra: dict | None = None, mode: Literal["fast", "slow"] = "fast",
               page: Optional[int] = None,  # noqa: UP045 (the old spelling must work too)
               anything=None, *args, **kwargs) -> list:
        """Search the index.

        More words that are not the description."""

    tool = Tool.from_function(search)
    assert tool.definition() == {"name": "search", "description": "Search the index.", "parameters": {
        "type": "object", "required": ["query"], "properties": {
            "query": {"type": "string"}, "limit": {"type": "integer"}, "ratio": {"type": "number"},
            "exact": {"type": "boolean"}, "tags": {"type": "array", "items": {"type": "string"}},
            "extra": {"type": "object"}, "mode": {"enum": ["fast", "slow"]}, "page": {"type": "integer"},
            "anything": {}}}}
    assert tool.handler is search
    openai_shaped = Tool.from_dict({"type": "function", "function": TIME_TOOL})
    assert openai_shaped.definition() == TIME_TOOL and openai_shaped.handler is None


# ---- streaming and tools ---------------------------------------------------------------------------------------
def test_streaming_text_and_final_text(server):
    async def go():
        async with Client(server.url, timeout=10) as client:
            session = await client.create_session()
            gen = session.generate("hello there", max_new_tokens=50)
            events = await collect(gen)
            assert await collect(gen) == []  # iteration stopped after End
            assert await session.ask("and again") == "You said: and again"
            return gen, events
    gen, events = run(go())
    chunks = [e.text for e in events if isinstance(e, TextChunk)]
    assert len(chunks) > 1 and isinstance(events[-2], FinalText) and isinstance(events[-1], End)
    assert "".join(chunks) == events[-2].text == gen.final_text == gen.text == "You said: hello there"
    end = events[-1]
    assert end.finish_reason == gen.finish_reason == "stop"
    assert end.usage["total_tokens"] == end.usage["prompt_tokens"] + end.usage["completion_tokens"] > 0
    assert gen.task_id.startswith("task-")


def test_python_handler_answers_a_tool_call_and_generation_continues(server):
    async def go():
        async with Client(server.url, timeout=10) as client:
            session = await client.create_session(tools=[get_weather])
            return await collect(session.generate("What is the weather in London?", max_new_tokens=100))
    events = run(go())
    [calls] = [e for e in events if isinstance(e, ToolCalls)]
    [call] = calls.calls
    assert (call.tool, call.parameters, call.answered, call.error) == \
        ("get_weather", {"location": "London"}, True, None)
    assert call.result == {"location": "London", "temperature": "15°C"} and not calls.pending
    assert get_weather.thread is not threading.main_thread()  # a sync handler runs in a worker thread
    assert events[-2] == FinalText('Tool said: {"location": "London", "temperature": "15°C"}')
    assert events[-1].finish_reason == "stop"
    assert '"name": "get_weather"' in server.model.prompts[-1]  # the derived definition reached the template


def test_async_handler_given_as_a_mapping(server):
    async def population(city: str) -> int:
        await asyncio.sleep(0.01)
        return {"Paris": 2_100_000}[city]

    async def go():
        async with Client(server.url, timeout=10) as client:
            session = await client.create_session(tools={"get_population": population})
            return await session.ask("What is the population of Paris?", max_new_tokens=100)
    assert run(go()) == "Tool said: 2100000"


def test_handler_that_raises_sends_is_error_and_the_model_sees_it(server):
    def get_stock(symbol: str) -> float:
        raise RuntimeError(f"market closed for {symbol}")

    async def go():
        async with Client(server.url, timeout=10) as client:
            session = await client.create_session(tools=[get_stock])
            return await collect(session.generate("stock price of ACME?", max_new_tokens=100))
    events = run(go())
    [call] = next(e for e in events if isinstance(e, ToolCalls)).calls
    assert call.answered and call.result is None and call.error == "RuntimeError: market closed for ACME"
    assert events[-2] == FinalText('Tool said: {"error": "RuntimeError: market closed for ACME"}')


def test_call_without_handler_surfaces_and_is_answered_by_hand(server):
    async def go():
        async with Client(server.url, timeout=10) as client:
            session = await client.create_session(tools=[get_weather, TIME_TOOL])
            gen = session.generate("weather and time in Oslo", max_new_tokens=100)
            events = []
            async for event in gen:
                events.append(event)
                if isinstance(event, ToolCalls):
                    assert [c.tool for c in event.pending] == ["get_time"]
                    assert await session.tool_result(event.task_id, [event.pending[0].reply("12:00")]) == \
                        {"status": "received"}
            return gen, events
    gen, events = run(go())
    [calls] = [e for e in events if isinstance(e, ToolCalls)]
    assert [(c.tool, c.answered) for c in calls.calls] == [("get_weather", True), ("get_time", False)]
    assert gen.final_text == 'Checking.\n\nTool said: {"location": "Oslo", "temperature": "15°C"} | 12:00'


def test_handler_registered_with_the_decorator_after_creation(server):
    async def go():
        async with Client(server.url, timeout=10) as client:
            session = await client.create_session()

            @session.tool
            def get_weather(location: str) -> str:
                """Weather, in words."""
                return f"sunny in {location}"

            return await session.ask("weather in London?", max_new_tokens=100)
    assert run(go()) == "Tool said: sunny in London"
    assert "Weather, in words." in server.model.prompts[-2]  # sent as this request's tools


# ---- cancel, errors, reconnect, concurrency ----------------------------------------------------------------------
def test_cancel_mid_stream(server):
    async def go():
        async with Client(server.url, timeout=10) as client:
            session = await client.create_session()
            events = []
            async for event in session.generate("tell me a long story", max_new_tokens=1000):
                events.append(event)
                if len(events) == 3:
                    assert (await session.cancel())["status"] == "cancelled"
            assert await session.ask("hi again", max_new_tokens=30) == "You said: hi again"
            return events
    events = run(go())
    assert events[-1].finish_reason == "cancelled" and 0 < events[-1].usage["completion_tokens"] < 300
    assert not any(isinstance(e, FinalText) for e in events)


def test_rpc_errors_are_raised_and_the_session_still_works(server):
    async def go():
        async with Client(server.url, timeout=10) as client:
            session = await client.create_session()
            with pytest.raises(RpcError) as bad:
                await collect(session.generate("x", max_new_tokens=0))
            with pytest.raises(RpcError) as nothing:
                await session.cancel()
            with pytest.raises(RpcError) as unknown:
                await session.tool_result("task-nope", [{"tool_name": "t"}])
            assert await session.ask("still fine?", max_new_tokens=30) == "You said: still fine?"
            return bad.value, nothing.value, unknown.value
    bad, nothing, unknown = run(go())
    assert bad.code == -32602 and bad.data and "max_new_tokens" in json.dumps(bad.data)
    assert (nothing.code, unknown.code) == (-32002, -32003)


def test_failed_generation_is_an_error_event_and_ask_raises(server):
    async def go():
        async with Client(server.url, timeout=10) as client:
            session = await client.create_session()
            server.model.fail_next.set()
            with pytest.raises(RpcError) as failed:
                await session.ask("this will fail", max_new_tokens=20)
            server.model.fail_next.set()
            events = await collect(session.generate("and this", max_new_tokens=20))
            return failed.value, events
    failed, events = run(go())
    assert failed.code == -32000 and "out of memory" in failed.message
    assert isinstance(events[-2], Error) and events[-2].code == -32000 and events[-1].finish_reason == "error"


def test_attach_keeps_the_conversation(server):
    async def go():
        async with Client(server.url, timeout=10) as client:
            first = await client.create_session()
            assert await first.ask("my name is Ada", max_new_tokens=40) == "You said: my name is Ada"
            with pytest.raises(ApiError) as busy:  # one socket per session
                await client.attach(first.session_id)
            await first.close()
            assert first.closed
            again = await client.attach(first.session_id)
            assert await again.ask("what is my name?", max_new_tokens=40) == "You said: what is my name?"
            with pytest.raises(ApiError) as unknown:
                await client.attach("no-such-session")
            return busy.value, unknown.value
    busy, unknown = run(go())
    assert (busy.status, unknown.status) == (409, 404) and unknown.message == "no such session"
    assert "my name is Ada" in server.model.prompts[-1] and "what is my name?" in server.model.prompts[-1]


def test_two_sessions_at_once(server):
    order: list[str] = []

    async def one(client: Client, word: str) -> str:
        session = await client.create_session()
        gen = session.generate(f"repeat {word}", max_new_tokens=200)
        async for event in gen:
            if isinstance(event, TextChunk):
                order.append(word)
        return gen.final_text

    async def go():
        async with Client(server.url, timeout=10) as client:
            return await asyncio.gather(one(client, "alpha"), one(client, "beta"))
    assert run(go()) == ["alpha " * 60, "beta " * 60]
    # batched: each stream's chunks arrive while the other's are still coming
    assert order.index("beta") < len(order) - order[::-1].index("alpha") - 1
    assert order.index("alpha") < len(order) - order[::-1].index("beta") - 1


def test_a_socket_closed_by_the_server_ends_every_wait(server):
    """Without reconnecting (reconnect_s=0), a closed socket ends every wait."""
    rt = server.state.runtime

    async def go():
        async with Client(server.url, timeout=10, reconnect_s=0) as client:
            session = await client.create_session()
            gen = session.generate("tell me a long story", max_new_tokens=1000)
            await gen.__anext__()
            conn = rt.sessions.get(session.session_id).connection
            server.server.loop.call_soon_threadsafe(conn.close, 1001, "going away")
            with pytest.raises(ClientClosed):
                async for _ in gen:
                    pass
            with pytest.raises(ClientClosed):
                await session.cancel()
            assert session.closed
    run(go(), timeout=15)


def test_a_tool_call_across_a_dropped_socket_is_answered_once(server):
    """The socket drops while a handler runs: its tool_result goes out on the resumed socket (a send that meets the
    closed one is kept for it), the server asks for the still-unanswered calls again (same call_ids), and the
    client answers from the reply it already made: the handler runs once and the answer completes."""
    rt = server.state.runtime
    ran: list[str] = []

    async def go():
        async with Client(server.url, timeout=10) as client:
            session = await client.create_session()

            @session.tool
            async def get_weather(location: str) -> dict:
                ran.append(location)
                conn = rt.sessions.get(session.session_id).connection
                server.server.loop.call_soon_threadsafe(conn.close, 1001, "going away")
                await session._link._ws.wait_closed()
                return {"location": location, "temperature": "15°C"}

            gen = session.generate("what is the weather?")
            events = [event async for event in gen]
            calls = [e for e in events if isinstance(e, ToolCalls)]
            assert isinstance(events[-1], End) and gen.finish_reason == "stop", events
            assert ran == ["London"] and session.reconnects == 1 and len(calls) == 2  # asked twice, run once
            assert calls and {c.call_id for e in calls for c in e.calls} == {calls[0].calls[0].call_id}
            assert all(c.answered and c.result["temperature"] == "15°C" for e in calls for c in e.calls)
            assert gen.final_text == 'Tool said: {"location": "London", "temperature": "15°C"}'
    run(go(), timeout=30)


def test_api_key_on_http_and_websocket(settings):
    with running_server(replace(settings, api_key="s3cret"), scripted_loader(respond)) as app:
        url = f"http://{app.base}"

        async def go():
            with pytest.raises(ApiError) as no_key:
                await Client(url, timeout=10).create_session()
            async with Client(url, api_key="s3cret", timeout=10) as client:
                session = await client.create_session()
                assert await session.ask("hello", max_new_tokens=30) == "You said: hello"
                await session.close()
                with pytest.raises(ApiError) as wrong_key:
                    await Client(url, api_key="wrong", timeout=10).attach(session.session_id)
                again = await client.attach(session.session_id)
                assert await again.ask("bye", max_new_tokens=30) == "You said: bye"
            return no_key.value, wrong_key.value
        no_key, wrong_key = run(go())
    assert (no_key.status, wrong_key.status) == (401, 401)
    assert "API key" in no_key.message and "credentials" in wrong_key.message


# ---- the terminal chat --------------------------------------------------------------------------------------------
def test_cli_streams_answers_and_answers_tool_calls(server, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{**Tool.from_function(get_weather).definition(), "result": {"sky": "blue"}},
                                 TIME_TOOL]))
    stdin = "What is the weather in London?\nwhat time is it\n\"12:00\"\n\nhello\n"
    proc = subprocess.run([sys.executable, "-m", "inference_client", "--url", server.url, "--tools", str(tools),
                           "--max-new-tokens", "100"], input=stdin, capture_output=True, text=True, timeout=30,
                          cwd=REPO_ROOT, check=False)
    assert proc.returncode == 0, proc.stderr
    banner, out = proc.stdout.split("\n", 1)
    assert re.fullmatch(rf"Connected to {re.escape(server.url)}: model model \(cpu, (float32|bfloat16), the CPU "
                        r"fallback\), session [0-9a-f-]{36}, tools: get_weather, get_time\. "
                        r"Ctrl-C cancels an answer; Ctrl-D or Ctrl-C at the prompt quits\.", banner), banner
    assert out == ('> [tool] get_weather({"location": "London"}) -> {"sky": "blue"}\nTool said: {"sky": "blue"}\n'
                   "> [tool] get_time({})\nresult of get_time (JSON)> Tool said: 12:00\n"
                   "> > You said: hello\n> \n")


def test_cli_ctrl_c_cancels_the_answer_and_returns_to_the_prompt(server):
    async def read_until(proc, text: str, seen: list[str]) -> None:
        while text not in "".join(seen):
            seen.append((await asyncio.wait_for(proc.stdout.read(4096), 10)).decode())

    async def go():
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "inference_client", "--url", server.url, cwd=REPO_ROOT,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            seen: list[str] = []
            await read_until(proc, "> ", seen)
            proc.stdin.write(b"tell me a long story\n")
            await read_until(proc, "once upon a time", seen)
            proc.send_signal(signal.SIGINT)
            await read_until(proc, "[cancelled]\n> ", seen)
            proc.stdin.write(b"hello\n")
            await read_until(proc, "You said: hello\n> ", seen)
            proc.send_signal(signal.SIGINT)  # at the prompt: exits
            assert await asyncio.wait_for(proc.wait(), 10) == 0, await proc.stderr.read()
            return "".join(seen)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    out = run(go())
    assert out.index("once upon a time") < out.index("[cancelled]") < out.index("You said: hello")


def test_banner_names_the_model_and_strips_terminal_escapes():
    from inference_client.chat import banner

    class FakeSession:
        session_id = "s-1"

    line = banner("http://h:1", {"id": "evil\x1b[2J\x07name", "device": "cuda", "quantization": "nf4"},
                  FakeSession(), [])  # type: ignore[arg-type]
    assert line == ("Connected to http://h:1: model evil[2Jname (cuda, nf4), session s-1, tools: none. "
                    "Ctrl-C cancels an answer; Ctrl-D or Ctrl-C at the prompt quits.\n")
    assert banner("http://h:1", {}, FakeSession(), []).startswith("Connected to http://h:1: model unknown model, ")
