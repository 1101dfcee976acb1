"""End to end over real sockets: the real app under uvicorn, with the scripted model double (and once
with the real random tiny model). Protocol behaviour, not content."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from shared import Settings
from support import WsClient, create_session, running_server, scripted_loader

WEATHER_TOOL = {"name": "get_weather", "description": "Current weather for a city",
                "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                               "required": ["location"]}}
TIME_TOOL = {"name": "get_time", "description": "Local time", "parameters": {"type": "object", "properties": {}}}
WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"location": "London"}}\n</tool_call>'
TWO_CALLS = ('Checking both.\n<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
ANSWER = "The weather in London is 15°C and cloudy."
BAD_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
ROME_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Rome"}}\n</tool_call>'
STUBBORN_CALL = '<tool_call>\n{"name": "get_wether", "arguments": {"location": "Oslo"}}\n</tool_call>'


def respond(prompt: str) -> str:
    """The scripted model's behaviour, keyed on the last user turn of the rendered prompt."""
    last = prompt.rsplit("<|im_start|>user\n", 1)[-1].split("<|im_end|>")[0]
    if "no tool named 'get_wether'" in last:  # a model that does not learn
        return STUBBORN_CALL
    if "Call the tool again" in last:  # the server's correction of BAD_CALL
        return "Sorry.\n" + ROME_CALL
    if "<tool_response>" in last:
        return ANSWER if "15°C" in last else "Tool results: " + " | ".join(
            part.split("</tool_response>")[0].strip() for part in last.split("<tool_response>")[1:])
    if "weather in Rome" in last:
        return "Let me check.\n" + BAD_CALL
    if "stubborn" in last:
        return STUBBORN_CALL
    if "weather" in last:
        return WEATHER_CALL
    if "two cities" in last:
        return TWO_CALLS
    if "long story" in last:
        return "once upon a time " * 150
    if "broken call" in last:
        return "<tool_call>\n{not json}\n</tool_call> done"
    if "stop here" in last:
        return "alpha beta STOP gamma"
    if "unicode" in last:
        return "Café 日本語 😀 naïve ünïcödé"
    return "You said: " + last[:30]


@pytest.fixture(scope="module")
def settings(tiny_model_dir, tmp_path_factory) -> Settings:
    # The script writes invalid tool calls on purpose: these tests exercise the unconstrained path (validation and
    # correction rounds). Constrained decoding has its own tests (test_structured_outputs.py).
    return Settings(model_id=str(tiny_model_dir), log_file=str(tmp_path_factory.mktemp("log") / "server.log"),
                    kv_block_size=16, max_context=2048, max_batch=8, prefill_chunk=64, structured_outputs="off")


@pytest.fixture(scope="module")
def server(settings):
    holder: dict = {}
    with running_server(settings, scripted_loader(respond, step_delay=0.002, holder=holder)) as app:
        app.model = holder["model"]
        yield app


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def generate(client: WsClient, **params) -> str:
    response = await client.call("generate", params)
    assert response["result"]["status"] == "processing", response
    return response["result"]["task_id"]


def assert_no_markup(client: WsClient, task_id: str) -> None:
    for chunk in (n["params"]["chunk"] for n in client.of_task(task_id, "text_chunk")):
        assert "<tool_call>" not in chunk and "</tool_call>" not in chunk and "<tool" not in chunk


def assert_one_end(client: WsClient, task_id: str) -> dict:
    ends = client.of_task(task_id, "end")
    assert len(ends) == 1, ends
    return ends[0]["params"]


def wait_idle(app, timeout: float = 10) -> None:
    engine = app.state.runtime.engine.engine
    deadline = time.monotonic() + timeout
    while engine.stats()["running"] or engine.stats()["waiting"]:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.01)


# ---- HTTP ----------------------------------------------------------------------------------------------------
def test_create_session_with_and_without_tools(server):
    for body in (None, {}, {"tools": []}, {"tools": [WEATHER_TOOL, TIME_TOOL]},
                 {"tools": [{"type": "function", "function": WEATHER_TOOL}]}):
        r = httpx.post(f"http://{server.base}/create_session", json=body)
        assert r.status_code == 200, r.text
        assert len(r.json()["session_id"]) >= 32


@pytest.mark.parametrize("body, status", [
    ("{not json", 400),
    ("[1, 2]", 422),
    (json.dumps({"tools": [WEATHER_TOOL, WEATHER_TOOL]}), 422),
    (json.dumps({"tools": [{"name": "bad name!", "parameters": {"type": "object"}}]}), 422),
    (json.dumps({"tools": [{"name": "t", "parameters": {"type": "array"}}]}), 422),
    (json.dumps({"tools": [{"name": "t", "parameters": {"type": "object", "properties": 5}}]}), 422),
    (json.dumps({"tools": "nope"}), 422),
])
def test_create_session_rejects_bad_input_with_4xx_json(server, body, status):
    r = httpx.post(f"http://{server.base}/create_session", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]


def test_unknown_session_is_refused(server):
    async def go():
        with pytest.raises(InvalidStatus) as info:
            async with WsClient.connect(server, "no-such-session"):
                pass
        assert info.value.response.status_code == 404
    run(go())


def test_second_socket_to_an_attached_session_is_refused_and_reconnect_works(server):
    sid = create_session(server)

    async def go():
        async with WsClient.connect(server, sid) as client:
            with pytest.raises(InvalidStatus):
                async with WsClient.connect(server, sid):
                    pass
            task = await generate(client, message="hello there", max_new_tokens=40)
            await client.until("end", task_id=task)
        async with WsClient.connect(server, sid) as client:  # the conversation survives a reconnect
            task = await generate(client, message="again", max_new_tokens=40)
            await client.until("end", task_id=task)
    run(go())
    assert "hello there" in server.model.prompts[-1] and "again" in server.model.prompts[-1]


# ---- the seed's weather flow ----------------------------------------------------------------------------------
def test_weather_tool_flow_end_to_end(server):
    sid = create_session(server, [WEATHER_TOOL])

    async def go():
        async with WsClient.connect(server, sid) as client:
            task = await generate(client, message="What is the weather like in London?", max_new_tokens=200)
            call = await client.until("function_call_request", task_id=task)
            assert call["params"]["session_id"] == sid
            [tool_call] = call["params"]["tool_calls"]
            assert tool_call["tool"] == "get_weather" and tool_call["parameters"] == {"location": "London"}
            assert tool_call["call_id"]
            assert not client.of_task(task, "end")
            reply = await client.call("tool_result", {"task_id": task, "results": [{
                "tool_name": "get_weather", "result": {"temperature": "15°C", "condition": "Cloudy"},
                "isError": False}]})
            assert reply["result"] == {"status": "received"}
            final = await client.until("final_text", task_id=task)
            end = await client.until("end", task_id=task)
            assert final["params"]["final_text"] == ANSWER == client.chunks(task)
            assert end["params"]["finish_reason"] == "stop"
            usage = end["params"]["usage"]
            assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
            assert usage["cached_tokens"] > 0  # the continuation after tool_result reused the warm KV cache
            assert_no_markup(client, task)
            order = [n["method"] for n in client.of_task(task)]
            assert order.index("function_call_request") < order.index("text_chunk") < order.index("final_text")
            assert order[-2:] == ["final_text", "end"]
            for note in client.of_task(task):
                assert note["params"]["session_id"] == sid

            # a follow-up message continues the same conversation, served from the warm cache
            task2 = await generate(client, message="thanks", max_new_tokens=50)
            end2 = await client.until("end", task_id=task2)
            assert end2["params"]["usage"]["cached_tokens"] > 0
    run(go())
    prompt = server.model.prompts[-1]
    assert prompt.count('<tool_call>\n{"name": "get_weather"') == 1
    assert "<tool_response>" in prompt and ANSWER in prompt and "thanks" in prompt


def test_several_calls_in_one_request_answered_out_of_order_and_in_parts(server):
    sid = create_session(server, [WEATHER_TOOL, TIME_TOOL])

    async def go():
        async with WsClient.connect(server, sid) as client:
            task = await generate(client, message="the time in two cities", max_new_tokens=200)
            call = await client.until("function_call_request", task_id=task)
            calls = call["params"]["tool_calls"]
            assert [c["tool"] for c in calls] == ["get_weather", "get_time"]
            assert calls[0]["parameters"] == {"location": "Paris"} and calls[1]["parameters"] == {}
            assert len({c["call_id"] for c in calls}) == 2
            assert client.chunks(task) == "Checking both."
            first = await client.call("tool_result", {"task_id": task, "results": [
                {"tool_name": "get_time", "call_id": calls[1]["call_id"], "result": "12:00"}]})
            assert first["result"]["status"] == "received"
            await asyncio.sleep(0.2)
            assert not client.of_task(task, "final_text")  # still waiting for the weather
            await client.call("tool_result", {"task_id": task, "results": [
                {"tool_name": "get_weather", "result": {"sky": "blue"}}]})
            final = await client.until("final_text", task_id=task)
            await client.until("end", task_id=task)
            text = final["params"]["final_text"]
            assert text == client.chunks(task)
            assert text.startswith("Checking both.\n\nTool results: ")  # a paragraph break between model calls
            assert '{"sky": "blue"}' in text and "12:00" in text
            # tool responses are in the order of the calls, not the order of arrival
            assert text.index("sky") < text.index("12:00")
            assert_no_markup(client, task)
    run(go())


def test_invalid_tool_call_is_corrected_by_the_model_before_the_client_sees_it(server):
    sid = create_session(server, [WEATHER_TOOL])

    async def go():
        async with WsClient.connect(server, sid) as client:
            task = await generate(client, message="What is the weather in Rome?", max_new_tokens=200)
            call = await client.until("function_call_request", task_id=task)
            [tool_call] = call["params"]["tool_calls"]
            assert tool_call["tool"] == "get_weather" and tool_call["parameters"] == {"location": "Rome"}
            assert "validation_error" not in tool_call
            assert len(client.of_task(task, "function_call_request")) == 1  # the bad call never reached us
            await client.call("tool_result", {"task_id": task, "results": [
                {"tool_name": "get_weather", "result": {"temperature": "15°C"}}]})
            final = await client.until("final_text", task_id=task)
            assert (await client.until("end", task_id=task))["params"]["finish_reason"] == "stop"
            assert final["params"]["final_text"] == client.chunks(task) == "Let me check.\n\nSorry.\n\n" + ANSWER
            assert_no_markup(client, task)
    run(go())
    prompt = server.model.prompts[-1]
    assert "invalid arguments for get_weather: 'location' is a required property" in prompt


def test_a_call_still_invalid_after_the_retries_reaches_the_client_flagged(server):
    sid = create_session(server, [WEATHER_TOOL])

    async def go():
        async with WsClient.connect(server, sid) as client:
            task = await generate(client, message="be stubborn", max_new_tokens=200)
            call = await client.until("function_call_request", task_id=task)
            [tool_call] = call["params"]["tool_calls"]
            assert tool_call["tool"] == "get_wether"
            assert tool_call["validation_error"] == "there is no tool named 'get_wether' (the tools are: get_weather)"
            await client.call("tool_result", {"task_id": task, "results": [
                {"tool_name": "get_wether", "result": "no such tool", "isError": True}]})
            await client.until("final_text", task_id=task)
            assert (await client.until("end", task_id=task))["params"]["finish_reason"] == "stop"
    run(go())


def test_tool_result_errors_leave_the_task_waiting(server):
    sid = create_session(server, [WEATHER_TOOL])

    async def go():
        async with WsClient.connect(server, sid) as client:
            task = await generate(client, message="weather please")
            call = (await client.until("function_call_request", task_id=task))["params"]["tool_calls"][0]
            bad = [
                ({"task_id": "task-nope", "results": [{"tool_name": "get_weather"}]}, -32003),
                ({"task_id": task, "results": [{"tool_name": "get_time"}]}, -32602),
                ({"task_id": task, "results": [{"tool_name": "get_weather", "call_id": "call-nope"}]}, -32602),
                ({"task_id": task, "results": [{"tool_name": "get_time", "call_id": call["call_id"]}]}, -32602),
                ({"task_id": task, "results": []}, -32602),
                ({"task_id": task}, -32602),
                ({"task_id": task, "results": [{"tool_name": "get_weather"}, {"tool_name": "get_weather"}]}, -32602),
            ]
            for params, code in bad:
                response = await client.call("tool_result", params)
                assert response["error"]["code"] == code, (params, response)
            ok = await client.call("tool_result", {"task_id": task, "results": [{
                "tool_name": "get_weather", "call_id": call["call_id"], "isError": True,
                "error_message": "service down"}]})
            assert ok["result"]["status"] == "received"
            await client.until("end", task_id=task)
            late = await client.call("tool_result", {"task_id": task, "results": [{"tool_name": "get_weather"}]})
            assert late["error"]["code"] == -32003
    run(go())
    assert "service down" in server.model.prompts[-1]


def test_tool_result_while_generating_is_refused(server):
    sid = create_session(server)

    async def go():
        async with WsClient.connect(server, sid) as client:
            task = await generate(client, message="tell me a long story", max_new_tokens=400)
            await client.until("text_chunk", task_id=task)
            response = await client.call("tool_result", {"task_id": task, "results": [{"tool_name": "x"}]})
            assert response["error"]["code"] == -32007
            await client.call("cancel")
            await client.until("end", task_id=task)
    run(go())


# ---- cancel, busy, disconnect -----------------------------------------------------------------------------------
def test_cancel_during_generation(server):
    sid = create_session(server)

    async def go():
        async with WsClient.connect(server, sid) as client:
            task = await generate(client, message="tell me a long story", max_new_tokens=1000)
            await client.until("text_chunk", task_id=task)
            response = await client.call("cancel")
            assert response["result"]["status"] == "cancelled"
            end = await client.until("end", task_id=task)
            assert end["params"]["finish_reason"] == "cancelled"
            assert not client.of_task(task, "final_text")
            assert 0 < end["params"]["usage"]["completion_tokens"] < 300  # what was generated until the cancel
            nothing = await client.call("cancel")
            assert nothing["error"]["code"] == -32002
            # the session is usable again, and the conversation kept the user turn
            task2 = await generate(client, message="hi again", max_new_tokens=30)
            assert (await client.until("end", task_id=task2))["params"]["finish_reason"] == "stop"
    run(go())
    wait_idle(server)


def test_cancel_while_awaiting_tool_results(server):
    sid = create_session(server, [WEATHER_TOOL])

    async def go():
        async with WsClient.connect(server, sid) as client:
            task = await generate(client, message="weather in London")
            await client.until("function_call_request", task_id=task)
            wrong = await client.call("cancel", {"task_id": "task-other"})
            assert wrong["error"]["code"] == -32003
            response = await client.call("cancel", {"task_id": task})
            assert response["result"]["status"] == "cancelled"
            end = await client.until("end", task_id=task)
            assert end["params"]["finish_reason"] == "cancelled"
            assert len(client.of_task(task, "end")) == 1
            task2 = await generate(client, message="and now?", max_new_tokens=30)
            await client.until("end", task_id=task2)
    run(go())
    # the unanswered call got a tool message, so the conversation stays well-formed for the model
    assert "cancelled by the client" in server.model.prompts[-1]


def test_second_generate_while_busy_is_refused(server):
    sid = create_session(server)

    async def go():
        async with WsClient.connect(server, sid) as client:
            task = await generate(client, message="tell me a long story", max_new_tokens=300)
            busy = await client.call("generate", {"message": "me too"})
            assert busy["error"]["code"] == -32001
            assert busy["error"]["data"]["task_id"] == task
            await client.call("cancel")
            await client.until("end", task_id=task)
    run(go())


def test_disconnect_mid_stream_cancels_the_task_and_frees_the_engine(server):
    sid = create_session(server)
    session = server.state.runtime.sessions.get(sid)

    async def go():
        async with WsClient.connect(server, sid) as client:
            task = await generate(client, message="tell me a long story", max_new_tokens=1000)
            await client.until("text_chunk", task_id=task)
    run(go())
    deadline = time.monotonic() + 10
    while session.active_task is not None or session.emitter is not None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    wait_idle(server)


def test_two_sessions_generate_at_once(server):
    sids = [create_session(server), create_session(server)]

    async def one(sid: str, n: int) -> tuple[WsClient, str]:
        async with WsClient.connect(server, sid) as client:
            task = await generate(client, message=f"tell me a long story number {n}", max_new_tokens=200)
            await client.until("end", task_id=task)
            return client, task

    async def go():
        return await asyncio.gather(*(one(sid, i) for i, sid in enumerate(sids)))

    results = run(go())
    spans = []
    for (client, task), sid in zip(results, sids):
        assert {n["params"]["session_id"] for n in client.notifications} == {sid}
        assert client.chunks(task) == client.of_task(task, "final_text")[0]["params"]["final_text"]
        assert assert_one_end(client, task)["finish_reason"] == "length"
        spans.append(len(client.of_task(task, "text_chunk")))
    assert all(s > 100 for s in spans)


# ---- requests that fail cleanly ---------------------------------------------------------------------------------
@pytest.mark.parametrize("params", [
    {},
    {"message": "a", "history": [{"role": "user", "content": "b"}]},
    {"message": 5},
    {"history": []},
    {"history": [{"role": "robot", "content": "x"}]},
    {"message": "a", "temperature": -1},
    {"message": "a", "max_new_tokens": 0},
    {"message": "a", "max_new_tokens": 10**9},
    {"message": "a", "top_p": 2},
    {"message": "a", "tools": [WEATHER_TOOL, WEATHER_TOOL]},
])
def test_invalid_generate_params(server, params):
    sid = create_session(server)

    async def go():
        async with WsClient.connect(server, sid) as client:
            response = await client.call("generate", params)
            assert response["error"]["code"] == -32602, response
            assert response["error"]["data"]
            task = await generate(client, message="still usable?", max_new_tokens=20)
            await client.until("end", task_id=task)
    run(go())


def test_context_length_exceeded_is_an_error_response(server):
    sid = create_session(server)

    async def go():
        async with WsClient.connect(server, sid) as client:
            response = await client.call("generate", {"message": "word " * 3000})
            assert response["error"]["code"] == -32004
            assert response["error"]["data"]["max_context"] == 2048
            task = await generate(client, message="short", max_new_tokens=20)
            await client.until("end", task_id=task)
    run(go())
    assert "word word" not in server.model.prompts[-1]  # the refused turn was not kept


def test_generation_failure_ends_the_task_with_error_and_the_server_goes_on(server):
    sid = create_session(server)

    async def go():
        async with WsClient.connect(server, sid) as client:
            server.model.fail_next.set()
            task = await generate(client, message="this will fail", max_new_tokens=20)
            error = await client.until("error", task_id=task)
            assert error["params"]["error"]["code"] == -32000
            assert "out of memory" in error["params"]["error"]["message"]
            end = await client.until("end", task_id=task)
            assert end["params"]["finish_reason"] == "error"
            task2 = await generate(client, message="and now", max_new_tokens=20)
            assert (await client.until("end", task_id=task2))["params"]["finish_reason"] == "stop"
    run(go())


def test_history_replaces_the_conversation(server):
    sid = create_session(server)

    async def go():
        async with WsClient.connect(server, sid) as client:
            task = await generate(client, message="first message", max_new_tokens=30)
            await client.until("end", task_id=task)
            history = [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "weather?"},
                       {"role": "assistant", "tool_calls": [{"tool": "get_weather", "parameters": {"location": "Oslo"},
                                                             "call_id": "c1"}]},
                       {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": {"t": 3}},
                       {"role": "user", "content": "replaced history"}]
            task = await generate(client, history=history, tools=[WEATHER_TOOL], max_new_tokens=30)
            await client.until("end", task_id=task)
    run(go())
    prompt = server.model.prompts[-1]
    assert "first message" not in prompt and "replaced history" in prompt and "Be brief." in prompt
    assert '"location": "Oslo"' in prompt and '{"t": 3}' in prompt and "# Tools" in prompt


def test_stop_strings_and_invalid_tool_json(server):
    sid = create_session(server, [WEATHER_TOOL])

    async def go():
        async with WsClient.connect(server, sid) as client:
            task = await generate(client, message="stop here", stop=["STOP"], max_new_tokens=50)
            final = await client.until("final_text", task_id=task)
            assert final["params"]["final_text"] == "alpha beta " == client.chunks(task)
            assert (await client.until("end", task_id=task))["params"]["finish_reason"] == "stop"
            task = await generate(client, message="broken call", max_new_tokens=50)
            final = await client.until("final_text", task_id=task)
            assert final["params"]["final_text"] == "<tool_call>\n{not json}\n</tool_call> done" == client.chunks(task)
            assert not client.of_task(task, "function_call_request")
    run(go())


def test_multibyte_text_streams_without_broken_characters(server):
    sid = create_session(server)

    async def go():
        async with WsClient.connect(server, sid) as client:
            task = await generate(client, message="unicode please", max_new_tokens=80)
            final = await client.until("final_text", task_id=task)
            chunks = [n["params"]["chunk"] for n in client.of_task(task, "text_chunk")]
            assert all("\ufffd" not in c for c in chunks)
            assert "".join(chunks) == final["params"]["final_text"] == "Café 日本語 😀 naïve ünïcödé"
    run(go())


# ---- JSON-RPC framing on the socket ------------------------------------------------------------------------------
def test_jsonrpc_errors_keep_the_socket_usable(server):
    sid = create_session(server)

    async def go():
        async with WsClient.connect(server, sid) as client:
            await client.send("not json {")
            assert (await client.recv())["error"]["code"] == -32700
            await client.send(b"\xff\xfe binary junk")
            assert (await client.recv())["error"] == {"code": -32700,
                                                      "message": "Parse error: the message is not valid JSON"}
            await client.send({"jsonrpc": "2.0", "method": "nope", "id": "x"})
            reply = await client.recv()
            assert reply["error"]["code"] == -32601 and reply["id"] == "x"
            await client.send({"jsonrpc": "1.0", "method": "generate", "id": 3})
            assert (await client.recv())["error"]["code"] == -32600
            await client.send({"jsonrpc": "2.0", "method": "cancel"})  # a notification: no response
            await client.send({"jsonrpc": "2.0", "method": "generate", "params": [1], "id": 4})
            reply = await client.recv()
            assert reply["id"] == 4 and reply["error"]["code"] == -32602
            await client.send([{"jsonrpc": "2.0", "method": "cancel", "id": 5}, {"jsonrpc": "2.0", "method": "x"}])
            batch = await client.recv()
            assert isinstance(batch, list) and [r["id"] for r in batch] == [5]
            task = await generate(client, message="still fine", max_new_tokens=20)
            await client.until("end", task_id=task)
    run(go())


def test_tool_result_timeout(settings):
    from dataclasses import replace

    with running_server(replace(settings, tool_result_timeout_s=0.3), scripted_loader(respond)) as app:
        sid = create_session(app, [WEATHER_TOOL])

        async def go():
            async with WsClient.connect(app, sid) as client:
                task = await generate(client, message="weather now")
                await client.until("function_call_request", task_id=task)
                error = await client.until("error", task_id=task, timeout=5)
                assert error["params"]["error"]["code"] == -32005
                end = await client.until("end", task_id=task)
                assert end["params"]["finish_reason"] == "error"
        run(go())


def test_real_tiny_model_streams_a_consistent_answer(settings):
    """The real loading path and the real forward pass (random weights): protocol invariants only."""
    with running_server(settings) as app:
        sid = create_session(app, [WEATHER_TOOL])

        async def go():
            async with WsClient.connect(app, sid) as client:
                for message in ("What is the weather like in London?", "And tomorrow?"):
                    task = await generate(client, message=message, max_new_tokens=40, do_sample=True,
                                          temperature=0.8, seed=1)
                    end = (await client.until("end", task_id=task))["params"]
                    if end["finish_reason"] in ("stop", "length") and not client.of_task(task, "function_call_request"):
                        final = client.of_task(task, "final_text")[0]["params"]["final_text"]
                        assert final == client.chunks(task)
                    assert end["usage"]["completion_tokens"] >= 1
                return end
        end = run(go())
        assert end["usage"]["cached_tokens"] > 0


def test_the_weather_example_client_script(server, capsys):
    import importlib.util

    from conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("weather_client", REPO_ROOT / "scripts" / "weather_client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    transcript = run(module.run(f"http://{server.base}", "What is the weather like in London?"))
    assert [c["tool"] for c in transcript["tool_calls"]] == ["get_weather"]
    assert transcript["final_text"] == ANSWER == "".join(transcript["chunks"])
    assert transcript["end"]["finish_reason"] == "stop"
    assert "[tool call] get_weather" in capsys.readouterr().out
