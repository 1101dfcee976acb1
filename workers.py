"""Where CPU-heavy work on client input runs: a small, bounded thread pool, never the event loop.

Tokenizing a prompt, checking a tool's JSON Schema and validating the model's arguments against it can take
milliseconds to seconds; on the event loop they would stall every socket and ``/health``. They run here,
after the cheap count and size limits have priced the input (``limits.py``), at most ``WORKERS`` at a time.
The threads still share the GIL with the loop, but Python switches threads every few milliseconds, so the loop
keeps answering. (A single C call that holds the GIL, such as ``json.loads``, gains nothing from a thread: that
is why those are bounded by size and count before they run.)
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
WORKERS = min(8, max(2, (os.cpu_count() or 2) // 2))
_pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="cpu")


async def off_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on the worker pool, with the caller's context (the log lines keep their
    session and task ids)."""
    context = contextvars.copy_context()
    call = functools.partial(context.run, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_pool, call)
