"""JSON-RPC 2.0 framing and dispatch (jsonrpc.Dispatcher), driven directly without a transport."""
from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import BaseModel, Field

from jsonrpc import Dispatcher, Method, RpcError, notification

PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL_ERROR = -32700, -32600, -32601, -32602, -32603


class AddParams(BaseModel):
    a: int
    b: int = Field(default=0, ge=0)


class NoParams(BaseModel):
    pass


class Context:
    def __init__(self):
        self.calls = []


async def add(ctx, p):
    ctx.calls.append(("add", p.a, p.b))
    return {"sum": p.a + p.b}


async def ping(ctx, p):
    ctx.calls.append(("ping",))
    return "pong"


async def busy(ctx, p):
    raise RpcError(-32001, "session busy", {"task_id": "t1"})


async def broken(ctx, p):
    ctx.calls.append(("broken",))
    raise KeyError("oops")


METHODS = {"add": Method(AddParams, add), "ping": Method(NoParams, ping),
           "busy": Method(NoParams, busy), "broken": Method(NoParams, broken)}


def handle(payload, ctx=None):
    """Send ``payload`` (text, or anything JSON-encodable) through a fresh dispatcher."""
    text = payload if isinstance(payload, str) else json.dumps(payload)
    response = asyncio.run(Dispatcher(METHODS).handle_text(text, ctx if ctx is not None else Context()))
    if response is not None:
        json.dumps(response, allow_nan=False)  # whatever comes back must be sendable as strict JSON
    return response


def req(method, params=None, id=1, **extra):
    msg = {"jsonrpc": "2.0", "method": method, **extra}
    if params is not None:
        msg["params"] = params
    if id is not ...:
        msg["id"] = id
    return msg


def assert_error(response, code, id=None):
    assert response["jsonrpc"] == "2.0"
    assert "result" not in response
    assert response["id"] == id
    assert response["error"]["code"] == code
    assert isinstance(response["error"]["message"], str) and response["error"]["message"]


# ---- success -------------------------------------------------------------------------------------------------------
def test_request_gets_result_with_its_id():
    ctx = Context()
    assert handle(req("add", {"a": 2, "b": 3}, id=7), ctx) == {"jsonrpc": "2.0", "result": {"sum": 5}, "id": 7}
    assert ctx.calls == [("add", 2, 3)]


@pytest.mark.parametrize("request_id", ["abc", 0, -5, 1.5, ""])
def test_string_and_number_ids_are_echoed(request_id):
    assert handle(req("ping", id=request_id)) == {"jsonrpc": "2.0", "result": "pong", "id": request_id}


def test_missing_params_and_empty_positional_params_are_no_params():
    assert handle(req("ping"))["result"] == "pong"
    assert handle(req("ping", []))["result"] == "pong"
    assert handle(req("ping", {}))["result"] == "pong"


def test_null_id_is_a_request_and_gets_a_response():
    ctx = Context()
    assert handle(req("ping", id=None), ctx) == {"jsonrpc": "2.0", "result": "pong", "id": None}
    assert ctx.calls == [("ping",)]


def test_notification_runs_but_gets_no_response():
    ctx = Context()
    assert handle(req("add", {"a": 1}, id=...), ctx) is None
    assert ctx.calls == [("add", 1, 0)]


# ---- parse errors and invalid requests ----------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["", "not json", '{"jsonrpc": "2.0", "method": "ping", "id": 1', "{'a': 1}", "[1,",
                                  '{"jsonrpc": "2.0"} trailing'])
def test_not_json_is_a_parse_error_with_null_id(text):
    assert_error(handle(text), PARSE_ERROR, id=None)


@pytest.mark.parametrize("text", ["1", '"a string"', "null", "true", "3.5"])
def test_json_that_is_not_an_object_is_invalid_request(text):
    assert_error(handle(text), INVALID_REQUEST, id=None)


@pytest.mark.parametrize("message", [
    {"method": "ping", "id": 1},
    {"jsonrpc": "1.0", "method": "ping", "id": 1},
    {"jsonrpc": 2.0, "method": "ping", "id": 1},
    {"jsonrpc": None, "method": "ping", "id": 1},
])
def test_missing_or_wrong_jsonrpc_version(message):
    ctx = Context()
    assert_error(handle(message, ctx), INVALID_REQUEST, id=1)
    assert ctx.calls == []


@pytest.mark.parametrize("method", [None, 5, ["ping"], {"name": "ping"}, True])
def test_method_must_be_a_string(method):
    assert_error(handle({"jsonrpc": "2.0", "method": method, "id": 1}), INVALID_REQUEST, id=1)


def test_method_missing_is_invalid_request():
    assert_error(handle({"jsonrpc": "2.0", "id": 3}), INVALID_REQUEST, id=3)


@pytest.mark.parametrize("params", ["a", 1, True, None])
def test_params_must_be_object_or_array(params):
    ctx = Context()
    assert_error(handle({"jsonrpc": "2.0", "method": "ping", "params": params, "id": 1}, ctx), INVALID_REQUEST, id=1)
    assert ctx.calls == []


@pytest.mark.parametrize("request_id", [True, False, {"a": 1}, [1]])
def test_bool_object_and_array_ids_are_rejected(request_id):
    ctx = Context()
    assert_error(handle(req("ping", id=request_id), ctx), INVALID_REQUEST, id=None)
    assert ctx.calls == []


def test_malformed_envelope_is_answered_even_without_id():
    assert_error(handle({"jsonrpc": "1.0", "method": "ping"}), INVALID_REQUEST, id=None)
    assert_error(handle({"jsonrpc": "2.0", "method": 5}), INVALID_REQUEST, id=None)
    assert_error(handle({"jsonrpc": "2.0", "method": "ping", "params": "x"}), INVALID_REQUEST, id=None)


# ---- method and params errors -----------------------------------------------------------------------------------
def test_unknown_method_echoes_the_id():
    response = handle(req("nope", id="x-1"))
    assert_error(response, METHOD_NOT_FOUND, id="x-1")
    assert "nope" in response["error"]["message"]


@pytest.mark.parametrize(("params", "loc"), [
    ({}, ["a"]),
    ({"a": "not a number"}, ["a"]),
    ({"a": 1, "b": -1}, ["b"]),
])
def test_invalid_params_carry_validation_details(params, loc):
    ctx = Context()
    response = handle(req("add", params, id=4), ctx)
    assert_error(response, INVALID_PARAMS, id=4)
    data = response["error"]["data"]
    assert isinstance(data, list) and data
    assert data[0]["loc"] == loc
    assert isinstance(data[0]["msg"], str) and isinstance(data[0]["type"], str)
    assert ctx.calls == []


def test_invalid_params_lists_every_problem():
    data = handle(req("add", {"a": "x", "b": "y"}))["error"]["data"]
    assert sorted(d["loc"][0] for d in data) == ["a", "b"]


def test_non_empty_positional_params_are_invalid_params():
    ctx = Context()
    assert_error(handle(req("add", [1, 2], id=5), ctx), INVALID_PARAMS, id=5)
    assert ctx.calls == []


def test_handler_rpc_error_keeps_its_code_and_data():
    response = handle(req("busy", id=6))
    assert response == {"jsonrpc": "2.0", "id": 6,
                        "error": {"code": -32001, "message": "session busy", "data": {"task_id": "t1"}}}


def test_handler_exception_is_internal_error_and_dispatch_goes_on():
    ctx = Context()
    dispatcher = Dispatcher(METHODS)

    async def scenario():
        first = await dispatcher.handle_text(json.dumps(req("broken", id=1)), ctx)
        second = await dispatcher.handle_text(json.dumps(req("ping", id=2)), ctx)
        return first, second

    first, second = asyncio.run(scenario())
    assert_error(first, INTERNAL_ERROR, id=1)
    assert "oops" not in json.dumps(first)  # internals are logged, not sent
    assert second == {"jsonrpc": "2.0", "result": "pong", "id": 2}
    assert ctx.calls == [("broken",), ("ping",)]


@pytest.mark.parametrize("message", [
    req("nope", id=...),
    req("add", {"a": "x"}, id=...),
    req("add", [1], id=...),
    req("busy", id=...),
    req("broken", id=...),
])
def test_notifications_get_no_response_even_on_error(message):
    assert handle(message) is None


# ---- batches -----------------------------------------------------------------------------------------------------
def test_batch_returns_only_responses_in_order():
    ctx = Context()
    batch = [req("add", {"a": 1, "b": 1}, id="one"), req("ping", id=...), req("nope", id=2),
             req("add", {"a": 5}, id=3), 7, req("busy", id=...)]
    responses = handle(batch, ctx)
    assert [r["id"] for r in responses] == ["one", 2, 3, None]
    assert responses[0]["result"] == {"sum": 2}
    assert responses[1]["error"]["code"] == METHOD_NOT_FOUND
    assert responses[2]["result"] == {"sum": 5}
    assert responses[3]["error"]["code"] == INVALID_REQUEST
    assert ctx.calls == [("add", 1, 1), ("ping",), ("add", 5, 0)]


def test_empty_batch_is_invalid_request():
    assert_error(handle("[]"), INVALID_REQUEST, id=None)


def test_batch_of_only_notifications_gets_nothing():
    ctx = Context()
    assert handle([req("ping", id=...), req("add", {"a": 2}, id=...)], ctx) is None
    assert ctx.calls == [("ping",), ("add", 2, 0)]


def test_batch_of_non_objects_gets_one_error_each():
    responses = handle("[1, 2, 3]")
    assert len(responses) == 3
    for r in responses:
        assert_error(r, INVALID_REQUEST, id=None)


# ---- hostile input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "[" * 100_000 + "]" * 100_000,
    "[" * 100_000,
    '{"a":' * 100_000 + "1" + "}" * 100_000,
    json.dumps(req("ping"))[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
])
def test_deeply_nested_json_does_not_raise(text):
    response = handle(text)
    assert response["error"]["code"] in (PARSE_ERROR, INVALID_REQUEST)
    assert response["id"] is None


def test_moderately_nested_params_are_handled():
    nested = "[" * 500 + "]" * 500
    response = handle('{"jsonrpc": "2.0", "method": "add", "params": {"a": ' + nested + '}, "id": 1}')
    assert_error(response, INVALID_PARAMS, id=1)


def test_huge_integers_do_not_raise():
    assert handle("9" * 100_000)["error"]["code"] in (PARSE_ERROR, INVALID_REQUEST)
    response = handle('{"jsonrpc": "2.0", "method": "add", "params": {"a": ' + "9" * 100_000 + '}, "id": 1}')
    assert response["error"]["code"] in (PARSE_ERROR, INVALID_PARAMS)
    big = 10**200
    assert handle(req("add", {"a": big}, id=big)) == {"jsonrpc": "2.0", "result": {"sum": big}, "id": big}


@pytest.mark.parametrize("request_id", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_ids_are_not_echoed(request_id):
    # handle() also checks that the response is strict JSON: a NaN/inf id would be sent as bare NaN/Infinity
    response = handle('{"jsonrpc": "2.0", "method": "ping", "id": ' + request_id + "}")
    assert response["error"]["code"] in (PARSE_ERROR, INVALID_REQUEST)


def test_notification_helper_dumps_models():
    msg = notification("text_chunk", AddParams(a=1))
    assert msg == {"jsonrpc": "2.0", "method": "text_chunk", "params": {"a": 1, "b": 0}}
    assert "id" not in msg
