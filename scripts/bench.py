"""Benchmark the engine against the seed design (``model.generate`` per request, serially), in one run.

    python scripts/bench.py --random-weights                  # Qwen2.5-14B shape, NF4, on the GPU
    python scripts/bench.py --model ./Qwen2.5-14B-Instruct    # a real checkpoint, loaded like the server does
    python scripts/bench.py --size tiny                       # CPU smoke run (what CI does), no speed claims

Prints one JSON object on stdout (progress goes to stderr): TTFT and time-per-output-token p50/p99,
per-stream and aggregate tok/s for each stream count, the follow-up-turn TTFT with and without the warm
KV cache, GPU memory, the seed design's figures measured in the same run, the ratios, and (with
``--server``) the same streams through the real server over WebSockets. Output length is forced
(EOS ignored) so runs are comparable; with random weights the speed equals the real model's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engine import Engine, EngineConfig, SamplingParams, TokenEvent  # noqa: E402
from engine.qwen2 import PagedQwen2  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=False),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "14b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))] if values else float("nan")


def ms(x: float) -> float:
    return round(x * 1000, 2)


# ---- model -----------------------------------------------------------------------------------------------
def quantize_nf4(model: torch.nn.Module, compute_dtype: torch.dtype, device: str = "cuda") -> int:
    """Swap every decoder nn.Linear for a bitsandbytes Linear4bit (NF4 + double quant), as from_pretrained does."""
    import bitsandbytes as bnb

    count = 0
    for layer in model.model.layers:
        for module in list(layer.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                          device="meta")
                    q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                                 quant_type="nf4", blocksize=64).to(device)
                    q.support_avx512bf16_for_cpu = False  # CPU dry runs: keep bitsandbytes' storage layout
                    if child.bias is not None:
                        q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                    setattr(module, name, q)
                    count += 1
        if device == "cuda":
            torch.cuda.empty_cache()
    return count


def build_random(size: str, device: str, nf4: bool,
                 interpreted: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = SHAPES[size]
    config = Qwen2Config(**shape, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                         initializer_range=0.02 if size != "tiny" else 0.5)
    config._attn_implementation = "sdpa"
    from shared import cpu_dtype

    dtype = torch.bfloat16 if device == "cuda" else getattr(torch, cpu_dtype())
    if (nf4 or interpreted) and device == "cpu":  # the CPU dry run: Triton's interpreter gets bfloat16 tl.dot wrong
        dtype = torch.float32
    started = time.perf_counter()
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype).eval()
    info = {"source": f"random weights, {size} shape", "dtype": str(dtype),
            "build_s": round(time.perf_counter() - started, 1),
            "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3)}
    if nf4:
        started = time.perf_counter()
        info["nf4_linears"] = quantize_nf4(model, dtype, device)
        info["quantize_s"] = round(time.perf_counter() - started, 1)
    return model, info


def load_checkpoint(path: str) -> tuple[torch.nn.Module, dict[str, Any], Any]:
    from shared import Settings, load_model

    loaded = load_model(Settings(model_id=path))
    return loaded.hf_model, {"source": path}, loaded


# ---- the seed design: model.generate per request, serially ---------------------------------------------
def random_prompt(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, max(11, min(vocab, 100000) - 10), (n,), generator=g).tolist()


def seed_design(model: torch.nn.Module, prompt_len: int, new: int, requests: int, vocab: int) -> dict[str, Any]:
    from transformers import GenerationConfig

    device = model.get_input_embeddings().weight.device

    def timed(ids: torch.Tensor, n: int) -> float:
        gc = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
        sync()
        return time.perf_counter() - t

    ids = torch.tensor([random_prompt(prompt_len, vocab, 999)], device=device)
    timed(ids, 2)  # warm-up
    ttfts, totals = [], []
    for i in range(requests):
        ids = torch.tensor([random_prompt(prompt_len, vocab, 1000 + i)], device=device)
        ttfts.append(timed(ids, 1))
        totals.append(timed(ids, new))
    ttft, total = statistics.median(ttfts), statistics.median(totals)
    return {"requests_measured": requests, "ttft_ms": ms(ttft), "request_s": round(total, 3),
            "tpot_ms": ms((total - ttft) / max(1, new - 1)), "tok_s": round(new / total, 2)}


def serial_figures(seed: dict[str, Any], streams: int) -> dict[str, Any]:
    """N requests served one after another: the k-th waits for k-1 whole requests before its first token."""
    ttfts = [seed["ttft_ms"] + k * seed["request_s"] * 1000 for k in range(streams)]
    return {"ttft_p50_ms": round(pct(ttfts, 50), 1), "ttft_p99_ms": round(pct(ttfts, 99), 1),
            "aggregate_tok_s": seed["tok_s"], "per_stream_tok_s": round(1000 / seed["tpot_ms"], 2)}


# ---- the engine -------------------------------------------------------------------------------------------
class Stream:
    """Tokens and their timestamps of one request, recorded on the engine thread."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.final: TokenEvent | None = None
        self.done = threading.Event()
        self.submitted = 0.0

    def __call__(self, event: TokenEvent) -> None:
        now = time.perf_counter()
        self.times.extend([now] * len(event.token_ids))
        self.tokens.extend(event.token_ids)
        if event.finished:
            self.final = event
            self.done.set()


def compile_events(engine: Engine) -> int:
    """Triton compiles and CUDA-graph captures so far: a timed run that adds to them timed a compile too."""
    from engine import attention, nf4

    graphs = engine.runner.graphs
    return nf4.compile_count() + attention.compile_count() + len(getattr(graphs, "graphs", None) or {})


class CompiledWhileTimed(RuntimeError):
    """A timed run compiled a kernel or captured a graph: its figures would measure that, not serving."""


def run_streams(engine: Engine, n: int, prompts: list[list[int]], new: int, session: str | None = None,
                timeout: float = 900, timed: bool = True) -> dict[str, Any]:
    """Run ``n`` streams at once; raises CompiledWhileTimed when ``timed`` and a compile happened meanwhile."""
    compiled_before = compile_events(engine)
    streams = [Stream() for _ in range(n)]
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    started = time.perf_counter()
    for i, stream in enumerate(streams):
        stream.submitted = time.perf_counter()
        engine.submit(prompts[i], params, stream, session_key=session)
    for stream in streams:
        if not stream.done.wait(timeout):
            raise TimeoutError("a stream did not finish")
    wall = time.perf_counter() - started
    bad = [s.final.error or s.final.finish_reason.value for s in streams if len(s.times) != new]
    if bad:
        raise RuntimeError(f"streams ended early: {bad[:3]}")
    compiled = compile_events(engine) - compiled_before
    if timed and compiled:
        raise CompiledWhileTimed(f"{compiled} kernel compile(s) or graph capture(s) during a timed run")
    ttfts = [s.times[0] - s.submitted for s in streams]
    tpots = [(s.times[-1] - s.times[0]) / max(1, new - 1) for s in streams]
    return {"streams": n, "ttft_p50_ms": ms(pct(ttfts, 50)), "ttft_p99_ms": ms(pct(ttfts, 99)),
            "tpot_p50_ms": ms(pct(tpots, 50)), "tpot_p99_ms": ms(pct(tpots, 99)),
            "per_stream_tok_s": round(statistics.mean(1 / t for t in tpots), 2),
            "aggregate_tok_s": round(n * new / wall, 2), "wall_s": round(wall, 3),
            "cached_tokens": [s.final.cached_tokens for s in streams][:4]}


def followup(engine: Engine, context: int, new: int, vocab: int) -> dict[str, Any]:
    """A 50-token follow-up turn on a long session: warm (the session's KV reused) vs cold (recomputed).

    The whole measurement runs once untimed first, on other tokens and another session, so that the timed one
    compiles nothing (a warm follow-up prefills an odd number of rows; its kernels must already exist)."""

    def measure(seed: int, session: str, timed: bool) -> tuple[dict[str, Any], dict[str, Any], int]:
        first = random_prompt(context, vocab, seed)
        turn1 = Stream()
        engine.submit(first, SamplingParams(max_new_tokens=16, ignore_eos=True), turn1, session_key=session)
        turn1.done.wait(600)
        history = first + turn1.tokens  # what the conversation holds after the first turn
        follow = history + random_prompt(new, vocab, seed + 1)
        warm = run_streams(engine, 1, [follow], 8, session=session, timed=timed)
        cold_prompt = random_prompt(len(follow), vocab, seed + 2)  # same length, nothing cached
        return warm, run_streams(engine, 1, [cold_prompt], 8, timed=timed), len(follow)

    measure(17, "bench-warm-up-session", timed=False)
    warm, cold, length = measure(7, "bench-session", timed=True)
    return {"context_tokens": length, "new_tokens": new, "ttft_warm_ms": warm["ttft_p50_ms"],
            "ttft_cold_ms": cold["ttft_p50_ms"], "cached_tokens_warm": warm["cached_tokens"][0],
            "speedup": round(cold["ttft_p50_ms"] / max(1e-6, warm["ttft_p50_ms"]), 2)}


def make_engine(model: PagedQwen2, streams: list[int], max_context: int, graphs: bool, prefill: int,
                kv_tokens: int) -> Engine:
    config = EngineConfig(max_running=max(streams), max_context=max_context, block_size=64,
                          kv_cache_bytes=kv_tokens * model.kv_bytes_per_token(), prefill_chunk=prefill,
                          max_queue=4 * max(streams) + 16, cuda_graphs=graphs,
                          async_scheduling=torch.cuda.is_available())  # what the server runs (auto)
    engine = Engine(model, config)
    engine.start()
    return engine


def engine_section(paged: PagedQwen2, args: argparse.Namespace, seed: dict[str, Any] | None,
                   out: dict[str, Any]) -> None:
    vocab = paged.vocab_size
    kv_tokens = max(args.streams) * (args.prompt_len + args.new_tokens + 128) + 2 * (args.followup_context + 256)
    max_context = max(args.prompt_len + args.new_tokens, args.followup_context + 128) + 64
    engine = make_engine(paged, args.streams, max_context, not args.no_graphs, args.prefill_chunk, kv_tokens)
    try:
        runs: dict[str, Any] = {}
        for n in args.streams:
            log(f"engine: {n} streams x ({args.prompt_len} prompt + {args.new_tokens} new), warm-up then measured")
            run_streams(engine, n, [random_prompt(args.prompt_len, vocab, 50_000 + i) for i in range(n)],
                        args.new_tokens, timed=False)  # compiles what this batch size needs; prompts not reused
            result = run_streams(engine, n, [random_prompt(args.prompt_len, vocab, 60_000 + 100 * n + i)
                                             for i in range(n)], args.new_tokens)
            if seed is not None:
                serial = serial_figures(seed, n)
                result["seed_design"] = serial
                result["aggregate_vs_seed"] = round(result["aggregate_tok_s"] / serial["aggregate_tok_s"], 2)
                result["ttft_p99_vs_seed"] = round(result["ttft_p99_ms"] / serial["ttft_p99_ms"], 3)
            runs[str(n)] = result
            out["engine"] = runs
        if args.followup_context:
            log(f"follow-up turn on a {args.followup_context}-token session")
            out["followup"] = followup(engine, args.followup_context, args.followup_new, vocab)
        graphs = engine.runner.graphs
        out["engine_info"] = {"cuda_graphs": bool(graphs and graphs.use_graphs),
                              "graphs_captured": len(graphs.graphs) if graphs else 0,
                              "graph_capture_s": round(graphs.capture_seconds, 2) if graphs else 0,
                              "kv_blocks": engine.blocks.num_usable, "prefill_budget": args.prefill_chunk}
    finally:
        engine.stop()


# ---- the whole server path ------------------------------------------------------------------------------------
def load_bench_server() -> Any:
    """scripts/bench_server.py, importable by name (the engine process unpickles its loader from there)."""
    import importlib

    scripts = str(Path(__file__).resolve().parent)
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    return importlib.import_module("bench_server")


def server_section(hf_model: torch.nn.Module | None, paged: PagedQwen2 | None, args: argparse.Namespace,
                   loaded: Any) -> dict:
    """The token path through the real server (scripts/bench_server.py)."""
    return load_bench_server().server_section(hf_model, paged, args, loaded, random_prompt, log, SHAPES, __file__)


# ---- main ------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--random-weights", action="store_true", help="random weights of --size's shape (default)")
    src.add_argument("--model", help="a model directory or HF id, loaded like the server loads it")
    p.add_argument("--size", choices=sorted(SHAPES), default=None, help="shape for random weights "
                   "(default: 14b on CUDA, tiny on the CPU)")
    p.add_argument("--streams", default=None, help="comma-separated stream counts (default 1,8,32,64; CPU 1,8)")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--followup-context", type=int, default=4000, help="0 skips the follow-up-turn measurement")
    p.add_argument("--followup-new", type=int, default=50)
    p.add_argument("--baseline-requests", type=int, default=2, help="seed-design requests measured (0 skips)")
    p.add_argument("--prefill-chunk", type=int, default=2048)
    p.add_argument("--no-graphs", action="store_true", help="eager decode (to measure what graphs buy)")
    p.add_argument("--nf4-kernel", choices=["both", "triton", "bnb"], default="both",
                   help="NF4 models: measure bitsandbytes' kernels, ours (fused Triton), or both in the same run")
    p.add_argument("--nf4-on-cpu", action="store_true", help="dry run of the NF4 paths on the CPU (random weights; "
                   "with TRITON_INTERPRET=1 for ours)")
    p.add_argument("--server", action="store_true", help="also measure the whole server path over WebSockets: "
                   "event-loop CPU per token, the engine's host time per step with and without streaming, inter-token "
                   "latency end to end vs the engine's own (scripts/bench_server.py)")
    p.add_argument("--server-streams", default="1,8,32,64", help="comma-separated stream counts of --server")
    p.add_argument("--server-only", action="store_true", help="run only --server (with --engine-process on and "
                   "random weights the model is built in the engine process only)")
    p.add_argument("--pin", action="store_true", help="--server: the engine's threads on CPU 1, the rest on CPU 0 "
                   "(a 2-core machine: both placements on the same CPUs, so only the interpreter lock differs)")
    p.add_argument("--engine-process", choices=["on", "off", "both"], default="on", help="--server: the engine in "
                   "its own process (the server's default), on a thread of the server's, or both in one run")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--context-sweep", action="store_true", help="Engine II: decode over batch x context for paged "
                   "and reference attention, and inter-token latency while prompts arrive (mixed vs alternating); "
                   "runs only this section")
    p.add_argument("--sweep-batches", default=None, help="comma-separated (default 1,8,32)")
    p.add_argument("--sweep-contexts", default=None, help="comma-separated (default 1024,8192,32768)")
    p.add_argument("--sweep-steps", type=int, default=16, help="timed decode steps per point")
    p.add_argument("--attention-modes", default=None, help="comma-separated, e.g. paged,reference (default: both "
                   "where the kernels run compiled, else reference)")
    p.add_argument("--itl-streams", type=int, default=16)
    p.add_argument("--itl-prompts", type=int, default=4)
    p.add_argument("--itl-prompt-len", type=int, default=8192)
    p.add_argument("--itl-context", type=int, default=1024, help="context of the running streams")
    p.add_argument("--max-step-tokens", type=int, default=128, help="the engine's step budget while sequences decode")
    p.add_argument("--itl-step-tokens", default=None, help="comma-separated budgets of the mixed-steps latency "
                   "runs (default 128,512)")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--ws-client", help=argparse.SUPPRESS)  # internal: run the WebSocket clients against this URL
    p.add_argument("--texts", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.size = args.size or ("14b" if cuda else "tiny")
    args.streams = [int(s) for s in (args.streams or ("1,8,32,64" if cuda else "1,8")).split(",")]
    args.server_streams = [int(s) for s in str(args.server_streams).split(",")]
    args.sweep_batches = [int(s) for s in (args.sweep_batches or "1,8,32").split(",")]
    args.sweep_contexts = [int(s) for s in (args.sweep_contexts or "1024,8192,32768").split(",")]
    args.attention_modes = args.attention_modes.split(",") if args.attention_modes else None
    args.itl_step_tokens = [int(s) for s in (args.itl_step_tokens or "128,512").split(",")]
    return args


def nf4_kernels(paged: PagedQwen2, args: argparse.Namespace, nf4_model: bool, out: dict[str, Any]) -> list[str]:
    """Which NF4 matmul paths to measure ([] for an unquantized model); installs ours when asked for."""
    if not nf4_model:
        return []
    from engine import nf4

    wanted = ["bnb", "triton"] if args.nf4_kernel == "both" else [args.nf4_kernel]
    if "triton" in wanted and paged.projections is None:
        started = time.perf_counter()
        if nf4.install(paged, "triton") != "triton":
            out["errors"]["nf4_triton"] = "the Triton kernels could not run here (see the log): bnb only"
            wanted = ["bnb"]
        out["nf4_install_s"] = round(time.perf_counter() - started, 1)
    out["nf4_kernels"] = wanted
    return wanted


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.ws_client:
        results = load_bench_server().ws_client(args.ws_client, json.loads(Path(args.texts).read_text()),
                                                args.new_tokens)
        print(json.dumps(results))
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    out: dict[str, Any] = {"device": device, "torch": torch.__version__, "args": dict(vars(args)), "errors": {}}
    if args.server_only and args.engine_process == "on" and not args.model:  # the model is built there only
        out["model"] = {"source": f"random weights, {args.size} shape, built in the engine process"}
        try:
            out["server"] = server_section(None, None, args, None)
        except Exception as exc:
            out["errors"]["server"] = f"{type(exc).__name__}: {exc}"[:500]
            log(f"server failed:\n{traceback.format_exc()}")
        return finish(args, out)
    loaded = None
    if args.model:
        hf_model, info, loaded = load_checkpoint(args.model)
    else:
        hf_model, info = build_random(args.size, "cuda" if cuda else "cpu", nf4=cuda or args.nf4_on_cpu,
                                      interpreted="paged" in (args.attention_modes or ()))
    out["model"] = info
    if cuda:
        out["gpu_memory_weights_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    paged = loaded.paged_model if loaded is not None else PagedQwen2(hf_model)
    log(f"model ready: {info}")

    def section(name: str, fn: Any) -> Any:
        try:
            return fn()
        except Exception as exc:  # keep the other sections' figures
            out["errors"][name] = f"{type(exc).__name__}: {exc}"[:500]
            log(f"{name} failed:\n{traceback.format_exc()}")
            return None

    if args.context_sweep:
        section("context_sweep", lambda: sweep(paged, hf_model, args, out, section))
        return finish(args, out)
    seed = None
    if args.baseline_requests:
        log(f"seed design: model.generate, {args.baseline_requests} requests, serially")
        seed = section("seed_design", lambda: seed_design(hf_model, args.prompt_len, args.new_tokens,
                                                           args.baseline_requests, paged.vocab_size))
        out["seed_design"] = seed
    nf4_model = (cuda or args.nf4_on_cpu) and (loaded is None or loaded.serving_info.get("quantization") == "nf4")
    kernels = nf4_kernels(paged, args, nf4_model, out)
    if not kernels:
        section("engine", lambda: engine_section(paged, args, seed, out))
    projections = paged.projections
    for kernel in kernels:  # bitsandbytes' kernels first, then ours (what the server then runs), same weights
        paged.projections = projections if kernel == "triton" else None
        log(f"engine with NF4 kernel: {kernel}")
        sub: dict[str, Any] = {}
        section(f"engine[{kernel}]", lambda sub=sub: engine_section(paged, args, seed, sub))
        out.setdefault("by_nf4_kernel", {})[kernel] = sub
        out.update(sub)
    if set(kernels) == {"bnb", "triton"}:
        by = out["by_nf4_kernel"]
        out["triton_vs_bnb"] = {n: round(by["triton"]["engine"][n]["aggregate_tok_s"]
                                         / by["bnb"]["engine"][n]["aggregate_tok_s"], 2)
                                for n in by["triton"].get("engine", {}) if n in by["bnb"].get("engine", {})}
    if args.server:
        log(f"server path: {args.server_streams} streams over WebSockets")
        out["server"] = section("server", lambda: server_section(hf_model, paged, args, loaded))
    return finish(args, out)


def sweep(paged: PagedQwen2, hf_model: torch.nn.Module, args: argparse.Namespace, out: dict[str, Any],
          section: Any) -> None:
    """``--context-sweep`` (scripts/bench_context.py), with the NF4 kernels the server would pick."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_context", Path(__file__).with_name("bench_context.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if torch.cuda.is_available() or args.nf4_on_cpu:
        args.nf4_kernel = "triton"
        nf4_kernels(paged, args, True, out)
    def save(partial: dict[str, Any]) -> None:  # a step stopped at its time limit still leaves what finished
        out["context_sweep"] = partial
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=1))

    module.context_sweep(paged, hf_model, args, lambda e: compile_events(e), section, log, save)


def finish(args: argparse.Namespace, out: dict[str, Any]) -> dict[str, Any]:
    """Print the JSON (and write it to --out)."""
    if torch.cuda.is_available():
        out["gpu_memory_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    text = json.dumps(out, indent=1)
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text)
    return out


if __name__ == "__main__":
    main()
