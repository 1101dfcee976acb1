"""Engine II figures for ``scripts/bench.py --context-sweep``.

* Decode over batch x context, for ``paged`` and ``reference`` attention in the same run: tok/s, ms per step, host
  ms per step (scheduling, building and sending the inputs, postprocessing), and the bytes attention moves per step
  next to the weights' bytes. Contexts are taken as already computed (the requests' KV is whatever the pool holds:
  attention's speed does not depend on its values), so a 32K point costs no 32K-token prefill.
* Inter-token latency (p50/p99) of running streams while long prompts arrive, mixed vs alternating steps.

The engine is driven on this thread (``Engine.admit``/``Engine.step``, no engine thread), so every step is timed
exactly. A timed stretch during which a kernel compiled or a graph was captured is refused, not reported.
"""
from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import torch

from engine import Engine, EngineConfig, SamplingParams, TokenEvent
from engine.attention import kernels_unavailable
from engine.model_runner import bucket
from engine.request import FinishReason, Request

GB = 1e9


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))] if values else float("nan")


class Times:
    """Sink recording when each token of a request arrived."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.finished = False

    def __call__(self, event: TokenEvent) -> None:
        self.times.extend([time.perf_counter()] * len(event.token_ids))
        self.finished = self.finished or event.finished


def weight_bytes_per_step(hf_model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads: every parameter (NF4 codes and their scales) but the input embedding,
    of which a step reads a few rows (unless the lm_head is the same tensor)."""
    embed = hf_model.get_input_embeddings().weight
    tied = embed is hf_model.get_output_embeddings().weight
    total = 0
    for p in hf_model.parameters():
        if p is embed and not tied:
            continue
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
    return total


def inject(engine: Engine, n: int, context: int, new: int, vocab: int, seed: int) -> list[tuple[Request, Times]]:
    """Admit ``n`` requests whose first ``context`` tokens count as computed; they decode from the next step."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        sink = Times()
        req = Request(torch.randint(10, vocab - 10, (context,), generator=g).tolist(),
                      SamplingParams(max_new_tokens=new, ignore_eos=True), sink)
        req.max_tokens, req.queued = context + new, False
        engine.scheduler.add(req)
        out.append((req, sink))
    admitted = engine.admit()
    if len(admitted) != n:
        raise RuntimeError(f"only {len(admitted)} of {n} requests of {context} tokens fit the KV cache")
    for req in admitted:
        req.num_computed = req.num_tokens - 1
    return out


def make_engine(paged, attention: str, max_rows: int, max_context: int, kv_tokens: int, args: Any,
                mixed: bool = True) -> tuple[Engine, float]:
    """An engine as the server builds it (graphs captured, kernels compiled at start-up); start-up seconds."""
    started = time.perf_counter()
    cuda = paged.device.type == "cuda"
    kv = 0 if cuda and not kv_tokens else kv_tokens * paged.kv_bytes_per_token()
    engine = Engine(paged, EngineConfig(max_running=max_rows, max_context=max_context, block_size=64,
                                        kv_cache_bytes=kv, prefill_chunk=args.prefill_chunk,
                                        max_step_tokens=args.max_step_tokens, mixed_steps=mixed, attention=attention,
                                        cuda_graphs=not args.no_graphs, max_queue=4 * max_rows))
    if engine.attention == "paged" and cuda:
        engine.runner.warm_up()
    if engine.runner.graphs is not None:
        engine.runner.graphs.capture_all()
    if cuda:
        torch.cuda.synchronize()
    return engine, time.perf_counter() - started


def release(engine: Engine) -> None:
    """Give back the engine's KV pool and graph memory before the next engine is built."""
    if engine.runner.graphs is not None:
        engine.runner.graphs.graphs.clear()
    engine.model.allocate_kv_cache(0)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def decode_point(engine: Engine, batch: int, context: int, steps: int, compiles: Callable[[Engine], int],
                 weights: int) -> dict[str, Any]:
    warm = 2
    reqs = inject(engine, batch, context, warm + steps, engine.model.vocab_size, seed=batch * 100_003 + context)
    for _ in range(warm):
        engine.step()
    before, stats = compiles(engine), engine.step_stats
    steps0, host0 = stats.steps, stats.host_seconds
    started = time.perf_counter()
    while engine.scheduler.running:
        engine.step()
    wall = time.perf_counter() - started
    done = stats.steps - steps0
    if compiles(engine) != before:
        raise RuntimeError(f"a kernel compiled or a graph was captured while timing batch {batch} x {context}")
    if not all(sink.finished and len(sink.times) == warm + steps for _, sink in reqs):
        raise RuntimeError("a request ended early")
    kv = engine.model.kv_bytes_per_token()
    bs = engine.blocks.block_size
    padded = bucket(engine.blocks.blocks_for(context + warm + steps), engine.runner.table_width) * bs
    attn = batch * (context + warm + steps // 2) * kv
    gathered = 3 * batch * padded * kv  # read the pool, write a contiguous copy, read it again
    moved = attn if engine.attention == "paged" else gathered
    return {"batch": batch, "context": context, "tok_s": round(batch * done / wall, 1),
            "ms_per_step": round(wall / done * 1000, 3), "host_ms_per_step": round((stats.host_seconds - host0)
                                                                                 / done * 1000, 3),
            "attention_gb_per_step": round(moved / GB, 3), "weights_gb_per_step": round(weights / GB, 3),
            "attention_vs_weights": round(moved / weights, 3)}


def sweep_mode(paged, attention: str, args: Any, compiles: Callable[[Engine], int], weights: int) -> dict[str, Any]:
    steps = args.sweep_steps
    # the largest point, plus the block of headroom per running sequence that admission keeps
    need = max(b * (c + steps + 8) for b in args.sweep_batches for c in args.sweep_contexts) \
        + 2 * max(args.sweep_batches) * 64 + 64
    cuda = paged.device.type == "cuda"
    engine, startup = make_engine(paged, attention, max(args.sweep_batches), max(args.sweep_contexts) + steps + 64,
                                  0 if cuda else need, args)
    out: dict[str, Any] = {"attention": engine.attention, "startup_s": round(startup, 2),
                           "graphs": len(engine.runner.graphs.graphs) if engine.runner.graphs else 0,
                           "kv_tokens": engine.blocks.num_usable * engine.blocks.block_size, "points": []}
    try:
        for batch in args.sweep_batches:
            for context in args.sweep_contexts:
                tokens = batch * (context + steps + 8) + 2 * batch * 64
                if tokens > out["kv_tokens"]:
                    out["points"].append({"batch": batch, "context": context, "skipped":
                                          f"needs {tokens} KV tokens; the pool holds {out['kv_tokens']}"})
                    continue
                out["points"].append(decode_point(engine, batch, context, steps, compiles, weights))
    finally:
        release(engine)
    return out


def itl_window(engine: Engine, mixed: bool, budget: int, args: Any, compiles: Callable[[Engine], int],
               seed: int) -> dict[str, Any]:
    """Inter-token latency of ``itl_streams`` decoding streams while ``itl_prompts`` prompts arrive at once, from
    the prompts' arrival until each has its first token (and two steps more). ``seed`` makes each window's
    tokens new, so nothing comes from the prefix cache."""
    n, k, plen, ctx = args.itl_streams, args.itl_prompts, args.itl_prompt_len, args.itl_context
    engine.scheduler.mixed, engine.scheduler.max_step_tokens = mixed, budget
    streams = inject(engine, n, ctx, itl_steps(args, budget), engine.model.vocab_size, seed=seed)
    for _ in range(4):
        engine.step()
    before, steps0, kinds0 = compiles(engine), engine.step_stats.steps, dict(engine.step_stats.by_kind)
    g = torch.Generator().manual_seed(seed + 1)
    prompts = []
    t0 = time.perf_counter()
    for _ in range(k):
        sink = Times()
        req = Request(torch.randint(10, engine.model.vocab_size - 10, (plen,), generator=g).tolist(),
                      SamplingParams(max_new_tokens=4, ignore_eos=True), sink)
        req.max_tokens, req.queued = plen + 4, False
        engine.scheduler.add(req)
        prompts.append(sink)
    while not all(p.times for p in prompts):
        engine.step()
    for _ in range(2):
        engine.step()
    end = time.perf_counter()
    if compiles(engine) != before:
        raise RuntimeError("a kernel compiled or a graph was captured during the timed window")
    gaps = []
    for _, sink in streams:
        times = [t for t in sink.times if t <= end]
        gaps += [b - a for a, b in zip(times, times[1:]) if b > t0]
    kinds = {kind: c - kinds0.get(kind, 0) for kind, c in engine.step_stats.by_kind.items() if c > kinds0.get(kind, 0)}
    while engine.scheduler.running:  # the prompts' last tokens, then cancel the streams: a clean pool for the next
        for req, _ in streams:
            if engine.scheduler.find(req.request_id) is not None:
                engine._finish(req, FinishReason.CANCELLED)
        engine.step()
    p50, p99 = pct(gaps, 50), pct(gaps, 99)
    return {"mode": "mixed" if mixed else "alternating", "step_tokens": budget if mixed else args.prefill_chunk,
            "attention": engine.attention, "streams": n, "prompts": k, "prompt_tokens": plen, "stream_context": ctx,
            "itl_p50_ms": round(p50 * 1000, 2), "itl_p99_ms": round(p99 * 1000, 2),
            "itl_max_ms": round(max(gaps) * 1000, 2), "p99_over_p50": round(p99 / p50, 2),
            "ttft_ms": [round((p.times[0] - t0) * 1000, 1) for p in prompts], "steps": engine.step_stats.steps - steps0,
            "steps_by_kind": kinds}


def itl_steps(args: Any, budget: int) -> int:
    """Steps the window can take at most (the streams must not finish inside it)."""
    total = args.itl_prompts * args.itl_prompt_len
    return 64 + total // max(1, budget - args.itl_streams) + 2 * total // max(1, args.prefill_chunk)


def itl(paged, attention: str, args: Any, compiles: Callable[[Engine], int], section: Callable[[str, Any], Any],
        log: Callable[[str], None], out: dict[str, Any], save: Callable[[], None]) -> None:
    """Mixed steps at each budget of ``itl_step_tokens``, then alternating steps, on one engine (into ``out``)."""
    n, k = args.itl_streams, args.itl_prompts
    window = max(itl_steps(args, b) for b in args.itl_step_tokens)
    kv_tokens = n * (args.itl_context + window + 128) + k * (args.itl_prompt_len + 128)
    args_max = type(args)(**{**vars(args), "max_step_tokens": max(args.itl_step_tokens)})
    engine, _ = make_engine(paged, attention, n + k, max(args.itl_context + window, args.itl_prompt_len) + 128,
                            kv_tokens, args_max)
    try:
        runs = [(True, b) for b in args.itl_step_tokens] + [(False, args.max_step_tokens)]
        for i, (mixed, budget) in enumerate(runs):
            name = f"mixed_{budget}" if mixed else "alternating"
            log(f"inter-token latency: {n} streams while {k} x {args.itl_prompt_len}-token prompts arrive, {name}, "
                f"{engine.attention} attention")
            result = section(f"itl[{name}]",
                             lambda m=mixed, b=budget, i=i: itl_window(engine, m, b, args, compiles, seed=10 * i + 5))
            if result is not None:
                out[name] = result
            save()
    finally:
        release(engine)


def modes(paged, args: Any) -> list[str]:
    if args.attention_modes:
        return args.attention_modes
    return ["paged", "reference"] if kernels_unavailable(paged.device) is None and paged.device.type == "cuda" \
        else ["reference"]


def targets(sweep: dict[str, Any], itl_runs: dict[str, Any]) -> dict[str, Any]:
    """The issue's GPU targets (H200, 14B shape), evaluated on whatever ran (meaningful on that GPU only)."""
    paged = {(p["batch"], p["context"]): p for p in sweep.get("paged", {}).get("points", []) if "tok_s" in p}
    out: dict[str, Any] = {}
    if (1, 32768) in paged and (1, 1024) in paged:
        out["1x32K_vs_1x1K"] = {"value": round(paged[(1, 32768)]["tok_s"] / paged[(1, 1024)]["tok_s"], 3),
                                "target": ">= 0.6"}
    if (32, 8192) in paged:
        out["32x8K_tok_s"] = {"value": paged[(32, 8192)]["tok_s"], "target": ">= 1500"}
    if (32, 1024) in paged:
        out["32x1K_tok_s"] = {"value": paged[(32, 1024)]["tok_s"], "target": ">= 3000"}
    for name, run in itl_runs.items():
        if name.startswith("mixed"):
            out[f"itl_p99_over_p50_{name}"] = {"value": run["p99_over_p50"], "target": "<= 3"}
    if "paged" in sweep:
        out["startup_s"] = {"value": sweep["paged"]["startup_s"], "target": "<= 90 (after the weights are loaded)"}
    return out


def context_sweep(paged, hf_model: torch.nn.Module, args: Any, compiles: Callable[[Engine], int],
                  section: Callable[[str, Any], Any], log: Callable[[str], None],
                  save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Every figure of the sweep; ``save`` gets the figures so far after each part."""
    weights = weight_bytes_per_step(hf_model)
    out: dict[str, Any] = {"weights_gb_per_step": round(weights / GB, 3), "kv_bytes_per_token":
                           paged.kv_bytes_per_token(), "max_step_tokens": args.max_step_tokens, "decode": {},
                           "itl": {}}
    for attention in modes(paged, args):
        log(f"context sweep: {attention} attention, batches {args.sweep_batches} x contexts {args.sweep_contexts}")
        result = section(f"sweep[{attention}]", lambda a=attention: sweep_mode(paged, a, args, compiles, weights))
        if result is not None:
            out["decode"][attention] = result
        save(out)
    ref = {(p["batch"], p["context"]): p for p in out["decode"].get("reference", {}).get("points", [])
           if "tok_s" in p}
    out["paged_vs_reference"] = {f"{p['batch']}x{p['context']}": round(p["tok_s"] / ref[(p["batch"], p["context"])]
                                                                       ["tok_s"], 2)
                                 for p in out["decode"].get("paged", {}).get("points", [])
                                 if "tok_s" in p and (p["batch"], p["context"]) in ref}
    itl(paged, modes(paged, args)[0], args, compiles, section, log, out["itl"], lambda: save(out))
    out["targets"] = targets(out["decode"], out["itl"])
    save(out)
    return out
