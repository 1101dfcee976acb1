"""Per-shape microbenchmark of the NF4 Triton kernels (engine/nf4.py) against bitsandbytes, in one short run.

    python scripts/bench_nf4.py                              # Qwen2.5-14B projections, M = 1,2,7,16,33,64
    python scripts/bench_nf4.py --shapes qkv,o --m 1,16      # a subset
    python scripts/bench_nf4.py --tune --out nf4.json        # also sweep KernelConfigs for --tune-shapes/--tune-m
    TRITON_INTERPRET=1 python scripts/bench_nf4.py --tiny    # CPU dry run: tiny shapes, no speed claims

For every shape (q, k, v, o, gate, up, down, and the fused qkv and gate_up the server runs) and every M it
checks ``nf4_matmul`` (with ``nf4.pick_config``'s config) against bitsandbytes' own dequantizer
(``dequantize_4bit(W)`` of the parts before fusion, float32 matmul), then times it and bitsandbytes' path (the
``Linear4bit`` forward; for a fused shape the sum of its parts' forwards, which is what the fused matmul
replaces) the same way: CUDA events around a CUDA graph of ``--calls`` calls (launch overhead removed), and
eager calls. Each call reads another copy of the weight (enough copies to exceed ``--rotate-mib``, several
times the L2 cache), so that weights stream from HBM as they do in the model. Effective bandwidth counts the
weight's codes, absmax and absmax2 bytes. A copy and a read of a 1 GiB buffer give the physical reference.

``--tune`` sweeps a bounded, staged grid of ``KernelConfig`` per (shape, M): tile sizes, then split-K, then
warps and stages, each config checked against the reference before it is timed; it prints (stderr, and
``tuned_literal`` in the JSON) the best per ``(kind, N, K, bucket_m)`` as entries to paste into
``nf4.TUNED``. Configs that fail to compile or launch are listed under the tuning entry's ``failed``.

Prints one JSON object on stdout (progress goes to stderr); ``--out`` also writes it, after every shape.
On the CPU (no CUDA) the kernels run under Triton's interpreter with float32 activations and perf_counter
timings; the figures only show that the script works.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

if not torch.cuda.is_available():  # Triton's interpreter runs the kernels on the CPU; set before Triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine import nf4  # noqa: E402

# Qwen2.5-14B: hidden 5120, intermediate 13824, 40 query heads and 8 KV heads of 128.
DIMS = {"14b": dict(hidden=5120, intermediate=13824, q=40 * 128, kv=8 * 128),
        "tiny": dict(hidden=256, intermediate=384, q=256, kv=64)}
SHAPE_NAMES = ("qkv", "o", "gate_up", "down", "q", "k", "v", "gate", "up")  # the server's four first
MODEL_SHAPES = ("qkv", "o", "gate_up", "down")
FUSED = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}
BIASED = {"q", "k", "v"}  # Qwen2 has biases on q/k/v only


def log(msg: str) -> None:
    print(f"[bench_nf4 {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def shape_table(dims: dict[str, int]) -> dict[str, list[tuple[str, int, int]]]:
    """name -> its parts (part name, N, K); unfused shapes are one part."""
    h, i, q, kv = dims["hidden"], dims["intermediate"], dims["q"], dims["kv"]
    one = {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "gate": (i, h), "up": (i, h), "down": (h, i)}
    table = {name: [(name, *nk)] for name, nk in one.items()}
    table.update({name: [(p, *one[p]) for p in parts] for name, parts in FUSED.items()})
    return {name: table[name] for name in SHAPE_NAMES}


def bucket_of(m: int) -> tuple[str, int]:
    """(kind, bucket_m) as nf4.pick_config keys nf4.TUNED."""
    if m <= nf4.GEMV_MAX_M:
        return "gemv", m
    return "gemm", 16 if m <= 16 else 32 if m <= 32 else 64


def tuned_key(m: int, n: int, k: int) -> tuple[str, int, int, int]:
    kind, bucket = bucket_of(m)
    return kind, n, k, bucket


def cfg_str(cfg: nf4.KernelConfig) -> str:
    return (f"bm{cfg.block_m} bn{cfg.block_n} bk{cfg.block_k} split{cfg.split_k} "
            f"w{cfg.num_warps} st{cfg.num_stages}")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def sig(x: float, digits: int = 4) -> float:
    """x rounded to a few significant digits (microseconds and TB/s span orders of magnitude)."""
    return float(f"{x:.{digits}g}")


# ---- weights ---------------------------------------------------------------------------------------------------------
def make_linear(n: int, k: int, bias: bool, dtype: torch.dtype, device: str, seed: int) -> torch.nn.Module:
    """A bitsandbytes Linear4bit [n, k] as the server loads it (NF4, blocks of 64, double quantization)."""
    import bitsandbytes as bnb

    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(n, k, generator=g, device=device) * 0.02
    w *= 0.25 + torch.rand(n, 1, generator=g, device=device)  # rows of different magnitudes: scales differ
    lin = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=dtype, quant_type="nf4", compress_statistics=True,
                            device="meta")
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True,
                                   blocksize=nf4.BLOCKSIZE).to(device)
    if bias:
        b = (torch.randn(n, generator=g, device=device) * 0.1).to(dtype)
        lin.bias = torch.nn.Parameter(b, requires_grad=False)
    lin.support_avx512bf16_for_cpu = False  # else its first CPU forward repacks the weight into another layout
    return lin


def weight_bytes(w: nf4.NF4Weight) -> int:
    """What the kernel must stream: codes, 64-block absmax and (nested) 256-block absmax2."""
    total = w.codes.numel() * w.codes.element_size() + w.absmax_q.numel() * w.absmax_q.element_size()
    return total + (w.absmax2.numel() * w.absmax2.element_size() if w.nested else 0)


@dataclass
class Shape:
    name: str
    parts: list[tuple[str, int, int]]
    copies: list[tuple[list[torch.nn.Module], nf4.NF4Weight]]  # (bitsandbytes modules, our weight) per copy
    ref_w: torch.Tensor  # float32 [N, K]: copy 0 by bitsandbytes' dequantizer, taken before fusion
    ref_b: torch.Tensor | None
    n: int
    k: int
    bytes: int


@torch.no_grad()
def build_shape(name: str, parts: list[tuple[str, int, int]], dtype: torch.dtype, device: str,
                rotate_bytes: int, copies: int) -> Shape:
    import bitsandbytes.functional as F

    n, k = sum(p[1] for p in parts), parts[0][2]
    built: list[tuple[list[torch.nn.Module], nf4.NF4Weight]] = []
    ref_w = ref_b = None
    count = copies
    while len(built) < max(1, count):
        c = len(built)
        mods = [make_linear(pn, pk, pname in BIASED, dtype, device, seed=1000 * c + j)
                for j, (pname, pn, pk) in enumerate(parts)]
        if c == 0:
            ref_w = torch.cat([F.dequantize_4bit(m.weight.data, m.weight.quant_state).float() for m in mods])
            if mods[0].bias is not None:
                ref_b = torch.cat([m.bias.float() for m in mods])
        w = nf4.fuse(mods) if len(mods) > 1 else nf4.from_bnb(mods[0])
        built.append((mods, w))
        if c == 0 and not copies:  # auto: enough copies that one pass over them overflows the L2 cache
            count = max(1, min(64, cdiv(rotate_bytes, weight_bytes(w))))
    return Shape(name, parts, built, ref_w, ref_b, n, k, weight_bytes(built[0][1]))


# ---- timing ----------------------------------------------------------------------------------------------------------
class Clock:
    """Per-call time of ``call(i)`` (i cycles over the weight copies): CUDA events around a CUDA graph of
    ``calls`` calls and around the same calls eagerly; on the CPU, perf_counter around eager calls."""

    def __init__(self, cuda: bool, graphs: bool, reps: int) -> None:
        self.cuda, self.graphs, self.reps = cuda, graphs and cuda, reps

    @staticmethod
    def _events_ms(fn: Callable[[], Any]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def measure(self, call: Callable[[int], Any], calls: int, eager: bool = True) -> dict[str, Any]:
        def loop(count: int = calls) -> None:
            for i in range(count):
                call(i)

        res: dict[str, Any] = {"graph_us": None, "eager_us": None}
        loop(calls if self.cuda else 1)  # warm-up: Triton compiles, bitsandbytes' first-call setup
        if not self.cuda:
            samples = []
            for _ in range(self.reps):
                t0 = time.perf_counter()
                loop()
                samples.append(time.perf_counter() - t0)
            res["eager_us"] = 1e6 * statistics.median(samples) / calls
        else:
            torch.cuda.synchronize()
            if eager or not self.graphs:
                res["eager_us"] = 1e3 * statistics.median(self._events_ms(loop) for _ in range(3)) / calls
            if self.graphs:
                try:
                    res["graph_us"] = self._graph_us(loop, calls)
                except Exception as exc:  # not capturable: the eager figure stands
                    res["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
                    if res["eager_us"] is None:
                        res["eager_us"] = 1e3 * statistics.median(self._events_ms(loop) for _ in range(3)) / calls
        res["us"] = res["graph_us"] if res["graph_us"] is not None else res["eager_us"]
        return res

    def _graph_us(self, loop: Callable[[], None], calls: int) -> float:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm on a side stream before capture, as torch recommends
            loop()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loop()
        graph.replay()
        torch.cuda.synchronize()
        samples = [self._events_ms(graph.replay) for _ in range(self.reps)]
        del graph
        return 1e3 * statistics.median(samples) / calls


def reference_bandwidth(cuda: bool, mib: int, reps: int) -> dict[str, Any]:
    """The physical reference: a device-to-device copy (read + write bytes) and a read-only reduction."""
    device = "cuda" if cuda else "cpu"
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4

    def timed(fn: Callable[[], Any]) -> float:
        fn()
        if cuda:
            return statistics.median(Clock._events_ms(fn) for _ in range(reps)) / 1e3
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)

    t_copy = timed(lambda: dst.copy_(src))
    t_read = timed(lambda: torch.amax(src))
    return {"buffer_mib": mib, "copy_us": round(t_copy * 1e6, 1),
            "copy_tb_s": round(2 * nbytes / t_copy / 1e12, 3),  # bytes read + bytes written
            "read_tb_s": round(nbytes / t_read / 1e12, 3)}  # torch.amax: bytes read


# ---- benchmark and tuning --------------------------------------------------------------------------------------------
def make_x(m: int, k: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator(device=device).manual_seed(m), device=device).to(dtype)


def reference(x: torch.Tensor, s: Shape) -> torch.Tensor:
    y = x.float() @ s.ref_w.T
    return y + s.ref_b if s.ref_b is not None else y


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max abs error / max |ref|)."""
    err = (got.float() - ref).abs().max().item()
    return err, err / max(ref.abs().max().item(), 1e-30)


def calls_for(s: Shape, calls: int) -> int:
    """Calls per timed batch: a whole number of passes over the copies."""
    c = len(s.copies)
    return c * max(1, cdiv(calls, c))


@torch.no_grad()
def bench_m(s: Shape, m: int, args: argparse.Namespace, clock: Clock) -> dict[str, Any]:
    x = make_x(m, s.k, args.torch_dtype, args.device)
    ref = reference(x, s)
    cfg = nf4.pick_config(m, s.n, s.k, x.device)
    mods0, w0 = s.copies[0]
    abs_err, rel = rel_err(nf4.nf4_matmul(x, w0, cfg), ref)
    _, bnb_rel = rel_err(torch.cat([mod(x) for mod in mods0], dim=-1), ref)
    calls = calls_for(s, args.calls)
    copies = s.copies
    ours = clock.measure(lambda i: nf4.nf4_matmul(x, copies[i % len(copies)][1], cfg), calls)
    theirs = clock.measure(lambda i: [mod(x) for mod in copies[i % len(copies)][0]], calls)
    for r in (ours, theirs):
        r["tb_s"] = sig(s.bytes / (r["us"] * 1e-6) / 1e12)
        for key in ("us", "graph_us", "eager_us"):
            if r.get(key) is not None:
                r[key] = sig(r[key])
    return {"config": asdict(cfg), "tuned": tuned_key(m, s.n, s.k) in nf4.TUNED, "max_abs_err": abs_err,
            "max_rel_err": rel, "bnb_max_rel_err": bnb_rel, "pass": rel <= args.tol, "ours": ours, "bnb": theirs,
            "speedup": sig(theirs["us"] / ours["us"]), "calls_per_batch": calls}


def stage1(kind: str, m: int, n: int, k: int, sm: int) -> list[nf4.KernelConfig]:
    """Tile shapes, each with split-K filling the GPU (4 waves of programs for GEMV, 2 for GEMM)."""
    out = []
    _, bucket = bucket_of(m)
    block_ms = [0] if kind == "gemv" else [bm for bm in (16, 32, 64) if bucket // 2 <= bm <= bucket]
    for bm in block_ms:
        for bn in (16, 32, 64, 128):
            for bk in (64, 128, 256):
                if k % bk or (bm and bn * bk > 128 * 128):  # partial K tiles; GEMM tiles too big for registers
                    continue
                programs = cdiv(n, bn) * (cdiv(m, bm) if bm else 1)
                split = max(1, min(k // bk, cdiv((4 if kind == "gemv" else 2) * sm, programs)))
                out.append(nf4.KernelConfig(bm, bn, bk, split))
    return out


@torch.no_grad()
def tune_m(s: Shape, m: int, args: argparse.Namespace, clock: Clock, sm: int, deadline: float) -> dict[str, Any]:
    kind, bucket = bucket_of(m)
    x = make_x(m, s.k, args.torch_dtype, args.device)
    ref = reference(x, s)
    w0 = s.copies[0][1]
    calls = calls_for(s, args.calls)
    copies = s.copies
    timings: dict[nf4.KernelConfig, float] = {}
    failed: dict[str, str] = {}
    skipped = 0

    def best() -> nf4.KernelConfig | None:
        return min(timings, key=timings.get) if timings else None

    def trial(cfg: nf4.KernelConfig) -> None:
        nonlocal skipped
        if cfg in timings or cfg_str(cfg) in failed:
            return
        if len(timings) + len(failed) >= args.tune_max or time.monotonic() > deadline:
            skipped += 1
            return
        try:
            _, rel = rel_err(nf4.nf4_matmul(x, w0, cfg), ref)
            if not rel <= args.tol:
                failed[cfg_str(cfg)] = f"wrong result: max rel err {rel:.3g}"
                return
            timings[cfg] = clock.measure(lambda i: nf4.nf4_matmul(x, copies[i % len(copies)][1], cfg), calls,
                                         eager=False)["us"]
        except Exception as exc:  # compile errors, out of shared memory: next config
            failed[cfg_str(cfg)] = f"{type(exc).__name__}: {exc}"[:300]

    current = nf4.pick_config(m, s.n, s.k, x.device)
    trial(current)
    for cfg in stage1(kind, m, s.n, s.k, sm):
        trial(cfg)
    top = best()
    if top is not None:  # split-K around the best tile's
        f = top.split_k
        for split in sorted({1, max(1, f // 2), 2 * f, 4 * f}):
            if split <= s.k // top.block_k:
                trial(nf4.KernelConfig(top.block_m, top.block_n, top.block_k, split, top.num_warps, top.num_stages))
    top = best()
    if top is not None:  # then warps and pipeline stages
        for warps in (2, 4, 8):
            for stages in (2, 3):
                trial(nf4.KernelConfig(top.block_m, top.block_n, top.block_k, top.split_k, warps, stages))
    top = best()
    if top is None:
        raise RuntimeError(f"no config ran: {list(failed.items())[:3]}")
    us = timings[top]
    ranked = sorted(timings.items(), key=lambda kv: kv[1])[:5]
    return {"key": [kind, s.n, s.k, bucket], "m": m, "best": asdict(top), "us": sig(us),
            "tb_s": sig(s.bytes / (us * 1e-6) / 1e12), "current": asdict(current),
            "current_us": sig(timings[current]) if current in timings else None,
            "gain_vs_current": sig(timings[current] / us) if current in timings else None,
            "top5": [[cfg_str(c), sig(t)] for c, t in ranked], "tried": len(timings) + len(failed),
            "skipped": skipped, "failed": failed}


def tuned_literal(entries: list[dict[str, Any]]) -> str:
    """The best configs as entries of nf4.TUNED (KernelConfig(block_m, block_n, block_k, split_k, warps, stages))."""
    lines = ["{"]
    for e in sorted(entries, key=lambda e: tuple(e["key"])):
        kind, n, k, bucket = e["key"]
        c = nf4.KernelConfig(**e["best"])
        gain = f", x{e['gain_vs_current']} vs before" if e.get("gain_vs_current") else ""
        lines.append(f'    ("{kind}", {n}, {k}, {bucket}): KernelConfig({c.block_m}, {c.block_n}, {c.block_k}, '
                     f'{c.split_k}, {c.num_warps}, {c.num_stages}),  # {e["shape"]}: {e["tb_s"]} TB/s{gain}')
    lines.append("}")
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------------------------------------
def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def name_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in SHAPE_NAMES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown shapes {bad}; known: {','.join(SHAPE_NAMES)}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes and few iterations (the CPU dry run)")
    p.add_argument("--shapes", type=name_list, default=list(SHAPE_NAMES), help="comma-separated, from "
                   f"{','.join(SHAPE_NAMES)} (default: all)")
    p.add_argument("--m", type=int_list, default=[1, 2, 7, 16, 33, 64], help="rows of x (default 1,2,7,16,33,64)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="activations (default bf16 on CUDA; fp32 on the CPU: the interpreter's bf16 dot is wrong)")
    p.add_argument("--calls", type=int, default=None, help="calls per timed batch / CUDA graph (default 32; tiny 2)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed batches, median taken (default 10 on CUDA, 3 on the CPU, 1 with --tiny there)")
    p.add_argument("--copies", type=int, default=0, help="weight copies cycled through (0: enough for --rotate-mib)")
    p.add_argument("--rotate-mib", type=int, default=256, help="bytes of weights one pass over the copies reads "
                   "(several times the L2 cache; CUDA only)")
    p.add_argument("--no-graphs", action="store_true", help="eager timings only")
    p.add_argument("--copy-mib", type=int, default=None, help="buffer of the bandwidth reference (default 1024)")
    p.add_argument("--tol", type=float, default=None,
                   help="max error / max |ref| to pass (default 1e-2 for 16-bit or on CUDA, 1e-4 fp32 on the CPU)")
    p.add_argument("--tune", action="store_true", help="sweep KernelConfigs; print the best as nf4.TUNED entries")
    p.add_argument("--tune-shapes", type=name_list, default=list(MODEL_SHAPES),
                   help="shapes to tune (default: what the server runs, qkv,o,gate_up,down)")
    p.add_argument("--tune-m", type=int_list, default=[1, 16], help="M values to tune (default 1,16)")
    p.add_argument("--tune-max", type=int, default=40, help="most configs tried per (shape, M)")
    p.add_argument("--tune-budget", type=float, default=360, help="seconds of tuning before the rest is skipped")
    p.add_argument("--out", help="also write the JSON here (rewritten after every shape)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.device = "cuda" if cuda else "cpu"
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    args.calls = max(1, args.calls or (2 if args.tiny else 32))
    args.reps = max(1, args.reps or (1 if args.tiny and not cuda else 10 if cuda else 3))
    args.copy_mib = args.copy_mib or (1024 if cuda else 64)
    if args.tol is None:
        args.tol = 1e-4 if args.torch_dtype == torch.float32 and not cuda else 1e-2
    return args


def environment(cuda: bool) -> dict[str, Any]:
    import bitsandbytes
    import triton

    env: dict[str, Any] = {"torch": torch.__version__, "triton": triton.__version__,
                           "bitsandbytes": bitsandbytes.__version__,
                           "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, sm_count=props.multi_processor_count,
                   l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
                   memory_gib=round(props.total_memory / 2**30, 1), capability=list(torch.cuda.get_device_capability()))
    else:
        env.update(device=f"cpu ({torch.get_num_threads()} threads)", sm_count=nf4.sm_count(torch.device("cpu")))
    return env


def summarize(out: dict[str, Any]) -> dict[str, Any]:
    checks, speedups, rows = [], {}, []
    for name, sh in out["shapes"].items():
        for m, r in sh.get("m", {}).items():
            checks.append(r["pass"])
            speedups.setdefault(m, []).append(r["speedup"])
            rows.append(f"{name:8s} M={m:>3s} ours {r['ours']['us']:9.2f} us {r['ours']['tb_s']:6.3f} TB/s | "
                        f"bnb {r['bnb']['us']:9.2f} us | x{r['speedup']:.2f} | rel err {r['max_rel_err']:.1e}"
                        f"{'' if r['pass'] else ' FAIL'}")
    geo = {m: sig(math.exp(statistics.mean(math.log(v) for v in vals))) for m, vals in speedups.items()
           if all(v > 0 for v in vals)}
    return {"all_pass": bool(checks) and all(checks), "checks": len(checks), "speedup_geomean_by_m": geo,
            "table": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    started = time.monotonic()
    args = parse_args(argv)
    cuda = args.device == "cuda"
    clock = Clock(cuda, not args.no_graphs, args.reps)
    out: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "torch_dtype"}, "errors": {}}

    def emit(final: bool = False) -> None:
        out["elapsed_s"] = round(time.monotonic() - started, 1)
        text = json.dumps(out, indent=1, default=str)
        if args.out:
            Path(args.out).write_text(text)
        if final:
            print(text, flush=True)

    def section(name: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # keep the other shapes' figures
            out["errors"][name] = f"{type(exc).__name__}: {exc}"[:500]
            log(f"{name} failed:\n{traceback.format_exc()}")
            return None

    out["env"] = section("env", lambda: environment(cuda)) or {}
    sm = out["env"].get("sm_count") or 4
    why = nf4.triton_available()
    if why is not None:
        out["errors"]["triton"] = why
    if not cuda and not args.tiny:
        log("no CUDA: Qwen2.5-14B shapes through Triton's interpreter take very long (--tiny is the CPU dry run)")
    log(f"device {out['env'].get('device')}, {args.dtype} activations; bandwidth reference ({args.copy_mib} MiB)")
    out["reference"] = section("reference", lambda: reference_bandwidth(cuda, args.copy_mib, 5 if cuda else 1))
    if cuda:
        torch.cuda.empty_cache()
    if out["reference"]:
        log(f"reference: copy {out['reference']['copy_tb_s']} TB/s (read+write), read {out['reference']['read_tb_s']}"
            " TB/s")
    table = shape_table(DIMS["tiny" if args.tiny else "14b"])
    out["shapes"], tune_entries = {}, []
    if args.tune:
        out["tune"] = {}
    tune_deadline = math.inf
    tuned_keys: set[tuple[Any, ...]] = set()
    rotate = args.rotate_mib * 2**20 if cuda else 0
    for name in SHAPE_NAMES:
        bench, tune = name in args.shapes, args.tune and name in args.tune_shapes
        if not (bench or tune):
            continue
        parts = table[name]
        t0 = time.monotonic()
        s = section(name, lambda: build_shape(name, parts, args.torch_dtype, args.device, rotate, args.copies))
        if s is None:
            emit()
            continue
        entry = out["shapes"][name] = {"n": s.n, "k": s.k, "parts": [list(p) for p in parts],
                                       "bias": parts[0][0] in BIASED, "weight_bytes": s.bytes,
                                       "copies": len(s.copies), "build_s": round(time.monotonic() - t0, 2)}
        log(f"{name} [{s.n}, {s.k}]: {s.bytes / 2**20:.1f} MiB NF4, {len(s.copies)} copies")
        if bench:
            entry["m"] = {}
            for m in args.m:
                r = section(f"{name}/m={m}", lambda: bench_m(s, m, args, clock))
                if r is not None:
                    entry["m"][str(m)] = r
                    log(f"  M={m:<3d} ours {r['ours']['us']:8.2f} us {r['ours']['tb_s']:.3f} TB/s  "
                        f"bnb {r['bnb']['us']:8.2f} us  x{r['speedup']:.2f}  rel err {r['max_rel_err']:.1e}"
                        f"{'' if r['pass'] else '  FAIL'}  [{cfg_str(nf4.KernelConfig(**r['config']))}]")
        if tune:
            if tune_deadline == math.inf:
                tune_deadline = time.monotonic() + args.tune_budget
            tune_out = out["tune"].setdefault(name, {})
            for m in args.tune_m:
                key = tuned_key(m, s.n, s.k)
                if key in tuned_keys:
                    tune_out[str(m)] = {"key": list(key), "same_key_as": "an earlier shape or M"}
                    continue
                log(f"  tuning {name} M={m} {key}")
                r = section(f"tune/{name}/m={m}", lambda: tune_m(s, m, args, clock, sm, tune_deadline))
                if r is not None:
                    r["shape"] = name
                    tuned_keys.add(key)
                    tune_out[str(m)] = r
                    tune_entries.append(r)
                    log(f"  best {cfg_str(nf4.KernelConfig(**r['best']))}: {r['us']} us {r['tb_s']} TB/s "
                        f"(current {r['current_us']} us; {r['tried']} tried, {len(r['failed'])} failed)")
        s = None  # free this shape's weights before the next
        if cuda:
            torch.cuda.empty_cache()
        emit()
    out["summary"] = summarize(out)
    if args.tune:
        out["tuned_literal"] = tuned_literal(tune_entries)
        log("best configs, to paste into nf4.TUNED:\n" + out["tuned_literal"])
    log(f"done in {time.monotonic() - started:.0f} s; all checks pass: {out['summary']['all_pass']}; "
        f"errors: {sorted(out['errors'])}")
    emit(final=True)
    return out


if __name__ == "__main__":
    main()
