"""The front end's handle on the engine process (``engine.core_process``): the same calls as ``AsyncEngine``
(``generate`` -> ``RequestStream``, ``release_session``, ``alive``, ``stats``...), over one socket.

Everything here runs on the event loop, with no thread: requests go out as ``Add``/``Abort`` frames written to the
socket's transport (never blocking), and each engine step comes back as one ``Outputs`` frame whose events are
delivered to their streams in one pass (an asyncio protocol; what a stream's reader has not taken yet is merged,
as in process). Refusals that ``Engine.submit`` would raise (context, queue, a dead engine) are raised here,
synchronously, from the limits the engine sent when it started.

The engine process dying (its socket's end of stream, or its ``Failed``) fails every waiting stream at once with an
error event and makes ``alive`` false (``/ready`` turns 503).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import pickle
import socket
from typing import Any, Callable

from engine.async_engine import RequestStream
from engine.config import ContextLengthExceeded, EngineOverloaded, EngineStopped
from engine.core_process import EngineReady, EngineStartFailed, main
from engine.protocol import (Abort, Add, Failed, FrameReader, Outputs, Release, Shutdown, decode_from_engine,
                             event_from_wire, frame, params_to_wire, recv_frame)
from engine.request import FinishReason, SamplingParams, TokenEvent

log = logging.getLogger("inference.engine_client")


class EngineStartError(RuntimeError):
    """The engine process could not start (its message says why)."""


class _Channel(asyncio.Protocol):
    def __init__(self, client: EngineProcess) -> None:
        self.client = client
        self.reader = FrameReader()

    def data_received(self, data: bytes) -> None:
        for payload in self.reader.feed(data):
            self.client._received(decode_from_engine(payload))

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._lost()


class EngineProcess:
    """The engine in a process of its own (see the module docstring)."""

    in_process = False

    def __init__(self, settings: Any, loader: Callable[[Any], Any]) -> None:
        self.settings, self.loader = settings, loader
        self.process: multiprocessing.process.BaseProcess | None = None
        self.transport: asyncio.Transport | None = None
        self.streams: dict[str, RequestStream] = {}
        self.ready: EngineReady | None = None
        self._stats: dict[str, float] = {}
        self.dead_reason: str | None = "engine not started"
        self.stopping = False
        self.on_step: Callable[[str, int, float], None] | None = None
        self._ids = itertools.count()
        self._prefix = f"r{os.getpid()}-"

    # ---- life ---------------------------------------------------------------------------------------------------
    async def start(self) -> Any:
        """Spawn the engine process and wait until it has loaded the model and started (minutes on a GPU); the
        loaded model's metadata (tokenizer, defaults...) comes back, without its weights."""
        ours, theirs = socket.socketpair()
        self.process = multiprocessing.get_context("spawn").Process(
            target=main, args=(theirs, self.settings, self.loader), name="inference-engine", daemon=True)
        self.process.start()
        theirs.close()
        try:
            payload = await asyncio.to_thread(recv_frame, ours)
        except BaseException:
            ours.close()
            self.process.kill()
            raise
        if payload is None:
            ours.close()
            self.process.join(5)
            raise EngineStartError(f"the engine process exited while starting (exit code {self.process.exitcode})")
        ready = pickle.loads(payload)
        if isinstance(ready, EngineStartFailed):
            ours.close()
            self.process.join(10)
            if ready.kind == "ConfigError":
                from shared import ConfigError

                raise ConfigError(ready.message)
            raise EngineStartError(f"{ready.kind}: {ready.message}")
        self.ready, self._stats = ready, dict(ready.stats)
        ours.setblocking(False)
        self.transport, _ = await asyncio.get_running_loop().create_connection(lambda: _Channel(self), sock=ours)
        self.dead_reason = None
        log.info("engine process %d ready", ready.pid)
        return ready.model

    async def stop(self, timeout: float = 30.0) -> None:
        """Ask the engine process to stop (its requests end, cancelled), wait for it, kill it if it hangs."""
        self.stopping = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(Shutdown()))
        if self.process is not None:
            await asyncio.to_thread(self.process.join, timeout)
            if self.process.is_alive():
                log.warning("the engine process did not stop within %.0f s: killing it", timeout)
                self.process.kill()
                await asyncio.to_thread(self.process.join, 5)
        if self.transport is not None:
            self.transport.close()
        self._died("engine stopped")

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def engine_thread(self) -> tuple[int, int]:
        """(process id, thread id) of the engine thread (benchmarks read its scheduler figures)."""
        return self.ready.pid, self.ready.engine_tid

    @property
    def alive(self) -> bool:
        return self.dead_reason is None and self.process is not None and self.process.is_alive()

    @property
    def max_context(self) -> int:
        return self.ready.max_context if self.ready else 0

    @property
    def vocab_size(self) -> int:
        return self.ready.vocab_size if self.ready else 0

    def stats(self) -> dict[str, int]:
        keys = ("running", "waiting", "queued", "kv_blocks_total", "kv_blocks_used", "steps")
        stats = {k: int(self._stats.get(k, 0)) for k in keys}
        stats.update({k: int(v) for k, v in self._stats.items() if k.startswith("gpu_")})
        if not self.alive:  # nothing runs in a dead engine
            stats.update(running=0, waiting=0, queued=0)
        return stats

    def counters(self) -> dict[str, float]:
        """The engine's step counters and its thread's CPU seconds, as of its latest step."""
        s = self._stats
        return {"steps": s.get("step_count", 0.0), "seconds": s.get("step_seconds", 0.0),
                "host_seconds": s.get("host_seconds", 0.0), "cpu_seconds": s.get("cpu_seconds", 0.0)}

    # ---- requests (event loop) -----------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[int], params: SamplingParams, session_key: str | None = None,
                 cache_salt: str = "") -> RequestStream:
        """Submit a request; raises what ``Engine.submit`` raises, before anything is sent."""
        ready = self.ready
        if not self.alive or ready is None or self.transport is None or self.transport.is_closing():
            raise EngineStopped(self.dead_reason or "engine is not running")
        if not prompt_ids:
            raise ValueError("empty prompt")
        if not all(0 <= t < ready.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {ready.vocab_size})")
        if len(prompt_ids) >= ready.max_context:
            raise ContextLengthExceeded(len(prompt_ids), ready.max_context)
        waiting = len(self.streams) - ready.max_running  # requests the engine holds beyond its batch
        if waiting >= ready.max_queue:
            raise EngineOverloaded(f"{waiting} requests are waiting")
        message = Add(f"{self._prefix}{next(self._ids)}", list(prompt_ids), params_to_wire(params), session_key,
                      cache_salt)
        data = frame(message)  # before the stream is registered: a value msgpack cannot carry leaves nothing behind
        stream = RequestStream(self.abort, asyncio.get_running_loop())
        stream.request_id = message.request_id
        self.streams[message.request_id] = stream
        self.transport.write(data)
        return stream

    def abort(self, request_id: str) -> None:
        """Cancel a request (its stream stays registered until the engine's final event for it)."""
        if request_id in self.streams and self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(Abort(request_id)))

    def release_session(self, session_key: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(Release(session_key)))

    # ---- from the engine (event loop) ------------------------------------------------------------------------------
    def _received(self, message: Outputs | Failed) -> None:
        if type(message) is Failed:
            log.error("the engine died: %s", message.reason)
            self._died(f"engine failure: {message.reason}")
            return
        streams = self.streams
        for wire in message.events:
            stream = streams.get(wire[0])
            if stream is None:
                continue
            event = event_from_wire(wire)
            if event.finish_reason is not None:
                del streams[wire[0]]
            stream.deliver(event)
        self._stats = message.stats
        if self.on_step is not None:
            for kind, batch, seconds in message.steps:
                self.on_step(kind, batch, seconds)

    def _lost(self) -> None:
        if self.stopping:
            self._died("engine stopped")
            return
        code = self.process.exitcode if self.process is not None and not self.process.is_alive() else None
        reason = "engine process died" + (f" (exit code {code})" if code is not None else "")
        log.error("%s: failing %d requests", reason, len(self.streams))
        self._died(reason)

    def _died(self, reason: str) -> None:
        """Every waiting stream ends now, with an error; nothing more is accepted."""
        if self.dead_reason is None:
            self.dead_reason = reason
        streams, self.streams = self.streams, {}
        for request_id, stream in streams.items():
            stream.deliver(TokenEvent(request_id, (), FinishReason.ERROR, f"engine unavailable: {reason}"))
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


def can_spawn(loader: Callable[[Any], Any]) -> bool:
    """Whether ``loader`` can be sent to a spawned process (a module-level function can; a lambda or a closure,
    as tests pass, cannot)."""
    try:
        pickle.dumps(loader)
    except Exception:
        return False
    return True

