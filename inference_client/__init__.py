"""An asyncio client for the server's WebSocket JSON-RPC protocol, and a terminal chat.

Library use::

    async with Client("http://localhost:8000") as client:
        session = await client.create_session(tools=[get_weather])   # plain functions become tools
        async for event in session.generate(message="Weather in London?"):
            ...                                                       # TextChunk, ToolCalls, FinalText, Error, End

A session whose socket drops reconnects by itself (``Client(reconnect_s=...)``) with ``?resume_from=<last seq>``:
the server sends what was missed, then the live stream goes on; requests still unanswered are sent again.

The terminal chat: ``inference-chat --url http://localhost:8000 [--tools tools.json]`` once installed
(``pip install -e .`` in the repository), or ``python -m inference_client`` from the repository root.
Only ``websockets`` and the standard library are used.
"""
from __future__ import annotations

from .chat import main
from .client import Client
from .events import (ApiError, ClientClosed, End, Error, Event, FinalText, RpcError, TextChunk, ToolCall,
                     ToolCalls)
from .session import Generation, Session
from .tools import Tool, as_tools, load_tools

__all__ = ["ApiError", "Client", "ClientClosed", "End", "Error", "Event", "FinalText", "Generation", "RpcError",
           "Session", "TextChunk", "Tool", "ToolCall", "ToolCalls", "as_tools", "load_tools", "main"]
