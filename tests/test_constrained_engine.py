"""Constrained decoding in the engine, on the tiny random-weight model (which writes garbage when free): every
constrained output parses and validates, for 100 seeds x the schema set; tool_choice "required" and named calls
always yield a valid call of the right tool; unconstrained rows sharing the batch keep their tokens; a grammar
that fails mid-stream ends its request with an error and nothing else."""
from __future__ import annotations

import threading

import pytest
import torch

from engine import Engine, EngineConfig, FinishReason, SamplingParams, TokenEvent
from engine.qwen2 import PagedQwen2
from engine.structured import Grammar
from grammar_walks import validate, validate_json_text
from grammars import ResponseFormat, ToolChoice, ToolSpec
from schema_cases import SCHEMAS, WEATHER
from utils import ToolCallParser

TIMEOUT = 300.0
SEEDS = 100
TOOLS = [ToolSpec("get_weather", WEATHER), *(ToolSpec(name, schema) for name, schema in SCHEMAS.items())]
SCHEMA_OF = {t.name: t.parameters for t in TOOLS}


class Collector:
    def __init__(self) -> None:
        self.events: list[TokenEvent] = []
        self.done = threading.Event()

    def __call__(self, event: TokenEvent) -> None:  # engine thread
        self.events.append(event)
        if event.finished:
            self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [t for e in self.events for t in e.token_ids]

    @property
    def final(self) -> TokenEvent:
        assert self.done.wait(TIMEOUT), "timed out"
        return self.events[-1]


@pytest.fixture(scope="module")
def engine(tiny_hf_model):
    eng = Engine(PagedQwen2(tiny_hf_model), EngineConfig(block_size=16, prefill_chunk=1024, max_running=32,
                                                         max_context=4096, num_blocks=6400, max_queue=4096))
    eng.start()
    yield eng
    eng.stop(timeout=10)


@pytest.fixture(scope="module")
def stops(tiny_tokenizer) -> frozenset[int]:
    return frozenset(tiny_tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))


def chat_prompt(tokenizer, text: str, tools: list[ToolSpec] = ()) -> list[int]:
    template_tools = [{"type": "function", "function": {"name": t.name, "parameters": dict(t.parameters)}}
                      for t in tools] or None
    enc = tokenizer.apply_chat_template([{"role": "user", "content": text}], tools=template_tools,
                                        add_generation_prompt=True, tokenize=True)
    return list(enc["input_ids"] if hasattr(enc, "keys") else enc)


def sampled(seed: int, stops: frozenset[int], grammar: Grammar | None = None, n: int = 400) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=1.0, seed=seed, stop_token_ids=stops, grammar=grammar)


def run_all(engine: Engine, jobs: list[tuple[list[int], SamplingParams]]) -> list[Collector]:
    collectors = []
    for ids, params in jobs:
        c = Collector()
        engine.submit(ids, params, c)
        collectors.append(c)
    for c in collectors:
        assert c.done.wait(TIMEOUT), "timed out"
    return collectors


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_constrained_answer_parses_and_validates(engine, grammar_compiler, tiny_tokenizer, stops, name):
    """response_format json_schema, 100 seeds: the random model's answer always parses and validates (and ends
    on its own: every schema of the set is finite, so nothing is cut by max_new_tokens)."""
    schema = SCHEMAS[name]
    grammar = grammar_compiler.compile([], ToolChoice(), ResponseFormat("json_schema", schema))
    ids = chat_prompt(tiny_tokenizer, f"Answer with a JSON document ({name}).")
    results = run_all(engine, [(ids, sampled(seed, stops, grammar)) for seed in range(SEEDS)])
    free = run_all(engine, [(ids, sampled(seed, stops)) for seed in range(3)])
    assert not any(_parses(tiny_tokenizer.decode(c.tokens, skip_special_tokens=True)) for c in free)  # garbage free
    for seed, c in enumerate(results):
        assert c.final.finish_reason is FinishReason.STOP, (seed, c.final)
        validate_json_text(tiny_tokenizer.decode(c.tokens, skip_special_tokens=True), schema)


def _parses(text: str) -> bool:
    import json

    try:
        json.loads(text)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("choice", ["required", "named"])
def test_required_and_named_tool_choices_always_yield_a_valid_call(engine, grammar_compiler, tiny_tokenizer, stops,
                                                                    choice):
    wanted = ToolChoice("function", "nested") if choice == "named" else ToolChoice("required")
    turns = grammar_compiler.for_turns(TOOLS, wanted, ResponseFormat())
    ids = chat_prompt(tiny_tokenizer, "What is the weather in Rome?", TOOLS)
    ids += tiny_tokenizer.encode(turns.prefix, add_special_tokens=False)
    results = run_all(engine, [(ids, sampled(seed, stops, turns.first, 600)) for seed in range(SEEDS)])
    names = set()
    for seed, c in enumerate(results):
        assert c.final.finish_reason is FinishReason.STOP, (seed, c.final)
        parser = ToolCallParser()
        text = parser.push(turns.prefix + tiny_tokenizer.decode(c.tokens, skip_special_tokens=True))
        text += parser.flush()
        assert parser.calls and not text.strip(), (seed, text)
        for call in parser.calls:
            validate(call.arguments, SCHEMA_OF[call.name])
            names.add(call.name)
        if choice == "named":
            assert [call.name for call in parser.calls] == ["nested"]
    if choice == "required":
        assert len(names) >= 3  # the random model picks among the tools: the grammar does not favour one


def test_unconstrained_rows_keep_their_tokens_beside_constrained_ones(engine, grammar_compiler, tiny_tokenizer,
                                                                      stops):
    """Greedy and seeded rows, alone and then sharing every step with constrained rows: the same tokens."""
    free_jobs = [(chat_prompt(tiny_tokenizer, f"Tell me a story, {i}."),
                  SamplingParams(max_new_tokens=48, temperature=0.0 if i % 2 else 0.9, seed=100 + i,
                                 stop_token_ids=stops, ignore_eos=True)) for i in range(6)]
    alone = [c.tokens for c in run_all(engine, free_jobs)]
    grammar = grammar_compiler.compile(TOOLS, ToolChoice("required"), ResponseFormat())
    ids = chat_prompt(tiny_tokenizer, "Call a tool.", TOOLS)
    constrained_jobs = [(ids, sampled(seed, stops, grammar, 200)) for seed in range(12)]
    sizes: list[int] = []
    hook = engine.on_step
    engine.on_step = lambda kind, n, seconds: sizes.append(n)
    try:
        with Paused(engine):  # everything reaches the scheduler together: the rows share their steps
            mixed = run_all_async(engine, free_jobs + constrained_jobs)
        mixed_free = [c.tokens for c in wait_all(mixed)[:len(free_jobs)]]
    finally:
        engine.on_step = hook
    assert max(sizes) == len(free_jobs) + len(constrained_jobs)
    assert mixed_free == alone


class Paused:
    """Holds the engine thread inside the sink of a 1-token request, so that what is submitted meanwhile reaches
    the scheduler at once."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.inside, self.release = engine, threading.Event(), threading.Event()

    def _sink(self, event: TokenEvent) -> None:
        if event.finished:
            self.inside.set()
            self.release.wait(TIMEOUT)

    def __enter__(self) -> Paused:
        self.engine.submit([1], SamplingParams(max_new_tokens=1), self._sink)
        assert self.inside.wait(TIMEOUT)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()


def run_all_async(engine: Engine, jobs: list[tuple[list[int], SamplingParams]]) -> list[Collector]:
    collectors = []
    for ids, params in jobs:
        c = Collector()
        engine.submit(ids, params, c)
        collectors.append(c)
    return collectors


def wait_all(collectors: list[Collector]) -> list[Collector]:
    for c in collectors:
        assert c.done.wait(TIMEOUT), "timed out"
    return collectors


def test_a_grammar_failing_mid_stream_ends_its_request_with_an_error(engine, grammar_tokenizer, tiny_tokenizer,
                                                                     stops):
    """A regex too large for the lexer, past the up-front probe (built straight from Grammar, as a client cannot):
    the request ends with an error naming the failure; its neighbour finishes as usual."""
    text = 'start: %json {"type": "string", "pattern": "^([a-z]{1,100}){1,100}$"}'
    grammar = Grammar(grammar_tokenizer, text)
    ids = chat_prompt(tiny_tokenizer, "Say a word.")
    bad, good = run_all(engine, [(ids, sampled(1, stops, grammar, 100)),
                                 (ids, SamplingParams(max_new_tokens=30, stop_token_ids=stops, ignore_eos=True))])
    assert bad.final.finish_reason is FinishReason.ERROR
    assert "structured output failed" in bad.final.error and "too many expressions" in bad.final.error
    assert good.final.finish_reason is FinishReason.LENGTH and len(good.tokens) == 30


def test_a_complete_grammar_ends_the_row_without_waiting_for_a_stop_token(engine, grammar_compiler, tiny_tokenizer,
                                                                         stops):
    grammar = grammar_compiler.compile([], ToolChoice(), ResponseFormat("json_schema", {"enum": ["yes", "no"]}))
    [c] = run_all(engine, [(chat_prompt(tiny_tokenizer, "yes or no?"), sampled(0, stops, grammar, 50))])
    assert c.final.finish_reason is FinishReason.STOP
    assert tiny_tokenizer.decode(c.tokens) in ('"yes"', '"no"')
    assert not stops & set(c.tokens)


def test_rows_without_a_grammar_pay_nothing(engine, grammar_compiler, tiny_tokenizer, stops, monkeypatch):
    """No mask is filled, copied or applied in a step whose rows have no grammar."""
    import engine.core as core

    applied, filled = [], []
    real_unpack = core.unpack_bitmask
    monkeypatch.setattr(core, "unpack_bitmask", lambda bitmask, vocab: applied.append(1) or real_unpack(bitmask, vocab))
    monkeypatch.setattr(engine.masks, "host", _Watched(engine.masks.host, filled))
    run_all(engine, [(chat_prompt(tiny_tokenizer, "hello"), SamplingParams(max_new_tokens=8, stop_token_ids=stops))])
    assert not applied and not filled
    grammar = grammar_compiler.compile([], ToolChoice(), ResponseFormat("json_object"))
    run_all(engine, [(chat_prompt(tiny_tokenizer, "hello"), sampled(0, stops, grammar, 8))])
    assert applied and filled


class _Watched:
    """A tensor stand-in that records being sliced (MaskBatch.fill slices its host buffer first)."""

    def __init__(self, tensor: torch.Tensor, log: list) -> None:
        self.tensor, self.log = tensor, log

    def __getitem__(self, index):
        self.log.append(index)
        return self.tensor[index]


class _AlwaysStops:
    """The tiny model, except that every step's logits force the end-of-turn token."""

    def __init__(self, model: PagedQwen2, stop: int) -> None:
        self.model, self.stop = model, stop

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def forward(self, input_ids, positions, meta):
        logits = self.model.forward(input_ids, positions, meta).clone()  # (an inference tensor: read-only here)
        logits[:, self.stop] = 1e4
        return logits


def test_ignore_eos_runs_a_constrained_row_on_to_max_new_tokens(tiny_hf_model, grammar_compiler, tiny_tokenizer,
                                                                 stops):
    """ignore_eos (the playground's "Long answer", benchmarks): a stop token the grammar allows does not end the
    row, and the grammar never sees it (it would end there): the row runs to max_new_tokens. Without ignore_eos
    the same stop token ends it."""
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    eng = Engine(_AlwaysStops(PagedQwen2(tiny_hf_model), im_end),
                 EngineConfig(block_size=16, prefill_chunk=1024, max_running=4, max_context=4096, num_blocks=64))
    eng.start()
    try:
        grammar = grammar_compiler.compile(TOOLS[:1], ToolChoice("auto"), ResponseFormat())
        ids = chat_prompt(tiny_tokenizer, "Tell me a long story.", TOOLS[:1])
        long, short = run_all(eng, [
            (ids, SamplingParams(max_new_tokens=20, stop_token_ids=stops, grammar=grammar, ignore_eos=True)),
            (ids, SamplingParams(max_new_tokens=20, stop_token_ids=stops, grammar=grammar))])
    finally:
        eng.stop(timeout=10)
    assert long.final.finish_reason is FinishReason.LENGTH and long.tokens == [im_end] * 20
    assert short.final.finish_reason is FinishReason.STOP and short.tokens == []
