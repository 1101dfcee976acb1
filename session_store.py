"""Durable sessions: what a session is (``SessionRecord``), written after every change by one worker thread, in
the order the changes were made (so the event loop never waits on the store's I/O), and read back when a session
is attached after a restart or on another replica. A failure is logged, counted and reported by ``status()``
(which /ready shows); it is never silent. The backends are in ``store_backends.py``."""
from __future__ import annotations

import asyncio
import json
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from store_backends import Backend, StoreError, Stored, TooLarge, open_backend, redact

log = logging.getLogger("inference.store")
ROLES = frozenset({"system", "user", "assistant", "tool"})
RETRY_PING_S = 2.0  # while failing, how often the worker checks whether the store is back
WAIT_S = 5.0  # how long a caller that needs a write committed waits before it goes on without


class BadRecord(StoreError):
    """A stored session cannot be used (malformed, or too large); the store itself works."""


class SessionTooLarge(BadRecord):
    """The session's stored form would exceed the configured size."""


@dataclass
class SessionRecord:
    """What a session is, as stored: everything needed to continue it on any replica."""

    session_id: str
    owner: str  # the id of the key that created it, never the key
    quota: str  # whose session count it counts against
    tools: list[dict[str, Any]]  # tool definitions, as JSON
    messages: list[dict[str, Any]] = field(default_factory=list)  # the conversation, chat-template shaped
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    seq: int = 0  # the last notification number handed out
    task: dict[str, Any] | None = None  # the running task: {"task_id", "base": messages before it}
    version: int = 0  # +1 per write: a replica holding an older copy reloads

    def meta_json(self, length: int, size: int) -> str:
        meta = asdict(self)
        del meta["messages"]
        meta.update(format=1, length=length, bytes=size)
        return json.dumps(meta, separators=(",", ":"))

    @classmethod
    def from_stored(cls, session_id: str, stored: Stored, max_bytes: int) -> SessionRecord:
        """Parse and check a stored session (StoreError when malformed or too large)."""
        size = len(stored.meta) + sum(map(len, stored.messages))
        if size > max_bytes:
            raise SessionTooLarge(f"session {session_id}: {size} bytes stored, more than {max_bytes}")
        try:
            meta = json.loads(stored.meta)
            messages = [json.loads(body) for body in stored.messages]
            record = cls(session_id=session_id, owner=str(meta["owner"]), quota=str(meta.get("quota", "")),
                         tools=list(meta["tools"]), messages=messages, created_at=float(meta["created_at"]),
                         updated_at=float(meta["updated_at"]), seq=int(meta.get("seq", 0)),
                         task=meta.get("task"), version=int(stored.version))
        except (ValueError, KeyError, TypeError, RecursionError) as exc:  # (JSON nested past the parser's limit)
            raise BadRecord(f"session {session_id}: malformed record ({exc.__class__.__name__}: {exc})") from None
        problem = _shape_problem(record)
        if problem:
            raise BadRecord(f"session {session_id}: malformed record ({problem})")
        return record


def _shape_problem(record: SessionRecord) -> str | None:
    if not all(isinstance(t, dict) for t in record.tools):
        return "a tool is not an object"
    for i, m in enumerate(record.messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content", ""), (str, type(None))):
            return f"message {i} is not a chat message"
    if record.task is not None and not (isinstance(record.task, dict) and isinstance(record.task.get("task_id"), str)
                                        and isinstance(record.task.get("base"), int)
                                        and 0 <= record.task["base"] <= len(record.messages)):
        return "task is malformed"
    if not (0 <= record.seq < 2**53 and math.isfinite(record.created_at) and math.isfinite(record.updated_at)):
        return "counters out of range"
    return None


async def committed(write: asyncio.Future[Any] | None) -> str | None:
    """Wait (up to WAIT_S) for a write queued by ``SessionStore.save``: None once it is committed (or when there
    was nothing to write), else why not."""
    if write is None:
        return None
    try:
        result = await asyncio.wait_for(asyncio.shield(write), WAIT_S)
    except TimeoutError:
        return f"the store did not confirm the write within {WAIT_S:.0f} s"
    return None if result is None else str(result)[:200]


def dumps(message: dict[str, Any]) -> str:
    # ASCII: its length is its size in bytes, and a lone surrogate in a message cannot fail the write
    return json.dumps(message, separators=(",", ":"))


class SessionStore:
    """The async face of a backend. Every operation runs on one worker thread, in submission order."""

    def __init__(self, backend: Backend, *, max_bytes: int, idle_s: float, name: str = "") -> None:
        self.backend = backend
        self.name = name or type(backend).__name__
        self.max_bytes = max_bytes
        self.idle_s = idle_s
        self.error: str | None = None  # the last failure, until an operation succeeds again
        self.failures = 0
        self.write_seconds: deque[float] = deque(maxlen=4096)  # queued -> committed, per write
        self.on_write: Callable[[float], None] | None = None  # observes each write's latency (metrics)
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Any] | None] = queue.SimpleQueue()
        self._written: dict[str, tuple[int, int]] = {}  # worker only: (messages, bytes) stored per session
        self._unsaved: dict[str, SessionRecord] = {}  # worker only: each session's latest write that failed
        self._thread = threading.Thread(target=self._work, name="session-store", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, url: str, *, max_bytes: int, idle_s: float) -> SessionStore:
        return cls(open_backend(url, idle_s), max_bytes=max_bytes, idle_s=idle_s, name=redact(url))

    @property
    def durable(self) -> bool:
        return self.backend.durable

    @property
    def shared(self) -> bool:
        return self.backend.shared

    # ---- the worker ------------------------------------------------------------------------------------------
    def _work(self) -> None:
        try:  # at once: a store that is not there at start shows in /ready (and the log) before any request
            self.backend.ping()
        except Exception as exc:  # noqa: BLE001
            self._failed("connection", exc)
        while True:
            try:
                job = self._jobs.get(timeout=RETRY_PING_S if self.error else None)
            except queue.Empty:
                self._ping()
                continue
            if job is None:
                return
            fn, done = job
            try:
                result: Any = fn()
            except Exception as exc:  # noqa: BLE001 - reported to the caller and in status()
                result = exc
            done(result)
            if self._unsaved and self.error is None:
                self._retry_unsaved()

    def _ping(self) -> None:
        try:
            self.backend.ping()
        except Exception as exc:  # noqa: BLE001
            self.error = f"{exc}"
            return
        log.warning("session store %s is reachable again", self.name)
        self.error = None
        self._retry_unsaved()

    def _retry_unsaved(self) -> None:
        """The store works again: write each session whose latest write failed (whole), so that the stored copy
        is not left behind (a session that went quiet would otherwise keep it until a restart loads it)."""
        if not self._unsaved:
            return
        for sid, record in list(self._unsaved.items()):
            try:
                self._write(record, 0)
            except SessionTooLarge:
                pass
            except Exception as exc:  # noqa: BLE001
                self._failed(f"write of session {sid} (retried)", exc)
                return
            if self._unsaved.get(sid) is record:
                del self._unsaved[sid]
        if not self._unsaved:
            log.info("session store %s: the writes that failed are stored now", self.name)

    def _submit(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run ``fn`` on the worker; the future gets its result, or the exception it raised (as the result
        for fire-and-forget callers, who never have to retrieve an exception). Called outside an event loop
        (a test's thread), the work is queued just the same and the future is one nobody awaits."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = asyncio.new_event_loop()
            loop.close()  # resolving it is skipped: call_soon_threadsafe on a closed loop raises, caught below
        future: asyncio.Future[Any] = loop.create_future()

        def done(result: Any) -> None:
            def resolve() -> None:
                if not future.done():
                    future.set_result(result)
            try:
                loop.call_soon_threadsafe(resolve)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass
        self._jobs.put((fn, done))
        return future

    def _failed(self, what: str, exc: BaseException) -> BaseException:
        self.failures += 1
        self.error = f"{what}: {exc}"
        log.error("session store %s: %s failed: %s", self.name, what, exc)
        return exc

    def _ok(self) -> None:
        if self.error is not None:
            log.warning("session store %s is working again", self.name)
            self.error = None

    # ---- operations ----------------------------------------------------------------------------------------
    def save(self, record: SessionRecord, start: int) -> asyncio.Future[Any]:
        """Store ``record`` (a snapshot: its ``messages`` list must not change afterwards); messages before
        ``start`` are unchanged since the previous save. The future resolves to None once committed, or to the
        exception that stopped it."""
        queued = time.perf_counter()

        def write() -> Any:
            try:
                self._write(record, start)
            except SessionTooLarge as exc:
                log.warning("%s; not stored", exc)
                self._unsaved.pop(record.session_id, None)
                return exc
            except Exception as exc:  # noqa: BLE001
                self._unsaved[record.session_id] = record  # written again when the store is back
                return self._failed(f"write of session {record.session_id}", exc)
            self._unsaved.pop(record.session_id, None)
            self._ok()
            elapsed = time.perf_counter() - queued
            self.write_seconds.append(elapsed)
            if self.on_write is not None:
                self.on_write(elapsed)
            return None
        return self._submit(write)

    def _write(self, record: SessionRecord, start: int) -> None:
        sid = record.session_id
        stored = self._written.get(sid)
        if stored is None or stored[0] != start:  # not what this worker last wrote: rewrite it whole
            start = 0
        bodies = [dumps(m) for m in record.messages[start:]]
        size = (stored[1] if start and stored else 0) + sum(map(len, bodies))
        meta = record.meta_json(start + len(bodies), size)
        if size + len(meta) > self.max_bytes:
            raise SessionTooLarge(f"session {sid}: {size + len(meta)} bytes, more than {self.max_bytes}")
        if not self.backend.write(sid, meta, record.version, start, bodies):
            bodies = [dumps(m) for m in record.messages]  # the store holds fewer messages than we thought
            size = sum(map(len, bodies))
            meta = record.meta_json(len(bodies), size)
            self.backend.write(sid, meta, record.version, 0, bodies)
        self._written[sid] = (len(record.messages), size)

    async def load(self, session_id: str) -> SessionRecord | None:
        """The stored session, or None. Raises StoreError when the store fails or the record is unusable."""
        def read() -> SessionRecord | None:
            try:
                stored = self.backend.read(session_id, self.max_bytes)
            except TooLarge as exc:
                raise SessionTooLarge(str(exc)) from None
            except (ValueError, TypeError) as exc:  # the store answered, with something that is not a session
                raise BadRecord(f"session {session_id}: malformed record ({exc.__class__.__name__}: {exc})") from None
            if stored is None:
                return None
            record = SessionRecord.from_stored(session_id, stored, self.max_bytes)
            self._written[session_id] = (len(record.messages), sum(map(len, stored.messages)))
            return record
        return await self._checked(read, f"read of session {session_id}")

    async def version(self, session_id: str) -> int | None:
        """The stored version of a session (None: not stored). Raises StoreError."""
        return await self._checked(lambda: self.backend.version(session_id), f"version of session {session_id}")

    async def _checked(self, fn: Callable[[], Any], what: str) -> Any:
        result = await self._submit(fn)
        if isinstance(result, BadRecord):
            log.error("session store %s: %s", self.name, result)
            raise result
        if isinstance(result, BaseException):
            self._failed(what, result)
            raise result if isinstance(result, StoreError) else StoreError(f"{what}: {result}")
        self._ok()
        return result

    def delete(self, session_id: str, version: int | None = None) -> asyncio.Future[Any]:
        """Delete a stored session; with ``version``, only if the store still holds that version (on a shared
        store, another replica may have taken the session over since: its copy is not this one's to delete)."""
        def delete() -> Any:
            self._written.pop(session_id, None)
            self._unsaved.pop(session_id, None)
            try:
                self.backend.delete(session_id, version)
            except Exception as exc:  # noqa: BLE001
                return self._failed(f"delete of session {session_id}", exc)
            return None
        return self._submit(delete)

    def touch(self, session_ids: list[str]) -> asyncio.Future[Any]:
        """Mark sessions as in use (a socket or a task holds them) so that the store does not expire them."""
        def touch() -> Any:
            try:
                self.backend.touch(session_ids)
            except Exception as exc:  # noqa: BLE001
                return self._failed("touch", exc)
            return None
        return self._submit(touch)

    async def expire(self) -> list[str]:
        """Delete stored sessions idle longer than the idle timeout; their ids."""
        def expire() -> Any:
            try:
                gone = self.backend.expire(self.idle_s)
            except Exception as exc:  # noqa: BLE001
                return self._failed("expiry", exc)
            for session_id in gone:
                self._written.pop(session_id, None)
                self._unsaved.pop(session_id, None)
            return gone
        result = await self._submit(expire)
        return [] if isinstance(result, BaseException) else result

    def status(self) -> dict[str, Any]:
        """For /ready: which store, whether it works, the last error."""
        return {"store": self.name, "ok": self.error is None, "error": self.error, "failures": self.failures,
                "queued": self._jobs.qsize()}

    async def close(self, timeout_s: float = 10.0) -> None:
        """Finish the queued operations (up to ``timeout_s``), then close the backend."""
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join, timeout_s)
        if self._thread.is_alive():
            log.error("session store %s: %d operations still queued at shutdown", self.name, self._jobs.qsize())
            return
        self.backend.close()
