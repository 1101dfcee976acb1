"""Who may talk to the server: API keys, single-use WebSocket tickets, Origin checks, per-key rate limits.

Pure and transport-agnostic; the transport calls these at its doors (HTTP routes, WebSocket handshake).
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

ANONYMOUS = "anonymous"


def key_id(key: str) -> str:
    """A stable, non-secret name for a key (for ownership and logs; the key itself is never logged)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


class ApiKeys:
    """The accepted keys; empty means authentication is off and every caller is ``anonymous``."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in dict.fromkeys(k for k in keys if k)]

    @classmethod
    def load(cls, key: str, keys_file: str) -> ApiKeys:
        keys = [key] if key else []
        if keys_file:
            for line in Path(keys_file).read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(line.split()[0])
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def check(self, presented: str | None) -> str | None:
        """The key id of ``presented`` if it is a valid key, else None. Compares with every key in constant time."""
        if not self.enabled:
            return ANONYMOUS
        if not presented:
            return None
        candidate = presented.encode()
        match = None
        for key in self._keys:  # no early exit: the time taken does not depend on which key matched
            if hmac.compare_digest(candidate, key):
                match = key
        return key_id(match.decode()) if match is not None else None

    def from_header(self, authorization: str | None) -> str | None:
        """Key id from an ``Authorization: Bearer <key>`` header value."""
        if not self.enabled:
            return ANONYMOUS
        scheme, _, token = (authorization or "").partition(" ")
        return self.check(token.strip()) if scheme.lower() == "bearer" else None


@dataclass(frozen=True)
class Ticket:
    owner: str
    session_id: str | None
    expires_at: float


class TicketBookFull(Exception):
    """Too many live tickets: refuse more until some expire."""


class TicketBook:
    """Short-lived, single-use tickets that let a browser open a WebSocket without putting a key in a URL.

    Tickets are kept in the order they were issued, which (one TTL for all) is the order they expire: issuing
    one drops the expired ones from the front, O(1) amortised, and at most ``max_live`` are alive at once.
    """

    def __init__(self, ttl_s: float, max_live: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_live = max_live
        self._tickets: OrderedDict[str, Ticket] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._tickets)

    def issue(self, owner: str, session_id: str | None) -> str:
        now = time.monotonic()
        token = secrets.token_urlsafe(32)
        with self._lock:
            while self._tickets and next(iter(self._tickets.values())).expires_at <= now:
                self._tickets.popitem(last=False)
            if len(self._tickets) >= self.max_live:
                raise TicketBookFull(f"{len(self._tickets)} tickets are live; retry when some have expired")
            self._tickets[token] = Ticket(owner, session_id, now + self.ttl_s)
        return token

    def redeem(self, token: str, session_id: str) -> str | None:
        """The ticket's owner if it is valid for ``session_id``; the ticket is used up either way."""
        with self._lock:
            ticket = self._tickets.pop(token, None)
        if ticket is None or ticket.expires_at < time.monotonic():
            return None
        if ticket.session_id is not None and ticket.session_id != session_id:
            return None
        return ticket.owner


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Browsers send Origin on a WebSocket handshake; a page from another site must not reach the server.

    With an allow-list, the Origin must be on it (``*`` allows any). Without one, requests without an
    Origin (non-browser clients) and same-origin pages (the playground) are allowed.
    """
    if origin is None:
        return True
    if "*" in allowed or origin in allowed:
        return True
    if allowed:
        return False
    return bool(host) and urlsplit(origin).netloc.lower() == host.lower()


class RateLimiter:
    """Token bucket per caller: ``per_minute`` requests per minute, bursts up to that many."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, last refill)
        self._lock = threading.Lock()

    def acquire(self, caller: str) -> float:
        """0 if the request may go ahead, else the seconds to wait before retrying."""
        if self.per_minute <= 0:
            return 0.0
        rate = self.per_minute / 60.0
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(caller, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - last) * rate)
            if tokens >= 1:
                self._buckets[caller] = (tokens - 1, now)
                return 0.0
            self._buckets[caller] = (tokens, now)
            if len(self._buckets) > 100_000:  # forget callers whose bucket has refilled: they owe nothing
                self._buckets = {c: b for c, b in self._buckets.items()
                                 if b[0] + (now - b[1]) * rate < self.per_minute}
            return (1 - tokens) / rate
