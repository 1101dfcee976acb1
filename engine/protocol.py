"""The typed messages between the front end and the engine process, and their framing on a stream socket.

Front end -> engine: ``Add`` (a request: token ids and sampling parameters, never text), ``Abort``, ``Release`` (a
session's warm KV tail), ``Shutdown``. Engine -> front end: ``Ready`` once (what the front end needs to serve:
limits, the tokenizer and the model's metadata), then ``Outputs`` once per engine step (every event of the step
and the engine's counters), and ``Failed`` if it cannot start. Messages are msgpack (msgspec: typed, compact
arrays); ``Ready`` carries Python objects (the tokenizer) and is pickled. Each frame is a 4-byte big-endian
length and the payload. Both ends are this program's own processes: nothing here comes from a client.
"""
from __future__ import annotations

import dataclasses
import pickle
import socket
import struct
from typing import Any, Callable, Union

import msgspec

from engine.request import FinishReason, SamplingParams, TokenEvent

HEADER = struct.Struct(">I")
MAX_FRAME = 1 << 31


class Add(msgspec.Struct, tag=True, array_like=True):
    request_id: str
    prompt_ids: list[int]
    params: list[Any]  # SamplingParams' fields in order (``params_to_wire``)
    session_key: str | None = None
    cache_salt: str = ""


class Abort(msgspec.Struct, tag=True, array_like=True):
    request_id: str


class Release(msgspec.Struct, tag=True, array_like=True):
    session_key: str


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    pass


class Outputs(msgspec.Struct, tag=True, array_like=True):
    # (request_id, token_ids, finish_reason or "", error or "", prompt_tokens, cached_tokens, completion_tokens)
    events: list[tuple[str, list[int], str, str, int, int, int]]
    stats: dict[str, float]  # Engine.stats() and its step counters, as of this step
    steps: list[tuple[str, int, float]] = []  # (kind, batch size, seconds) of the steps since the last Outputs


class Failed(msgspec.Struct, tag=True, array_like=True):
    reason: str


ToEngine = Union[Add, Abort, Release, Shutdown]
FromEngine = Union[Outputs, Failed]
_encode = msgspec.msgpack.Encoder().encode
_to_engine = msgspec.msgpack.Decoder(ToEngine)
_from_engine = msgspec.msgpack.Decoder(FromEngine)

_PARAM_FIELDS = [f.name for f in dataclasses.fields(SamplingParams)]


def params_to_wire(params: SamplingParams) -> list[Any]:
    """SamplingParams as a list (sets as sorted lists). A grammar goes as what defines it, ``[text, prefix ids]``:
    the engine process compiles its own (grammar state lives with the engine, per row). Any other field this cannot
    send (a compiled object) is refused here, in the front end, rather than failing in the engine."""
    values = []
    for name in _PARAM_FIELDS:
        value = getattr(params, name)
        if name == "grammar" and value is not None:
            value = [value.text, list(value.prefix)]
        elif isinstance(value, (set, frozenset)):
            value = sorted(value)
        elif value is not None and not isinstance(value, (bool, int, float, str)):
            raise TypeError(f"SamplingParams.{name} ({type(value).__name__}) cannot be sent to the engine process")
        values.append(value)
    return values


def params_from_wire(values: list[Any], grammar: Callable[[str, tuple[int, ...]], Any] | None = None
                     ) -> SamplingParams:
    """SamplingParams back; ``grammar(text, prefix)`` compiles a constrained request's grammar (the engine's)."""
    kwargs = dict(zip(_PARAM_FIELDS, values))
    kwargs["stop_token_ids"] = frozenset(kwargs.get("stop_token_ids") or ())
    if kwargs.get("grammar") is not None:
        if grammar is None:
            raise ValueError("a constrained request, but structured outputs are off in the engine process")
        text, prefix = kwargs["grammar"]
        kwargs["grammar"] = grammar(text, tuple(prefix))
    return SamplingParams(**kwargs)


def event_to_wire(e: TokenEvent) -> tuple[str, list[int], str, str, int, int, int]:
    return (e.request_id, list(e.token_ids), e.finish_reason.value if e.finish_reason else "", e.error or "",
            e.prompt_tokens, e.cached_tokens, e.completion_tokens)


def event_from_wire(t: tuple[str, list[int], str, str, int, int, int] | list[Any]) -> TokenEvent:
    rid, ids, finish, error, prompt, cached, completion = t
    return TokenEvent(rid, tuple(ids), FinishReason(finish) if finish else None, error or None, prompt, cached,
                      completion)


def frame(message: msgspec.Struct) -> bytes:
    payload = _encode(message)
    return HEADER.pack(len(payload)) + payload


def pickled_frame(obj: Any) -> bytes:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(payload)) + payload


def decode_to_engine(payload: bytes | memoryview) -> ToEngine:
    return _to_engine.decode(payload)


def decode_from_engine(payload: bytes | memoryview) -> FromEngine:
    return _from_engine.decode(payload)


def recv_frame(sock: socket.socket) -> bytes | None:
    """The next frame's payload from a blocking socket; None at end of stream (the other side is gone)."""
    head = _recv_exact(sock, HEADER.size)
    if head is None:
        return None
    (n,) = HEADER.unpack(head)
    return _recv_exact(sock, n)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            return None
        got += k
    return bytes(buf)


class FrameReader:
    """Splits a byte stream into frames (the front end's side: fed by an asyncio protocol)."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self.buffer += data
        frames, buf, start = [], self.buffer, 0
        while len(buf) - start >= HEADER.size:
            (n,) = HEADER.unpack_from(buf, start)
            if len(buf) - start - HEADER.size < n:
                break
            frames.append(bytes(buf[start + HEADER.size:start + HEADER.size + n]))
            start += HEADER.size + n
        if start:
            del buf[:start]
        return frames
