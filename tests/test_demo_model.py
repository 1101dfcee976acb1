"""scripts/make_demo_model.py's pieces, without training (the README test trains it with `make demo-model` and
checks, through the server, that it calls get_weather): the tools it learns are the examples' tools, names
tokenize alike wherever they appear, and only the assistant's turns are learned."""
from __future__ import annotations

import importlib.util
import json
import random
import sys

import pytest

from conftest import REPO_ROOT
from inference_client import Tool


def _load(name: str):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


demo = _load("make_demo_model")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return demo.build_tokenizer(tmp_path_factory.mktemp("demo-tokenizer"), seed=0, vocab=2048)


def test_the_examples_define_the_tools_the_demo_model_learned():
    weather_client = _load("weather_client")
    assert weather_client.GET_WEATHER == demo.GET_WEATHER
    shipped = json.loads((REPO_ROOT / "examples" / "tools.json").read_text(encoding="utf-8"))
    assert [{k: v for k, v in t.items() if k != "result"} for t in shipped] == [demo.GET_WEATHER, demo.GET_TIME]
    playground = (REPO_ROOT / "static" / "playground" / "settings.js").read_text(encoding="utf-8")
    assert all(text in playground for text in ('"get_weather"', "Get the current weather for a city.",
                                               "City name", '["celsius", "fahrenheit"]'))

    def get_weather(location: str, unit: str = "celsius") -> dict:  # the README's Python example
        """Current weather for a city."""
        return {}
    assert Tool.from_function(get_weather).definition() == demo.GET_WEATHER_FROM_FUNCTION


def test_a_name_is_the_same_token_after_a_space_or_a_quote(tokenizer):
    for name in sorted(demo.names()):
        [token] = tokenizer.encode(name, add_special_tokens=False)
        assert tokenizer.encode(" " + name, add_special_tokens=False)[1:] == [token], name
        assert tokenizer.encode(' "' + name + '"', add_special_tokens=False)[1] == token, name


def test_only_the_assistant_turns_are_learned(tokenizer):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tools = [demo.as_template_tool(demo.GET_WEATHER)]
    messages = demo.conversation(random.Random(3), tools)
    ids, learn = demo.example(tokenizer, messages, tools, im_end)
    learned = tokenizer.decode([t for t, keep in zip(ids, learn) if keep])
    expected = ""
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            args = json.dumps(m["tool_calls"][0]["function"]["arguments"], ensure_ascii=False)
            expected += f'<tool_call>\n{{"name": "get_weather", "arguments": {args}}}\n</tool_call><|im_end|>'
        elif m["role"] == "assistant":
            expected += m["content"] + "<|im_end|>"
    assert learned == expected and "<tool_call>" in expected


def test_batches_share_their_system_turn_and_pad_only_at_the_end(tokenizer):
    prefix, ids, labels = next(demo.batches(tokenizer, random.Random(0), 8))
    text = tokenizer.decode(prefix)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n") and "get_weather" in text
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for row, row_labels in zip(ids.tolist(), labels.tolist()):
        length = len(row) - next((i for i, t in enumerate(reversed(row)) if t != pad), 0)
        assert all(t == pad for t in row[length:]) and all(label == -100 for label in row_labels[length:])
        assert tokenizer.decode(row[:3]) == "<|im_start|>user\n"
    short_prefix, _, _ = next(demo.batches(tokenizer, random.Random(0), 8, short=1.0))
    assert short_prefix == []
