"""The seed's weather example, end to end: a runnable client for the WebSocket JSON-RPC protocol.

    .venv/bin/python scripts/weather_client.py [--url http://localhost:8000] [--message "What is the weather like in London?"]

It registers a ``get_weather`` tool, asks the question, answers the model's ``function_call_request``
with a local stand-in implementation, and prints the streamed answer.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.request
from typing import Any

from websockets.asyncio.client import connect

GET_WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather for a city.",
    "parameters": {
        "type": "object",
        "properties": {"location": {"type": "string", "description": "City name"},
                       "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["location"],
    },
}


def get_weather(location: str, unit: str = "celsius") -> dict[str, Any]:
    """Stand-in for a real weather service: a fixed, plausible answer."""
    temperature = 15 if unit == "celsius" else 59
    return {"location": location, "temperature": f"{temperature}°{'C' if unit == 'celsius' else 'F'}",
            "condition": "Cloudy"}


TOOLS = {"get_weather": get_weather}


def create_session(base_url: str, tools: list[dict[str, Any]]) -> str:
    request = urllib.request.Request(f"{base_url}/create_session", data=json.dumps({"tools": tools}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["session_id"]


async def run(base_url: str, message: str, out: Any = sys.stdout, max_new_tokens: int = 512) -> dict[str, Any]:
    """Run one conversation turn; returns the transcript (tool calls, final text, end params)."""
    session_id = create_session(base_url, [GET_WEATHER])
    ws_url = base_url.replace("http://", "ws://").replace("https://", "wss://") + f"/ws/{session_id}"
    transcript: dict[str, Any] = {"session_id": session_id, "tool_calls": [], "chunks": []}
    async with connect(ws_url, max_size=None) as ws:
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "generate",
                                  "params": {"message": message, "max_new_tokens": max_new_tokens}}))
        async for raw in ws:
            msg = json.loads(raw)
            method, params = msg.get("method"), msg.get("params", {})
            if "error" in msg:
                print(f"\n[error {msg['error']['code']}] {msg['error']['message']}", file=out)
                transcript["end"] = {"finish_reason": "error", "error": msg["error"]}
                break
            if method == "text_chunk":
                transcript["chunks"].append(params["chunk"])
                print(params["chunk"], end="", flush=True, file=out)
            elif method == "function_call_request":
                results = []
                for call in params["tool_calls"]:
                    print(f"\n[tool call] {call['tool']}({json.dumps(call['parameters'])})", file=out)
                    transcript["tool_calls"].append(call)
                    fn = TOOLS.get(call["tool"])
                    try:
                        result = fn(**call["parameters"]) if fn else None
                        error = None if fn else f"unknown tool {call['tool']}"
                    except TypeError as exc:  # the model passed arguments the function does not take
                        result, error = None, str(exc)
                    results.append({"tool_name": call["tool"], "call_id": call["call_id"], "result": result,
                                    "isError": error is not None, "error_message": error})
                await ws.send(json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tool_result",
                                          "params": {"task_id": params["task_id"], "results": results}}))
            elif method == "final_text":
                transcript["final_text"] = params["final_text"]
            elif method == "error":
                print(f"\n[error {params['error']['code']}] {params['error']['message']}", file=out)
            elif method == "end":
                transcript["end"] = params
                print(f"\n[end: {params['finish_reason']}, usage {params['usage']}]", file=out)
                break
    return transcript


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://localhost:8000")
    parser.add_argument("--message", default="What is the weather like in London?")
    args = parser.parse_args(argv)
    transcript = asyncio.run(run(args.url.rstrip("/"), args.message))
    return 0 if transcript.get("end", {}).get("finish_reason") in ("stop", "length") else 1


if __name__ == "__main__":
    sys.exit(main())
