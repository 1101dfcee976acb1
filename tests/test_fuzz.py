"""Property-based fuzzing of the WebSocket JSON-RPC endpoint: over 1,000 generated frames on ONE socket
(random JSON, wrong types, huge values, unknown methods, junk bytes, deep nesting). Each frame gets the
right JSON-RPC answer, the socket stays usable, and no task leaks."""
from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect

from shared import Settings
from support import create_session, running_server, scripted_loader

METHODS = ("generate", "tool_result", "cancel")
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                          max_leaves=12)
ids = st.one_of(st.integers(min_value=-(2**40), max_value=2**40), st.text(max_size=12))


def frame(payload, expected):
    """A JSON-encoded frame and what must come back."""
    return (json.dumps(payload), expected)


def raw(data, expected):
    """A frame sent as is (text or bytes)."""
    return (data, expected)


# Each strategy yields (frame, expected error code, or None for "no response") -------------------------------
not_json = st.one_of(
    st.binary(min_size=1, max_size=64).filter(lambda b: not _is_json(b)).map(lambda b: raw(b, -32700)),
    st.text(min_size=1, max_size=64).filter(lambda t: not _is_json(t)).map(lambda t: raw(t, -32700)),
    st.sampled_from(["NaN", '{"id": Infinity}', "1e999", "[1,]", "{'a': 1}", ""]).map(lambda t: raw(t, -32700)),
)
# Deep nesting: too deep for the parser (-32700), or parsed as a batch whose one entry is not a request
deep = st.integers(min_value=500, max_value=100_000).map(lambda n: raw("[" * n + "]" * n, "deep"))
not_an_object = st.one_of(json_leaf.filter(lambda v: not isinstance(v, (dict, list))),
                          st.lists(json_leaf, min_size=1, max_size=3)).map(
    lambda v: frame(v, [-32600] * len(v) if isinstance(v, list) else -32600))
bad_envelope = st.one_of(
    st.builds(lambda i, v: {"jsonrpc": v, "method": "cancel", "id": i}, ids,
              json_leaf.filter(lambda v: v != "2.0")),
    st.builds(lambda i, m: {"jsonrpc": "2.0", "method": m, "id": i}, ids,
              json_value.filter(lambda m: not isinstance(m, str))),
    st.builds(lambda i, p: {"jsonrpc": "2.0", "method": "cancel", "params": p, "id": i}, ids,
              json_leaf.filter(lambda p: p is not None)),
    st.builds(lambda i: {"jsonrpc": "2.0", "method": "cancel", "id": i}, st.one_of(
        st.booleans(), st.lists(json_leaf, max_size=2), st.dictionaries(st.text(max_size=3), json_leaf, max_size=2))),
).map(lambda o: frame(o, -32600))
unknown_method = st.builds(lambda i, m: {"jsonrpc": "2.0", "method": m, "id": i}, ids,
                           st.text(max_size=30).filter(lambda m: m not in METHODS)).map(lambda o: frame(o, -32601))
bad_generate = st.one_of(
    st.builds(lambda v: {"message": v}, json_value.filter(lambda v: not isinstance(v, str))),
    st.builds(lambda v: {"history": v}, json_value.filter(lambda v: not isinstance(v, list) or v == [])),
    st.builds(lambda m, h: {"message": m, "history": h}, st.text(max_size=10),
              st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": st.text(max_size=5)}),
                       min_size=1, max_size=2)),
    st.builds(lambda n: {"message": "hi", "max_new_tokens": n},
              st.one_of(st.integers(max_value=0), st.integers(min_value=10**6, max_value=10**30))),
    st.builds(lambda t: {"message": "hi", "temperature": t},
              st.floats(max_value=-0.001, allow_nan=False, allow_infinity=False)),
    st.builds(lambda t: {"message": "hi", "top_p": t},
              st.floats(min_value=1.001, max_value=1e300, allow_infinity=False)),
    st.builds(lambda t: {"message": "hi", "tools": t}, st.lists(json_leaf, min_size=1, max_size=2)),
    st.just({}),
).map(lambda p: {"jsonrpc": "2.0", "method": "generate", "params": p, "id": 7}).map(lambda o: frame(o, -32602))
bad_tool_result = st.one_of(
    st.builds(lambda t: {"task_id": t}, json_value),
    st.builds(lambda r: {"task_id": "x", "results": r}, json_value.filter(
        lambda r: not (isinstance(r, list) and r and all(isinstance(x, dict) and "tool_name" in x for x in r)))),
).map(lambda p: {"jsonrpc": "2.0", "method": "tool_result", "params": p, "id": 8}).map(lambda o: frame(o, -32602))
unknown_task = st.builds(lambda t: {"jsonrpc": "2.0", "method": "tool_result", "id": 9, "params": {
    "task_id": t, "results": [{"tool_name": "x"}]}}, st.text(max_size=20)).map(lambda o: frame(o, -32003))
nothing_to_cancel = st.builds(lambda i: {"jsonrpc": "2.0", "method": "cancel", "id": i}, ids).map(
    lambda o: frame(o, -32002))
notifications = st.builds(lambda m, p: {"jsonrpc": "2.0", "method": m, "params": p},
                          st.sampled_from(["cancel", "nope", "tool_result"]),
                          st.dictionaries(st.text(max_size=5), json_leaf, max_size=2)).map(lambda o: frame(o, None))
huge = st.integers(min_value=1, max_value=3).map(
    lambda k: frame({"jsonrpc": "2.0", "method": "generate", "id": 1, "params": {
        "message": "x" * 10, "max_new_tokens": 10**(100 * k)}}, -32602))
frames = st.one_of(not_json, deep, not_an_object, bad_envelope, unknown_method, bad_generate, bad_tool_result,
                   unknown_task, nothing_to_cancel, notifications, huge)


def _is_json(data) -> bool:
    try:
        json.loads(data)
        return True
    except (ValueError, RecursionError):
        return False


@pytest.fixture(scope="module")
def socket_under_fuzz(tiny_model_dir, tmp_path_factory):
    settings = Settings(model_id=str(tiny_model_dir), log_file=str(tmp_path_factory.mktemp("log") / "log"),
                        log_level="WARNING", rate_limit_per_min=0, kv_block_size=16, max_context=4096)
    with running_server(settings, scripted_loader(lambda p: "ok.")) as app:
        sid = create_session(app)
        with connect(f"ws://{app.base}/ws/{sid}", max_size=None) as ws:
            yield app, sid, ws


COUNT = {"frames": 0}


@settings(max_examples=1100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(case=frames)
def test_every_frame_gets_the_right_answer_on_one_socket(socket_under_fuzz, case):
    app, sid, ws = socket_under_fuzz
    payload, expected = case
    ws.send(payload)
    COUNT["frames"] += 1
    if expected is None:  # a notification: nothing comes back; a ping proves the socket is still in order
        ws.send(json.dumps({"jsonrpc": "2.0", "method": "cancel", "id": "probe"}))
        reply = json.loads(ws.recv(timeout=10))
        assert reply["id"] == "probe" and reply["error"]["code"] == -32002
        return
    reply = json.loads(ws.recv(timeout=10))
    if expected == "deep":
        assert reply == [{"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request: expected an object"},
                          "id": None}] or reply["error"]["code"] == -32700
        return
    if isinstance(expected, list):
        assert isinstance(reply, list) and [r["error"]["code"] for r in reply] == expected
        return
    assert reply["jsonrpc"] == "2.0" and reply["error"]["code"] == expected, (payload[:200], reply)
    if expected in (-32700,):
        assert reply["id"] is None


def test_after_the_fuzz_the_socket_works_and_nothing_leaked(socket_under_fuzz):
    app, sid, ws = socket_under_fuzz
    assert COUNT["frames"] >= 1000
    rt = app.state.runtime
    assert rt.sessions.get(sid).active_task is None
    ws.send(json.dumps({"jsonrpc": "2.0", "method": "generate", "id": "last", "params": {"message": "hi"}}))
    assert json.loads(ws.recv(timeout=10))["result"]["status"] == "processing"
    while True:
        message = json.loads(ws.recv(timeout=10))
        if message.get("method") == "end":
            assert message["params"]["finish_reason"] == "stop"
            break
    deadline = time.monotonic() + 5
    while rt.engine.engine.stats()["running"] or rt.sessions.active_tasks:
        assert time.monotonic() < deadline
        time.sleep(0.01)
