"""Engine II on the CPU: the mixed step shape (engine/scheduler.py), the runner's host path (engine/model_runner.py),
greedy tokens through the engine with paged vs reference attention, and the KV sizing (engine/memory.py)."""
from __future__ import annotations

import pytest
import torch

from engine import Engine, EngineConfig, SamplingParams
from engine.attention import kernels_unavailable
from engine.block_manager import BlockManager
from engine.qwen2 import PagedQwen2
from engine.request import Request, RequestStatus
from engine.scheduler import Scheduler
from test_engine import Paused, StepLog, greedy, make_engine, prompt, reference, submit  # noqa: F401 (fixtures)

BS = 8


def running(n_tokens: int, computed: int) -> Request:
    req = Request(list(range(n_tokens)), SamplingParams(), lambda e: None)
    req.status, req.num_computed = RequestStatus.RUNNING, computed
    return req


def scheduler_with(reqs: list[Request], **kw) -> Scheduler:
    blocks = BlockManager(200, BS)
    s = Scheduler(blocks, kw.pop("max_running", 8), **{"prefill_chunk": 40, "max_step_tokens": 64, **kw})
    for req in reqs:
        computed = req.num_computed
        assert blocks.allocate(req)
        req.num_computed = computed
        req.row = s.free_rows.pop()
        s.running.append(req)
    return s


# ---- the step shape -------------------------------------------------------------------------------------------------
def test_a_mixed_step_carries_every_decode_then_prompt_chunks_up_to_the_budget():
    decodes = [running(10, 9) for _ in range(3)]
    prompts = [running(100, 0), running(50, 0), running(30, 0)]
    s = scheduler_with(decodes + prompts)
    step, preempted = s.schedule()
    assert not preempted
    assert step.requests == decodes + prompts[:2] and step.counts == [1, 1, 1, 40, 21]  # 3 + 40 + 21 = 64
    assert step.num_decode == 3 and step.kind == "mixed" and step.num_tokens == 64
    assert [step.completes(i) for i in range(5)] == [True, True, True, False, False]


def test_without_decodes_prompts_share_one_prefill_chunk():
    prompts = [running(100, 0), running(30, 0)]
    s = scheduler_with(prompts, prefill_chunk=48)
    step, _ = s.schedule()
    assert step.requests == prompts[:1] and step.counts == [48] and step.kind == "prefill"
    prompts[0].num_computed = 90  # 10 left: the second prompt gets the rest of the chunk
    step, _ = s.schedule()
    assert step.counts == [10, 30]


def test_alternating_steps_never_mix():
    decodes = [running(10, 9), running(12, 11)]
    prompts = [running(100, 0)]
    s = scheduler_with(decodes + prompts, mixed=False)
    kinds = []
    for _ in range(4):
        step, _ = s.schedule()
        kinds.append(step.kind)
        if step.kind == "prefill":
            prompts[0].num_computed += step.counts[0]
    assert kinds == ["decode", "prefill", "decode", "prefill"]


def test_the_budget_must_leave_room_for_prompts():
    with pytest.raises(ValueError, match="max_step_tokens"):
        EngineConfig(max_running=32, max_step_tokens=32)
    EngineConfig(max_running=32, max_step_tokens=16, mixed_steps=False)  # alternating steps have no such budget


# ---- through the engine ---------------------------------------------------------------------------------------------
def generate_all(engine: Engine, prompts: list[list[int]], news: list[int], stagger: bool = True) -> list[list[int]]:
    """Submit the prompts, the later ones while the first ones decode; greedy tokens of each."""
    first = [submit(engine, p, greedy(n)) for p, n in zip(prompts[:2], news[:2])]
    if stagger:
        first[0].wait_tokens(2)
    rest = [submit(engine, p, greedy(n)) for p, n in zip(prompts[2:], news[2:])]
    for c in first + rest:
        c.wait()
    return [c.tokens for c in first + rest]


def test_mixed_steps_give_the_tokens_of_alternating_steps_and_never_pause_the_streams(make_engine, reference):
    lengths, news = [6, 20, 70, 33, 9], [30, 24, 12, 10, 16]
    prompts = [prompt(n, seed=200 + i) for i, n in enumerate(lengths)]
    results, kinds = {}, {}
    for mixed in (True, False):
        engine = make_engine(start=False, mixed_steps=mixed, max_step_tokens=24, prefill_chunk=16)
        log = StepLog(engine)
        paused: list[int] = []
        run = engine.runner.run

        def watch(step, run=run, paused=paused, engine=engine):
            decoding = [r for r in engine.scheduler.running if r.num_pending == 1]
            paused.append(len([r for r in decoding if r not in step.requests]))
            return run(step)

        engine.runner.run = watch
        engine.start()
        results[mixed] = generate_all(engine, prompts, news)
        kinds[mixed] = set(log.kinds)
        if mixed:
            assert sum(paused) == 0  # every generating stream got its token in every step
        else:
            assert sum(paused) > 0  # alternating: prefill steps leave them waiting
    assert "mixed" in kinds[True] and "mixed" not in kinds[False]
    assert results[True] == results[False] == [reference(p, n) for p, n in zip(prompts, news)]


def test_the_device_block_table_follows_every_row_incrementally(make_engine, reference):
    """After every step the persistent device table holds each running request's blocks; entries are sent only
    when blocks appear (admission, growth), and each step sends its inputs with one copy."""
    engine = make_engine(start=False, num_blocks=12, max_context=64, max_running=4)  # tight: preemption happens
    runner = engine.runner
    sends, updates, checked = [], [], []
    send, sync = runner.buffers.send, runner._sync_tables

    def counted_send():
        sends.append(1)
        send()

    def counted_sync(reqs):
        before = sum(len(r.block_ids) for r in reqs)
        sync(reqs)
        updates.append(before)

    runner.buffers.send, runner._sync_tables = counted_send, counted_sync
    step = engine.step

    def checked_step():
        step()
        for req in engine.scheduler.running:
            if runner._synced[req.row]:
                assert runner.block_table[req.row, :len(req.block_ids)].tolist() == req.block_ids
                checked.append(1)

    engine.step = checked_step
    engine.start()
    prompts = [prompt(n, seed=300 + n) for n in (5, 17, 12, 9, 23)]
    with Paused(engine):
        cs = [submit(engine, p, greedy(20)) for p in prompts]
    for c, p in zip(cs, prompts):
        c.wait()
        assert c.tokens == reference(p, 20)
    assert len(checked) > 20
    assert len(sends) == engine.step_stats.steps  # one copy of the step's inputs per step


@pytest.mark.slow
@pytest.mark.skipif(kernels_unavailable(torch.device("cpu")) is not None, reason="needs Triton")
@pytest.mark.parametrize("config", [dict(), dict(static_decode=True, max_running=5)], ids=["eager", "static"])
def test_greedy_tokens_are_the_same_with_paged_and_reference_attention(make_engine, tiny_hf_model, reference, config):
    """The paged kernels (Triton's interpreter on the CPU) through the whole engine: mixed steps, prompts chunked
    over cached prefixes, decodes through the padded static buffers CUDA graphs replay; same tokens as the
    reference path and as ``generate``."""
    lengths, news = [5, 30, 70, 12], [8, 6, 5, 8]
    prompts = [prompt(n, seed=400 + n) for n in lengths]
    runs = {}
    for attention in ("reference", "paged"):
        engine = make_engine(PagedQwen2(tiny_hf_model), attention=attention, **config)
        assert engine.attention == attention
        runs[attention] = generate_all(engine, prompts, news)
        # the second turn of a conversation: its prefix is cached up to an unaligned tail, the rest is a chunk
        turn2 = prompts[2] + runs[attention][2] + prompt(11, seed=498)
        first = submit(engine, prompts[2] + runs[attention][2][:3], greedy(1), session="s").wait()
        assert first.prompt_tokens == 73
        second = submit(engine, turn2, greedy(6), session="s")
        assert second.wait().cached_tokens > 64
        runs[attention].append(second.tokens)
    assert runs["paged"] == runs["reference"]
    assert runs["paged"][:4] == [reference(p, n) for p, n in zip(prompts, news)]


# ---- KV sizing ------------------------------------------------------------------------------------------------------
def test_kv_budget_leaves_the_measured_step_and_graph_memory():
    from engine import memory

    needs = memory.StepMemory(step_bytes=3 * 2**30, graph_bytes=2**30)
    assert memory.kv_budget(40 * 2**30, needs) == int((36 * 2**30 - memory.MARGIN) * memory.FRACTION)
    assert memory.kv_budget(2**30, needs) == 0


def test_free_memory_is_read_after_the_allocator_gives_back_its_cache(monkeypatch):
    """Free GPU memory is read only after the caching allocator has released what loading, the NF4 self-check and
    the profiling freed: otherwise memory that is free in fact is left out of the KV cache."""
    from engine import memory

    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: calls.append("mem_get_info") or (40 * 2**30, 80 * 2**30))
    assert memory.free_gpu_bytes() == 40 * 2**30
    assert calls == ["empty_cache", "mem_get_info"]


def test_profiling_runs_the_largest_step_shapes(tiny_hf_model):
    """On the CPU there is nothing to measure, but the profile's synthetic steps run through the real runner."""
    from engine import memory

    paged = PagedQwen2(tiny_hf_model)
    runs: list[tuple[str, int]] = []
    forward = paged.forward

    def logged(ids, positions, meta):
        runs.append((meta.num_decode, ids.shape[0]))
        return forward(ids, positions, meta)

    paged.forward = logged
    assert memory.profile(paged, max_rows=6, max_step_tokens=50, block_size=BS, attention="reference") == \
        memory.StepMemory(0, 0)
    assert runs == [(5, 50), (6, 6)]  # five decodes + one 45-token chunk; then a full batch of decodes
    with pytest.raises(ValueError, match="CUDA"):
        Engine(paged, EngineConfig(kv_cache_bytes=0))


@pytest.mark.parametrize("max_running", [1, 2, 8])
def test_warm_up_runs_a_chunk_alone_and_decodes_beside_chunks(make_engine, tiny_hf_model, reference, max_running):
    """What start-up runs on CUDA before capturing graphs (so no kernel compiles on a request); it writes only the
    scratch block, so serving afterwards is unaffected."""
    engine = make_engine(start=False, max_running=max_running)
    kinds: list[str] = []
    run = engine.runner.run
    engine.runner.run = lambda step: kinds.append(step.kind) or run(step)
    engine.runner.warm_up()
    assert kinds == ["prefill", "mixed" if max_running > 1 else "prefill"]
    engine.start()
    p = prompt(21, seed=77)
    c = submit(engine, p, greedy(6))
    c.wait()
    assert c.tokens == reference(p, 6)
