"""Model loaders that a spawned engine process can import (module-level functions: ``INFERENCE_ENGINE_PROCESS=on``
pickles the loader by name). Each loads the tiny model directory of ``settings.model_id``, then swaps in the
scripted model double (tests/scripted_model.py)."""
from __future__ import annotations

from typing import Any

STORY = " ".join(f"word{i}" for i in range(400))


def story(prompt: str) -> str:
    """A long, deterministic reply (a stream that runs long enough to be cancelled, cut or killed)."""
    return STORY


def scripted_story(settings: Any) -> Any:
    """The scripted model replying ``STORY``, one step every 20 ms (so streams are still running when a test acts)."""
    from support import scripted_loader

    return scripted_loader(story, step_delay=0.02)(settings)


def scripted_echo(settings: Any) -> Any:
    """The scripted model replying with the last line of the prompt's user message, reversed, at full speed."""
    from support import scripted_loader

    def echo(prompt: str) -> str:
        user = prompt.rsplit("<|im_start|>user\n", 1)[-1].split("<|im_end|>", 1)[0]
        return f"echo: {user[::-1]}"
    return scripted_loader(echo)(settings)
