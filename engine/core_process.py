"""The engine process: the engine core in a process of its own, so that its step loop shares no interpreter lock
with the front end (vLLM v1's EngineCore process).

Started by ``engine.mp_client.EngineProcess`` (multiprocessing's spawn: nothing of the front end, CUDA least of
all, is inherited), it loads the model with the server's loader, builds and starts the engine (graphs captured
before it says it is ready), sends ``Ready``, then serves one socket with three threads:

* the engine thread (``Engine``'s own): schedule -> run -> postprocess; a step's events are handed to the sender
  as they are (one queue put per step): the step never waits on a socket;
* this process's main thread: reads the front end's messages and puts them in the engine's inbox;
* the sender: encodes each step's events (msgpack) and writes them.

The front end going away (its socket's end of stream: it exited or crashed) stops the engine and this process,
so no request runs on for a client that is gone. The engine thread dying is reported (``Failed``) and ends the
process.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import queue
import select
import signal
import socket
import threading
import time
from collections import OrderedDict
from typing import Any, Callable

from engine.core import Engine
from engine.protocol import (Abort, Add, Failed, Outputs, Release, Shutdown, decode_to_engine, event_to_wire, frame,
                             params_from_wire, pickled_frame, recv_frame)
from engine.request import EventSink, FinishReason, TokenEvent

log = logging.getLogger("inference.engine_process")
GRAMMARS_KEPT = 64  # compiled grammars kept for reuse (the front end compiled and checked each one first)


@dataclasses.dataclass
class EngineReady:
    """What the front end needs to serve: the loaded model without its weights (tokenizer, defaults, name...),
    the engine's limits and its counters so far."""

    model: Any  # shared.LoadedModel with hf_model and paged_model left out
    max_context: int
    vocab_size: int
    max_running: int
    max_queue: int
    stats: dict[str, float]
    pid: int
    engine_tid: int  # the engine thread's id (benchmarks read its scheduler figures)


@dataclasses.dataclass
class EngineStartFailed:
    kind: str  # the exception's class name (ConfigError: a setting is wrong)
    message: str


def engine_stats(engine: Engine, cpu_clock: Callable[[], float]) -> dict[str, float]:
    """Engine.stats() with its step counters and the engine thread's CPU seconds (benchmarks read these)."""
    s = engine.step_stats
    return {**engine.stats(), "step_count": s.steps, "step_seconds": s.seconds, "host_seconds": s.host_seconds,
            "cpu_seconds": cpu_clock()}


def _thread_clock(thread: threading.Thread | None) -> Callable[[], float]:
    if thread is None:
        return lambda: 0.0
    clock = time.pthread_getcpuclockid(thread.ident)
    return lambda: time.clock_gettime(clock)


def _ignore(event: TokenEvent) -> None:  # the engine's sinks here: its events go out through ``deliver``
    pass


SINK: EventSink = _ignore


def main(sock: socket.socket, settings: Any, loader: Callable[[Any], Any]) -> None:
    """The engine process' entry point (a spawned process: ``settings`` and ``loader`` were pickled)."""
    from shared import engine_config, setup_logging

    # Ctrl-C and SIGTERM (sent to the whole process group by a terminal or a service manager) are the front end's
    # to handle: it drains its tasks while this engine keeps serving them, then stops it (or, if the front end
    # dies, this process sees its socket close and stops).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging(settings, rotate=False)  # the front end rotates the file both write
    sock.setblocking(True)
    loading = threading.Event()
    loading.set()
    threading.Thread(target=_exit_if_orphaned, args=(sock, loading), name="engine-orphan-watch", daemon=True).start()
    try:
        loaded = loader(settings)
        config = engine_config(settings, loaded)
        # The front end bounds the requests in flight (max_running + max_queue) and refuses the rest itself, typed
        # (EngineOverloaded); this engine must not refuse any it let through (a burst within one step counts as
        # queued here until admitted), which could only come back as an error event.
        in_flight = config.max_queue + config.max_running
        engine = Engine(loaded.paged_model, dataclasses.replace(config, max_queue=in_flight))
        engine.start()
    except BaseException as exc:  # the front end reports it (a ConfigError names the setting)
        if type(exc).__name__ == "ConfigError":  # the message is the whole story: no traceback
            log.debug("the engine could not start: %s", exc)
        else:
            log.exception("the engine could not start")
        loading.clear()
        sock.sendall(pickled_frame(EngineStartFailed(type(exc).__name__, str(exc))))
        return
    loading.clear()
    clock = _thread_clock(engine._thread)
    grammars = grammar_cache(settings, loaded)
    model = dataclasses.replace(loaded, hf_model=None, paged_model=None)
    sock.sendall(pickled_frame(EngineReady(model, engine.max_context, loaded.paged_model.vocab_size,
                                           engine.config.max_running, config.max_queue,
                                           engine_stats(engine, clock), os.getpid(), engine._thread.native_id)))
    serve(sock, engine, clock, grammars)


def _exit_if_orphaned(sock: socket.socket, loading: threading.Event) -> None:
    """While the model loads (minutes on a GPU, nothing read from the socket yet), end this process if the front
    end goes away (killed: its end of the socket closes), rather than load on, holding the GPU's memory, for no one.
    The front end sends nothing before ``Ready``: the socket turning readable means its end of stream."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
    while loading.is_set():
        if poller.poll(100) and loading.is_set():
            log.warning("the front end went away while the engine was starting: exiting")
            os._exit(1)


def grammar_cache(settings: Any, loaded: Any) -> Callable[[str, tuple[int, ...]], Any] | None:
    """Compiles the grammars of constrained requests in this process (the front end sends their text), keeping
    the latest few: a session's tools give the same grammar turn after turn. None with structured outputs off."""
    if getattr(settings, "structured_outputs", "off") == "off" or not loaded.stop_token_ids:
        return None
    from engine.structured import Grammar, GrammarTokenizer

    tokenizer = GrammarTokenizer(loaded.tokenizer, loaded.paged_model.vocab_size, sorted(loaded.stop_token_ids))
    cache: OrderedDict[tuple[str, tuple[int, ...]], Any] = OrderedDict()

    def compile_grammar(text: str, prefix: tuple[int, ...]) -> Any:
        key = (text, prefix)
        if (hit := cache.get(key)) is not None and not hit.failed:  # a failed one is compiled afresh
            cache.move_to_end(key)
            return hit
        grammar = cache[key] = Grammar(tokenizer, text, prefix)
        if len(cache) > GRAMMARS_KEPT:
            cache.popitem(last=False)
        return grammar
    return compile_grammar


def serve(sock: socket.socket, engine: Engine, clock: Callable[[], float],
          grammars: Callable[[str, tuple[int, ...]], Any] | None = None) -> None:
    """Serve the front end on ``sock`` until it says stop or goes away, or the engine dies."""
    out: queue.SimpleQueue[Any] = queue.SimpleQueue()
    steps: list[tuple[str, int, float]] = []

    def on_step(kind: str, batch: int, seconds: float) -> None:  # engine thread
        steps.append((kind, batch, seconds))

    def deliver(batch: list[tuple[EventSink, TokenEvent]]) -> None:  # engine thread: no I/O, no encoding here
        taken = steps[:]
        del steps[:len(taken)]
        out.put(([e for _, e in batch], engine_stats(engine, clock), taken))

    engine.on_step = on_step
    engine.deliver = deliver
    sender = threading.Thread(target=_send_loop, args=(sock, out), name="engine-sender", daemon=True)
    sender.start()
    watchdog = threading.Thread(target=_watch, args=(engine, out), name="engine-watchdog", daemon=True)
    watchdog.start()
    try:
        _receive_loop(sock, engine, out, clock, grammars)
    finally:
        engine.stop()
        out.put(None)
        sender.join(10)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


def _receive_loop(sock: socket.socket, engine: Engine, out: queue.SimpleQueue[Any], clock: Callable[[], float],
                  grammars: Callable[[str, tuple[int, ...]], Any] | None) -> None:
    while True:
        try:
            payload = recv_frame(sock)
        except OSError:
            payload = None
        if payload is None:
            if engine.alive:
                log.warning("the front end went away: stopping the engine (its requests end with it)")
            return
        msg = decode_to_engine(payload)
        if type(msg) is Add:
            try:
                # (a grammar compiles here, on this thread, never on the engine's)
                engine.submit(msg.prompt_ids, params_from_wire(msg.params, grammars), SINK, msg.session_key,
                              msg.cache_salt, request_id=msg.request_id)
            except Exception as exc:  # the front end checks first; what it could not know ends the request here
                refusal = TokenEvent(msg.request_id, (), FinishReason.ERROR, f"{type(exc).__name__}: {exc}")
                out.put(([refusal], engine_stats(engine, clock), []))
        elif type(msg) is Abort:
            engine.abort(msg.request_id)
        elif type(msg) is Release:
            engine.release_session(msg.session_key)
        elif type(msg) is Shutdown:
            return


def _watch(engine: Engine, out: queue.SimpleQueue[Any]) -> None:
    """The engine thread ended: if it died (not stopped), say why, and end the process (its socket closes)."""
    thread = engine._thread
    if thread is not None:
        thread.join()
    if engine.dead_reason and engine.dead_reason != "engine stopped":
        out.put(Failed(engine.dead_reason))
        out.put(None)


def _send_loop(sock: socket.socket, out: queue.SimpleQueue[Any]) -> None:
    """Encode and write what the engine hands over; several steps' worth in one write when they queued up."""
    while True:
        items = [out.get()]
        while True:
            try:
                items.append(out.get_nowait())
            except queue.Empty:
                break
        frames, done = [], False
        for item in items:
            if item is None:
                done = True
                break
            if isinstance(item, Failed):
                frames.append(frame(item))
                continue
            events, stats, steps = item
            frames.append(frame(Outputs([event_to_wire(e) for e in events], stats, steps)))
        try:
            if frames:
                sock.sendall(b"".join(frames))
        except OSError:  # the front end is gone: the receive loop sees it too and stops the engine
            return
        if done:
            if any(isinstance(i, Failed) for i in items):
                os._exit(1)  # the engine died: nothing left to serve
            return
