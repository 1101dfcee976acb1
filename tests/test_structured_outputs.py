"""Structured outputs end to end, on the real server with the tiny random-weight model (garbage when free): over the
WebSocket and with the official ``openai`` client, tool_choice "required" and named calls always come out as valid
calls of the right tool, response_format answers parse and validate, "none" never calls, and a schema the grammar
engine cannot compile is refused up front naming the keyword."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from openai import OpenAI

from grammar_walks import validate
from schema_cases import SCHEMAS, UNSUPPORTED, WEATHER
from shared import Settings
from support import WsClient, create_session, running_server

SEEDS = 20
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": WEATHER}},
         *({"type": "function", "function": {"name": name, "parameters": schema}} for name, schema in SCHEMAS.items())]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
SAMPLED = {"temperature": 1.0, "do_sample": True}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    settings = Settings(model_id=str(tiny_model_dir), log_file=str(tmp_path_factory.mktemp("log") / "log"),
                        kv_block_size=16, max_context=4096, max_batch=16, rate_limit_per_min=0,
                        served_model_name="tiny", max_tool_schema_bytes=65536)
    with running_server(settings) as app:
        yield app


@pytest.fixture
def client(server) -> OpenAI:
    return OpenAI(base_url=f"http://{server.base}/v1", api_key="unused", max_retries=0, timeout=120)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 300))


async def first_calls(app, params: dict) -> list[dict]:
    """``generate`` on a fresh session; the first function_call_request's calls (the task is then cancelled)."""
    async with WsClient.connect(app, create_session(app, TOOLS)) as ws:
        reply = await ws.call("generate", {"message": "What is the weather in Rome?", "max_new_tokens": 600,
                                           **params})
        task = reply["result"]["task_id"]
        note = await ws.until("function_call_request", timeout=120, task_id=task)
        assert not ws.of_task(task, "text_chunk"), "text before a required call"
        await ws.call("cancel", {"task_id": task})
        await ws.until("end", timeout=60, task_id=task)
        return note["params"]["tool_calls"]


# ---- WebSocket ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("choice", ["required", "named"])
def test_ws_required_and_named_calls_are_valid_calls_of_the_right_tool(server, choice):
    wanted = {"type": "function", "function": {"name": "arrays"}} if choice == "named" else "required"

    async def go():
        return await asyncio.gather(*(first_calls(server, {"tool_choice": wanted, "seed": seed, **SAMPLED})
                                      for seed in range(SEEDS)))

    for calls in run(go()):
        assert calls
        for call in calls:
            assert "validation_error" not in call
            validate(call["parameters"], SCHEMA_OF[call["tool"]])
        if choice == "named":
            assert [c["tool"] for c in calls] == ["arrays"]


def test_ws_response_format_final_text_is_the_json_document(server):
    schema = SCHEMAS["nested"]

    async def answer(seed: int) -> str:
        async with WsClient.connect(server, create_session(server)) as ws:
            reply = await ws.call("generate", {
                "message": "Who are you? Answer in JSON.", "seed": seed, "max_new_tokens": 400, **SAMPLED,
                "response_format": {"type": "json_schema", "json_schema": {"name": "user", "schema": schema}}})
            task = reply["result"]["task_id"]
            final = await ws.until("final_text", timeout=120, task_id=task)
            end = await ws.until("end", timeout=60, task_id=task)
            assert end["params"]["finish_reason"] == "stop"
            assert final["params"]["final_text"] == ws.chunks(task)
            return final["params"]["final_text"]

    async def go():
        return await asyncio.gather(*(answer(seed) for seed in range(SEEDS)))

    for text in run(go()):
        validate(json.loads(text), schema)


def test_ws_tool_choice_none_never_calls(server):
    async def go():
        async with WsClient.connect(server, create_session(server, TOOLS)) as ws:
            for seed in range(3):
                reply = await ws.call("generate", {"message": "Call get_weather now.", "tool_choice": "none",
                                                   "seed": seed, "max_new_tokens": 60, **SAMPLED})
                task = reply["result"]["task_id"]
                end = await ws.until("end", timeout=120, task_id=task)
                assert end["params"]["finish_reason"] in ("stop", "length")
                assert not ws.of_task(task, "function_call_request")
                assert "<tool_call>" not in ws.chunks(task)
    run(go())


@pytest.mark.parametrize("keyword", ["if", "uniqueItems", "pattern"])
def test_ws_a_schema_the_grammar_cannot_enforce_is_refused_naming_the_keyword(server, keyword):
    bad = {"type": "function", "function": {"name": "bad_tool", "parameters": UNSUPPORTED[keyword]}}
    if keyword == "pattern":  # RE2 (the validator's engine) refuses lookaround on the wire; \b it runs, llguidance not
        bad["function"]["parameters"] = {"type": "object", "properties": {"a": {"type": "string",
                                                                                "pattern": "^\\bfoo$"}}}

    async def go():
        async with WsClient.connect(server, create_session(server)) as ws:
            reply = await ws.call("generate", {"message": "hi", "tools": [TOOLS[0], bad]})
            assert reply["error"]["code"] == -32602, reply
            [detail] = reply["error"]["data"]
            assert detail["loc"] == ["tools", 1, "parameters"] and detail["keyword"] == keyword
            assert keyword in reply["error"]["message"] and "bad_tool" in reply["error"]["message"]
            reply = await ws.call("generate", {"message": "hi", "response_format": {
                "type": "json_schema", "json_schema": {"name": "x", "schema": bad["function"]["parameters"]}}})
            assert reply["error"]["code"] == -32602 and reply["error"]["data"][0]["keyword"] == keyword
            reply = await ws.call("generate", {"message": "hi", "max_new_tokens": 4})  # the session goes on
            assert reply["result"]["status"] == "processing"
    run(go())


def test_ws_strict_false_skips_the_schema(server):
    loose = {"type": "function", "function": {"name": "loose", "strict": False, "parameters": UNSUPPORTED["if"]}}

    async def go():
        calls = await first_calls(server, {"tools": [loose], "tool_choice": "required", "seed": 1, **SAMPLED})
        assert [c["tool"] for c in calls] and all(c["tool"] == "loose" for c in calls)
    run(go())


def test_ws_tool_choice_names_no_tool_of_the_request(server):
    async def go():
        async with WsClient.connect(server, create_session(server, TOOLS)) as ws:
            reply = await ws.call("generate", {"message": "hi", "tool_choice": {"type": "function",
                                                                                "function": {"name": "nope"}}})
            assert reply["error"]["code"] == -32602 and "nope" in reply["error"]["message"]
            reply = await ws.call("generate", {"message": "hi", "tools": [], "tool_choice": "required"})
            assert reply["error"]["code"] == -32602 and "needs tools" in reply["error"]["message"]
    run(go())


# ---- the official openai client ----------------------------------------------------------------------------------
@pytest.mark.parametrize("choice", ["required", "named"])
def test_openai_required_and_named_calls_are_valid_calls_of_the_right_tool(client, choice):
    wanted = {"type": "function", "function": {"name": "enums"}} if choice == "named" else "required"
    for seed in range(SEEDS):
        out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather?"}],
                                             tools=TOOLS, tool_choice=wanted, seed=seed, temperature=1.0,
                                             max_tokens=600)
        choice_ = out.choices[0]
        assert choice_.finish_reason == "tool_calls" and choice_.message.tool_calls
        for call in choice_.message.tool_calls:
            validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])
        if choice == "named":
            assert [c.function.name for c in choice_.message.tool_calls] == ["enums"]


def test_openai_parallel_tool_calls_false_makes_one_call(client):
    for seed in range(5):
        out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather?"}],
                                             tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                                             seed=seed, temperature=1.0, max_tokens=600)
        [call] = out.choices[0].message.tool_calls
        validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])


def test_openai_response_format_json_schema_and_json_object(client):
    schema = SCHEMAS["any_of"]
    for seed in range(SEEDS):
        out = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Pick a target."}], seed=seed, temperature=1.0,
            max_tokens=300, response_format={"type": "json_schema",
                                             "json_schema": {"name": "target", "schema": schema, "strict": True}})
        assert out.choices[0].finish_reason == "stop"
        validate(json.loads(out.choices[0].message.content), schema)
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "JSON please"}],
                                            seed=3, temperature=1.0, max_tokens=300, stream=True,
                                            response_format={"type": "json_object"})
    chunks = [c.choices[0] for c in stream if c.choices]
    text, finish = "".join(c.delta.content or "" for c in chunks), chunks[-1].finish_reason
    if finish == "stop":  # an open object can also run into max_tokens (then it is cut, never malformed before)
        assert isinstance(json.loads(text), dict)
    else:
        assert finish == "length" and text.startswith("{")


def test_openai_unsupported_keyword_is_a_400_naming_it(client):
    bad = {"type": "function", "function": {"name": "bad_tool", "parameters": UNSUPPORTED["contains"]}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], tools=[bad])
    body = info.value.body
    assert "contains" in body["message"] and body["param"] == "tools" and body["code"] == "unsupported_schema"


def test_structured_outputs_off_refuses_response_format_and_keeps_tool_choice(tiny_model_dir, tmp_path):
    settings = Settings(model_id=str(tiny_model_dir), log_file=str(tmp_path / "log"), kv_block_size=16,
                        max_context=4096, structured_outputs="off", served_model_name="tiny")
    with running_server(settings) as app:
        assert app.state.runtime.grammars is None
        r = httpx.post(f"http://{app.base}/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_object"}})
        assert r.status_code == 400 and "INFERENCE_STRUCTURED_OUTPUTS" in r.json()["error"]["message"]
        r = httpx.post(f"http://{app.base}/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS[:1],
            "tool_choice": "required", "max_tokens": 5})
        assert r.status_code == 200  # forced opening in the prompt; unconstrained after it
        prompt_tail = r.json()["choices"][0]
        assert prompt_tail["finish_reason"] in ("length", "stop", "tool_calls")
