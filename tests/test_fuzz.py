"""Property-based fuzzing of the WebSocket JSON-RPC endpoint: over 1,000 generated frames on ONE socket
(random JSON, wrong types, huge values, unknown methods, junk bytes, deep nesting, batches, oversized batches,
lone surrogates). Each frame gets the right JSON-RPC answer, the socket stays usable, and no task leaks.
Then sequences of generate / cancel / tool_result, as batches or back-to-back frames: every accepted generate
ends exactly once."""
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
# A batch of requests that each get an error: the replies come back in order, one per request
answered = st.one_of(bad_envelope, unknown_method, bad_generate, bad_tool_result, unknown_task, nothing_to_cancel)
batch = st.lists(answered, min_size=1, max_size=8).map(
    lambda cases: frame([json.loads(payload) for payload, _ in cases], [code for _, code in cases]))
too_big_batch = st.integers(min_value=33, max_value=200).map(
    lambda n: frame([{"jsonrpc": "2.0", "method": "cancel", "id": i} for i in range(n)], "batch-limit"))
# An unpaired surrogate escape anywhere (id, method, params; alone or in a batch): not Unicode, -32700
surrogate = st.builds(
    lambda code, where, text: raw(json.dumps({
        "id": {"jsonrpc": "2.0", "method": "cancel", "id": text + "@"},
        "method": {"jsonrpc": "2.0", "method": text + "@", "id": 1},
        "params": {"jsonrpc": "2.0", "method": "generate", "id": 1, "params": {"message": text + "@"}},
        "batch": [{"jsonrpc": "2.0", "method": "cancel", "id": 1, "params": {"task_id": text + "@"}}],
    }[where]).replace("@", "\\u%04x" % code), "surrogate"),
    st.integers(min_value=0xD800, max_value=0xDFFF), st.sampled_from(["id", "method", "params", "batch"]),
    st.text(alphabet="abc", max_size=5))
frames = st.one_of(not_json, deep, not_an_object, bad_envelope, unknown_method, bad_generate, bad_tool_result,
                   unknown_task, nothing_to_cancel, notifications, huge, batch, too_big_batch, surrogate)


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
    if expected == "surrogate":
        assert reply["error"]["code"] == -32700 and reply["id"] is None, (payload[:200], reply)
        return
    if expected == "batch-limit":
        assert isinstance(reply, dict) and reply["error"]["code"] == -32600 and reply["id"] is None
        return
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


# ---- sequences: every accepted generate ends exactly once ---------------------------------------------------------------
def respond(prompt: str) -> str:
    last = prompt.rsplit("<|im_start|>user\n", 1)[-1]
    if "<tool_response>" in last:
        return "thanks."
    if "use the tool" in last:
        return '<tool_call>\n{"name": "lookup", "arguments": {}}\n</tool_call>'
    if "go on" in last:
        return "and so on " * 200
    return "ok."


action = st.one_of(
    st.sampled_from(["hi", "use the tool", "go on"]).map(lambda m: ("generate", m)),
    st.sampled_from(["cancel", "cancel-task", "cancel-other"]).map(lambda a: (a, None)),
    st.sampled_from(["result", "result-wrong-call", "result-unknown-task", "result-huge"]).map(lambda a: (a, None)),
)
sequence = st.lists(st.tuples(st.lists(action, min_size=1, max_size=4), st.booleans()), min_size=1, max_size=5)


@pytest.fixture(scope="module")
def sequence_server(tiny_model_dir, tmp_path_factory):
    settings = Settings(model_id=str(tiny_model_dir), log_file=str(tmp_path_factory.mktemp("log") / "log"),
                        log_level="WARNING", rate_limit_per_min=0, kv_block_size=16, max_context=4096,
                        max_tool_result_chars=2000)
    with running_server(settings, scripted_loader(respond, step_delay=0.001)) as app:
        yield app


def _request(counter: list[int], method: str, params: dict) -> dict:
    counter[0] += 1
    return {"jsonrpc": "2.0", "id": counter[0], "method": method, "params": params}


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(steps=sequence)
def test_every_accepted_generate_ends_exactly_once(sequence_server, steps):
    app = sequence_server
    sid = create_session(app, [{"name": "lookup", "parameters": {"type": "object", "properties": {}}}])
    counter, accepted, ends, calls = [0], [], {}, {}
    task = None  # the latest accepted task

    def handle(message) -> dict | None:
        if isinstance(message, dict) and message.get("method") == "end":
            ends[message["params"]["task_id"]] = ends.get(message["params"]["task_id"], 0) + 1
        elif isinstance(message, dict) and message.get("method") == "function_call_request":
            calls[message["params"]["task_id"]] = message["params"]["tool_calls"][0]["call_id"]
        return message

    with connect(f"ws://{app.base}/ws/{sid}", max_size=None) as ws:
        for actions, batched in steps:
            requests = []
            for kind, arg in actions:
                if kind == "generate":
                    requests.append(_request(counter, "generate", {"message": arg}))
                elif kind.startswith("cancel"):
                    tid = {"cancel": None, "cancel-task": task, "cancel-other": "task-nope"}[kind]
                    requests.append(_request(counter, "cancel", {} if tid is None else {"task_id": tid}))
                else:
                    result = "x" * 5000 if kind == "result-huge" else "42"
                    call_id = "call-nope" if kind == "result-wrong-call" else calls.get(task)
                    requests.append(_request(counter, "tool_result", {
                        "task_id": "task-nope" if kind == "result-unknown-task" else (task or "task-none"),
                        "results": [{"tool_name": "lookup", "result": result, **({"call_id": call_id} if call_id
                                                                                   else {})}]}))
            if batched:
                ws.send(json.dumps(requests))
            else:
                for request in requests:
                    ws.send(json.dumps(request))
            waiting = {r["id"]: r for r in requests}
            while waiting:
                message = handle(json.loads(ws.recv(timeout=20)))
                for reply in message if isinstance(message, list) else [message]:
                    if "method" in reply:
                        continue
                    request = waiting.pop(reply["id"])
                    assert ("result" in reply) != ("error" in reply), reply
                    if request["method"] == "generate" and "result" in reply:
                        task = reply["result"]["task_id"]
                        accepted.append(task)
        ws.send(json.dumps({"jsonrpc": "2.0", "method": "cancel", "id": "last"}))  # whatever is still running
        deadline = time.monotonic() + 30
        while any(t not in ends for t in accepted):
            assert time.monotonic() < deadline, (accepted, ends)
            handle(json.loads(ws.recv(timeout=20)))
        quiet_until = time.monotonic() + 0.2  # nothing more may come: a second end would arrive now
        while time.monotonic() < quiet_until:
            try:
                handle(json.loads(ws.recv(timeout=quiet_until - time.monotonic())))
            except TimeoutError:
                break
    assert set(ends) == set(accepted) and all(n == 1 for n in ends.values()), (accepted, ends)
    rt = app.state.runtime
    assert rt.sessions.get(sid).active_task is None
