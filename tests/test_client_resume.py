"""The client's resuming socket (``inference_client/link.py``) and what the session makes of a resume, against a
socket double whose drops happen exactly where a test puts them (the real server's resumes: test_client.py and
test_durable_sessions.py)."""
from __future__ import annotations

import asyncio
import json
from typing import Any

from websockets.exceptions import ConnectionClosed

from inference_client import End, Error, Session, TextChunk
from inference_client.events import TASK_LOST


class FakeSocket:
    """A ClientConnection double: ``push`` queues what the server says; ``drop`` closes it (sends then fail, the
    reader's iteration ends when ``end_reading`` is called or at once)."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.incoming: asyncio.Queue[Any] = asyncio.Queue()
        self.close_code: int | None = None
        self.sent_event = asyncio.Event()

    def push(self, message: dict[str, Any]) -> None:
        self.incoming.put_nowait(json.dumps(message))

    def drop(self, code: int = 1001, *, end_reading: bool = True) -> None:
        self.close_code = code
        if end_reading:
            self.end_reading()

    def end_reading(self) -> None:
        self.incoming.put_nowait(None)

    async def send(self, text: str) -> None:
        if self.close_code is not None:
            raise ConnectionClosed(None, None)
        self.sent.append(json.loads(text))
        self.sent_event.set()

    async def close(self) -> None:
        self.drop(1000)

    def __aiter__(self) -> FakeSocket:
        return self

    async def __anext__(self) -> str:
        item = await self.incoming.get()
        if item is None:
            raise ConnectionClosed(None, None)
        return item

    async def next_sent(self) -> dict[str, Any]:
        while not self.sent:
            self.sent_event.clear()
            await asyncio.wait_for(self.sent_event.wait(), 5)
        return self.sent.pop(0)


def session_over(first: FakeSocket, *later: FakeSocket) -> tuple[Session, list[int]]:
    """A session on ``first``; each reconnect opens the next of ``later`` (the resume_from it asked is kept)."""
    queue, asked = list(later), []

    async def reopen(last_seq: int) -> FakeSocket:
        asked.append(last_seq)
        return queue.pop(0)
    return Session("s1", first, [], timeout=5, reopen=reopen, reconnect_s=5), asked


def text_chunk(task_id: str, chunk: str, seq: int) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": "text_chunk", "params": {"task_id": task_id, "chunk": chunk, "seq": seq}}


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_a_request_sent_on_a_socket_that_just_closed_goes_out_again_after_the_resume():
    """The send meets the closed socket before the reader has noticed: the request is kept, not failed, and
    goes out once the resumed socket's replay is over."""
    async def go():
        old, new = FakeSocket(), FakeSocket()
        session, asked = session_over(old, new)
        old.drop(end_reading=False)  # closed, but the reader has not seen it yet
        call = asyncio.create_task(session.call("tool_result", {"task_id": "t1", "results": []}))
        await asyncio.sleep(0.05)
        assert not call.done() and old.sent == []
        old.end_reading()
        new.push({"jsonrpc": "2.0", "method": "resumed", "params": {"session_id": "s1", "task_id": "t1"}})
        request = await new.next_sent()
        assert request["method"] == "tool_result" and asked == [0]
        new.push({"jsonrpc": "2.0", "id": request["id"], "result": {"status": "ok"}})
        assert await call == {"status": "ok"} and session.reconnects == 1
        await session.close()
    run(go())


def test_notifications_already_seen_are_dropped_and_resume_from_is_the_last_seq():
    async def go():
        old, new = FakeSocket(), FakeSocket()
        session, asked = session_over(old, new)
        gen = session.generate("hi")
        start = asyncio.create_task(gen.start())
        request = await old.next_sent()
        old.push({"jsonrpc": "2.0", "id": request["id"], "result": {"status": "processing", "task_id": "t1"}})
        await start
        for seq, chunk in ((1, "a"), (2, "b")):
            old.push(text_chunk("t1", chunk, seq))
        assert [await gen.__anext__(), await gen.__anext__()] == [TextChunk("a"), TextChunk("b")]
        old.drop()
        for seq, chunk in ((2, "b"), (3, "c")):  # the replay overlaps what arrived before the drop
            new.push(text_chunk("t1", chunk, seq))
        new.push({"jsonrpc": "2.0", "method": "resumed", "params": {"session_id": "s1", "task_id": "t1"}})
        new.push({"jsonrpc": "2.0", "method": "end", "params": {"task_id": "t1", "finish_reason": "stop", "seq": 4}})
        assert [e async for e in gen] == [TextChunk("c"), End("stop", {})]
        assert asked == [2] and gen.text == "abc" and session.last_seq == 4
        await session.close()
    run(go())


def test_a_task_the_replay_does_not_name_ends_as_lost():
    """Its end was not kept while the socket was away: the resumed socket names no running task, and the
    generation ends with -32011 and End("error") instead of waiting for ever."""
    async def go():
        old, new = FakeSocket(), FakeSocket()
        session, _ = session_over(old, new)
        gen = session.generate("hi")
        start = asyncio.create_task(gen.start())
        request = await old.next_sent()
        old.push({"jsonrpc": "2.0", "id": request["id"], "result": {"status": "processing", "task_id": "t1"}})
        await start
        old.drop()
        new.push({"jsonrpc": "2.0", "method": "resumed", "params": {"session_id": "s1", "task_id": None}})
        events = [e async for e in gen]
        assert [type(e) for e in events] == [Error, End] and events[0].code == TASK_LOST
        assert gen.finish_reason == "error"
        await session.close()
    run(go())


def test_a_generate_whose_response_was_lost_becomes_the_task_the_replay_names():
    """The generate went out, the socket dropped before its response: the replay names the running task, so the
    generate is not sent again (that would be refused as busy, or start a second task): it is that task."""
    async def go():
        old, new = FakeSocket(), FakeSocket()
        session, _ = session_over(old, new)
        gen = session.generate("hi")
        start = asyncio.create_task(gen.start())
        await old.next_sent()
        old.drop()
        new.push(text_chunk("t9", "x", 1))
        new.push({"jsonrpc": "2.0", "method": "resumed", "params": {"session_id": "s1", "task_id": "t9"}})
        await start
        new.push({"jsonrpc": "2.0", "method": "end", "params": {"task_id": "t9", "finish_reason": "stop", "seq": 2}})
        assert gen.task_id == "t9" and [e async for e in gen] == [TextChunk("x"), End("stop", {})]
        assert new.sent == []  # nothing was sent again
        await session.close()
    run(go())


def test_a_resent_generate_refused_as_busy_with_an_unclaimed_task_is_that_task():
    """The replay came too late to name it (or named none): the generate is sent again, and "session busy" with a
    task no generation of ours owns means the first one got through."""
    async def go():
        old, new = FakeSocket(), FakeSocket()
        session, _ = session_over(old, new)
        gen = session.generate("hi")
        start = asyncio.create_task(gen.start())
        await old.next_sent()
        old.drop()
        new.push({"jsonrpc": "2.0", "method": "resumed", "params": {"session_id": "s1", "task_id": None}})
        resent = await new.next_sent()
        assert resent["method"] == "generate"
        new.push({"jsonrpc": "2.0", "id": resent["id"], "error": {"code": -32001, "message": "busy",
                                                                  "data": {"task_id": "t5"}}})
        await start
        assert gen.task_id == "t5"
        await session.close()
    run(go())
