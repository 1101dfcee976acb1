"""The OpenAI-compatible API, driven by the official ``openai`` package against the real server."""
from __future__ import annotations

import json
import time
from dataclasses import replace

import httpx
import openai
import pytest
from openai import OpenAI

from shared import Settings
from support import running_server, scripted_loader

KEY = "sk-test-" + "k" * 24
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"location": {"type": "string"}},
                                                           "required": ["location"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"location": "London"}}\n</tool_call>'


def respond(prompt: str) -> str:
    last = prompt.rsplit("<|im_start|>user\n", 1)[-1]
    if "<tool_response>" in last:
        return "It is " + last.split("<tool_response>\n")[1].split("\n</tool_response>")[0] + " in London."
    if "weather" in last and "# Tools" in prompt:
        return CALL
    if "long" in last:
        return "and on and on " * 200
    if "unicode" in last:
        return "Café 日本語 😀"
    if "call anyway" in last:  # a model that calls a tool it was not offered
        return "Let me check. " + CALL
    return "Hello from the model."


def respond_forced(prompt: str) -> str:
    """After a forced tool-call opening (in the prompt's assistant turn), the model writes the rest of it."""
    if prompt.endswith('"arguments": '):
        return '{"location": "Paris"}}\n</tool_call>'
    if prompt.endswith('{"name": "'):
        return 'get_time", "arguments": {}}\n</tool_call>'
    return respond(prompt)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    settings = Settings(model_id=str(tiny_model_dir), log_file=str(tmp_path_factory.mktemp("log") / "log"),
                        kv_block_size=16, max_context=4096, api_key=KEY, served_model_name="qwen-test",
                        max_new_tokens_cap=2000, ws_max_message_bytes=200_000)
    holder: dict = {}
    with running_server(settings, scripted_loader(respond_forced, step_delay=0.002, holder=holder)) as app:
        app.model = holder["model"]
        yield app


@pytest.fixture
def client(server) -> OpenAI:
    return OpenAI(base_url=f"http://{server.base}/v1", api_key=KEY, max_retries=0, timeout=30)


def test_models(client):
    [model] = client.models.list().data
    assert model.id == "qwen-test" and model.owned_by == "local"
    assert model.model_extra["device"] == "cpu" and model.model_extra["quantization"] == "none"


def test_plain_completion_and_usage(client):
    r = client.chat.completions.create(model="qwen-test", messages=[
        {"role": "system", "content": "Be nice."}, {"role": "user", "content": "hi"}])
    assert r.object == "chat.completion" and r.model == "qwen-test"
    assert r.choices[0].message.content == "Hello from the model." and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_text_with_usage(client):
    chunks = list(client.chat.completions.create(
        model="qwen-test", messages=[{"role": "user", "content": "unicode please"}], stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Café 日本語 😀"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all("\ufffd" not in (c.choices[0].delta.content or "") for c in chunks if c.choices)


def test_tool_call_and_its_follow_up(client):
    messages = [{"role": "user", "content": "What is the weather in London?"}]
    r = client.chat.completions.create(model="qwen-test", messages=messages, tools=[WEATHER, TIME])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"location": "London"}
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "15°C and cloudy"}]
    r = client.chat.completions.create(model="qwen-test", messages=messages, tools=[WEATHER, TIME])
    assert r.choices[0].message.content == "It is 15°C and cloudy in London."
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens_details.cached_tokens > 0  # the resent history hit the prefix cache


def test_streamed_tool_call(client):
    chunks = list(client.chat.completions.create(
        model="qwen-test", messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER], stream=True))
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather" and calls[0].index == 0
    assert json.loads(calls[0].function.arguments) == {"location": "London"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""  # no markup leaks as text
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice(client):
    messages = [{"role": "user", "content": "weather?"}]
    r = client.chat.completions.create(model="qwen-test", messages=messages, tools=[WEATHER], tool_choice="none")
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    r = client.chat.completions.create(model="qwen-test", messages=[{"role": "user", "content": "hi"}],
                                       tools=[WEATHER, TIME],
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"location": "Paris"}
    r = client.chat.completions.create(model="qwen-test", messages=[{"role": "user", "content": "hi"}],
                                       tools=[WEATHER, TIME], tool_choice="required")
    assert r.choices[0].message.tool_calls[0].function.name == "get_time"


def test_a_request_without_tools_gets_no_tool_calls(client):
    """A model that writes a call although the request offered no tools (none given, or tool_choice "none"
    without a grammar to stop it): the answer has no tool_calls for a function the client never defined, and
    no call markup in its text."""
    messages = [{"role": "user", "content": "call anyway"}]
    r = client.chat.completions.create(model="qwen-test", messages=messages)
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content == "Let me check."
    chunks = list(client.chat.completions.create(model="qwen-test", messages=messages, stream=True))
    assert not [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Let me check."
    assert chunks[-1].choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="qwen-test", messages=messages, tools=[WEATHER], tool_choice="none")
    assert not r.choices[0].message.tool_calls and "<tool_call>" not in r.choices[0].message.content


def test_sampling_params_are_accepted(client):
    r = client.chat.completions.create(model="qwen-test", messages=[{"role": "user", "content": "tell a long one"}],
                                       temperature=0.7, top_p=0.9, max_tokens=12, seed=5, stop=["zzz"],
                                       presence_penalty=0.5, frequency_penalty=0.5)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    r = client.chat.completions.create(model="qwen-test", messages=[{"role": "user", "content": "tell a long one"}],
                                       stop=["on and"], max_completion_tokens=50)
    assert r.choices[0].message.content == "and " and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kwargs, status, fragment", [
    (dict(model="qwen-test", messages=[]), 400, "messages"),
    (dict(model="qwen-test", messages=[{"role": "user", "content": "hi"}], temperature=5), 400, "temperature"),
    (dict(model="qwen-test", messages=[{"role": "user", "content": "hi"}], n=2), 400, "n=1"),
    (dict(model="qwen-test", messages=[{"role": "user", "content": "hi"}], logprobs=True), 400, "logprobs"),
    (dict(model="qwen-test", messages=[{"role": "user", "content": "hi"}], max_tokens=10**6), 400, "max_tokens"),
    (dict(model="qwen-test", messages=[{"role": "user", "content": "hi"}], tool_choice="required"), 400, "tools"),
    (dict(model="qwen-test", messages=[{"role": "user", "content": "hi"}], extra_body={"top_k": 2**64}), 400, "top_k"),
    (dict(model="qwen-test", messages=[{"role": "user", "content": "1 " * 3000}]), 400, "tokens"),
    (dict(model="gpt-4o", messages=[{"role": "user", "content": "hi"}]), 404, "does not exist"),
])
def test_errors_in_openai_shape(client, kwargs, status, fragment):
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**kwargs)
    assert info.value.status_code == status
    assert fragment in info.value.body["message"] and "type" in info.value.body


def test_the_model_answers_to_its_aliases(client, tiny_model_dir):
    """The served name, and the configured INFERENCE_MODEL_ID: as written, normalised, or its directory's name
    (here hidden from /v1/models by INFERENCE_SERVED_MODEL_NAME); responses always give the served name."""
    messages = [{"role": "user", "content": "hi"}]
    for alias in ("qwen-test", str(tiny_model_dir), tiny_model_dir.name):
        r = client.chat.completions.create(model=alias, messages=messages, max_tokens=8)
        assert r.model == "qwen-test", alias
    for other in (f"{tiny_model_dir.name}x", tiny_model_dir.parent.name, f"{tiny_model_dir}/..", "", "/", "."):
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=other, messages=messages, max_tokens=8)


def test_auth_size_and_rate_errors(server, tiny_model_dir, tmp_path):
    bad = OpenAI(base_url=f"http://{server.base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="qwen-test", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(f"http://{server.base}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   content=json.dumps({"model": "qwen-test", "messages": [{"role": "user", "content": "x" * 300_000}]}))
    assert r.status_code == 413 and r.json()["error"]["message"]
    settings = Settings(model_id=str(tiny_model_dir), log_file=str(tmp_path / "log"), rate_limit_per_min=2)
    with running_server(settings, scripted_loader(respond)) as app:
        client = OpenAI(base_url=f"http://{app.base}/v1", api_key="none", max_retries=0)
        for _ in range(2):
            client.chat.completions.create(model="tiny" if False else app.state.runtime.model.name,
                                           messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model=app.state.runtime.model.name,
                                           messages=[{"role": "user", "content": "hi"}])
        assert int(info.value.response.headers["retry-after"]) >= 1
        app.state.runtime.draining = True
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model=app.state.runtime.model.name,
                                           messages=[{"role": "user", "content": "hi"}])
        assert info.value.status_code == 503
        app.state.runtime.draining = False


def test_a_client_that_leaves_a_stream_aborts_the_request(server, client):
    stream = client.chat.completions.create(model="qwen-test", messages=[{"role": "user", "content": "a long one"}],
                                            stream=True, max_tokens=1500)
    for i, _ in enumerate(stream):
        if i == 5:
            break
    stream.close()
    engine = server.state.runtime.engine.engine
    deadline = time.monotonic() + 10
    while engine.stats()["running"]:
        assert time.monotonic() < deadline, "the abandoned request kept running"
        time.sleep(0.02)


def test_same_limits_as_the_websocket_path(server, tiny_model_dir, tmp_path):
    settings = replace(server.state.runtime.settings, max_tools=1, api_key="", log_file=str(tmp_path / "log"))
    with running_server(settings, scripted_loader(respond)) as app:
        client = OpenAI(base_url=f"http://{app.base}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="qwen-test", messages=[{"role": "user", "content": "hi"}],
                                           tools=[WEATHER, TIME])
        assert "limits" in info.value.body["message"]
