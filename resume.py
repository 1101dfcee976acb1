"""Resumable streams: the notifications a session has sent lately, numbered (``seq``) and kept, bounded in
bytes, so that a client that lost its socket can reconnect with ``?resume_from=<last seq seen>`` and be sent
exactly what it missed, in order, before the live stream goes on."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

MAX_SEQ = 2**53 - 1  # JSON numbers stay exact up to here in every client


class ResumeRefused(Exception):
    """``resume_from`` cannot be honoured; the message says why (sent to the client as the refusal)."""


def parse_resume_from(raw: str | None) -> int | None:
    """The ``resume_from`` query parameter: None when absent, else a non-negative integer (ResumeRefused)."""
    if raw is None:
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 16:
        raise ResumeRefused("resume_from must be the seq of the last notification received (an integer >= 0)")
    value = int(raw)
    if value > MAX_SEQ:
        raise ResumeRefused(f"resume_from must be at most {MAX_SEQ}")
    return value


@dataclass
class Replay:
    """What to send a resuming client: the missed notifications (JSON texts) and whether some were lost."""

    texts: list[str]
    missing_from: int | None = None  # the first missed seq that can no longer be sent (None: none)
    floor: int = 0  # the highest seq no longer kept


class ReplayBuffer:
    """The latest notifications of one session, oldest first, at most ``max_bytes`` of JSON text (the newest
    one is always kept). ``floor`` is the highest seq no longer kept: a client that saw less has lost some."""

    def __init__(self, max_bytes: int, floor: int = 0) -> None:
        self.max_bytes = max_bytes
        self.entries: deque[tuple[int, str, int]] = deque()  # (seq, text, bytes)
        self.bytes = 0
        self.floor = floor

    def add(self, seq: int, text: str, size: int) -> None:
        self.entries.append((seq, text, size))
        self.bytes += size
        while self.bytes > self.max_bytes and len(self.entries) > 1:
            dropped, _, dropped_size = self.entries.popleft()
            self.bytes -= dropped_size
            self.floor = dropped

    def clear(self, last_seq: int) -> None:
        """Forget everything up to ``last_seq`` (a finished task's grace period is over)."""
        self.entries.clear()
        self.bytes = 0
        self.floor = max(self.floor, last_seq)

    def since(self, resume_from: int) -> Replay:
        """Every kept notification after ``resume_from``, in order."""
        texts = [text for seq, text, _ in self.entries if seq > resume_from]
        return Replay(texts, resume_from + 1 if resume_from < self.floor else None, self.floor)
