"""Async scheduling (EngineConfig.async_scheduling): step N+1 is scheduled and sent while step N's tokens are still
on the device. On the CPU nothing overlaps in time, but every piece of the logic runs: decode inputs read on the
device from the sampler's last tokens, finishes known one step late (the extra token dropped), aborts and
preemption while a step is in flight, block hashes registered only once tokens are known.

Every engine test of tests/test_engine.py runs here again with async scheduling on (same assertions: greedy tokens
equal one-request ``generate``, seeded streams reproduce, the warm cache is reused, aborts, preemption, stop
tokens, failures), plus checks that the overlap really happened."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

import test_constrained_engine
import test_engine
from engine import Engine, EngineConfig, SamplingParams
from engine.qwen2 import PagedQwen2
from test_engine import DEFAULTS, greedy, prompt, reference, run, submit  # noqa: F401 (reference: a fixture)

# test_abort_running_and_waiting_requests counts the aborted session's tail with synchronous timing (KV written for
# every received token but the last); with a step in flight it is every received token: checked below instead
SYNC_TIMING_ONLY = {"test_abort_running_and_waiting_requests"}
for _module in (test_engine, test_constrained_engine):
    for _name in dir(_module):
        if _name.startswith("test_") and _name not in SYNC_TIMING_ONLY:
            globals()[_name] = getattr(_module, _name)
from test_constrained_engine import TOOLS, ToolChoice, ResponseFormat, chat_prompt, run_all, sampled, stops  # noqa


@pytest.fixture(scope="module")
def engine(tiny_hf_model):
    """test_constrained_engine's engine, with async scheduling on: its tests run here again."""
    eng = Engine(PagedQwen2(tiny_hf_model), EngineConfig(block_size=16, prefill_chunk=1024, max_running=32,
                                                         max_context=4096, num_blocks=6400, max_queue=4096,
                                                         async_scheduling=True))
    eng.start()
    yield eng
    eng.stop(timeout=10)


def test_grammar_rows_run_their_steps_one_at_a_time(engine, grammar_compiler, tiny_tokenizer, stops):
    """A grammar row's next mask needs its last token: while one runs, no step is launched ahead."""
    grammar = grammar_compiler.compile(TOOLS, ToolChoice("required"), ResponseFormat())
    ids = chat_prompt(tiny_tokenizer, "Call a tool.", TOOLS)
    before = engine.overlapped
    for c in run_all(engine, [(ids, sampled(seed, stops, grammar, 120)) for seed in range(3)]):
        assert c.final.finish_reason is not None and c.final.error is None
    assert engine.overlapped == before


@pytest.fixture
def make_engine(tiny_hf_model) -> Iterator[Callable[..., Engine]]:
    """test_engine's fixture, with async scheduling on (unless a test's config says otherwise)."""
    engines: list[Engine] = []

    def make(model=None, start: bool = True, **config) -> Engine:
        engine = Engine(model if model is not None else PagedQwen2(tiny_hf_model),
                        EngineConfig(**{**DEFAULTS, "async_scheduling": True, **config}))
        engines.append(engine)
        if start:
            engine.start()
        return engine

    yield make
    for engine in engines:
        engine.stop(timeout=10)


def test_steps_overlap_and_decode_inputs_come_from_the_device(make_engine, reference):
    engine = make_engine()
    prompts = [prompt(5 + 7 * i, 100 + i) for i in range(4)]
    collectors = [submit(engine, p, greedy(20)) for p in prompts]
    for p, c in zip(prompts, collectors):
        c.wait()
        assert c.tokens == reference(p, 20)  # an input read wrong on the device would change every later token
    assert engine.overlapped > 10  # steps launched while the one before was still in flight


def test_a_row_that_stops_computes_one_dropped_token(make_engine, reference):
    """A stop token is known a step late: the next step has already run for the row; nothing of it comes out."""
    p = prompt(9, 7)
    expected = reference(p, 12)
    stop = expected[5]
    engine = make_engine()
    c = run(engine, p, greedy(12, stop_token_ids=frozenset({stop})))
    assert c.tokens == expected[:expected.index(stop)] and c.final.finish_reason.value == "stop"
    assert engine.stats()["running"] == 0 and engine.blocks.num_in_use == 0


def test_sync_and_async_give_the_same_sampled_tokens(make_engine):
    params = SamplingParams(max_new_tokens=24, temperature=0.9, top_k=50, top_p=0.95, seed=1234,
                            repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.2)
    prompts = [prompt(6 + 5 * i, 300 + i) for i in range(5)]
    outputs = {}
    for mode in (False, True):
        engine = make_engine(async_scheduling=mode)
        collectors = [submit(engine, p, params) for p in prompts]
        outputs[mode] = [c.wait() and c.tokens for c in collectors]
    assert outputs[True] == outputs[False]
