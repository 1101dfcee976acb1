"""``python tests/scripted_server.py``: the real server process (settings from INFERENCE_*, the DrainingServer),
serving the scripted echo model instead of the tiny model's random weights. The restart and cluster tests
start it, SIGKILL it and start it again; its replies show the history it was given.

The echo model answers ``heard: <every user message of the prompt, joined by " | ">``, so a reply proves which
conversation the server rebuilt (see ``echo``). SCRIPTED_STEP_DELAY_S slows each model step (a task that runs long enough to
be caught mid-stream).
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

USER = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.S)


def echo(prompt: str) -> str:
    """Every user message of the conversation; a last message with "long" in it gets a long tail (a task that
    is still running when the test kills the server)."""
    users = [m.strip() for m in USER.findall(prompt)]
    return "heard: " + " | ".join(users) + (" and so on" * 300 if users and "long" in users[-1] else "")


def main() -> None:
    import uvicorn

    from server_starlette import UVICORN_WS, create_app, make_server_class
    from shared import Settings, setup_logging
    from support import scripted_loader

    settings = Settings.from_env()
    setup_logging(settings)
    delay = float(os.environ.get("SCRIPTED_STEP_DELAY_S", "0"))
    app = create_app(settings, loader=scripted_loader(echo, step_delay=delay))
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            ws_max_size=settings.ws_max_message_bytes, **UVICORN_WS)
    make_server_class()(config).run()


if __name__ == "__main__":
    main()
