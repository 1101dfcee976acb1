"""Tests for the engine (engine/core.py and friends) on the CPU with the tiny random Qwen2 model.

The reference for every greedy output is ``Qwen2ForCausalLM.generate`` run on one request at a time;
the engine must reproduce it token for token while it batches, chunks prefills, reuses cached KV and
preempts. Every wait has a timeout, so a hung engine fails the test instead of hanging it.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from engine import (AsyncEngine, ContextLengthExceeded, Engine, EngineConfig, EngineOverloaded, EngineStopped,
                    FinishReason, SamplingParams, TokenEvent)
from engine.attention import AttentionMetadata
from engine.qwen2 import PagedQwen2
from scripted_model import ScriptedModel

TIMEOUT = 30.0
BS = 8
DEFAULTS = dict(block_size=BS, prefill_chunk=16, max_running=8, max_context=256, num_blocks=80, max_queue=64)


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kw)


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1000, (n,), generator=g).tolist()


class Collector:
    """An event sink that a test can wait on."""

    def __init__(self) -> None:
        self.events: list[TokenEvent] = []
        self.request_id = ""
        self._cond = threading.Condition()

    def __call__(self, event: TokenEvent) -> None:  # engine thread
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    @property
    def tokens(self) -> list[int]:
        return [t for e in self.events for t in e.token_ids]

    @property
    def finished(self) -> bool:
        return any(e.finished for e in self.events)

    @property
    def final(self) -> TokenEvent:
        assert self.events and self.events[-1].finished, self.events[-1:]
        return self.events[-1]

    def _wait_for(self, predicate: Callable[[], bool], what: str, timeout: float) -> None:
        with self._cond:
            assert self._cond.wait_for(predicate, timeout), f"timed out waiting for {what}"

    def wait_tokens(self, n: int, timeout: float = TIMEOUT) -> None:
        self._wait_for(lambda: len(self.tokens) >= n or self.finished, f"{n} tokens", timeout)
        assert len(self.tokens) >= n, f"finished early: {self.events[-1]}"

    def wait(self, timeout: float = TIMEOUT) -> TokenEvent:
        self._wait_for(lambda: self.finished, "the final event", timeout)
        assert sum(e.finished for e in self.events) == 1 and self.events[-1].finished  # exactly one, last
        return self.events[-1]


def submit(engine: Engine, tokens: list[int], params: SamplingParams, session: str | None = None) -> Collector:
    c = Collector()
    c.request_id = engine.submit(tokens, params, c, session)
    return c


def run(engine: Engine, tokens: list[int], params: SamplingParams, session: str | None = None) -> Collector:
    c = submit(engine, tokens, params, session)
    c.wait()
    return c


def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def make_engine(tiny_hf_model) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(model=None, start: bool = True, **config) -> Engine:
        engine = Engine(model if model is not None else PagedQwen2(tiny_hf_model),
                        EngineConfig(**{**DEFAULTS, **config}))
        engines.append(engine)
        if start:
            engine.start()
        return engine

    yield make
    for engine in engines:
        engine.stop(timeout=10)


@pytest.fixture(scope="module")
def reference(tiny_hf_model) -> Callable[[list[int], int], list[int]]:
    """Greedy tokens of plain one-request ``generate`` (no eos: the engine is given no stop tokens)."""
    cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def ref(tokens: list[int], n: int) -> list[int]:
        key = (tuple(tokens), n)
        if key not in cache:
            ids = torch.tensor([tokens])
            with torch.no_grad():
                out = tiny_hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                             max_new_tokens=n, eos_token_id=None, pad_token_id=0)
            cache[key] = out[0, len(tokens):].tolist()
            assert len(cache[key]) == n
        return cache[key]

    return ref


class Paused:
    """Holds the engine thread (inside the sink of a 1-token request) so that requests submitted meanwhile
    all reach the scheduler together, in order: their schedule no longer depends on thread timing."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.inside, self.release = engine, threading.Event(), threading.Event()

    def _sink(self, event: TokenEvent) -> None:  # engine thread
        if event.finished:
            self.inside.set()
            self.release.wait(TIMEOUT)

    def __enter__(self) -> Paused:
        self.engine.submit([1], greedy(1), self._sink)
        assert self.inside.wait(TIMEOUT)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()


class StepLog:
    """Records what the runner computes: ("D", decodes in the step) then ("P", request_id, tokens) per chunk."""

    def __init__(self, engine: Engine) -> None:
        self.steps: list[tuple] = []
        self.prefill_rows: list[int] = []  # prompt chunks in each step that has any
        self.kinds: list[str] = []
        runner = engine.runner
        run = runner.run

        def logged_run(step):
            self.kinds.append(step.kind)
            decodes = [r for r, n in zip(step.requests, step.counts) if n == r.num_pending == 1]
            if decodes:
                self.steps.append(("D", len(decodes)))
            chunks = [(r, n) for r, n in zip(step.requests, step.counts) if not n == r.num_pending == 1]
            if chunks:
                self.prefill_rows.append(len(chunks))
            self.steps.extend(("P", req.request_id, n) for req, n in chunks)
            return run(step)

        runner.run = logged_run


class WrappedModel:
    """The real paged model behind a hook that runs before each forward pass (given the step's metadata)."""

    def __init__(self, inner: PagedQwen2, before: Callable[[AttentionMetadata], None]) -> None:
        self.inner, self.before = inner, before
        self.vocab_size, self.device = inner.vocab_size, inner.device

    def kv_bytes_per_token(self) -> int:
        return self.inner.kv_bytes_per_token()

    def allocate_kv_cache(self, num_slots: int) -> None:
        self.inner.allocate_kv_cache(num_slots)

    def forward(self, input_ids, positions, meta):
        self.before(meta)
        return self.inner.forward(input_ids, positions, meta)


# ---- (1) batched greedy == one-at-a-time generate ----------------------------------------------------------

def test_batched_greedy_matches_generate_for_mixed_prompts_joining_at_different_steps(make_engine, reference):
    engine = make_engine(start=False)
    log = StepLog(engine)
    engine.start()
    # short, several blocks, longer than prefill_chunk (16), exactly one block, block + 1, long
    lengths, news = [3, 13, 40, 8, 17, 33], [40, 40, 16, 24, 12, 20]
    prompts = [prompt(n, seed=i) for i, n in enumerate(lengths)]
    c = [None] * 6
    for i in (0, 1):
        c[i] = submit(engine, prompts[i], greedy(news[i]))
    c[0].wait_tokens(3)
    for i in (2, 3):
        c[i] = submit(engine, prompts[i], greedy(news[i]))
    c[2].wait_tokens(2)
    for i in (4, 5):
        c[i] = submit(engine, prompts[i], greedy(news[i]))
    for i in range(6):
        final = c[i].wait()
        assert c[i].tokens == reference(prompts[i], news[i]), f"request {i}"
        assert final.finish_reason is FinishReason.LENGTH
        assert (final.prompt_tokens, final.completion_tokens) == (lengths[i], news[i])
    # the 40-token prompt went in 16-token chunks with decode steps of the others between them
    chunks = [i for i, s in enumerate(log.steps) if s[0] == "P" and s[1] == c[2].request_id]
    assert [log.steps[i][2] for i in chunks] == [16, 16, 8]
    assert any(s[0] == "D" for s in log.steps[chunks[0]:chunks[-1]])
    assert max(s[1] for s in log.steps if s[0] == "D") >= 3  # requests really decoded together
    assert engine.blocks.num_in_use == 0


# ---- (2) warm session cache --------------------------------------------------------------------------------

def test_follow_up_turn_from_the_warm_cache_equals_recompute(make_engine, reference):
    engine = make_engine()
    p1 = prompt(21, seed=10)
    turn1 = run(engine, p1, greedy(10), session="s")
    assert turn1.final.cached_tokens == 0
    history = p1 + turn1.tokens  # 31 tokens; the last sampled one was never computed
    p2 = history + [5, 6, 7, 8, 9]
    turn2 = run(engine, p2, greedy(12), session="s")
    assert turn2.final.cached_tokens == len(history) - 1  # everything the first turn computed
    fresh = run(make_engine(), p2, greedy(12), session="s")
    assert fresh.final.cached_tokens == 0
    assert turn2.tokens == fresh.tokens == reference(p2, 12)
    # a third turn continues from the second one's tail
    p3 = p2 + turn2.tokens + [11, 12]
    turn3 = run(engine, p3, greedy(6), session="s")
    assert turn3.final.cached_tokens == len(p2) + len(turn2.tokens) - 1
    assert turn3.tokens == reference(p3, 6)


def test_other_session_sharing_a_prefix_reuses_full_blocks_only(make_engine, reference):
    engine = make_engine()
    p1 = prompt(21, seed=11)
    turn1 = run(engine, p1, greedy(10), session="s")
    history = p1 + turn1.tokens  # 31 tokens: 3 full blocks computed, 6 tokens in the tail
    other = history + [3, 1, 4]
    t = run(engine, other, greedy(8), session="t")
    assert t.final.cached_tokens == 3 * BS
    assert t.tokens == reference(other, 8)


def test_identical_prompt_again_recomputes_only_its_last_block(make_engine, reference):
    engine = make_engine()
    p = prompt(2 * BS, seed=13)  # exactly two blocks, both cached after the first run
    first = run(engine, p, greedy(6))
    again = run(engine, p, greedy(6))
    assert again.final.cached_tokens == BS  # the block holding the last prompt token is recomputed
    assert first.tokens == again.tokens == reference(p, 6)


def test_released_session_recomputes_its_tail(make_engine, reference):
    engine = make_engine()
    p1 = prompt(21, seed=12)
    turn1 = run(engine, p1, greedy(10), session="s")
    assert "s" in engine.blocks.tails
    engine.release_session("s")
    p2 = p1 + turn1.tokens + [1, 2]
    turn2 = run(engine, p2, greedy(5), session="s")
    assert turn2.final.cached_tokens == 3 * BS
    assert turn2.tokens == reference(p2, 5)


# ---- (3) per-row sampling in a mixed batch -------------------------------------------------------------------

def test_greedy_row_stays_deterministic_beside_sampling_rows(make_engine, reference):
    torch.manual_seed(0)
    engine = make_engine()
    p = prompt(12, seed=20)
    hot = SamplingParams(max_new_tokens=30, temperature=1.0)
    samplers = [submit(engine, prompt(9, seed=21 + i), hot) for i in range(3)]
    g = submit(engine, p, greedy(30))
    samplers.append(submit(engine, p, SamplingParams(max_new_tokens=30, temperature=1.0, seed=5)))  # same prompt
    for c in samplers:
        assert c.wait().finish_reason is FinishReason.LENGTH
    g.wait()
    assert g.tokens == reference(p, 30)
    assert samplers[-1].tokens != g.tokens  # the sampling rows really sampled


def test_repetition_penalty_matches_generate(make_engine, tiny_hf_model, reference):
    engine = make_engine()
    prompts = [prompt(10, seed=25), prompt(19, seed=26)]
    for p in prompts:  # one after the other: the second reuses the first one's sampler row
        ids = torch.tensor([p])
        with torch.no_grad():
            out = tiny_hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=30, repetition_penalty=1.5, eos_token_id=None,
                                         pad_token_id=0)
        expected = out[0, len(p):].tolist()
        assert expected != reference(p, 30)  # the penalty changes this output
        assert run(engine, p, greedy(30, repetition_penalty=1.5)).tokens == expected


def test_seeded_request_reproduces_with_different_neighbours(make_engine, reference):
    p = prompt(14, seed=30)
    seeded = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.95, seed=1234)
    alone = run(make_engine(), p, seeded).tokens

    engine = make_engine()
    neighbours = [submit(engine, prompt(20, seed=31), SamplingParams(max_new_tokens=40, temperature=1.2)),
                  submit(engine, prompt(5, seed=32), greedy(40))]
    neighbours[0].wait_tokens(3)
    crowded = run(engine, p, seeded).tokens
    for c in neighbours:
        c.wait()
    assert crowded == alone
    assert alone != reference(p, 24)  # it sampled
    other_seed = run(engine, p, SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.95, seed=99)).tokens
    assert other_seed != alone


@pytest.mark.parametrize("neighbour_top_k", [50, 0])
def test_seeded_top_k_request_ignores_the_top_k_of_its_neighbours(make_engine, neighbour_top_k):
    """Issue 10 item 15: a seed gives the same tokens whatever else is in the batch, even when a neighbour asks
    for a larger top_k (or none): the seeded row's noise must not be drawn over the batch's largest top_k."""
    p = prompt(14, seed=33)
    seeded = SamplingParams(max_new_tokens=24, temperature=1.0, top_k=20, seed=1234)
    alone = run(make_engine(), p, seeded).tokens
    engine = make_engine()
    with Paused(engine):
        neighbour = submit(engine, prompt(11, seed=34),
                           SamplingParams(max_new_tokens=40, temperature=1.0, top_k=neighbour_top_k))
        crowded = submit(engine, p, seeded)
    assert crowded.wait().finish_reason is FinishReason.LENGTH
    neighbour.wait()
    assert crowded.tokens == alone


# ---- (4) preemption ---------------------------------------------------------------------------------------------

def counting_preemptions(engine: Engine) -> list[tuple[str, int]]:
    """Record (request id, output tokens so far) of every preemption (install before start())."""
    preempted: list[tuple[str, int]] = []
    preempt = engine.scheduler.preempt

    def counting_preempt(req):
        preempted.append((req.request_id, req.num_output_tokens))
        preempt(req)

    engine.scheduler.preempt = counting_preempt
    return preempted


def test_preemption_keeps_greedy_outputs(make_engine, reference):
    lengths, news = [5, 12, 9, 20], [30, 25, 30, 20]
    prompts = [prompt(n, seed=40 + i) for i, n in enumerate(lengths)]
    # 8 usable blocks of 8 tokens: four sequences of 35-40 tokens cannot all stay resident
    engine = make_engine(start=False, num_blocks=9, max_context=64)
    preempted = counting_preemptions(engine)
    engine.start()
    with Paused(engine):
        cs = [submit(engine, p, greedy(n)) for p, n in zip(prompts, news)]
    for c in cs:
        assert c.wait().finish_reason is FinishReason.LENGTH
    assert any(n > 0 for _, n in preempted), "the test must preempt a request that had produced tokens"
    for i in range(4):
        assert cs[i].tokens == reference(prompts[i], news[i]), f"request {i}"
    assert engine.blocks.num_in_use == 0


def test_preempted_seeded_request_keeps_its_random_stream_and_penalty_state(make_engine, reference):
    pg, ps = prompt(20, seed=41), prompt(10, seed=45)
    seeded = SamplingParams(max_new_tokens=30, temperature=1.0, seed=7, repetition_penalty=1.3)
    alone = run(make_engine(), ps, seeded).tokens

    engine = make_engine(start=False, num_blocks=9, max_context=64)
    preempted = counting_preemptions(engine)
    engine.start()
    with Paused(engine):
        g = submit(engine, pg, greedy(30))
        s = submit(engine, ps, seeded)  # admitted last: the one preempted when the pool runs dry
    g.wait()
    s.wait()
    assert any(rid == s.request_id and 0 < n < 30 for rid, n in preempted), preempted
    assert s.tokens == alone
    assert g.tokens == reference(pg, 30)


def test_cached_tokens_survive_preemption(make_engine):
    engine = make_engine(start=False, num_blocks=9, max_context=64)
    preempted = counting_preemptions(engine)
    engine.start()
    with Paused(engine):
        g = submit(engine, prompt(20, seed=46), greedy(20))
        s = submit(engine, prompt(10, seed=47), greedy(20))
    g.wait()
    s.wait()
    assert any(rid == s.request_id and n > 0 for rid, n in preempted), preempted
    for c in (g, s):
        assert {e.cached_tokens for e in c.events} == {0}  # nothing of either prompt was ever cached


# ---- (5) abort -------------------------------------------------------------------------------------------------

def test_abort_running_and_waiting_requests(make_engine, reference):
    engine = make_engine(max_running=2)
    pa, pd, pb, pc = (prompt(10, seed=50 + i) for i in range(4))
    a = submit(engine, pa, greedy(200), session="sa")
    d = submit(engine, pd, greedy(40))
    a.wait_tokens(2)
    d.wait_tokens(1)
    b = submit(engine, pb, greedy(20))  # no free row: it waits
    engine.abort(b.request_id)
    assert b.wait().finish_reason is FinishReason.CANCELLED
    assert b.tokens == []
    engine.abort(a.request_id)
    final = a.wait()
    assert final.finish_reason is FinishReason.CANCELLED and len(a.tokens) < 200
    assert a.tokens == reference(pa, 200)[:len(a.tokens)]
    c = run(engine, pc, greedy(12))
    assert d.wait().finish_reason is FinishReason.LENGTH
    assert d.tokens == reference(pd, 40)
    assert c.tokens == reference(pc, 12)
    stats = engine.stats()
    assert (stats["running"], stats["waiting"], stats["queued"]) == (0, 0, 0)
    # only the aborted session's tail (its partial last block, if the KV written so far -- every token but the
    # last sampled one -- does not end on a block boundary) is still held, until the session is released
    partial = (len(pa) + len(a.tokens) - 1) % BS != 0
    assert list(engine.blocks.tails) == (["sa"] if partial else [])
    assert engine.blocks.num_in_use == int(partial)
    engine.release_session("sa")
    wait_until(lambda: engine.blocks.num_in_use == 0)


def test_abort_of_unknown_or_finished_request_is_harmless(make_engine, reference):
    engine = make_engine()
    p = prompt(6, seed=55)
    done = run(engine, p, greedy(3))
    engine.abort(done.request_id)
    engine.abort("no-such-request")
    again = run(engine, p, greedy(3))
    assert again.tokens == done.tokens == reference(p, 3)
    assert len(done.events) == 3


def test_a_thousand_short_requests_leave_memory_where_it_started(make_engine):
    """1,000 short requests (some cancelled, some in sessions): blocks, rows, queues and Python heap return
    to where they were after a warm-up; nothing of a finished request stays referenced."""
    import gc
    import tracemalloc

    engine = make_engine(max_queue=200)

    def wave(start: int, n: int) -> None:
        cs = [submit(engine, prompt(3 + i % 5, seed=1000 + i), greedy(2), session=f"s{i % 10}" if i % 2 else None)
              for i in range(start, start + n)]
        for c in cs[::7]:
            engine.abort(c.request_id)
        for c in cs:
            assert c.wait().finish_reason in (FinishReason.LENGTH, FinishReason.CANCELLED)

    wave(0, 100)  # warm-up: lazily built buffers, the prefix-cache table, session tails
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for start in range(100, 1100, 100):
            wave(start, 100)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 256 * 1024, f"heap grew by {grown} bytes over 1,000 requests"
    assert engine.blocks.num_in_use == len(engine.blocks.tails) <= 10
    assert len(engine.blocks.hash_to_block) <= engine.blocks.num_usable
    assert sorted(engine.scheduler.free_rows) == list(range(DEFAULTS["max_running"]))
    stats = engine.stats()
    assert (stats["running"], stats["waiting"], stats["queued"]) == (0, 0, 0)


# ---- (6) stop tokens, length and context bounds ------------------------------------------------------------------

def test_stop_token_ends_with_stop_and_is_counted_not_returned(make_engine, reference):
    engine = make_engine()
    p = prompt(11, seed=60)
    ref = reference(p, 20)
    k = next(i for i in range(2, 20) if ref[i] not in ref[:i])
    c = run(engine, p, greedy(20, stop_token_ids=frozenset({ref[k]})))
    assert c.final.finish_reason is FinishReason.STOP
    assert c.tokens == ref[:k] and ref[k] not in c.tokens
    assert c.final.token_ids == ()
    assert c.final.completion_tokens == k + 1
    ignored = run(engine, p, greedy(20, stop_token_ids=frozenset({ref[k]}), ignore_eos=True))
    assert ignored.tokens == ref and ignored.final.finish_reason is FinishReason.LENGTH


def test_max_new_tokens_ends_with_length(make_engine, reference):
    engine = make_engine()
    p = prompt(7, seed=61)
    c = run(engine, p, greedy(5))
    assert c.final.finish_reason is FinishReason.LENGTH
    assert c.tokens == reference(p, 5) and c.final.completion_tokens == 5
    assert [len(e.token_ids) for e in c.events] == [1] * 5  # one event per token, the last one final


def test_context_bound(make_engine, reference):
    engine = make_engine(max_context=48)
    with pytest.raises(ContextLengthExceeded):
        engine.submit(prompt(48, seed=62), greedy(1), Collector())
    with pytest.raises(ValueError):
        engine.submit([], greedy(1), Collector())
    edge = run(engine, prompt(47, seed=62), greedy(10))
    assert edge.final.finish_reason is FinishReason.LENGTH and len(edge.tokens) == 1
    p = prompt(40, seed=63)
    c = run(engine, p, greedy(100))
    assert c.final.finish_reason is FinishReason.LENGTH
    assert c.tokens == reference(p, 8)  # stopped at 48 tokens in all


def test_context_is_bounded_by_the_kv_pool(make_engine):
    engine = make_engine(num_blocks=5, max_context=1000)  # 4 usable blocks of 8
    assert engine.max_context == 32
    with pytest.raises(ContextLengthExceeded):
        engine.submit(prompt(32, seed=64), greedy(1), Collector())
    c = run(engine, prompt(20, seed=64), greedy(100))
    assert c.final.finish_reason is FinishReason.LENGTH and len(c.tokens) == 12


# ---- (7) queue bound ---------------------------------------------------------------------------------------------

def test_full_queue_raises_overloaded(make_engine, tiny_hf_model, reference):
    entered, gate = threading.Event(), threading.Event()

    def hold(_meta):
        entered.set()
        assert gate.wait(TIMEOUT)

    engine = make_engine(WrappedModel(PagedQwen2(tiny_hf_model), hold), max_queue=2)
    p = prompt(6, seed=70)
    try:
        first = submit(engine, p, greedy(3))
        assert entered.wait(TIMEOUT)  # admitted: the engine thread is inside a forward pass
        queued = [submit(engine, p, greedy(3)) for _ in range(2)]
        with pytest.raises(EngineOverloaded):
            submit(engine, p, greedy(3))
        assert engine.stats()["queued"] == 2
    finally:
        gate.set()
    for c in [first] + queued:
        c.wait()
        assert c.tokens == reference(p, 3)
    assert run(engine, p, greedy(3)).tokens == reference(p, 3)  # room again
    assert engine.stats()["queued"] == 0


# ---- (8) failure injection -----------------------------------------------------------------------------------------

def test_failing_prefill_ends_only_its_request(make_engine, tiny_hf_model, reference):
    armed = threading.Event()
    prefills_seen: list[int] = []

    def maybe_fail(meta: AttentionMetadata) -> None:
        if armed.is_set() and max(meta.query_lens) > 1:  # a step with a prompt chunk (beside a's decode)
            prefills_seen.append(max(meta.query_lens))
            if len(prefills_seen) == 2:  # b's second chunk: 12 of its tokens are already computed
                armed.clear()
                raise RuntimeError("injected prefill failure")

    engine = make_engine(WrappedModel(PagedQwen2(tiny_hf_model), maybe_fail), prefill_chunk=12)
    pa, pb, pc = prompt(12, seed=80), prompt(30, seed=81), prompt(12, seed=82)
    a = submit(engine, pa, greedy(40))
    a.wait_tokens(3)
    armed.set()
    b = submit(engine, pb, greedy(10), session="b")
    final = b.wait()
    assert final.finish_reason is FinishReason.ERROR
    assert "injected prefill failure" in final.error and b.tokens == []
    assert a.wait().finish_reason is FinishReason.LENGTH
    assert a.tokens == reference(pa, 40)
    c = run(engine, pc, greedy(10))
    assert c.final.finish_reason is FinishReason.LENGTH and c.tokens == reference(pc, 10)
    assert engine.blocks.num_in_use == 0 and engine.blocks.tails == {}  # the failed request kept no tail
    assert engine.alive


def test_failing_decode_step_errors_its_batch_and_engine_recovers(make_engine, tiny_tokenizer):
    reply = " ".join(f"word{i}" for i in range(20))  # about 100 tokens
    model = ScriptedModel(tiny_tokenizer, lambda text: reply, step_delay=0.002)
    engine = make_engine(model)
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    params = SamplingParams(max_new_tokens=200, stop_token_ids=frozenset({im_end}))

    def chat(text: str) -> list[int]:
        return tiny_tokenizer.encode(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n",
                                     add_special_tokens=False)

    a, b = submit(engine, chat("one"), params), submit(engine, chat("two"), params)
    a.wait_tokens(2)
    b.wait_tokens(2)
    model.fail_next.set()
    for c in (a, b):
        final = c.wait()
        assert final.finish_reason is FinishReason.ERROR and "out of memory" in final.error
    c = run(engine, chat("three"), params)
    assert c.final.finish_reason is FinishReason.STOP
    assert tiny_tokenizer.decode(c.tokens) == reply
    assert engine.blocks.num_in_use == 0


def test_out_of_range_seed_cannot_take_the_engine_down(make_engine, reference):
    engine = make_engine()
    pa, pb = prompt(9, seed=85), prompt(7, seed=86)
    a = submit(engine, pa, greedy(40))
    a.wait_tokens(1)
    try:  # refusing the seed up front is as good as failing only this request
        bad = submit(engine, pb, SamplingParams(max_new_tokens=5, temperature=1.0, seed=2**64))
    except ValueError:
        bad = None
    if bad is not None:
        assert bad.wait().finish_reason is FinishReason.ERROR
    assert a.wait().finish_reason is FinishReason.LENGTH
    assert a.tokens == reference(pa, 40)
    assert engine.alive
    assert run(engine, pb, greedy(5)).tokens == reference(pb, 5)


@pytest.mark.parametrize("bad_id", [-5000, 5000], ids=["negative", "beyond-vocab"])
def test_prompt_ids_outside_the_vocabulary_fail_only_their_request(make_engine, reference, bad_id):
    engine = make_engine()
    assert engine.model.vocab_size < 5000
    pa = prompt(9, seed=87)
    a = submit(engine, pa, greedy(40))
    a.wait_tokens(2)  # decoding
    try:  # refusing the prompt up front is as good as failing only this request
        bad = submit(engine, [bad_id], greedy(5))
    except ValueError:
        bad = None
    if bad is not None:
        assert bad.wait().finish_reason is FinishReason.ERROR
    assert a.wait().finish_reason is FinishReason.LENGTH
    assert a.tokens == reference(pa, 40)
    assert engine.alive


# ---- (9) stop ---------------------------------------------------------------------------------------------------

def test_stop_ends_in_flight_requests_and_refuses_new_ones(make_engine):
    engine = make_engine(max_running=2)
    cs = [submit(engine, prompt(10, seed=90 + i), greedy(200)) for i in range(3)]  # the third one waits
    cs[0].wait_tokens(2)
    engine.stop(timeout=10)
    assert not engine.alive
    for c in cs:
        assert c.wait(timeout=5).finish_reason is FinishReason.CANCELLED
    with pytest.raises(EngineStopped):
        engine.submit(prompt(5, seed=99), greedy(1), Collector())


def test_submit_before_start_raises_stopped(make_engine):
    engine = make_engine(start=False)
    with pytest.raises(EngineStopped):
        engine.submit([1, 2, 3], greedy(1), Collector())


# ---- the asyncio bridge -------------------------------------------------------------------------------------------

def test_async_engine_streams_and_aborts_on_early_exit(make_engine, reference):
    engine = make_engine()
    async_engine = AsyncEngine(engine)
    p1, p2 = prompt(9, seed=100), prompt(18, seed=101)

    async def collect(tokens: list[int], n: int) -> list[int]:
        out = []
        async with async_engine.generate(tokens, greedy(n)) as stream:
            async for event in stream:
                out.extend(event.token_ids)
        return out

    async def leave_early() -> None:
        async with async_engine.generate(p1, greedy(200)) as stream:
            async for _event in stream:
                break

    async def main() -> tuple[list[int], list[int]]:
        with pytest.raises(ContextLengthExceeded):
            async_engine.generate(prompt(300, seed=102), greedy(1))
        results = await asyncio.wait_for(asyncio.gather(collect(p1, 12), collect(p2, 12), leave_early()),
                                         TIMEOUT)
        return results[0], results[1]

    t1, t2 = asyncio.run(main())
    assert t1 == reference(p1, 12) and t2 == reference(p2, 12)
    wait_until(lambda: engine.stats()["running"] == 0 and engine.blocks.num_in_use == 0)
    assert engine.steps < 100  # the abandoned 200-token request was cancelled, not run to the end


@pytest.mark.parametrize("config", [dict(prefill_chunk=64), dict(static_decode=True),
                                    dict(static_decode=True, prefill_chunk=64, max_running=5)])
def test_batched_prefill_and_static_decode_buffers_match_generate(make_engine, reference, config):
    """Several prompts prefilled in one left-padded step, and decode through the padded static buffers
    (batch buckets, scratch-block padding rows) that CUDA graphs replay, give generate's tokens."""
    engine = make_engine(start=False, **config)
    log = StepLog(engine)
    engine.start()
    lengths, news = [5, 12, 20, 9, 31, 3], [9, 7, 12, 15, 6, 11]
    prompts = [prompt(n, seed=100 + i) for i, n in enumerate(lengths)]
    with Paused(engine):
        collectors = [submit(engine, p, greedy(n)) for p, n in zip(prompts, news)]
    for c, p, n in zip(collectors, prompts, news):
        c.wait()
        assert c.tokens == reference(p, n)
    if config.get("prefill_chunk", 16) >= 64:
        assert max(log.prefill_rows) >= 2  # prompts really were prefilled together
    assert engine.blocks.num_in_use == 0

