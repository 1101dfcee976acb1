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


class _Dying:
    """Wraps a scripted model: a prompt that mentions "die" kills the engine thread (an error no step survives)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def forward(self, input_ids, positions, meta):
        logits = self.model.forward(input_ids, positions, meta)
        if any("die" in p for p in self.model.prompts):
            raise SystemExit("the engine thread dies (injected by the test)")
        return logits


def scripted_dying(settings: Any) -> Any:
    """``scripted_story``, but a prompt that mentions "die" takes the engine thread down."""
    from dataclasses import replace

    loaded = scripted_story(settings)
    return replace(loaded, paged_model=_Dying(loaded.paged_model))


def slow_to_load(settings: Any) -> Any:
    """A model that takes minutes to load (the 14B on a GPU does): the front end can die meanwhile. It says it has
    begun in ``<log_file>.loading``."""
    import pathlib
    import time

    pathlib.Path(settings.log_file + ".loading").write_text(str(__import__("os").getpid()))
    time.sleep(120)
    return scripted_story(settings)


def scripted_slow_story(settings: Any) -> Any:
    """``scripted_story`` at one step every 200 ms (requests sent together reach the engine within one step)."""
    from support import scripted_loader

    return scripted_loader(story, step_delay=0.2)(settings)
