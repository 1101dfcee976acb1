"""The wire schemas in models.py: tools, sessions, generate params, history and tool results."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from models import CreateSessionRequest, GenerateRequestParams, HistoryMessage, ToolDefinition, ToolResultParams

WEATHER = {"name": "get_weather", "description": "Get the weather",
           "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}


def error_text(exc_info):
    return " ".join(e["msg"] for e in exc_info.value.errors())


# ---- ToolDefinition -----------------------------------------------------------------------------------------------
def test_tool_definition_seed_shape():
    tool = ToolDefinition.model_validate(WEATHER)
    assert tool.name == "get_weather"
    assert tool.parameters["required"] == ["location"]
    assert tool.for_template() == {"type": "function", "function": WEATHER}


def test_tool_definition_defaults():
    tool = ToolDefinition(name="ping")
    assert tool.description == ""
    assert tool.parameters == {"type": "object", "properties": {}}


def test_tool_definition_openai_wrapped_shape():
    tool = ToolDefinition.model_validate({"type": "function", "function": WEATHER})
    assert tool == ToolDefinition.model_validate(WEATHER)


@pytest.mark.parametrize("name", ["get_weather", "a", "x" * 64, "ns.tool:v2-beta", "A_1"])
def test_tool_definition_good_names(name):
    assert ToolDefinition(name=name).name == name


@pytest.mark.parametrize("name", ["", "x" * 65, "has space", "get_weather\n", "naïve", "a/b", "f()", "<tool_call>"])
def test_tool_definition_bad_names(name):
    with pytest.raises(ValidationError):
        ToolDefinition(name=name)


def test_tool_definition_name_required():
    with pytest.raises(ValidationError):
        ToolDefinition.model_validate({"description": "x"})


def test_tool_definition_extra_field_rejected():
    with pytest.raises(ValidationError):
        ToolDefinition.model_validate({**WEATHER, "paramters": {}})


@pytest.mark.parametrize("parameters", [
    {"type": "objekt"},
    {"type": "object", "properties": 5},
    {"type": "object", "required": "location"},
    {"type": "object", "properties": {"x": {"type": 7}}},
    {"type": "object", "minProperties": -1},
])
def test_tool_definition_parameters_must_be_a_valid_json_schema(parameters):
    with pytest.raises(ValidationError) as exc_info:
        ToolDefinition(name="f", parameters=parameters)
    assert "JSON Schema" in error_text(exc_info)


@pytest.mark.parametrize("parameters", [{"type": "string"}, {"type": "array", "items": {}},
                                        {"type": ["object", "null"]}])
def test_tool_definition_parameters_must_be_an_object_schema(parameters):
    with pytest.raises(ValidationError) as exc_info:
        ToolDefinition(name="f", parameters=parameters)
    assert '"type": "object"' in error_text(exc_info)


@pytest.mark.parametrize("parameters", ["not a schema", ["object"], None])
def test_tool_definition_parameters_must_be_a_dict(parameters):
    with pytest.raises(ValidationError):
        ToolDefinition.model_validate({"name": "f", "parameters": parameters})


def test_tool_definition_parameters_without_type_are_an_object_schema():
    schema = {"properties": {"x": {"type": "integer"}}}
    assert ToolDefinition(name="f", parameters=schema).parameters == schema


# ---- CreateSessionRequest -----------------------------------------------------------------------------------------
def test_create_session_tools_default_empty():
    assert CreateSessionRequest().tools == []
    assert len(CreateSessionRequest.model_validate({"tools": [WEATHER, {"name": "other"}]}).tools) == 2


def test_create_session_duplicate_names_rejected():
    with pytest.raises(ValidationError) as exc_info:
        CreateSessionRequest.model_validate({"tools": [WEATHER, {"type": "function", "function": WEATHER}]})
    assert "get_weather" in error_text(exc_info)


def test_create_session_bad_tool_rejected():
    with pytest.raises(ValidationError):
        CreateSessionRequest.model_validate({"tools": [{"name": "bad name"}]})


# ---- GenerateRequestParams ----------------------------------------------------------------------------------------
def test_generate_with_message_only():
    p = GenerateRequestParams.model_validate({"message": "hi"})
    assert p.message == "hi" and p.history is None
    assert p.stop is None and p.temperature is None and p.do_sample is None


def test_generate_with_history_only():
    p = GenerateRequestParams.model_validate({"history": [{"role": "user", "content": "hi"}]})
    assert p.message is None and p.history[0].content == "hi"


@pytest.mark.parametrize("payload", [
    {},
    {"message": "hi", "history": [{"role": "user", "content": "hi"}]},
    {"history": []},
    {"message": None},
])
def test_generate_needs_exactly_one_of_message_and_history(payload):
    with pytest.raises(ValidationError):
        GenerateRequestParams.model_validate(payload)


def test_generate_stop_string_becomes_a_list():
    assert GenerateRequestParams(message="x", stop="END").stop == ["END"]
    assert GenerateRequestParams(message="x", stop=["a", "b"]).stop == ["a", "b"]


@pytest.mark.parametrize("stop", ["", ["ok", ""], ["x"] * 17, [3], [None]])
def test_generate_bad_stop_rejected(stop):
    with pytest.raises(ValidationError):
        GenerateRequestParams(message="x", stop=stop)


def test_generate_duplicate_tool_names_rejected():
    with pytest.raises(ValidationError):
        GenerateRequestParams.model_validate({"message": "x", "tools": [WEATHER, WEATHER]})


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", 0), ("temperature", 2.5),
    ("top_p", 1), ("top_p", 0.01),
    ("top_k", 0), ("top_k", 50), ("top_k", 2**31 - 1),
    ("min_p", 0), ("min_p", 1),
    ("repetition_penalty", 0.5), ("repetition_penalty", 1.2),
    ("seed", 0), ("seed", 2**63 - 1),
    ("max_new_tokens", 1), ("max_new_tokens", 4096),
])
def test_generate_sampling_values_in_range(field, value):
    assert getattr(GenerateRequestParams.model_validate({"message": "x", field: value}), field) == value


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", -0.1), ("temperature", "hot"),
    ("top_p", 0), ("top_p", 1.01), ("top_p", -1),
    ("top_k", -1), ("top_k", 1.5), ("top_k", 2**31), ("top_k", 2**64),
    ("min_p", -0.01), ("min_p", 1.5),
    ("repetition_penalty", 0), ("repetition_penalty", -1),
    ("seed", -1), ("seed", 2**63), ("seed", 0.5),
    ("max_new_tokens", 0), ("max_new_tokens", -5), ("max_new_tokens", 2.5),
    ("do_sample", "maybe"),
    ("temperature", float("nan")),
])
def test_generate_sampling_values_out_of_range(field, value):
    with pytest.raises(ValidationError) as exc_info:
        GenerateRequestParams.model_validate({"message": "x", field: value})
    assert exc_info.value.errors()[0]["loc"] == (field,)


# ---- HistoryMessage -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("role", ["system", "user", "assistant", "tool"])
def test_history_content_required(role):
    with pytest.raises(ValidationError):
        HistoryMessage.model_validate({"role": role})
    assert HistoryMessage.model_validate({"role": role, "content": ""}).content == ""


def test_history_assistant_with_tool_calls_needs_no_content():
    m = HistoryMessage.model_validate({"role": "assistant", "tool_calls": [{"tool": "f", "parameters": {"a": 1}}]})
    assert m.content is None
    assert m.tool_calls[0].tool == "f" and m.tool_calls[0].parameters == {"a": 1} and m.tool_calls[0].call_id is None


def test_history_assistant_with_empty_tool_calls_needs_content():
    with pytest.raises(ValidationError):
        HistoryMessage.model_validate({"role": "assistant", "tool_calls": []})


def test_history_openai_tool_call_shape():
    m = HistoryMessage.model_validate({"role": "assistant", "content": None, "tool_calls": [
        {"id": "call-1", "type": "function", "function": {"name": "get_weather", "arguments": '{"location": "Rome"}'}},
        {"id": "call-2", "type": "function", "function": {"name": "get_time", "arguments": {}}},
    ]})
    assert [(c.call_id, c.tool, c.parameters) for c in m.tool_calls] == [
        ("call-1", "get_weather", {"location": "Rome"}), ("call-2", "get_time", {})]


@pytest.mark.parametrize("call", [
    {"id": "c", "function": {"name": "f", "arguments": "not json"}},
    {"id": "c", "function": {"name": "f", "arguments": "[1, 2]"}},
    {"id": "c", "function": {"arguments": "{}"}},
    {"tool": "f", "parameters": [1]},
])
def test_history_bad_tool_calls_rejected(call):
    with pytest.raises(ValidationError):
        HistoryMessage.model_validate({"role": "assistant", "tool_calls": [call]})


@pytest.mark.parametrize(("content", "text"), [
    ({"temperature": "15°C", "ok": True}, '{"temperature": "15°C", "ok": true}'),
    ([1, 2], "[1, 2]"),
    (42, "42"),
    ("plain", "plain"),
])
def test_history_tool_content_becomes_json_text(content, text):
    assert HistoryMessage.model_validate({"role": "tool", "content": content, "tool_call_id": "c"}).content == text


def test_history_non_tool_content_must_be_text():
    with pytest.raises(ValidationError):
        HistoryMessage.model_validate({"role": "user", "content": {"a": 1}})


def test_history_unknown_role_rejected():
    with pytest.raises(ValidationError):
        HistoryMessage.model_validate({"role": "developer", "content": "x"})


# ---- ToolResultParams ---------------------------------------------------------------------------------------------
def test_tool_result_params_seed_shape():
    p = ToolResultParams.model_validate({"task_id": "t1", "results": [
        {"tool_name": "get_weather", "result": {"temperature": "15°C"}, "isError": False}]})
    item = p.results[0]
    assert (item.tool_name, item.result, item.isError, item.error_message, item.call_id) == (
        "get_weather", {"temperature": "15°C"}, False, None, None)


@pytest.mark.parametrize("payload", [
    {"task_id": "t1", "results": []},
    {"task_id": "t1"},
    {"results": [{"tool_name": "f"}]},
    {"task_id": "t1", "results": [{"result": 1}]},
])
def test_tool_result_params_invalid(payload):
    with pytest.raises(ValidationError):
        ToolResultParams.model_validate(payload)


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "repetition_penalty"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_sampling_values_are_rejected(field, value):
    with pytest.raises(ValidationError):
        GenerateRequestParams(message="hi", **{field: value})


def test_openai_strict_flag_is_accepted_but_unknown_tool_fields_are_not():
    tool = ToolDefinition.model_validate({"type": "function", "function": {
        "name": "f", "parameters": {"type": "object"}, "strict": True}})
    assert tool.name == "f"
    with pytest.raises(ValidationError):
        ToolDefinition.model_validate({"name": "f", "paramters": {"type": "object"}})
