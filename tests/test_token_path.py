"""The token path on the front end's side: the per-request collector that merges what a busy reader missed, the
text_chunk encoding (json.dumps' text at msgspec's speed), coalescing chunks while a socket is behind, and the
Rust detokenizer against the Python one."""
from __future__ import annotations

import asyncio
import json
import random

import pytest
from hypothesis import given, settings, strategies as st

from engine.async_engine import RequestStream
from engine.request import FinishReason, TokenEvent
from jsonrpc import encode, encode_text_chunk
from tasks import Session
from utils import IncrementalDetokenizer


def run(coro):
    return asyncio.run(coro)


# ---- RequestStream ----------------------------------------------------------------------------------------------
def test_a_reader_that_keeps_up_sees_every_event():
    async def go():
        stream = RequestStream(lambda rid: None, asyncio.get_running_loop())
        stream.request_id = "r"
        seen = []

        async def read():
            async for event in stream:
                seen.append(event)
        reader = asyncio.create_task(read())
        for i in range(5):
            await asyncio.sleep(0)
            stream.deliver(TokenEvent("r", (i,), completion_tokens=i + 1))
            await asyncio.sleep(0)
        stream.deliver(TokenEvent("r", (), FinishReason.LENGTH, completion_tokens=5))
        await reader
        return seen
    seen = run(go())
    assert [e.token_ids for e in seen] == [(0,), (1,), (2,), (3,), (4,), ()]
    assert seen[-1].finish_reason is FinishReason.LENGTH


def test_events_a_busy_reader_missed_arrive_merged_in_order():
    async def go():
        stream = RequestStream(lambda rid: None, asyncio.get_running_loop())
        stream.request_id = "r"
        stream.deliver(TokenEvent("r", (1,), prompt_tokens=7, cached_tokens=3, completion_tokens=1))
        stream.deliver(TokenEvent("r", (2, 3), prompt_tokens=7, cached_tokens=3, completion_tokens=3))
        stream.deliver(TokenEvent("r", (4,), FinishReason.STOP, None, 7, 3, 4))
        stream.deliver(TokenEvent("r", (9,), completion_tokens=9))  # nothing follows a final event
        return [e async for e in stream], stream.merged
    events, merged = run(go())
    assert len(events) == 1 and merged == 3
    e = events[0]
    assert e.token_ids == (1, 2, 3, 4) and e.finish_reason is FinishReason.STOP
    assert (e.prompt_tokens, e.cached_tokens, e.completion_tokens) == (7, 3, 4)


def test_leaving_a_stream_aborts_its_request_once():
    aborted = []

    async def go():
        stream = RequestStream(aborted.append, asyncio.get_running_loop())
        stream.request_id = "r"
        stream.deliver(TokenEvent("r", (1,), completion_tokens=1))
        async with stream:
            async for _ in stream:
                break
        stream.abort()
    run(go())
    assert aborted == ["r"]


# ---- text_chunk encoding ----------------------------------------------------------------------------------------
@settings(max_examples=500, deadline=None)
@given(st.text(), st.text(), st.text(), st.integers(0, 2**53))
def test_text_chunk_encoding_is_json_dumps_text(session_id, task_id, chunk, seq):
    expected = encode({"jsonrpc": "2.0", "method": "text_chunk",
                       "params": {"session_id": session_id, "task_id": task_id, "chunk": chunk, "seq": seq}})
    assert encode_text_chunk(session_id, task_id, chunk, seq) == expected


def test_text_chunk_with_a_lone_surrogate_is_escaped_not_dropped():
    text, size = encode_text_chunk("s", "t", "a\ud800b", 1)
    assert json.loads(text)["params"]["chunk"] == "a\ud800b" and size == len(text.encode())


# ---- coalescing while the socket is behind ----------------------------------------------------------------------
class FakeConnection:
    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.behind = False
        self.on_drained = None
        self.held = 0

    def hold(self, size: int) -> None:
        self.held += 1

    def released(self) -> None:
        self.held = 0

    def send_text(self, text: str, size: int) -> None:
        self.sent.append(json.loads(text))


def session_with(conn: FakeConnection) -> Session:
    session = Session("s", [])
    session.connection, session.emitter = conn, conn.send_text
    return session


def test_chunks_are_held_while_the_socket_is_behind_and_sent_joined_when_it_catches_up():
    conn = FakeConnection()
    session = session_with(conn)
    session.emit_chunk("t", "a", coalesce=True)  # not behind: at once
    conn.behind = True
    session.emit_chunk("t", "b", coalesce=True)
    session.emit_chunk("t", "c", coalesce=True)
    assert [m["params"]["chunk"] for m in conn.sent] == ["a"] and conn.on_drained is not None
    conn.behind = False
    conn.on_drained()  # the connection's sender: everything queued is written
    assert [m["params"]["chunk"] for m in conn.sent] == ["a", "bc"]
    assert [m["params"]["seq"] for m in conn.sent] == [1, 2]


def test_held_text_goes_out_before_any_other_notification():
    conn = FakeConnection()
    session = session_with(conn)
    conn.behind = True
    session.emit_chunk("t", "x", coalesce=True)
    session.emit_raw("end", {"session_id": "s", "task_id": "t"})
    assert [(m["method"], m["params"]["seq"]) for m in conn.sent] == [("text_chunk", 1), ("end", 2)]
    assert session.replay.since(0).texts == [json.dumps(m, ensure_ascii=False) for m in conn.sent]


def test_without_coalescing_every_chunk_is_sent():
    conn = FakeConnection()
    session = session_with(conn)
    conn.behind = True
    for c in "xyz":
        session.emit_chunk("t", c, coalesce=False)
    assert [m["params"]["chunk"] for m in conn.sent] == ["x", "y", "z"]


def test_held_text_of_a_socket_that_went_away_is_kept_for_the_resume():
    conn = FakeConnection()
    session = session_with(conn)
    conn.behind = True
    session.emit_chunk("t", "x", coalesce=True)
    session.connection = session.emitter = None  # detached
    session.emit_chunk("t", "y", coalesce=True)
    assert [json.loads(t)["params"]["chunk"] for t in session.replay.since(0).texts] == ["xy"]


# ---- the detokenizer's two paths ----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_rust_and_python_detokenizers_agree(tiny_tokenizer, seed):
    rng = random.Random(seed)
    ids = [rng.randrange(len(tiny_tokenizer)) for _ in range(300)]
    rust, python = IncrementalDetokenizer(tiny_tokenizer), IncrementalDetokenizer(tiny_tokenizer)
    assert rust.stream is not None
    python.stream = None
    a = [rust.push(i) for i in ids]
    b = [python.push(i) for i in ids]
    assert "".join(a) + rust.flush() == "".join(b) + python.flush()
    assert a == b


def test_held_text_counts_against_the_socket_bounds_so_a_stalled_client_is_still_dropped():
    from connection import Connection

    class Stuck:  # a client that never reads: every send waits forever
        async def send_text(self, text: str) -> None:
            await asyncio.Event().wait()

    async def go():
        conn = Connection(Stuck(), max_queue=16)
        session = Session("s", [])
        session.connection, session.emitter = conn, conn.send_text
        for i in range(40):
            session.emit_chunk("t", f"w{i} ", coalesce=i > 0)
            await asyncio.sleep(0)
            if conn.overflowed.is_set():
                break
        conn.sender.cancel()
        return i
    assert run(go()) <= 16  # dropped once the chunks it was not sent would have filled its queue
