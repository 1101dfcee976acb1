"""Where durable sessions are kept: SQLite (one file, one server) or Redis (shared by replicas), or nowhere
(``memory``). Each backend is synchronous and is called only from the session store's worker thread.

A session is two things: its meta (a JSON object: owner, tools, timestamps, the running task, ...) and its
conversation, one JSON text per message. A write replaces the messages from index ``start`` on and the meta,
atomically; it refuses (returns False) when fewer than ``start`` messages are stored, so the store can rewrite
the whole conversation instead of leaving a hole.
"""
from __future__ import annotations

import os
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit


class StoreError(Exception):
    """The store could not be reached or refused an operation; the message says which."""


class TooLarge(StoreError):
    """A stored session is larger than the reader accepts (refused before its messages are read)."""

    def __init__(self, session_id: str, size: int, max_bytes: int) -> None:
        super().__init__(f"session {session_id}: more than {max_bytes} bytes stored ({size} at least)")


@dataclass(frozen=True)
class Stored:
    """What a backend returns for one session: the meta JSON, the version, and the messages' JSON texts."""

    meta: str
    version: int
    messages: list[str]


class Backend(Protocol):
    shared: bool  # other processes write the same sessions (a replica must check it holds the latest copy)
    durable: bool  # survives this process

    def write(self, session_id: str, meta: str, version: int, start: int, messages: list[str]) -> bool: ...
    def read(self, session_id: str, max_bytes: int | None = None) -> Stored | None: ...  # TooLarge past it
    def version(self, session_id: str) -> int | None: ...
    def delete(self, session_id: str, version: int | None = None) -> None: ...  # (only if still at ``version``)
    def touch(self, session_ids: list[str]) -> None: ...
    def expire(self, idle_s: float) -> list[str]: ...
    def ping(self) -> None: ...
    def close(self) -> None: ...


class NullBackend:
    """``memory``: sessions live only in the process's memory, as before durable sessions."""

    shared = False
    durable = False

    def write(self, session_id: str, meta: str, version: int, start: int, messages: list[str]) -> bool:
        return True

    def read(self, session_id: str, max_bytes: int | None = None) -> Stored | None:
        return None

    def version(self, session_id: str) -> int | None:
        return None

    def delete(self, session_id: str, version: int | None = None) -> None:
        pass

    def touch(self, session_ids: list[str]) -> None:
        pass

    def expire(self, idle_s: float) -> list[str]:
        return []

    def ping(self) -> None:
        pass

    def close(self) -> None:
        pass


SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, meta TEXT NOT NULL, version INTEGER NOT NULL, length INTEGER NOT NULL,
    touched REAL NOT NULL);
CREATE INDEX IF NOT EXISTS sessions_touched ON sessions (touched);
CREATE TABLE IF NOT EXISTS messages (
    session_id TEXT NOT NULL, idx INTEGER NOT NULL, body TEXT NOT NULL, PRIMARY KEY (session_id, idx)
) WITHOUT ROWID;
"""


class SqliteBackend:
    """One file (WAL journal: a commit survives the process being killed). ``touched`` drives idle expiry."""

    shared = False
    durable = True

    def __init__(self, path: str) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                Path(self.path).expanduser().parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(Path(self.path).expanduser(), timeout=5, isolation_level=None,
                                     check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")  # durable against a crash of the process, not of the OS
                db.executescript(SQLITE_SCHEMA)
            except (sqlite3.Error, OSError) as exc:
                raise StoreError(f"sqlite {self.path}: {exc}") from None
            self._db = db
        return self._db

    def _run(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(self._conn(), *args)
        except sqlite3.Error as exc:
            if self._db is not None and self._db.in_transaction:
                self._db.rollback()
            raise StoreError(f"sqlite {self.path}: {exc}") from None

    def write(self, session_id: str, meta: str, version: int, start: int, messages: list[str]) -> bool:
        def go(db: sqlite3.Connection) -> bool:
            db.execute("BEGIN IMMEDIATE")
            if start:
                row = db.execute("SELECT length FROM sessions WHERE id = ?", (session_id,)).fetchone()
                if row is None or row[0] < start:
                    db.rollback()
                    return False
            db.execute("DELETE FROM messages WHERE session_id = ? AND idx >= ?", (session_id, start))
            db.executemany("INSERT INTO messages VALUES (?, ?, ?)",
                           [(session_id, start + i, body) for i, body in enumerate(messages)])
            db.execute("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?)",
                       (session_id, meta, version, start + len(messages), time.time()))
            db.commit()
            return True
        return self._run(go)

    def read(self, session_id: str, max_bytes: int | None = None) -> Stored | None:
        def go(db: sqlite3.Connection) -> Stored | None:
            db.execute("BEGIN")  # one snapshot: the size checked is the size read
            try:
                return read(db)
            finally:
                db.rollback()

        def read(db: sqlite3.Connection) -> Stored | None:
            row = db.execute("SELECT meta, version, length FROM sessions WHERE id = ?", (session_id,)).fetchone()
            if row is None:
                return None
            if max_bytes is not None:  # measured in the database: nothing is read into memory past the limit
                size = db.execute("SELECT length(CAST(meta AS BLOB)) + (SELECT COALESCE(SUM(length(CAST(body AS "
                                  "BLOB))), 0) FROM messages WHERE session_id = ?1 AND idx < ?2) FROM sessions "
                                  "WHERE id = ?1", (session_id, row[2])).fetchone()[0]
                if size > max_bytes:
                    raise TooLarge(session_id, size, max_bytes)
            bodies = [b for (b,) in db.execute("SELECT body FROM messages WHERE session_id = ? AND idx < ? "
                                               "ORDER BY idx", (session_id, row[2]))]
            return Stored(row[0], row[1], bodies)
        return self._run(go)

    def version(self, session_id: str) -> int | None:
        row = self._run(lambda db: db.execute("SELECT version FROM sessions WHERE id = ?", (session_id,)).fetchone())
        return None if row is None else row[0]

    def delete(self, session_id: str, version: int | None = None) -> None:
        def go(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            if version is not None:
                row = db.execute("SELECT version FROM sessions WHERE id = ?", (session_id,)).fetchone()
                if row is not None and row[0] != version:
                    db.rollback()
                    return
            db.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))
            db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
            db.commit()
        self._run(go)

    def touch(self, session_ids: list[str]) -> None:
        def go(db: sqlite3.Connection) -> None:
            db.executemany("UPDATE sessions SET touched = ? WHERE id = ?", [(time.time(), s) for s in session_ids])
        if session_ids:
            self._run(go)

    def expire(self, idle_s: float) -> list[str]:
        def go(db: sqlite3.Connection) -> list[str]:
            stale = [s for (s,) in db.execute("SELECT id FROM sessions WHERE touched < ? LIMIT 1000",
                                              (time.time() - idle_s,))]
            for session_id in stale:
                db.execute("BEGIN IMMEDIATE")
                db.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))
                db.execute("DELETE FROM sessions WHERE id = ? AND touched < ?", (session_id, time.time() - idle_s))
                db.commit()
            return stale
        return self._run(go)

    def ping(self) -> None:
        self._run(lambda db: db.execute("SELECT 1").fetchone())

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


# KEYS: meta hash, messages list. ARGV: start, ttl ms, meta, version, messages... Returns 0 when fewer than
# `start` messages are stored (nothing written), else 1.
REDIS_WRITE = """
local start = tonumber(ARGV[1])
local length = tonumber(redis.call('HGET', KEYS[1], 'length') or '0')
if start > 0 and (length < start or redis.call('LLEN', KEYS[2]) < start) then return 0 end
if start == 0 then redis.call('DEL', KEYS[2])
elseif redis.call('LLEN', KEYS[2]) > start then redis.call('LTRIM', KEYS[2], 0, start - 1) end
for i = 5, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
redis.call('HSET', KEYS[1], 'meta', ARGV[3], 'version', ARGV[4], 'length', start + #ARGV - 4)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""


# KEYS: meta hash, messages list. ARGV: version. Deletes the session only if no other replica has written it since.
REDIS_DELETE = """
local version = redis.call('HGET', KEYS[1], 'version')
if version and version ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""


# KEYS: meta hash, messages list. ARGV: the most bytes to return. Returns nothing when there is no such session,
# {-1, bytes so far} past the limit (read a page at a time: nothing past it is copied), else {meta, version,
# length, message...}: the first `length` messages.
REDIS_READ = """
local got = redis.call('HMGET', KEYS[1], 'meta', 'version', 'length')
if not got[1] then return false end
local limit, size = tonumber(ARGV[1]), #got[1]
if size > limit then return {-1, size} end
local out, length, i = {got[1], got[2] or '', got[3] or ''}, tonumber(got[3]) or 0, 0
while i < length do
    local page = redis.call('LRANGE', KEYS[2], i, math.min(i + 255, length - 1))
    if #page == 0 then break end
    for _, body in ipairs(page) do
        size = size + #body
        if size > limit then return {-1, size} end
        out[#out + 1] = body
    end
    i = i + #page
end
return out
"""


class RedisBackend:
    """Shared by every replica. Each session's keys carry a TTL of the idle timeout, refreshed on every write
    and by ``touch``: Redis itself forgets sessions nobody uses, even when no replica is left to expire them."""

    shared = True
    durable = True

    def __init__(self, url: str, ttl_s: float, timeout_s: float = 2.0) -> None:
        import redis

        self._errors = (redis.RedisError, OSError)
        self.url = redact(url)
        self.ttl_ms = max(1000, int(ttl_s * 1000))
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._write = self.client.register_script(REDIS_WRITE)
        self._delete = self.client.register_script(REDIS_DELETE)
        self._read = self.client.register_script(REDIS_READ)

    @staticmethod
    def keys(session_id: str) -> tuple[str, str]:
        return f"inference:session:{{{session_id}}}:meta", f"inference:session:{{{session_id}}}:messages"

    def _run(self, fn: Any) -> Any:
        try:
            return fn()
        except self._errors as exc:
            raise StoreError(f"redis {self.url}: {exc}") from None

    def write(self, session_id: str, meta: str, version: int, start: int, messages: list[str]) -> bool:
        return bool(self._run(lambda: self._write(keys=self.keys(session_id),
                                                   args=[start, self.ttl_ms, meta, version, *messages])))

    def read(self, session_id: str, max_bytes: int | None = None) -> Stored | None:
        limit = 2**62 if max_bytes is None else max_bytes
        got = self._run(lambda: self._read(keys=self.keys(session_id), args=[limit]))
        if not got:
            return None
        if isinstance(got[0], int):  # measured in Redis: nothing was sent past the limit
            raise TooLarge(session_id, got[1], limit)
        meta, version, length, *bodies = got
        int(length)  # (a length that is not a number: a malformed record, ValueError)
        return Stored(meta.decode(), int(version), [b.decode() for b in bodies])

    def version(self, session_id: str) -> int | None:
        raw = self._run(lambda: self.client.hget(self.keys(session_id)[0], "version"))
        return None if raw is None else int(raw)

    def delete(self, session_id: str, version: int | None = None) -> None:
        if version is None:
            self._run(lambda: self.client.delete(*self.keys(session_id)))
        else:
            self._run(lambda: self._delete(keys=self.keys(session_id), args=[version]))

    def touch(self, session_ids: list[str]) -> None:
        def go() -> None:
            pipe = self.client.pipeline(transaction=False)
            for session_id in session_ids:
                for key in self.keys(session_id):
                    pipe.pexpire(key, self.ttl_ms)
            pipe.execute()
        if session_ids:
            self._run(go)

    def expire(self, idle_s: float) -> list[str]:
        return []  # the keys' TTL does it

    def ping(self) -> None:
        self._run(self.client.ping)

    def close(self) -> None:
        self.client.close()


def redact(url: str) -> str:
    """A store URL fit for logs and /ready: no password."""
    return re.sub(r"//[^@/]*@", "//***@", url)


def check_url(url: str) -> str:
    """``url`` if it names a store this server can open, else ValueError saying what is accepted."""
    scheme = urlsplit(url).scheme
    if url == "memory":
        return url
    if scheme == "sqlite":
        if not url.startswith("sqlite:///") or len(url) <= len("sqlite:///"):
            raise ValueError("use sqlite:///relative/path.db or sqlite:////absolute/path.db")
        return url
    if scheme in ("redis", "rediss", "unix"):
        if scheme != "unix" and not urlsplit(url).hostname:
            raise ValueError("use redis://host:port/db")
        return url
    raise ValueError("use memory, sqlite:///path.db or redis://host:port/db")


def open_backend(url: str, ttl_s: float) -> Backend:
    """The backend ``url`` names (see ``check_url``)."""
    check_url(url)
    if url == "memory":
        return NullBackend()
    if url.startswith("sqlite:///"):
        return SqliteBackend(os.path.expanduser(url[len("sqlite:///"):]))
    return RedisBackend(url, ttl_s)
