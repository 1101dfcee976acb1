"""The whole server path for ``scripts/bench.py --server``: what streaming costs the server and the engine.

For each stream count (``--server-streams``, default 1,8,32,64), two runs of the same workload on one server:

* ``direct``: the requests go to the engine through the server's own engine client, on its event loop, and their
  tokens are only counted (no detokenizing, no JSON, no socket): the engine's step time and host time per step with
  nothing being sent, and the inter-token latency the engine itself gives.
* ``ws``: one session and WebSocket per stream, from clients in another process (as real clients are): event-loop
  CPU per streamed token, the engine's host time per step while the streams are sent, and the inter-token latency
  the clients see.

The engine's host time per step (scheduling, building the inputs, postprocessing, handing the events over) comes
from the engine's own counters; ``host_ratio`` = streaming / direct is the "streaming costs the engine nothing"
figure (target <= 1.1). The event loop's CPU is its thread's CPU clock over the run, divided by the tokens sent.
"""
from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from engine import SamplingParams


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))] if values else float("nan")


def ms(x: float) -> float:
    return round(x * 1000, 3)


class ThreadClock:
    """CPU seconds of one thread of this process (the event loop's), read from any thread."""

    def __init__(self, thread: threading.Thread) -> None:
        self.clock = time.pthread_getcpuclockid(thread.ident)

    def __call__(self) -> float:
        return time.clock_gettime(self.clock)


def engine_counters(rt: Any) -> dict[str, float]:
    """The engine's step counters (steps, seconds, host_seconds), its CPU seconds so far, and how long its thread
    waited for a CPU while runnable (the kernel's schedstat: what other processes on the machine cost it)."""
    counters = dict(rt.engine.counters())
    pid, tid = rt.engine.engine_thread()
    try:
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            counters["runqueue_seconds"] = int(f.read().split()[1]) / 1e9
    except OSError:
        pass
    return counters


def pin(rt: Any, server_thread: threading.Thread) -> dict[str, Any]:
    """Give the engine's threads CPU 1 and everything else of this process (the event loop, the workers) CPU 0,
    whichever side of a process boundary the engine is on; the clients get CPU 0 too. On a 2-core machine this
    puts both placements on the same footing: what differs is only whether the engine shares an interpreter lock
    with the event loop."""
    pid, tid = rt.engine.engine_thread()
    engine_tids = set(int(t) for t in os.listdir(f"/proc/{pid}/task")) if pid != os.getpid() else {tid}
    for t in engine_tids:
        os.sched_setaffinity(t, {1})
    for t in os.listdir(f"/proc/{os.getpid()}/task"):
        if int(t) not in engine_tids:
            try:
                os.sched_setaffinity(int(t), {0})
            except OSError:
                pass
    return {"engine_cpus": [1], "front_end_and_clients_cpus": [0]}


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def per_step(d: dict[str, float]) -> dict[str, float]:
    steps = max(1.0, d["steps"])
    out = {"steps": int(d["steps"]), "step_ms": ms(d["seconds"] / steps),
           "host_ms_per_step": ms(d["host_seconds"] / steps)}
    if "runqueue_seconds" in d:  # the engine thread runnable but not running: the machine's other load
        out["engine_runqueue_ms_per_step"] = ms(d["runqueue_seconds"] / steps)
    return out


async def _direct(rt: Any, prompts: list[list[int]], new: int) -> list[list[float]]:
    """The requests straight into the engine client; each token's arrival time on the event loop."""
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)

    async def one(ids: list[int]) -> list[float]:
        times: list[float] = []
        async with rt.engine.generate(ids, params) as stream:
            async for event in stream:
                if event.error:
                    raise RuntimeError(event.error)
                times.extend([time.perf_counter()] * len(event.token_ids))
        return times
    return list(await asyncio.gather(*(one(p) for p in prompts)))


def direct_run(app: Any, loop: asyncio.AbstractEventLoop, prompts: list[list[int]], new: int) -> dict[str, Any]:
    rt = app.state.runtime
    before = engine_counters(rt)
    started = time.perf_counter()
    times = asyncio.run_coroutine_threadsafe(_direct(rt, prompts, new), loop).result(900)
    wall = time.perf_counter() - started
    d = delta(engine_counters(rt), before)
    gaps = [b - a for t in times for a, b in zip(t, t[1:])]
    return {**per_step(d), "itl_p50_ms": ms(pct(gaps, 50)), "itl_p99_ms": ms(pct(gaps, 99)),
            "aggregate_tok_s": round(sum(map(len, times)) / wall, 1)}


def ws_run(base: str, texts: list[str], new: int, rt: Any, loop_cpu: Callable[[], float],
           script: str, cpus: set[int] | None = None) -> dict[str, Any]:
    """The WebSocket clients (another process) against the server; the server's costs over their run."""
    texts_file = Path(tempfile.mkdtemp()) / "texts.json"
    texts_file.write_text(json.dumps(texts))
    command = [sys.executable, script, "--ws-client", f"http://{base}", "--texts", str(texts_file),
               "--new-tokens", str(new)]
    before, cpu0, proc0 = engine_counters(rt), loop_cpu(), os.times()
    done = subprocess.run(command, capture_output=True, text=True,
                          preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    if done.returncode:
        raise RuntimeError(f"WebSocket clients failed: {done.stderr[-800:]}")
    proc1, cpu1 = os.times(), loop_cpu()
    d = delta(engine_counters(rt), before)
    results = json.loads(done.stdout)
    tokens = sum(r["tokens"] for r in results)
    gaps = [g for r in results for g in r["gaps"]]
    return {**per_step(d), "tokens": tokens,
            "event_loop_us_per_token": round((cpu1 - cpu0) / max(1, tokens) * 1e6, 1),
            "server_process_us_per_token": round((proc1.user + proc1.system - proc0.user - proc0.system)
                                                 / max(1, tokens) * 1e6, 1),
            "engine_cpu_us_per_token": round(d.get("cpu_seconds", 0.0) / max(1, tokens) * 1e6, 1),
            "ttft_p50_ms": ms(pct([r["ttft"] for r in results], 50)),
            "tpot_p50_ms": ms(pct([r["tpot"] for r in results], 50)),
            "chunk_gap_p50_ms": ms(pct(gaps, 50)), "chunk_gap_p99_ms": ms(pct(gaps, 99)),
            "tokens_per_chunk": round(tokens / max(1, sum(r["chunks"] for r in results)), 2)}


def measure(app: Any, loop: asyncio.AbstractEventLoop, loop_cpu: Callable[[], float], tok: Any, vocab: int, n: int,
            new: int, prompt_len: int, random_prompt: Callable[[int, int, int], list[int]], script: str,
            warm_ws: bool, log: Callable[[str], None], client_cpus: set[int] | None = None) -> dict[str, Any]:
    """One stream count: a direct run (after a warm-up one), then the WebSocket run; their figures side by side."""
    rt = app.state.runtime

    def texts(seed: int) -> list[str]:  # new prompts every run: nothing comes from the prefix cache
        return [tok.decode(random_prompt(prompt_len, vocab, seed + i)) for i in range(n)]

    def ids(seed: int) -> list[list[int]]:
        return [tok.encode(t) for t in texts(seed)]

    log(f"server: {n} streams: warm-up, direct, then over WebSockets")
    direct_run(app, loop, ids(80_000 + 1000 * n), new)  # warm-up: graphs of this batch size
    if warm_ws:
        ws_run(app.base, texts(81_000 + 1000 * n), new, rt, loop_cpu, script, client_cpus)
    direct = direct_run(app, loop, ids(82_000 + 1000 * n), new)
    ws = ws_run(app.base, texts(83_000 + 1000 * n), new, rt, loop_cpu, script, client_cpus)
    return {"streams": n, "new_tokens": new, "direct": direct, "ws": ws,
            "event_loop_us_per_token": ws["event_loop_us_per_token"],
            "engine_host_ms_per_step": {"direct": direct["host_ms_per_step"], "streaming": ws["host_ms_per_step"]},
            "host_ratio": round(ws["host_ms_per_step"] / max(1e-9, direct["host_ms_per_step"]), 3),
            "itl_ms": {"engine_step": ws["step_ms"], "engine_direct_p50": direct["itl_p50_ms"],
                       "e2e_tpot_p50": ws["tpot_p50_ms"], "e2e_chunk_gap_p99": ws["chunk_gap_p99_ms"]},
            "e2e_vs_engine_itl": round(ws["tpot_p50_ms"] / max(1e-9, direct["itl_p50_ms"]), 3)}


# ---- one server per engine placement ---------------------------------------------------------------------------
def server_section(hf_model: Any, paged: Any, args: Any, loaded: Any,
                   random_prompt: Callable[[int, int, int], list[int]], log: Callable[[str], None],
                   shapes: dict[str, dict[str, Any]], script: str) -> dict[str, Any]:
    """The same streams over real WebSockets vs straight into the same server's engine, for each engine placement
    asked for (its own process, a thread of the server's). ``paged`` None: nothing was built here (--server-only,
    the engine process builds the model)."""
    import functools
    import importlib.util
    import tempfile

    import torch

    from shared import GenerationDefaults, LoadedModel, load_model

    if loaded is None:  # random weights: a tokenizer trained here, sampling restricted to its vocabulary
        spec = importlib.util.spec_from_file_location("mtm", Path(script).with_name("make_tiny_model.py"))
        mtm = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mtm)
        tmp = Path(tempfile.mkdtemp())
        mtm.save_tokenizer(mtm.train_tokenizer(1024), tmp, model_max_length=32768)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tmp)
        if paged is not None:
            paged.vocab_size = min(paged.vocab_size, len(tokenizer))
        here = LoadedModel(hf_model, tokenizer, paged, GenerationDefaults(), frozenset(), "bench", 32768)
        own = functools.partial(random_model_loader, size=args.size, tokenizer_dir=str(tmp), threads=args.threads,
                                nf4=torch.cuda.is_available() or args.nf4_on_cpu)
    else:
        here = LoadedModel(loaded.hf_model, loaded.tokenizer, paged, GenerationDefaults(), frozenset(),
                           loaded.name, loaded.max_position_embeddings)
        own = load_model
    modes = ["on", "off"] if args.engine_process == "both" else [args.engine_process]
    if paged is not None:
        kv_per_token = paged.kv_bytes_per_token()
    else:  # (--server-only: no model here) K and V of every layer, bf16 on a GPU, at most 4 bytes on a CPU
        shape = shapes[args.size]
        head_dim = shape["hidden_size"] // shape["num_attention_heads"]
        kv_per_token = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * head_dim * (
            2 if torch.cuda.is_available() else 4)
    out: dict[str, Any] = {"client": "separate process, one WebSocket per stream"}
    for mode in modes:
        log(f"server path, engine process {mode}: {args.server_streams} streams over WebSockets")
        result = server_mode(here if mode == "off" else None, own, args, mode, kv_per_token, random_prompt, log, script)
        out["engine_process_" + mode] = result
        if mode == modes[0]:  # the headline figures: the first placement measured
            first = result["points"][str(args.server_streams[0])]
            out.update(streams=args.server_streams, summary=result["summary"],
                       ws_tpot_p50_ms=first["ws"]["tpot_p50_ms"], engine_tpot_p50_ms=first["direct"]["itl_p50_ms"])
    return out


def server_mode(here: Any, own: Any, args: Any, mode: str, kv_per_token: int,
                random_prompt: Callable[[int, int, int], list[int]], log: Callable[[str], None],
                script: str) -> dict[str, Any]:
    """One server, its engine in its own process (``here`` None: ``own`` loads the model there) or on a thread."""
    import uvicorn

    from server_starlette import UVICORN_WS, create_app
    from shared import Settings

    n, new = max(args.server_streams), args.new_tokens
    kv_gb = n * (args.prompt_len * 2 + new + 512) * kv_per_token / 2**30
    settings = Settings(model_id="bench", max_batch=n, kv_cache_gb=max(kv_gb, 0.01), kv_block_size=64,
                        max_context=args.prompt_len * 2 + new + 512, log_file=os.devnull, log_level="WARNING",
                        cuda_graphs="off" if args.no_graphs else "on", prefill_chunk=args.prefill_chunk,
                        max_step_tokens=max(128, n + 64), max_queue=4 * n + 16, engine_process=mode)
    app = create_app(settings, loader=own if here is None else (lambda s: here))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="on",
                                           **UVICORN_WS))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    app.base = f"127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    tok = app.state.runtime.tokenizer
    try:
        pinned = pin(app.state.runtime, thread) if args.pin else None
        points: dict[str, Any] = {}
        for i, count in enumerate(args.server_streams):
            points[str(count)] = measure(app, app.state.loop, ThreadClock(thread), tok, len(tok) - 30, count, new,
                                         args.prompt_len, random_prompt, script, warm_ws=i == 0, log=log,
                                         client_cpus={0} if args.pin else None)
        return {"engine": "own process" if mode == "on" else "thread of the server", "pinned": pinned,
                "points": points, "summary": summary(points)}
    finally:
        server.should_exit = True
        thread.join(60)


def ws_client(base_url: str, texts: list[str], new: int) -> list[dict[str, Any]]:
    """One session and socket per text, all at once: TTFT, time per output token and the gaps between chunks as
    a client sees them."""
    import urllib.request

    from websockets.asyncio.client import connect

    async def one(text: str) -> dict[str, Any]:
        req = urllib.request.Request(f"{base_url}/create_session", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
        sid = json.load(urllib.request.urlopen(req))["session_id"]
        async with connect(base_url.replace("http", "ws", 1) + f"/ws/{sid}", max_size=None) as ws:
            sent = time.perf_counter()
            await ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "generate", "params": {
                "history": [{"role": "user", "content": text}], "max_new_tokens": new, "do_sample": False,
                "ignore_eos": True}}))
            arrivals: list[float] = []
            async for raw in ws:
                msg = json.loads(raw)
                if msg.get("method") == "text_chunk":
                    arrivals.append(time.perf_counter())
                elif msg.get("method") == "end":
                    count = msg["params"]["usage"]["completion_tokens"]
                    first, last = (arrivals[0], arrivals[-1]) if arrivals else (sent, sent)
                    return {"ttft": first - sent, "tpot": (last - first) / max(1, count - 1), "tokens": count,
                            "chunks": len(arrivals), "gaps": [b - a for a, b in zip(arrivals, arrivals[1:])]}
        raise RuntimeError("no end notification")

    async def all_streams() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(one(t) for t in texts)))

    return asyncio.run(all_streams())


def summary(points: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, read off the points."""
    at32 = points.get("32") or points[max(points, key=int)]
    worst = max(p["host_ratio"] for p in points.values())
    return {"event_loop_us_per_token_at_32": at32["event_loop_us_per_token"], "target_event_loop_us": 40,
            "host_ratio_worst": worst, "target_host_ratio": 1.1,
            "mean_e2e_vs_engine_itl": round(statistics.mean(p["e2e_vs_engine_itl"] for p in points.values()), 3)}


def random_model_loader(settings: Any, size: str, tokenizer_dir: str, threads: int, nf4: bool) -> Any:
    """The benchmark's random-weight model and its trained tokenizer, built where it is called: in the engine
    process when the server runs the engine in its own (a module-level function, so it can be sent there)."""
    import importlib.util

    import torch
    from transformers import AutoTokenizer

    from engine.qwen2 import PagedQwen2
    from shared import GenerationDefaults, LoadedModel

    if threads:
        torch.set_num_threads(threads)
    spec = importlib.util.spec_from_file_location("bench_script", Path(__file__).with_name("bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cuda = torch.cuda.is_available()
    hf_model, _ = bench.build_random(size, "cuda" if cuda else "cpu", nf4=nf4)
    paged = PagedQwen2(hf_model)
    if nf4:
        from engine import nf4 as nf4_kernels

        nf4_kernels.install(paged, "auto")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    paged.vocab_size = min(paged.vocab_size, len(tokenizer))
    return LoadedModel(hf_model, tokenizer, paged, GenerationDefaults(), frozenset(), "bench", 32768)
