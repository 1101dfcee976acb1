"""A KV-tracing fuzz of the engine's step loop, with and without async scheduling.

The model here stores in each KV slot the token id written there and, for every row it is asked to continue, reads
the row's whole history back through the block table, up to the position being computed: its next token is a hash
of that history. So every output token proves that every KV read behind it was right (a stale block, a wrong slot,
a tail holding a token the client never saw, a block freed while a step still wrote it and reused by another row:
each changes the hash). The reference is the hash of (prompt + the tokens the client received), computed here.

The engine thread is not started: the test drives the loop body (inbox, step) itself, so arrivals, aborts,
releases and preemptions land between chosen steps, reproducibly, and the bookkeeping is checked after every step.
Variants inject failures (a forward pass raising before or after its KV writes, a token read failing late) and,
with sampled logits (bf16-rounded, so they tie as a real model's do), check that a seeded request samples exactly
what it samples alone.
"""
from __future__ import annotations

import random
import threading
from collections import Counter

import pytest
import torch

from engine import ContextLengthExceeded, Engine, EngineOverloaded, EngineConfig, FinishReason, SamplingParams, TokenEvent
from engine.block_manager import SCRATCH_BLOCK
from engine.request import RequestStatus

VOCAB = 97


def next_token(history: list[int]) -> int:
    h = 1469598103934665603
    for t in history:
        h = ((h ^ (t + 1)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return (h >> 17) % VOCAB


def sampled_logits(history: list[int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(next_token(history) * 7919 + len(history))
    return (torch.randn(VOCAB, generator=g) * 3 + 10).to(torch.bfloat16).float()  # bf16: ties, as a real model's


class TracingModel:
    """A paged model whose KV slots hold token ids; its logits are a function of the history it read back."""

    def __init__(self, sample: bool = False, fail: random.Random | None = None) -> None:
        self.vocab_size = VOCAB
        self.device = torch.device("cpu")
        self.sample = sample
        self.fail = fail  # given: about one forward pass in 15 raises (as an OOM would), before or after writing KV
        self.cache: torch.Tensor | None = None

    def kv_bytes_per_token(self) -> int:
        return 8

    def allocate_kv_cache(self, num_slots: int) -> None:
        self.cache = torch.full((num_slots,), -1, dtype=torch.long)

    def forward(self, input_ids, positions, meta):
        if self.fail is not None and self.fail.random() < 0.03:
            raise RuntimeError("injected failure before the KV writes")
        self.cache[meta.slot_mapping] = input_ids
        if self.fail is not None and self.fail.random() < 0.03:
            raise RuntimeError("injected failure after the KV writes")
        bs = meta.block_size
        starts = meta.query_start.tolist()
        seq_lens = meta.seq_lens.tolist()
        out = torch.full((len(meta.logits_indices), VOCAB), -1e4)
        for row, index in enumerate(meta.logits_indices.tolist()):
            seq = max(i for i in range(len(starts) - 1) if starts[i] <= index)
            last = int(positions[index])
            assert last == seq_lens[seq] - 1 - (starts[seq + 1] - 1 - index)
            table = meta.block_table[int(meta.block_rows[seq])]
            slots = (table.unsqueeze(1) * bs + torch.arange(bs)).reshape(-1)
            history = self.cache[slots[:last + 1]].tolist()
            assert -1 not in history, "read a KV slot never written"
            if self.sample:
                out[row] = sampled_logits(history)
            else:
                out[row, next_token(history)] = 1e4
        return out


class Stream:
    def __init__(self, prompt: list[int], params: SamplingParams, session: str | None) -> None:
        self.prompt, self.params, self.session = prompt, params, session
        self.events: list[TokenEvent] = []
        self.request_id = ""
        self.aborted = False
        self.after_end: list[TokenEvent] = []

    def __call__(self, event: TokenEvent) -> None:
        if self.events and self.events[-1].finished:
            self.after_end.append(event)  # (checked by check_stream: raising here would only be logged)
        else:
            self.events.append(event)

    @property
    def tokens(self) -> list[int]:
        return [t for e in self.events for t in e.token_ids]

    @property
    def final(self) -> TokenEvent | None:
        return self.events[-1] if self.events and self.events[-1].finished else None


def driven_engine(config: EngineConfig, model: TracingModel | None = None) -> Engine:
    engine = Engine(model or TracingModel(), config)
    engine._thread = threading.current_thread()  # submit() accepts; the test runs the loop body
    return engine


def loop_once(engine: Engine) -> None:
    """What Engine._run does once."""
    engine._drain(block=False)
    engine._flush()
    if engine.scheduler.has_work or engine._in_flight is not None:
        engine.step()


def check_blocks(engine: Engine) -> None:
    """Every block is exactly one of: free, cached, or referenced (by running requests and session tails)."""
    bm = engine.blocks
    refs: Counter[int] = Counter()
    for req in engine.scheduler.running:
        refs.update(req.block_ids)
    for req in engine.scheduler.waiting:
        assert not req.block_ids
    for tail in bm.tails.values():
        refs[tail.block_id] += 1
    empty, cached = set(bm.empty), set(bm.cached)
    assert len(empty) == len(bm.empty) and not empty & cached
    for block in bm.blocks[1:]:
        assert block.ref_count == refs[block.block_id], (block, refs[block.block_id])
        assert (block.block_id in empty or block.block_id in cached) == (block.ref_count == 0)
    assert SCRATCH_BLOCK not in refs
    rows = [req.row for req in engine.scheduler.running]
    assert len(set(rows)) == len(rows) and not set(rows) & set(engine.scheduler.free_rows)


def check_stream(s: Stream, max_context: int, stop_ids: frozenset[int], failures: bool = False) -> None:
    final = s.final
    assert final is not None and sum(e.finished for e in s.events) == 1 and not s.after_end, s.after_end
    out = s.tokens
    for i, t in enumerate(out):
        assert t == next_token(s.prompt + out[:i]), f"{s.request_id}: token {i} is not its history's"
    reason = final.finish_reason
    if reason is FinishReason.STOP:
        assert next_token(s.prompt + out) in stop_ids and final.completion_tokens == len(out) + 1
    elif reason is FinishReason.LENGTH:
        assert len(out) == s.params.max_new_tokens or len(s.prompt) + len(out) == max_context, (len(out), s.params)
        assert final.completion_tokens == len(out)
    elif reason is FinishReason.ERROR:
        assert failures and "injected" in final.error, final
    else:
        assert reason is FinishReason.CANCELLED and s.aborted, final
        nxt = len(out)
        assert nxt < s.params.max_new_tokens and len(s.prompt) + nxt < max_context


class LateError:
    """Sampled tokens whose read fails, as an error the device reports only when the step's tokens are read."""

    def tolist(self):
        raise RuntimeError("injected device error")


def late_failures(engine: Engine, rng: random.Random) -> None:
    sample = engine.sampler.sample

    def failing_sample(*args, **kwargs):
        tokens = sample(*args, **kwargs)
        return LateError() if rng.random() < 0.03 else tokens

    engine.sampler.sample = failing_sample


CONFIGS = {
    "sync": dict(async_scheduling=False),
    "async": dict(async_scheduling=True),
    "async-alternating": dict(async_scheduling=True, mixed_steps=False),
    "async-static": dict(async_scheduling=True, static_decode=True),
    "sync-failures": dict(async_scheduling=False),
    "async-failures": dict(async_scheduling=True),
}


@pytest.mark.parametrize("mode", list(CONFIGS))
@pytest.mark.parametrize("seed", range(12))
def test_kv_trace_fuzz(mode, seed):
    rng = random.Random(seed * 1000 + len(mode))
    bs = rng.choice([2, 4, 8])
    config = EngineConfig(block_size=bs, max_running=rng.choice([3, 6]), max_context=rng.choice([24, 48, 64]),
                          num_blocks=rng.choice([6, 12, 20, 40]) * 8 // bs, prefill_chunk=rng.choice([3, 8, 16]),
                          max_step_tokens=rng.choice([7, 12, 20]), max_queue=64, **CONFIGS[mode])
    failures = mode.endswith("failures")
    engine = driven_engine(config, TracingModel(fail=random.Random(seed) if failures else None))
    if failures:
        late_failures(engine, random.Random(seed + 1))
    max_ctx = engine.max_context
    stop_ids = frozenset(rng.sample(range(VOCAB), 2))
    names = [f"s{i}" for i in range(rng.choice([4, 24]))]  # 24: more warm tails than the pool has blocks
    sessions: dict[str, list[int]] = {}  # session -> what the client has seen of it (prompt + replies)
    busy: set[str] = set()
    streams: list[Stream] = []
    live: list[Stream] = []
    for step in range(300):
        for _ in range(rng.choice([0, 0, 0, 1, 1, 2])):  # arrivals
            session = rng.choice([None] + names)
            if session in busy:
                session = None
            base = sessions.get(session, []) if session else []
            if session and base and rng.random() < 0.2:
                base = base[:rng.randrange(len(base))]  # an edited history
            shared = [5, 6, 7, 8, 9, 10, 11, 12] if rng.random() < 0.4 else []
            tail = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 14))]
            prompt = (base or shared) + tail
            if rng.random() < 0.05:
                prompt = [rng.randrange(VOCAB) for _ in range(max_ctx - rng.choice([0, 1, 2]))]
            params = SamplingParams(max_new_tokens=rng.randrange(1, 30), stop_token_ids=stop_ids,
                                    ignore_eos=rng.random() < 0.1)
            s = Stream(prompt, params, session)
            try:
                s.request_id = engine.submit(prompt, params, s, session, cache_salt=rng.choice(["", "k"]))
            except ContextLengthExceeded:
                assert len(prompt) >= max_ctx
                continue
            except EngineOverloaded:
                assert engine._queued >= config.max_queue
                continue
            assert len(prompt) < max_ctx
            streams.append(s)
            live.append(s)
            if session:
                busy.add(session)
        if live and rng.random() < 0.12:  # an abort, maybe of something that just arrived or just finished
            victim = rng.choice(live)
            victim.aborted = True
            engine.abort(victim.request_id)
        if rng.random() < 0.03:
            engine.release_session(rng.choice(names))
        loop_once(engine)
        check_blocks(engine)
        for s in list(live):
            if s.final is not None:
                live.remove(s)
                if s.session:
                    busy.discard(s.session)
                    if s.final.finish_reason is not FinishReason.ERROR:
                        sessions[s.session] = s.prompt + s.tokens
    for _ in range(2000):
        if not live:
            break
        loop_once(engine)
        check_blocks(engine)
        live = [s for s in live if s.final is None]
    assert not live
    loop_once(engine)  # (a step still in flight for a row that finished: its token is dropped)
    assert engine._in_flight is None and not engine.scheduler.has_work
    for s in streams:
        check_stream(s, max_ctx, frozenset() if s.params.ignore_eos else stop_ids, failures)
    assert engine.blocks.num_in_use == len(engine.blocks.tails)
    assert engine._queued == 0


def test_abort_of_a_session_request_whose_first_chunk_is_in_flight_keeps_the_engine_alive():
    """Async: a session's prompt chunk launched while another step is in flight has no block hashes yet when a
    cancel arrives; its tail (parent: the hash of the block before) must still be kept, not crash the engine."""
    engine = driven_engine(EngineConfig(block_size=4, max_running=4, max_context=64, num_blocks=40,
                                        prefill_chunk=16, max_step_tokens=24, async_scheduling=True))
    other = Stream([1, 2, 3], SamplingParams(max_new_tokens=20), None)
    other.request_id = engine.submit(other.prompt, other.params, other)
    loop_once(engine)
    assert engine._in_flight is not None  # a step of `other` is on the device
    prompt = list(range(10, 20))
    s = Stream(prompt, SamplingParams(max_new_tokens=5), "sess")
    s.request_id = engine.submit(prompt, s.params, s, "sess")
    loop_once(engine)  # launches the session's prompt, completes the step before it
    s.aborted = True
    engine.abort(s.request_id)
    loop_once(engine)
    check_blocks(engine)
    assert s.final is not None and s.final.finish_reason is FinishReason.CANCELLED
    tail = engine.blocks.tails["sess"]
    assert tail.token_ids == tuple(prompt[8:10])
    again = Stream(prompt + [1], SamplingParams(max_new_tokens=3), "sess")  # the next turn finds it warm
    again.request_id = engine.submit(again.prompt, again.params, again, "sess")
    while again.final is None or other.final is None:
        loop_once(engine)
    check_stream(again, engine.max_context, frozenset())
    assert again.final.cached_tokens == 10
    check_blocks(engine)


def random_sampling(rng: random.Random, stop_ids: frozenset[int]) -> SamplingParams:
    return SamplingParams(max_new_tokens=rng.randrange(1, 25), temperature=rng.choice([0.0, 0.7, 1.0, 1.5]),
                          top_k=rng.choice([0, 0, 1, 5, 40]), top_p=rng.choice([1.0, 0.9, 0.5]),
                          min_p=rng.choice([0.0, 0.05]), repetition_penalty=rng.choice([1.0, 1.3]),
                          presence_penalty=rng.choice([0.0, 0.5]), frequency_penalty=rng.choice([0.0, -0.4]),
                          seed=rng.randrange(2**64), stop_token_ids=stop_ids)


def alone(prompt: list[int], params: SamplingParams) -> list[int]:
    engine = driven_engine(EngineConfig(block_size=4, max_running=2, max_context=64, num_blocks=40, prefill_chunk=64,
                                        max_step_tokens=64), TracingModel(sample=True))
    s = Stream(prompt, params, None)
    s.request_id = engine.submit(prompt, params, s)
    while s.final is None:
        loop_once(engine)
    return s.tokens


@pytest.mark.parametrize("mode", ["sync", "async", "async-static"])
@pytest.mark.parametrize("seed", range(4))
def test_seeded_sampling_fuzz_equals_the_request_alone(mode, seed):
    """Seeded requests among random neighbours, preemption, aborts and chunking sample exactly what they sample
    alone (the model's logits are exact functions of the history, so any difference is the engine's)."""
    rng = random.Random(seed)
    engine = driven_engine(EngineConfig(block_size=4, max_running=4, max_context=64, num_blocks=14, prefill_chunk=5,
                                        max_step_tokens=9, max_queue=64, **CONFIGS[mode]), TracingModel(sample=True))
    stop_ids = frozenset(rng.sample(range(VOCAB), 2))
    streams: list[Stream] = []
    for step in range(150):
        if rng.random() < 0.4:
            prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 20))]
            s = Stream(prompt, random_sampling(rng, stop_ids), None)
            s.request_id = engine.submit(prompt, s.params, s)
            streams.append(s)
        live = [s for s in streams if s.final is None]
        if live and rng.random() < 0.05:
            victim = rng.choice(live)
            victim.aborted = True
            engine.abort(victim.request_id)
        loop_once(engine)
        check_blocks(engine)
    while any(s.final is None for s in streams) or engine._in_flight is not None:
        loop_once(engine)
    compared = 0
    for s in streams:
        if not s.aborted:
            assert s.final.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
            assert s.tokens == alone(s.prompt, s.params), s.params
            compared += 1
    assert compared > 20


def test_a_late_device_error_does_not_end_a_request_twice():
    """Async: a request cancelled while its step is in flight has its end; if reading that step's tokens then
    fails, the step's other requests end with the error, and the cancelled one gets nothing more."""
    engine = driven_engine(EngineConfig(block_size=4, max_running=4, max_context=64, num_blocks=40,
                                        prefill_chunk=16, max_step_tokens=24, async_scheduling=True))
    streams = [Stream([1, 2, 3 + i], SamplingParams(max_new_tokens=20), None) for i in range(2)]
    for s in streams:
        s.request_id = engine.submit(s.prompt, s.params, s)
    loop_once(engine)
    loop_once(engine)
    assert engine._in_flight is not None and len(streams[0].tokens) == 1
    engine._in_flight.tokens = LateError()
    streams[0].aborted = True
    engine.abort(streams[0].request_id)
    loop_once(engine)
    while engine._in_flight is not None or engine.scheduler.has_work:
        loop_once(engine)
    assert streams[0].final.finish_reason is FinishReason.CANCELLED and not streams[0].after_end
    assert streams[1].final.finish_reason is FinishReason.ERROR and not streams[1].after_end
    check_blocks(engine)
    assert engine.blocks.num_in_use == 0
