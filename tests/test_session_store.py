"""The durable session store on its real backends: SQLite files and a real redis-server (never mocked).

Every backend keeps the same contract: a session written in pieces reads back whole, in order; a truncation
(a task rolled back) and a rewrite (a history replaced) read back exactly; a hole is repaired by a full rewrite;
failures are reported, never silent; the event loop never waits on the store's I/O.
"""
from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

from services import Redis, redis_server
from session_store import BadRecord, SessionRecord, SessionStore, SessionTooLarge
from store_backends import NullBackend, RedisBackend, SqliteBackend, StoreError, check_url

MiB = 2**20


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/sessions.db"
    return request.getfixturevalue("redis_url")


def record(session_id: str, n: int = 0, **kw) -> SessionRecord:
    tools = [{"name": "get_weather", "description": "", "parameters": {"type": "object", "properties": {}}}]
    return SessionRecord(session_id=session_id, owner="key-1", quota="key-1", tools=tools,
                         messages=[message(i) for i in range(n)], **kw)


def message(i: int) -> dict:
    if i % 3 == 1:
        return {"role": "assistant", "content": f"answer {i} é 🙂", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": f"c{i}"}}}]}
    if i % 3 == 2:
        return {"role": "tool", "content": json.dumps({"t": i}), "tool_call_id": f"call-{i}", "name": "get_weather"}
    return {"role": "user", "content": f"question {i} \ud800 lone surrogate"}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_pieces_truncation_and_rewrite_read_back_exactly(store_url):
    async def go():
        store = SessionStore.open(store_url, max_bytes=MiB, idle_s=3600)
        sid = f"s-{os.urandom(6).hex()}"
        rec = record(sid)
        for n in range(1, 8):  # one message at a time, each save naming where the new part starts
            rec.messages = rec.messages + [message(n - 1)]
            rec.version += 1
            assert await store.save(SessionRecord(**{**rec.__dict__, "messages": list(rec.messages)}), n - 1) is None
        loaded = await store.load(sid)
        assert loaded.messages == [message(i) for i in range(7)] and loaded.version == 7
        assert loaded.tools == rec.tools and loaded.owner == "key-1"

        rec.messages, rec.task, rec.seq, rec.version = rec.messages[:3], {"task_id": "task-1", "base": 3}, 41, 8
        assert await store.save(SessionRecord(**rec.__dict__), 3) is None  # a rollback to 3 messages
        loaded = await store.load(sid)
        assert loaded.messages == [message(i) for i in range(3)]
        assert (loaded.task, loaded.seq) == ({"task_id": "task-1", "base": 3}, 41)

        rec.messages, rec.version, rec.task = [{"role": "user", "content": "replaced"}], 9, None
        assert await store.save(SessionRecord(**rec.__dict__), 0) is None  # a history replaces the conversation
        assert (await store.load(sid)).messages == [{"role": "user", "content": "replaced"}]
        assert await store.version(sid) == 9

        await store.delete(sid)
        assert await store.load(sid) is None and await store.version(sid) is None
        assert store.status()["ok"] and store.status()["failures"] == 0
        await store.close()
    run(go())


def test_writes_land_in_order_without_waiting(store_url):
    """Fire-and-forget saves of many sessions, interleaved: each session ends as its last save says."""
    async def go():
        store = SessionStore.open(store_url, max_bytes=MiB, idle_s=3600)
        ids = [f"o-{os.urandom(6).hex()}" for _ in range(5)]
        recs = {sid: record(sid) for sid in ids}
        futures = []
        for step in range(30):
            for sid in ids:
                rec = recs[sid]
                start = len(rec.messages)
                rec.messages = [*rec.messages, message(step)]
                rec.version += 1
                futures.append(store.save(SessionRecord(**{**rec.__dict__}), start))
        assert all(r is None for r in await asyncio.gather(*futures))
        for sid in ids:
            loaded = await store.load(sid)
            assert loaded.messages == [message(i) for i in range(30)] and loaded.version == 30
        await store.close()
    run(go())


def test_a_hole_is_repaired_by_a_full_rewrite(store_url):
    """Another writer (a second replica, or a store that lost data) leaves fewer messages than this worker
    wrote: the next incremental save notices and rewrites the whole conversation."""
    async def go():
        store = SessionStore.open(store_url, max_bytes=MiB, idle_s=3600)
        sid = f"h-{os.urandom(6).hex()}"
        await store.save(record(sid, 4, version=1), 0)
        await asyncio.to_thread(store.backend.delete, sid)  # behind the worker's back
        assert await store.save(record(sid, 6, version=2), 4) is None
        assert (await store.load(sid)).messages == [message(i) for i in range(6)]
        await store.close()
    run(go())


def test_size_bound_on_write_and_on_read(store_url):
    async def go():
        small = SessionStore.open(store_url, max_bytes=4096, idle_s=3600)
        sid = f"b-{os.urandom(6).hex()}"
        big = record(sid, 1)
        big.messages[0]["content"] = "x" * 5000
        assert isinstance(await small.save(big, 0), SessionTooLarge)
        assert small.status()["ok"], "a session too large is that session's problem, not the store's"
        assert await small.load(sid) is None
        large = SessionStore.open(store_url, max_bytes=MiB, idle_s=3600)
        assert await large.save(big, 0) is None
        with pytest.raises(SessionTooLarge):
            await small.load(sid)
        assert small.status()["ok"]
        await small.close()
        await large.close()
    run(go())


def test_sqlite_survives_a_new_process_and_expires_idle_sessions(tmp_path):
    async def go():
        url = f"sqlite:///{tmp_path}/s.db"
        first = SessionStore.open(url, max_bytes=MiB, idle_s=3600)
        await first.save(record("kept", 5, seq=12, version=3), 0)
        await first.save(record("idle", 2), 0)
        await first.close()
        second = SessionStore.open(url, max_bytes=MiB, idle_s=0.3)
        loaded = await second.load("kept")
        assert loaded.messages == [message(i) for i in range(5)] and (loaded.seq, loaded.version) == (12, 3)
        time.sleep(0.4)
        await second.touch(["kept"])  # in use: a socket or a task holds it
        assert await second.expire() == ["idle"]
        assert await second.load("idle") is None and await second.load("kept") is not None
        await second.close()
    run(go())


def test_redis_keys_expire_by_ttl_and_touch_refreshes(redis_url):
    async def go():
        store = SessionStore.open(redis_url, max_bytes=MiB, idle_s=5)
        sid = f"t-{os.urandom(6).hex()}"
        await store.save(record(sid, 2), 0)
        client = store.backend.client
        meta, msgs = RedisBackend.keys(sid)
        assert 0 < client.pttl(meta) <= 5000 and 0 < client.pttl(msgs) <= 5000
        client.pexpire(meta, 100)
        client.pexpire(msgs, 100)
        await store.touch([sid])
        assert client.pttl(meta) > 4000 and client.pttl(msgs) > 4000
        assert store.shared and store.durable
        await store.close()
    run(go())


def test_a_malformed_record_is_refused_not_trusted(redis_url):
    async def go():
        store = SessionStore.open(redis_url, max_bytes=MiB, idle_s=60)
        sid = f"m-{os.urandom(6).hex()}"
        meta, msgs = RedisBackend.keys(sid)
        store.backend.client.hset(meta, mapping={"meta": json.dumps(record(sid).__dict__), "version": 1, "length": 1})
        store.backend.client.rpush(msgs, json.dumps({"role": "hacker", "content": 3}))
        with pytest.raises(BadRecord, match="message 0"):
            await store.load(sid)
        store.backend.client.hset(meta, "meta", "{not json")
        with pytest.raises(BadRecord, match="malformed"):
            await store.load(sid)
        assert store.status()["ok"]
        await store.close()
    run(go())


def test_a_redis_outage_is_reported_and_never_blocks_the_loop(tmp_path):
    """Redis goes away: writes fail with the reason in status() (what /ready shows) while the event loop keeps
    ticking; Redis comes back: the store reports itself healthy again without a restart."""
    async def go(server: Redis):
        store = SessionStore.open(server.url, max_bytes=MiB, idle_s=60)
        assert await store.save(record("r1", 2), 0) is None
        server.stop()
        gaps, stop = [], asyncio.Event()

        async def heartbeat():
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now
        beat = asyncio.create_task(heartbeat())
        failed = await asyncio.gather(*(store.save(record("r1", 2 + i), 2 + i - 1) for i in range(1, 3)))
        stop.set()
        await beat
        assert all(isinstance(f, StoreError) for f in failed), failed
        status = store.status()
        assert not status["ok"] and "redis" in status["error"] and status["failures"] >= 2
        assert max(gaps) < 0.25, f"the loop stalled {max(gaps):.3f} s while the store failed"
        with pytest.raises(StoreError):
            await store.load("r1")
        server.start()
        deadline = time.monotonic() + 15
        while not store.status()["ok"]:
            assert time.monotonic() < deadline, store.status()
            await asyncio.sleep(0.1)
        assert await store.save(record("r1", 4, version=5), 0) is None
        assert (await store.load("r1")).version == 5
        await store.close()

    server = Redis(tmp_path / "redis").start()
    try:
        run(go(server))
    finally:
        server.stop()


def test_an_unwritable_sqlite_file_is_reported(tmp_path):
    (tmp_path / "dir.db").mkdir()

    async def go():
        store = SessionStore.open(f"sqlite:///{tmp_path}/dir.db", max_bytes=MiB, idle_s=60)
        assert isinstance(await store.save(record("x", 1), 0), StoreError)
        assert not store.status()["ok"] and "sqlite" in store.status()["error"]
        await store.close()
    run(go())


def test_memory_keeps_nothing():
    async def go():
        store = SessionStore(NullBackend(), max_bytes=MiB, idle_s=60)
        assert await store.save(record("n", 3), 0) is None
        assert await store.load("n") is None and not store.durable
        await store.close()
    run(go())


@pytest.mark.parametrize("url", ["memory", "sqlite:///sessions.db", "sqlite:////var/tmp/x.db", "redis://h:6379/0",
                                 "rediss://:pw@h:6380/1"])
def test_store_urls_accepted(url):
    assert check_url(url) == url


@pytest.mark.parametrize("url", ["", "sqlite://", "sqlite:///", "sqlite://host/x.db", "redis://", "postgres://h/db",
                                 "Memory", "file:///x.db"])
def test_store_urls_refused(url):
    with pytest.raises(ValueError, match="use "):
        check_url(url)


def test_sqlite_backend_direct_contract(tmp_path):
    """The backend alone: a write that would leave a hole is refused and changes nothing."""
    db = SqliteBackend(str(tmp_path / "b.db"))
    assert db.write("a", "{}", 1, 0, ["m0", "m1"])
    assert not db.write("a", "{}", 2, 5, ["m5"])
    stored = db.read("a")
    assert (stored.messages, stored.version) == (["m0", "m1"], 1)
    db.close()


def test_a_write_that_failed_during_an_outage_lands_once_the_store_is_back(tmp_path):
    """Redis restarts (with its data) mid-run: the write made while it was down failed (reported), and the session
    then went quiet. Once Redis is back the store must hold that write, not the older copy: otherwise a restart or
    a failover later loads the stale copy (here: a task still marked running, which would be rolled back although
    its client got its answer)."""
    async def go(server: Redis):
        store = SessionStore.open(server.url, max_bytes=MiB, idle_s=60)
        running = record("o1", 2, version=1, task={"task_id": "task-1", "base": 1})
        assert await store.save(running, 0) is None
        store.backend.client.save()  # on disk: the restart below brings this copy back
        server.stop()
        ended = record("o1", 3, version=2)  # the task's end: one more message, no running task
        assert isinstance(await store.save(ended, 2), StoreError)
        server.start()
        deadline = time.monotonic() + 15
        while not store.status()["ok"] or store.status()["queued"]:
            assert time.monotonic() < deadline, store.status()
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)
        back = await store.load("o1")
        assert (back.version, back.task, len(back.messages)) == (2, None, 3)
        await store.close()

    server = Redis(tmp_path / "redis").start()
    try:
        run(go(server))
    finally:
        server.stop()


@pytest.mark.parametrize("tamper", ["tool", "nested", "not_text"])
def test_a_tampered_row_is_refused_cleanly_and_the_store_stays_healthy(tmp_path, tamper):
    """A stored row someone edited (an invalid tool, JSON nested past the parser's recursion limit, a message that
    is not text) is a bad record: attaching it raises BadRecord (a StoreError: the handshake is refused with a
    status), never another exception, and it does not mark the store as failing (/ready, the proxy's check)."""
    from sessions import SessionRegistry

    async def go():
        store = SessionStore.open(f"sqlite:///{tmp_path}/t.db", max_bytes=MiB, idle_s=3600)
        rec = record("t1", 2)
        assert await store.save(rec, 0) is None
        db = store.backend._conn()
        if tamper == "tool":
            meta = json.loads(db.execute("SELECT meta FROM sessions").fetchone()[0])
            meta["tools"] = [{"name": "bad name!", "parameters": {"type": "string"}}]
            db.execute("UPDATE sessions SET meta = ?", (json.dumps(meta),))
        elif tamper == "nested":
            db.execute("UPDATE messages SET body = ? WHERE idx = 0", ("[" * 100_000 + "]" * 100_000,))
        else:
            db.execute("UPDATE messages SET body = ? WHERE idx = 0", (b"\xff{\xfe",))
        registry = SessionRegistry(store, max_sessions=10, idle_timeout_s=3600)
        with pytest.raises(BadRecord):
            await registry.attach("t1")
        assert store.status()["ok"], store.status()
        assert registry.get("t1") is None and len(registry) == 0
        await store.close()
    run(go())


def test_a_session_being_attached_is_not_expired_under_the_socket(redis_url):
    """A client comes back just as its session reaches the idle timeout. While the replica checks the shared
    store's version (an await), idle expiry runs: it must not remove the session being attached, or the socket is
    handed a session the registry no longer holds (uncounted, and loaded a second time by the next socket)."""
    from sessions import SessionRegistry

    async def go():
        store = SessionStore.open(redis_url, max_bytes=MiB, idle_s=60)
        registry = SessionRegistry(store, max_sessions=10, idle_timeout_s=60)
        session = registry.create([], owner="key-1")
        assert await session.save() is None
        session.last_active -= 61  # idle for just over the timeout
        attaching = asyncio.create_task(registry.attach(session.session_id))
        await asyncio.sleep(0)  # the attach now waits for the store's answer
        registry.expire_idle()
        attached = await attaching
        assert attached is not None and registry.get(session.session_id) is attached
        assert await store.load(session.session_id) is not None
        await store.close()
    run(go())


def test_a_tampered_redis_hash_is_a_bad_record_not_an_outage(redis_url):
    """The Redis side of the same: a version or length that is not a number, a meta that is not UTF-8."""
    async def go():
        store = SessionStore.open(redis_url, max_bytes=MiB, idle_s=60)
        for field_, value in (("version", "x"), ("length", "many"), ("meta", b"\xff\xfe")):
            sid = f"h-{os.urandom(6).hex()}"
            assert await store.save(record(sid, 2), 0) is None
            store.backend.client.hset(RedisBackend.keys(sid)[0], field_, value)
            with pytest.raises(BadRecord):
                await store.load(sid)
            assert store.status()["ok"], (field_, store.status())
        await store.close()
    run(go())


def test_a_replica_expiring_its_old_copy_does_not_delete_a_session_another_replica_uses(redis_url):
    """Replica r0 dies; r1 serves the session from Redis; r0 comes back and HAProxy sends the session home, where
    it goes on. An hour later r1's copy (idle there) expires: that must not delete the session from Redis, which
    r0 is using (r0's next restart would find no such session)."""
    from sessions import SessionRegistry

    def replica() -> SessionRegistry:
        return SessionRegistry(SessionStore.open(redis_url, max_bytes=MiB, idle_s=60), max_sessions=10,
                               idle_timeout_s=60)

    async def turn(registry: SessionRegistry, session, text: str) -> None:
        session.messages = [*session.messages, {"role": "user", "content": text}]
        assert await session.save() is None

    async def go():
        r0, r1 = replica(), replica()
        session = r0.create([], owner="key-1")
        await turn(r0, session, "one")
        await r0.store.close()  # r0 dies
        on_r1 = await r1.attach(session.session_id)
        await turn(r1, on_r1, "two")
        r0 = replica()  # r0 is back: the session goes home
        for home_turns in ([], ["three"]):  # attached there (no turn yet), then used
            on_r0 = await r0.attach(session.session_id)
            for text in home_turns:
                await turn(r0, on_r0, text)
            r1.expire_idle(time.monotonic() + 3600)  # r1's old copy expires
            await r1.store.delete("-flush-")  # (the store's operations run in order: r1's expiry is done)
            stored = await r0.store.load(session.session_id)
            assert stored is not None, f"r1's expiry deleted the session r0 holds (turns at home: {home_turns})"
            assert [m["content"] for m in stored.messages] == ["one", "two", *home_turns]
            r1 = replica()
            await r1.attach(session.session_id)  # r1 holds a copy again (for the second round)
            r0 = replica()
        await r0.store.close()
        await r1.store.close()
    run(go())


def test_a_huge_stored_row_is_refused_without_being_read_into_memory(store_url):
    """A stored session far past INFERENCE_SESSION_MAX_BYTES (written by hand, or by a server with a larger
    limit) is refused as too large before its messages are read: loading it costs no more memory than the limit."""
    import tracemalloc

    async def go():
        store = SessionStore.open(store_url, max_bytes=MiB, idle_s=3600)
        sid = f"huge-{os.urandom(6).hex()}"
        assert await store.save(record(sid, 2), 0) is None
        body = json.dumps({"role": "user", "content": "x" * (48 * MiB)})
        if isinstance(store.backend, RedisBackend):
            store.backend.client.rpush(RedisBackend.keys(sid)[1], body)
            store.backend.client.hset(RedisBackend.keys(sid)[0], "length", 3)
        else:
            db = store.backend._conn()
            db.execute("INSERT INTO messages VALUES (?, 2, ?)", (sid, body))
            db.execute("UPDATE sessions SET length = 3 WHERE id = ?", (sid,))
        del body
        tracemalloc.start()
        try:
            with pytest.raises(SessionTooLarge):
                await store.load(sid)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 * MiB, f"loading a refused session allocated {peak / MiB:.0f} MiB"
        assert store.status()["ok"]
        await store.close()
    run(go())
