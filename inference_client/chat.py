"""The terminal chat: ``inference-chat`` (or ``python -m inference_client``). Answers stream as they arrive,
tool calls show as ``[tool] name(args)``; Ctrl-C cancels an answer, Ctrl-C or Ctrl-D at the prompt quits."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
from typing import Any, TextIO

from .client import Client
from .events import ApiError, ClientClosed, End, Error, RpcError, TextChunk, ToolCalls
from .session import Session
from .tools import Tool, load_tools


class Terminal:
    """Lines from stdin (read by a daemon thread, so a pending read never blocks exit) and Ctrl-C as an event."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.loop = out, asyncio.get_running_loop()
        self.lines: asyncio.Queue[str | None] = asyncio.Queue()
        self.interrupt = asyncio.Event()
        self.eof, self.fresh_line = False, True
        threading.Thread(target=self._read_stdin, daemon=True).start()
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows: Ctrl-C raises there
            self.loop.add_signal_handler(signal.SIGINT, self.interrupt.set)

    def _read_stdin(self) -> None:
        for line in sys.stdin:
            self.loop.call_soon_threadsafe(self.lines.put_nowait, line.rstrip("\n"))
        self.loop.call_soon_threadsafe(self.lines.put_nowait, None)

    def write(self, text: str, *, own_line: bool = False) -> None:
        """Write ``text`` now; ``own_line``: start it on a fresh line."""
        text = "\n" + text if own_line and not self.fresh_line else text
        if text:
            self.out.write(text)
            self.out.flush()
            self.fresh_line = text.endswith("\n")

    async def readline(self, prompt: str) -> str | None:
        """The next line, or None at EOF or on Ctrl-C."""
        self.write(prompt)
        if self.eof:
            return None
        self.interrupt.clear()
        line, stop = asyncio.ensure_future(self.lines.get()), asyncio.ensure_future(self.interrupt.wait())
        done, _ = await asyncio.wait({line, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if line in done:
            self.eof = line.result() is None
            self.fresh_line = not self.eof  # the user's Enter ended the line
            return line.result()
        line.cancel()
        return None


async def _cancel_on_interrupt(session: Session, term: Terminal) -> None:
    while True:
        await term.interrupt.wait()
        term.interrupt.clear()
        with contextlib.suppress(RpcError, ClientClosed):  # the task may have just ended
            await session.cancel()


async def _turn(session: Session, term: Terminal, text: str, sampling: dict[str, Any]) -> None:
    """One question: stream the answer, show tool calls, answer the ones without a canned result by hand."""
    term.interrupt.clear()
    watcher = asyncio.create_task(_cancel_on_interrupt(session, term))
    gen = session.generate(text, **sampling)
    try:
        async for event in gen:
            if isinstance(event, TextChunk):
                term.write(event.text)
            elif isinstance(event, ToolCalls):
                for call in event.calls:
                    shown = f"error: {call.error}" if call.error else json.dumps(call.result, ensure_ascii=False,
                                                                                   default=str)
                    term.write(f"[tool] {call.tool}({json.dumps(call.parameters, ensure_ascii=False)})"
                               + (f" -> {shown}\n" if call.answered else "\n"), own_line=True)
                replies = []
                for call in event.pending:
                    line = await term.readline(f"result of {call.tool} (JSON)> ")
                    if line is None:  # Ctrl-C (the watcher cancels) or EOF
                        replies = []
                        if term.eof:
                            await session.cancel()
                        break
                    try:
                        replies.append(call.reply(json.loads(line)))
                    except ValueError:
                        replies.append(call.reply(line))
                if replies:
                    await session.tool_result(event.task_id, replies)
            elif isinstance(event, Error):
                term.write(f"[error {event.code}] {event.message}\n", own_line=True)
            elif isinstance(event, End):
                term.write("" if event.finish_reason == "stop" else f"[{event.finish_reason}]\n", own_line=True)
    except RpcError as exc:
        term.write(f"[error {exc.code}] {exc.message}\n", own_line=True)
        if gen.task_id is not None and gen.finish_reason is None:  # a refused tool_result: end the task
            with contextlib.suppress(RpcError):
                await session.cancel(gen.task_id)
    finally:
        watcher.cancel()


def banner(url: str, model: dict[str, Any], session: Session, tools: list[Tool]) -> str:
    """One line: where, which model (and whether it is the CPU fallback), the session, and how to quit."""
    def shown(value: Any) -> str:  # what the server says, without control characters (no terminal escapes)
        return "".join(c for c in str(value) if c.isprintable())[:200]

    name = shown(model.get("id") or "unknown model")
    how = "nf4" if model.get("quantization") == "nf4" else model.get("dtype")
    where = ", ".join(shown(v) for v in (model.get("device"), how) if v)
    fallback = ", the CPU fallback" if model.get("device") == "cpu" else ""
    tool_names = ", ".join(t.name for t in tools) or "none"
    return (f"Connected to {url}: model {name}{f' ({where}{fallback})' if where else ''}, "
            f"session {shown(session.session_id)}, tools: {tool_names}. "
            f"Ctrl-C cancels an answer; Ctrl-D or Ctrl-C at the prompt quits.\n")


async def chat(args: argparse.Namespace, tools: list[Tool], out: TextIO = sys.stdout) -> int:
    """The terminal chat loop; returns the exit status."""
    term = Terminal(out)
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    try:
        async with Client(args.url, args.api_key) as client:
            session = await client.create_session(tools)
            try:
                model = await client.model()
            except (ApiError, OSError, ValueError):  # an older server, or no /v1/models: the banner says so
                model = {}
            term.write(banner(client.url, model, session, tools))
            while (line := await term.readline("> ")) is not None:
                if line.strip():
                    await _turn(session, term, line, sampling)
    except (ApiError, ClientClosed, OSError) as exc:
        term.write(f"error: {exc}\n", own_line=True)
        return 1
    term.write("", own_line=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``inference-chat``: the terminal chat's command line."""
    parser = argparse.ArgumentParser(prog="inference-chat", description="Chat with the inference server in a "
                                     "terminal (Ctrl-C cancels an answer; Ctrl-D or Ctrl-C at the prompt quits).")
    parser.add_argument("--url", default="http://localhost:8000", help="the server (default: %(default)s)")
    parser.add_argument("--tools", help="a JSON list of tool definitions; a tool's optional \"result\" is a canned "
                                        "answer, else you are asked for a JSON result")
    parser.add_argument("--api-key", default=os.environ.get("INFERENCE_API_KEY") or None,
                        help="API key (default: $INFERENCE_API_KEY)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    args = parser.parse_args(argv)
    try:
        tools = load_tools(args.tools) if args.tools else []
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        parser.error(f"--tools {args.tools}: {exc!r}")
    try:
        return asyncio.run(chat(args, tools))
    except KeyboardInterrupt:  # where no signal handler could be installed
        return 130

