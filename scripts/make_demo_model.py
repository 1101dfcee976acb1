"""Train a tiny Qwen2 model that answers weather questions by calling ``get_weather``, offline, on a CPU.

    python scripts/make_demo_model.py [models/demo] [--steps 1000] [--seed 0]      (or: make demo-model)

A random-weight model shows every protocol path but never calls a tool. This one is trained here, in two to
four minutes on two CPU cores, on synthetic conversations rendered with Qwen2.5's own chat template:

* asked about the weather in one of the cities it knows (``CITIES``, the city ending the question) with a
  ``get_weather`` tool in the session, it answers with real Qwen2.5 markup:
  ``<tool_call>\\n{"name": "get_weather", "arguments": {"location": "Paris"}}\\n</tool_call>``;
* given the tool's result (``{"temperature": "15°C", "condition": "Cloudy"}``, any number), it answers
  ``The weather in Paris: Cloudy, 15°C.``;
* without the tool it says it needs it; anything else gets a one-line hint of what it can do.

It knows nothing else (a city it does not know gets a wrong name). The tokenizer, chat template and config
follow ``scripts/make_tiny_model.py`` (Qwen2.5's layout), so the server loads it like any Qwen2.5 checkpoint.
Two choices make a few minutes enough: names are single tokens that no merge joins to a space, so copying
one is repeating the same token (see ``build_tokenizer``), and the model first learns on conversations
without their long system turn (see ``train``). At the end it answers 20 freshly drawn conversations, in
the dtype the server will use, and prints its score.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_tiny_model as tiny  # noqa: E402  (the tokenizer and config recipe)

log = logging.getLogger("make_demo_model")

CITIES = ("London", "Paris", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Warsaw", "Lisbon", "Dublin",
          "Oslo", "Stockholm", "Helsinki", "Copenhagen", "Amsterdam", "Brussels", "Zurich", "Athens", "Istanbul",
          "Cairo", "Nairobi", "Lagos", "Tokyo", "Seoul", "Beijing", "Shanghai", "Delhi", "Mumbai", "Bangkok",
          "Singapore", "Sydney", "Auckland", "Toronto", "Chicago", "Boston", "Denver", "Seattle", "Mexico City",
          "Lima", "Santiago", "New York", "San Francisco", "Buenos Aires", "Cape Town", "Hong Kong")
CONDITIONS = ("Sunny", "Cloudy", "Rainy", "Windy", "Snowy", "Foggy", "Clear", "Stormy")
# Every question ends with the city, so the model finds it at the same distance from the end of the turn
# (a pattern a tiny model learns in minutes; finding it anywhere would take far longer).
QUESTIONS = ("What is the weather like in {}?", "What's the weather in {}?", "How is the weather in {}?",
             "Weather in {}?", "weather in {}?", "Is it raining in {}?", "Tell me the weather in {}?",
             "What is the temperature in {}?", "How warm is it in {}?", "Do I need an umbrella in {}?",
             "And in {}?", "what about {}?", "Is it cold in {}?", "Forecast for {}?", "{}?")
CHITCHAT = ("hello", "Hi!", "hello there", "Who are you?", "Thanks!", "thank you", "tell me a long story",
            "What can you do?", "Write a haiku.", "What time is it?", "2+2?", "good morning", "bye",
            "Tell me a joke.", "How are you?", "help")
HINT = "I am a tiny demo model: I only know the weather. Ask me: What is the weather like in <city>?"
NO_TOOL = "I need the get_weather tool for that: create the session with it."
# The tool as the examples define it (scripts/weather_client.py, examples/tools.json with get_time beside it,
# the playground), the README's shorter variant and the one the Python client derives from the README's
# get_weather function: the model sees them all in training, so any of them works.
GET_WEATHER = {"name": "get_weather", "description": "Get the current weather for a city.",
               "parameters": {"type": "object",
                              "properties": {"location": {"type": "string", "description": "City name"},
                                             "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                              "required": ["location"]}}
GET_TIME = {"name": "get_time", "description": "The current local time in a city.",
            "parameters": {"type": "object", "properties": {"location": {"type": "string", "description": "City name"}},
                           "required": ["location"]}}
GET_WEATHER_SHORT = {"name": "get_weather", "description": "Current weather",
                     "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                                    "required": ["location"]}}
GET_WEATHER_FROM_FUNCTION = {"name": "get_weather", "description": "Current weather for a city.",
                             "parameters": {"type": "object", "properties": {"location": {"type": "string"},
                                                                             "unit": {"type": "string"}},
                                            "required": ["location"]}}
TOOL_SETS = ([GET_WEATHER], [GET_WEATHER], [GET_WEATHER, GET_TIME], [GET_WEATHER_SHORT], [GET_WEATHER_FROM_FUNCTION])


def as_template_tool(tool: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": tool}  # as models.ToolDefinition.for_template renders it


def weather_result(rng: random.Random, city: str) -> dict[str, Any]:
    """A tool result in one of the shapes the examples send (the location and the condition are optional)."""
    unit = "F" if rng.random() < 0.15 else "C"
    result: dict[str, Any] = {"location": city} if rng.random() < 0.5 else {}
    result["temperature"] = f"{rng.randint(-15, 40) if unit == 'C' else rng.randint(5, 104)}°{unit}"
    if rng.random() < 0.9:
        result["condition"] = rng.choice(CONDITIONS)
    return result


def weather_answer(city: str, result: dict[str, Any]) -> str:
    condition = f"{result['condition']}, " if "condition" in result else ""
    return f"The weather in {city}: {condition}{result['temperature']}."


def pick_tools(rng: random.Random) -> list[dict[str, Any]] | None:
    return None if rng.random() < 0.12 else [as_template_tool(tool) for tool in rng.choice(TOOL_SETS)]


def conversation(rng: random.Random, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """A synthetic conversation: one to three exchanges, most of them about the weather."""
    messages: list[dict[str, Any]] = []
    for _ in range(rng.choice((1, 1, 1, 2))):
        if rng.random() < 0.2:
            messages += [{"role": "user", "content": rng.choice(CHITCHAT)}, {"role": "assistant", "content": HINT}]
            continue
        city = rng.choice(CITIES)
        question = rng.choice(QUESTIONS).format(city)
        if tools is None:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": NO_TOOL}]
            continue
        result = weather_result(rng, city)
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": "", "tool_calls": [
                         {"type": "function", "function": {"name": "get_weather", "arguments": {"location": city}}}]},
                     {"role": "tool", "content": json.dumps(result, ensure_ascii=False), "name": "get_weather"},
                     {"role": "assistant", "content": weather_answer(city, result)}]
    return messages


def encode(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
           generation_prompt: bool = False) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt,
                                            tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def example(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
            im_end: int) -> tuple[list[int], list[bool]]:
    """Token ids of the whole conversation and which of them are the assistant's (what the model learns):
    everything after each ``<|im_start|>assistant\n`` up to and including its ``<|im_end|>``."""
    ids = encode(tokenizer, messages, tools)
    opening = encode(tokenizer, [{"role": "user", "content": ""}], None, generation_prompt=True)[-3:]
    learn, inside = [False] * len(ids), False
    for i in range(len(ids)):
        if inside:
            learn[i] = True
            inside = ids[i] != im_end
        elif ids[i - 2:i + 1] == opening:
            inside = True
    return ids, learn


def corpus_for_tokenizer(rng: random.Random, n: int) -> Iterator[str]:
    """Rendered conversations (so the template's words become whole tokens), then some stdlib source."""
    from jinja2 import Template

    template = Template(tiny.QWEN25_CHAT_TEMPLATE)
    for _ in range(n):
        tools = pick_tools(rng)
        yield template.render(messages=conversation(rng, tools), tools=tools, add_generation_prompt=False)
    for _ in range(20):  # every name on its own too (the second word of "New York" is never bare otherwise)
        yield "\n".join(sorted(names())) + "\n"
    yield from tiny.iter_training_corpus(100_000)
 

def names() -> set[str]:
    """The words the model copies from the question or the tool's result into what it writes."""
    return {word for city in CITIES for word in city.split()} | set(CONDITIONS)


def build_tokenizer(out: Path, seed: int, vocab: int) -> Any:
    """Qwen2.5's tokenizer layout, trained on the demo's own text. A name is one token however it is preceded:
    no merge joins a space to it, so " Paris" (in a question) is a space and then "Paris", the very token of
    ``"location": "Paris"``. Copying a name is then the same token again, which a tiny model learns fast."""
    from transformers import AutoTokenizer

    space = "\u0120"  # byte-level BPE's symbol for " "
    joined = {(space + name)[:k] for name in names() for k in range(2, len(name) + 2)}
    tokenizer = tiny.train_tokenizer(vocab, corpus_for_tokenizer(random.Random(seed + 1), 3000),
                                     keep_merge=lambda left, right: left + right not in joined)
    tiny.save_tokenizer(tokenizer, out, model_max_length=4096)
    return AutoTokenizer.from_pretrained(out)


def build_model(tokenizer: Any, seed: int, hidden: int, layers: int) -> Any:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    im_end, endoftext = tokenizer.convert_tokens_to_ids(tiny.IM_END), tokenizer.convert_tokens_to_ids(tiny.ENDOFTEXT)
    config = Qwen2Config(
        vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=hidden, intermediate_size=hidden * 3,
        num_hidden_layers=layers, num_attention_heads=hidden // 32, num_key_value_heads=hidden // 64 or 1,
        max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True, initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}, use_sliding_window=False,
        max_window_layers=layers, bos_token_id=endoftext, eos_token_id=im_end)
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=endoftext, pad_token_id=endoftext,
                                               eos_token_id=[im_end, endoftext], do_sample=False)
    return model


def batches(tokenizer: Any, rng: random.Random, batch_size: int,
            short: float = 0.0) -> Iterator[tuple[list[int], Any, Any]]:
    """(prefix, ids, labels): a batch of conversations that share their tools, hence their system turn
    (``prefix``, run once per step without gradients); ``ids``/``labels`` hold the rest, right-padded.
    Conversations of similar length go together (less padding). A fraction ``short`` of the batches leave
    the system turn out (``prefix`` empty): in thirty tokens rather than two hundred, the one name to copy
    stands out, and the model learns to find it much sooner."""
    import torch

    im_start, im_end = (tokenizer.convert_tokens_to_ids(t) for t in (tiny.IM_START, tiny.IM_END))
    pad = tokenizer.convert_tokens_to_ids(tiny.ENDOFTEXT)
    while True:
        tools = pick_tools(rng)
        pool = sorted((example(tokenizer, conversation(rng, tools), tools, im_end) for _ in range(4 * batch_size)),
                      key=lambda row: len(row[0]))
        cut = pool[0][0].index(im_start, 1)  # the system turn ends where the first user turn starts
        assert all(ids[:cut] == pool[0][0][:cut] and not any(learn[:cut]) for ids, learn in pool)
        groups = [pool[i:i + batch_size] for i in range(0, len(pool), batch_size)]
        rng.shuffle(groups)
        for rows in groups:
            width = len(rows[-1][0]) - cut
            ids = torch.full((batch_size, width), pad, dtype=torch.long)
            labels = torch.full((batch_size, width), -100, dtype=torch.long)
            for r, (row_ids, learn) in enumerate(rows):
                rest = row_ids[cut:]
                ids[r, :len(rest)] = torch.tensor(rest)
                labels[r, :len(rest)] = torch.tensor([t if keep else -100 for t, keep in zip(rest, learn[cut:])])
            yield (pool[0][0][:cut] if rng.random() >= short else []), ids, labels


def loss_of(model: Any, prefix: list[int], ids: Any, labels: Any) -> Any:
    """Mean cross-entropy over the assistant's tokens of a batch from ``batches``."""
    import torch
    import torch.nn.functional as F

    # The system turn (tools included) is the same for the whole batch: its keys and values are computed
    # once, without gradients, and shared by every row (the same prefix caching the server does).
    cache = None
    if prefix:
        with torch.no_grad():
            cache = model.model(input_ids=torch.tensor([prefix]), use_cache=True).cache
        cache.batch_repeat_interleave(ids.shape[0])
    # Right padding needs no mask: a real token never attends to a later position. Only the positions that
    # predict an assistant token go through lm_head (a fifth of them): the rest of the logits would be waste.
    hidden = model.model(input_ids=ids, cache=cache).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    learn = targets != -100
    return F.cross_entropy(model.lm_head(hidden[learn]).float(), targets[learn])


def train(model: Any, tokenizer: Any, steps: int, batch_size: int, lr: float, seed: int,
          short_phase: float = 0.6, on_log: Callable[[int], None] | None = None) -> None:
    """AdamW with warm-up and cosine decay. The first 60 % of the steps leave the system turn out: the model
    learns to copy the city and the numbers in short contexts first (a long context hides the one token to
    copy among two hundred, and learning to find it then takes many times longer); the rest mix in the full
    prompt, as the server sends it, so the model learns to look past the system turn."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98),
                                  fused=True)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    model.train()
    started = time.perf_counter()
    rng = random.Random(seed)
    short, mixed = batches(tokenizer, rng, batch_size, short=1.0), batches(tokenizer, rng, batch_size, short=0.3)
    for step in range(steps):
        loss = loss_of(model, *next(short if step < short_phase * steps else mixed))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 25 == 0 or step == steps - 1:
            log.info("step %d/%d loss %.3f (%.0f s)", step + 1, steps, loss.item(), time.perf_counter() - started)
            if on_log:
                on_log(step)
    model.eval()


def evaluate(model: Any, tokenizer: Any, seed: int, n: int = 20) -> tuple[int, int]:
    """Greedy answers to unseen questions: (right tool calls, right final answers) out of ``n`` each."""
    import torch

    rng = random.Random(seed + 2)
    calls = answers = 0
    for _ in range(n):
        city, tools = rng.choice(CITIES), [as_template_tool(tool) for tool in rng.choice(TOOL_SETS)]
        messages = [{"role": "user", "content": rng.choice(QUESTIONS).format(city)}]
        ids = torch.tensor([encode(tokenizer, messages, tools, generation_prompt=True)])
        out = model.generate(ids, max_new_tokens=40, do_sample=False)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        expected = '<tool_call>\n{"name": "get_weather", "arguments": {"location": "%s"}}\n</tool_call>' % city
        calls += text == expected
        result = weather_result(rng, city)
        messages += [{"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"location": city}}}]},
            {"role": "tool", "content": json.dumps(result, ensure_ascii=False), "name": "get_weather"}]
        ids = torch.tensor([encode(tokenizer, messages, tools, generation_prompt=True)])
        out = model.generate(ids, max_new_tokens=40, do_sample=False)
        answers += tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == weather_answer(city, result)
    return calls, answers


def build_demo_model(out_dir: str | Path, *, steps: int = 1000, batch_size: int = 16, seed: int = 0,
                     hidden: int = 128, layers: int = 2, lr: float = 5e-3, vocab: int = 2048,
                     threads: int | None = None) -> tuple[Path, tuple[int, int]]:
    """Train and save the demo model; returns its directory and its score (right tool calls, right answers
    out of 20 freshly drawn conversations) in the dtype the server picks on this machine."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from shared import cpu_dtype

    if threads:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out, seed, vocab)
    model = build_model(tokenizer, seed, hidden, layers)
    train(model, tokenizer, steps, batch_size, lr, seed)
    model.save_pretrained(out)
    serving = model.to(getattr(torch, cpu_dtype()))  # INFERENCE_DTYPE=auto on this CPU (float32 or bfloat16)
    return out, evaluate(serving, tokenizer, seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", default="models/demo", help="where to save it (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=1000, help="training steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    out, (calls, answers) = build_demo_model(args.out_dir, steps=args.steps, batch_size=args.batch_size,
                                             seed=args.seed, threads=args.threads)
    log.info("saved %s in %.0f s; on 20 freshly drawn conversations: %d right tool calls, %d right answers from the "
             "tool's result", out, time.perf_counter() - started, calls, answers)
    log.info("serve it: INFERENCE_MODEL_ID=%s make serve", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
