"""The live sessions of this process: created here, or attached from the durable store when this process does
not hold them (after a restart, or on the replica that took over from a dead one); written to the store after
every change; expired when idle, from memory and from the store."""
from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from jsonrpc import RpcError, clip
from models import ErrorCode, ToolDefinition
from resume import ReplayBuffer
from session_store import BadRecord, SessionRecord, SessionStore, SessionTooLarge, StoreError
from tasks import Session, Task
from workers import off_loop

log = logging.getLogger("inference.sessions")
SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}")  # what this server hands out; checked before a lookup


class SessionRegistry:
    """All sessions of this process; idle ones (no task, no socket) expire and release their warm KV cache."""

    def __init__(self, store: SessionStore, max_sessions: int, idle_timeout_s: float, *, replica_id: str = "",
                 replay_bytes: int = 2**20, replay_keep_s: float = 0.0,
                 on_remove: Callable[[Session], None] = lambda s: None) -> None:
        self.sessions: dict[str, Session] = {}
        self.per_quota: Counter[str] = Counter()  # live sessions per key (or per client address without keys)
        self.store = store
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self.replica_id = replica_id
        self.replay_bytes = replay_bytes
        self.replay_keep_s = replay_keep_s
        self.on_remove = on_remove
        self.on_lost_task: Callable[[], None] = lambda: None
        self._attaching: dict[str, asyncio.Lock] = {}

    def __len__(self) -> int:
        return len(self.sessions)

    def new_id(self) -> str:
        """A uuid4 (122 random bits, the seed's shape), prefixed with this replica's name when it has one: the
        proxy routes a session back to the replica that holds it by that prefix (deploy/haproxy.cfg)."""
        sid = str(uuid.uuid4())
        return f"{self.replica_id}.{sid}" if self.replica_id else sid

    def create(self, tools: list[ToolDefinition], owner: str = "anonymous", per_owner: int | None = None,
               quota: str | None = None, tools_json: list[dict[str, Any]] | None = None) -> Session:
        """A new session of ``owner``, counted against ``quota`` (default: the owner): at most ``per_owner``
        each. Without keys every client is the owner "anonymous", so the quota is the client's address. (Not
        stored yet: ``create_session`` stores it before it answers.)"""
        return self._add(Session(self.new_id(), tools, owner, quota=quota or owner, tools_json=tools_json), per_owner)

    def _add(self, session: Session, per_owner: int | None = None) -> Session:
        self.expire_idle()
        if len(self.sessions) >= self.max_sessions:
            raise RpcError(ErrorCode.OVERLOADED, f"session limit reached ({self.max_sessions})")
        if per_owner is not None and self.per_quota[session.quota] >= per_owner:
            who = "client address" if session.quota.startswith("addr:") else "key"
            raise RpcError(ErrorCode.RATE_LIMITED, f"this {who} already has {per_owner} sessions")
        session.replay = ReplayBuffer(self.replay_bytes, session.seq)
        session.replay_keep_s = self.replay_keep_s
        session.saver = self.save
        self.sessions[session.session_id] = session
        self.per_quota[session.quota] += 1
        return session

    def get(self, session_id: str) -> Session | None:
        """The session if this process holds it (see ``attach`` for one that may be in the store)."""
        return self.sessions.get(session_id)

    async def attach(self, session_id: str) -> Session | None:
        """The session: held here, else loaded from the store; None when there is no such session. Raises
        StoreError when the store fails, RpcError(OVERLOADED) when this process holds too many sessions."""
        if not SESSION_ID.fullmatch(session_id):
            return None
        lock = self._attaching.setdefault(session_id, asyncio.Lock())
        try:
            async with lock:  # one load per session, however many sockets ask at once
                return await self._attach(session_id)
        finally:
            if not lock.locked() and self._attaching.get(session_id) is lock:
                del self._attaching[session_id]

    async def _attach(self, session_id: str) -> Session | None:
        session = self.sessions.get(session_id)
        if session is not None:
            session.touch()  # in use from now on: idle expiry must not remove it during the awaits below
        if session is not None and self.store.shared and session.active_task is None and session.connection is None:
            # Another replica may have served it meanwhile (while this one was unreachable): its copy wins.
            try:
                stored = await self.store.version(session_id)
            except StoreError:  # the store is down (and /ready says so): the copy held here is the best there is
                return session
            if stored is None:  # the store lost it (Redis restarted without its data): write it whole again
                log.warning("session %s: missing from the store; writing it again", session_id)
                session.synced = 0
                session.save()
            elif stored > session.version and session.active_task is None:
                log.info("session %s: the store holds a newer copy (version %d > %d); reloading", session_id,
                         stored, session.version)
                self._drop(session)
                session = None
        if session is not None:
            return session
        record = await self.store.load(session_id)
        if record is None or (session := self.sessions.get(session_id)) is not None:
            return session
        try:
            tools = await off_loop(lambda: [ToolDefinition.model_validate(t) for t in record.tools])
        except (ValueError, RecursionError) as exc:  # (pydantic's ValidationError is a ValueError)
            raise BadRecord(f"session {session_id}: malformed record (a stored tool: {clip(str(exc), 300)})") from None
        session = self._add(from_record(record, tools))
        log.info("session %s loaded from the store: %d messages", session_id, len(session.messages))
        if record.task is not None:
            self._lost(session, record.task)
        elif self.store.shared:
            session.save()  # (meta only) a new version: a replica still holding the old copy must not delete it
        return session

    def _lost(self, session: Session, task: dict[str, Any]) -> None:
        """The stored session names a task no process runs any more: its process or replica died. The
        conversation goes back to where it stood before the task, so that the client can simply retry it."""
        base = task["base"]
        log.warning("session %s: task %s was lost with its process; the conversation goes back to its %d "
                    "messages before it", session.session_id, task["task_id"], base)
        del session.messages[base:]
        session.synced = min(session.synced, base)
        session.stored_task = None
        session.lost_task = task["task_id"]
        self.on_lost_task()
        session.save()

    def save(self, session: Session) -> asyncio.Future[Any] | None:
        """Queue a write of ``session`` (a snapshot: later changes are the next write's)."""
        if not self.store.durable:
            return None
        session.version += 1
        if session.tools_json is None:
            session.tools_json = dump_tools(session.tools)
        record = SessionRecord(
            session_id=session.session_id, owner=session.owner, quota=session.quota, tools=session.tools_json,
            messages=list(session.messages), created_at=session.created_at, updated_at=time.time(),
            seq=session.seq, task=session.stored_task, version=session.version)
        start, session.synced = min(session.synced, len(session.messages)), len(session.messages)
        future = self.store.save(record, start)

        def settled(done: asyncio.Future[Any]) -> None:
            if not done.cancelled():
                session.too_large = isinstance(done.result(), SessionTooLarge)
        future.add_done_callback(settled)
        return future

    def remove(self, session: Session) -> None:
        """Forget a session here and in the store."""
        if self._drop(session):  # (shared: only this replica's copy; another may have taken the session over)
            self.store.delete(session.session_id, session.version if self.store.shared else None)

    def _drop(self, session: Session) -> bool:
        if self.sessions.pop(session.session_id, None) is None:
            return False
        self.per_quota[session.quota] -= 1
        if self.per_quota[session.quota] <= 0:
            del self.per_quota[session.quota]
        if session.active_task is not None:
            session.active_task.cancel()
        self.on_remove(session)
        return True

    def expire_idle(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        idle = [s for s in self.sessions.values() if s.active_task is None and s.connection is None
                and now - s.last_active > self.idle_timeout_s]
        for session in idle:
            log.info("session %s expired after %.0f s idle", session.session_id, now - session.last_active)
            self.remove(session)
        return len(idle)

    async def maintain(self) -> None:
        """Periodic: expire idle sessions here, keep the store from expiring the ones held here, and let the store
        expire what nobody holds any more."""
        self.expire_idle()
        if self.store.durable:
            await self.store.touch(list(self.sessions))
            for session_id in await self.store.expire():
                log.info("session %s expired from the store", session_id)

    @property
    def active_tasks(self) -> list[Task]:
        return [s.active_task for s in self.sessions.values() if s.active_task is not None]

    async def close_all(self) -> None:
        tasks = self.active_tasks
        for task in tasks:
            task.cancel()
        await asyncio.gather(*(t.wait() for t in tasks))


def dump_tools(tools: list[ToolDefinition]) -> list[dict[str, Any]]:
    """Tool definitions as stored (``create_session`` runs this on the worker pool: schemas can be large)."""
    return [t.model_dump(mode="json", exclude_none=True) for t in tools]


def from_record(record: SessionRecord, tools: list[ToolDefinition]) -> Session:
    return Session(record.session_id, tools, record.owner, quota=record.quota or record.owner,
                   messages=record.messages, seq=record.seq, created_at=record.created_at, version=record.version,
                   synced=len(record.messages), tools_json=record.tools)
