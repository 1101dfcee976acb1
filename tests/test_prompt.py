"""Prompt building in utils.py (the real Qwen2.5 chat template), tool messages and sampling parameters."""
from __future__ import annotations

import json

import pytest

from engine import SamplingParams
from models import GenerateRequestParams, HistoryMessage, ToolCallRequest, ToolDefinition, ToolResultItem
from shared import GenerationDefaults
from tasks import tool_message
from utils import assistant_message, build_prompt_ids, history_to_messages, sampling_params

WEATHER_SCHEMA = {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}
WEATHER = ToolDefinition(name="get_weather", description="Get the weather", parameters=WEATHER_SCHEMA)
WEATHER_JSON = ('{"type": "function", "function": {"name": "get_weather", "description": "Get the weather", '
                '"parameters": {"type": "object", "properties": {"location": {"type": "string"}}, '
                '"required": ["location"]}}}')
LONDON_BLOCK = '<tool_call>\n{"name": "get_weather", "arguments": {"location": "London"}}\n</tool_call>'


def render(tokenizer, messages, tools=()):
    ids = build_prompt_ids(tokenizer, messages, list(tools))
    assert isinstance(ids, list) and ids and all(isinstance(i, int) for i in ids)
    return tokenizer.decode(ids)


def history(*messages):
    return [HistoryMessage.model_validate(m) for m in messages]


# ---- build_prompt_ids -----------------------------------------------------------------------------------------------
def test_prompt_with_tools_renders_the_tool_json(tiny_tokenizer):
    text = render(tiny_tokenizer, [{"role": "user", "content": "Weather in London?"}], [WEATHER])
    assert "# Tools" in text
    assert f"<tools>\n{WEATHER_JSON}\n</tools>" in text
    assert "<|im_start|>user\nWeather in London?<|im_end|>\n" in text
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_prompt_ids_are_the_chat_template_tokenized(tiny_tokenizer):
    messages = [{"role": "user", "content": "Hello"}]
    ids = build_prompt_ids(tiny_tokenizer, messages, [WEATHER])
    rendered = tiny_tokenizer.apply_chat_template(messages, tools=[WEATHER.for_template()],
                                                  add_generation_prompt=True, tokenize=False)
    assert ids == tiny_tokenizer.encode(rendered)
    tail = tiny_tokenizer.encode("<|im_start|>assistant\n")
    assert ids[-len(tail):] == tail


def test_prompt_without_tools_has_no_tools_section(tiny_tokenizer):
    text = render(tiny_tokenizer, [{"role": "user", "content": "hi"}])
    assert "<tools>" not in text and "# Tools" not in text
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                    "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_openai_shaped_tool_renders_like_the_seed_shape(tiny_tokenizer):
    openai = ToolDefinition.model_validate({"type": "function", "function": {
        "name": "get_weather", "description": "Get the weather", "parameters": WEATHER_SCHEMA}})
    messages = [{"role": "user", "content": "hi"}]
    assert build_prompt_ids(tiny_tokenizer, messages, [openai]) == build_prompt_ids(tiny_tokenizer, messages, [WEATHER])


def test_several_tools_all_appear_in_order(tiny_tokenizer):
    clock = ToolDefinition(name="get_time", description="Current time")
    text = render(tiny_tokenizer, [{"role": "user", "content": "hi"}], [WEATHER, clock])
    time_json = ('{"type": "function", "function": {"name": "get_time", "description": "Current time", '
                 '"parameters": {"type": "object", "properties": {}}}}')
    assert f"<tools>\n{WEATHER_JSON}\n{time_json}\n</tools>" in text


def test_system_message_replaces_the_default_and_keeps_tools(tiny_tokenizer):
    text = render(tiny_tokenizer, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                  [WEATHER])
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert "You are Qwen" not in text


# ---- history_to_messages ------------------------------------------------------------------------------------------
OUR_SHAPE = {"role": "assistant", "tool_calls": [
    {"tool": "get_weather", "parameters": {"location": "London"}, "call_id": "call-1"}]}
OPENAI_SHAPE = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call-1", "type": "function",
     "function": {"name": "get_weather", "arguments": json.dumps({"location": "London"})}}]}


@pytest.mark.parametrize("assistant", [OUR_SHAPE, OPENAI_SHAPE], ids=["ours", "openai"])
def test_history_with_tool_calls_renders_as_qwen_expects(tiny_tokenizer, assistant):
    msgs = history_to_messages(history(
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in London?"},
        assistant,
        {"role": "tool", "content": {"temperature": "15°C"}, "tool_call_id": "call-1", "name": "get_weather"},
        {"role": "assistant", "content": "It is 15°C."},
        {"role": "user", "content": "Thanks"},
    ))
    assert msgs[2]["tool_calls"] == [{"id": "call-1", "type": "function",
                                      "function": {"name": "get_weather", "arguments": {"location": "London"}}}]
    text = render(tiny_tokenizer, msgs, [WEATHER])
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert text.endswith(
        "<|im_start|>user\nWeather in London?<|im_end|>\n"
        f"<|im_start|>assistant\n{LONDON_BLOCK}<|im_end|>\n"
        '<|im_start|>user\n<tool_response>\n{"temperature": "15°C"}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\nIt is 15°C.<|im_end|>\n"
        "<|im_start|>user\nThanks<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_our_and_openai_tool_call_shapes_give_the_same_prompt(tiny_tokenizer):
    base = [{"role": "user", "content": "Weather?"}]
    ours = history_to_messages(history(*base, OUR_SHAPE))
    openai = history_to_messages(history(*base, OPENAI_SHAPE))
    assert build_prompt_ids(tiny_tokenizer, ours, [WEATHER]) == build_prompt_ids(tiny_tokenizer, openai, [WEATHER])


def test_assistant_text_and_several_calls_and_grouped_tool_responses(tiny_tokenizer):
    msgs = history_to_messages(history(
        {"role": "user", "content": "London and Paris?"},
        {"role": "assistant", "content": "Checking both.", "tool_calls": [
            {"tool": "get_weather", "parameters": {"location": "London"}, "call_id": "a"},
            {"tool": "get_weather", "parameters": {"location": "Paris"}, "call_id": "b"}]},
        {"role": "tool", "content": "rain", "tool_call_id": "a"},
        {"role": "tool", "content": "sun", "tool_call_id": "b"},
    ))
    text = render(tiny_tokenizer, msgs, [WEATHER])
    paris = LONDON_BLOCK.replace("London", "Paris")
    assert (f"<|im_start|>assistant\nChecking both.\n{LONDON_BLOCK}\n{paris}<|im_end|>\n"
            "<|im_start|>user\n<tool_response>\nrain\n</tool_response>\n<tool_response>\nsun\n</tool_response>"
            "<|im_end|>\n<|im_start|>assistant\n") in text


def test_history_to_messages_keeps_roles_content_and_ids():
    msgs = history_to_messages(history(
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
        {"role": "tool", "content": "R", "tool_call_id": "c9", "name": "get_weather"},
    ))
    assert msgs == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
        {"role": "tool", "content": "R", "tool_call_id": "c9", "name": "get_weather"},
    ]


def test_tool_call_without_id_gets_a_fresh_one():
    msgs = history_to_messages(history(
        {"role": "assistant", "tool_calls": [{"tool": "f"}, {"tool": "f"}]}))
    ids = [c["id"] for c in msgs[0]["tool_calls"]]
    assert all(isinstance(i, str) and i for i in ids)
    assert ids[0] != ids[1]
    assert msgs[0]["content"] == ""
    assert [c["function"] for c in msgs[0]["tool_calls"]] == [{"name": "f", "arguments": {}}] * 2


def test_assistant_message_shape():
    calls = [ToolCallRequest(call_id="c1", tool="get_weather", parameters={"location": "Paris"})]
    assert assistant_message("hi") == {"role": "assistant", "content": "hi"}
    assert assistant_message("", calls) == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"location": "Paris"}}}]}


# ---- tool_message -------------------------------------------------------------------------------------------------
CALL = ToolCallRequest(call_id="call-7", tool="get_weather", parameters={"location": "Zürich"})


def test_tool_message_dict_result_is_json_text():
    msg = tool_message(CALL, ToolResultItem(tool_name="get_weather", result={"temperature": "15°C", "rain": False}))
    assert msg == {"role": "tool", "content": '{"temperature": "15°C", "rain": false}',
                   "tool_call_id": "call-7", "name": "get_weather"}


def test_tool_message_string_result_is_used_verbatim():
    msg = tool_message(CALL, ToolResultItem(tool_name="get_weather", result="Cloudy, 15°C"))
    assert msg["content"] == "Cloudy, 15°C"


@pytest.mark.parametrize(("result", "content"), [(None, "null"), (42, "42"), ([1, "é"], '[1, "é"]')])
def test_tool_message_other_results_are_json(result, content):
    assert tool_message(CALL, ToolResultItem(tool_name="get_weather", result=result))["content"] == content


@pytest.mark.parametrize(("item", "error"), [
    ({"isError": True, "error_message": "city not found"}, "city not found"),
    ({"isError": True, "error_message": "boom", "result": "ignored"}, "boom"),
    ({"isError": True, "result": "timeout"}, "timeout"),
    ({"isError": True}, "the tool failed"),
])
def test_tool_message_errors(item, error):
    msg = tool_message(CALL, ToolResultItem(tool_name="get_weather", **item))
    assert json.loads(msg["content"]) == {"error": error}
    assert msg["tool_call_id"] == "call-7" and msg["name"] == "get_weather"


def test_tool_message_renders_as_tool_response(tiny_tokenizer):
    msgs = [{"role": "user", "content": "Weather?"}, assistant_message("", [CALL]),
            tool_message(CALL, ToolResultItem(tool_name="get_weather", isError=True, error_message="no data"))]
    text = render(tiny_tokenizer, msgs, [WEATHER])
    assert '<|im_start|>user\n<tool_response>\n{"error": "no data"}\n</tool_response><|im_end|>\n' in text


# ---- sampling_params ----------------------------------------------------------------------------------------------
QWEN_DEFAULTS = GenerationDefaults(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, min_p=0.0,
                                   repetition_penalty=1.05)
STOP_IDS = frozenset({7, 9})


def params(**kw):
    return GenerateRequestParams(message="hi", **kw)


def test_sampling_defaults_come_from_generation_config():
    sp = sampling_params(params(), QWEN_DEFAULTS, 100, STOP_IDS)
    assert sp == SamplingParams(max_new_tokens=100, temperature=0.7, top_p=0.8, top_k=20, min_p=0.0,
                                repetition_penalty=1.05, seed=None, stop_token_ids=STOP_IDS)
    assert not sp.greedy


def test_request_values_override_defaults():
    sp = sampling_params(params(temperature=1.3, top_p=0.5, top_k=7, min_p=0.1, repetition_penalty=1.2, seed=11),
                         QWEN_DEFAULTS, 33, STOP_IDS)
    got = (sp.temperature, sp.top_p, sp.top_k, sp.min_p, sp.repetition_penalty, sp.seed)
    assert got == (1.3, 0.5, 7, 0.1, 1.2, 11)
    assert sp.max_new_tokens == 33 and sp.stop_token_ids == STOP_IDS
    assert not sp.ignore_eos and sampling_params(params(ignore_eos=True), QWEN_DEFAULTS, 5, STOP_IDS).ignore_eos


@pytest.mark.parametrize("kw", [{"do_sample": False}, {"temperature": 0.0}, {"do_sample": True, "temperature": 0}])
def test_do_sample_false_or_temperature_zero_is_greedy(kw):
    sp = sampling_params(params(**kw), QWEN_DEFAULTS, 10, STOP_IDS)
    assert sp.temperature == 0.0
    assert sp.greedy


def test_greedy_defaults_unless_request_samples():
    greedy = GenerationDefaults()  # a generation_config without do_sample
    assert sampling_params(params(), greedy, 10, STOP_IDS).temperature == 0.0
    sp = sampling_params(params(do_sample=True, temperature=0.9), greedy, 10, STOP_IDS)
    assert sp.temperature == 0.9 and not sp.greedy
    assert sampling_params(params(do_sample=True), greedy, 10, STOP_IDS).temperature == 1.0


# ---- tool-call validation ---------------------------------------------------------------------------------------
def test_call_error_names_the_problem():
    from utils import call_error

    tool = ToolDefinition(name="book", parameters={
        "type": "object", "required": ["when"], "additionalProperties": False,
        "properties": {"when": {"type": "string"}, "seats": {"type": "integer", "minimum": 1},
                       "guests": {"type": "array", "items": {"type": "object", "required": ["name"]}}}})
    assert call_error("book", {"when": "today", "seats": 2, "guests": [{"name": "A"}]}, [tool]) is None
    assert call_error("book", {}, [tool]) == "invalid arguments for book: 'when' is a required property"
    assert call_error("book", {"when": "x", "seats": 0}, [tool]) == \
        "invalid arguments for book: 0 is less than the minimum of 1 (at seats)"
    assert call_error("book", {"when": "x", "guests": [{"name": "A"}, {}]}, [tool]) == \
        "invalid arguments for book: 'name' is a required property (at guests/1)"
    assert "Additional properties are not allowed" in call_error("book", {"when": "x", "color": "red"}, [tool])
    assert call_error("cook", {}, [tool]) == "there is no tool named 'cook' (the tools are: book)"
    assert call_error("cook", {}, []) == "there is no tool named 'cook' (the tools are: none)"
