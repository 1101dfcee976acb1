"""Which session and task the running code serves: context variables every log line reads (``shared.py``
puts them in the log format). A module of its own so that the session and task layers can set them without
importing the process-wide state."""
from __future__ import annotations

import contextvars

session_var: contextvars.ContextVar[str] = contextvars.ContextVar("session_id", default="-")
task_var: contextvars.ContextVar[str] = contextvars.ContextVar("task_id", default="-")
