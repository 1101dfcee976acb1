"""Benchmark structured outputs: what grammars cost per request and per decode step.

    python scripts/bench_structured.py                          # Qwen-sized vocabulary (trained once, cached)
    python scripts/bench_structured.py --tokenizer ./Qwen2.5-14B-Instruct   # the real tokenizer
    python scripts/bench_structured.py --vocab 8000 --steps 20  # quick (CI)

Prints one JSON object on stdout (progress on stderr):
- ``compile_ms``: compiling the tool-call grammar for 1, 8, 32 and 128 tools (the server's schema set, renamed
  copies beyond it), cache off;
- ``per_step`` at 1, 8 and 32 constrained rows: ``fill_ms`` (the CPU computing the masks; the engine does it while
  the device runs the step, so only what exceeds the step counts), ``apply_ms`` (copy to the device, unpack, mask
  the logits [rows, 152064]: on the critical path), ``advance_ms`` (the matchers taking the sampled tokens);
  medians and p90 over random walks through tool calls (the call already opened: the costly part of a lazy
  grammar), and the same for rows in free text before any call;
- with ``--decode-step-ms`` (a decode step of the model at 32 rows, e.g. from scripts/bench.py), the masks' share
  of a step: ``max(0, fill - decode) + apply + advance`` over ``decode``. Target: <= 10 % at 32 rows on the 14B.

Without ``--tokenizer`` a byte-level BPE of Qwen2.5's size (151,665 tokens with its added tokens) is trained on the
Python standard library's source, as the test fixture's tokenizer is (about a minute on 2 cores), and cached.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from engine.structured import GrammarTokenizer, MaskBatch, masked_logits, unpack_bitmask  # noqa: E402
from grammars import GrammarCompiler, ResponseFormat, ToolChoice, ToolSpec  # noqa: E402
from schema_cases import SCHEMAS, WEATHER  # noqa: E402

QWEN_VOCAB, QWEN_LOGITS = 151_665, 152_064


def log(msg: str) -> None:
    print(f"[bench_structured {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def trained_tokenizer(vocab: int, cache: Path) -> Path:
    """A Qwen2-style byte-level BPE of ``vocab`` tokens trained on the standard library's source (cached)."""
    import make_tiny_model as m

    out = cache / f"bpe-{vocab}"
    if (out / "tokenizer.json").exists():
        return out
    stdlib = Path(os.path.dirname(os.__file__))

    def corpus(limit: int = max(4_000_000, vocab * 1_100)):  # ~160M characters for 151,665 tokens
        total = 0
        for path in sorted(stdlib.rglob("*.py")):
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            yield text
            total += len(text)
            if total > limit:
                break
        for _ in range(200):
            yield m._MULTILINGUAL_SAMPLE

    started = time.perf_counter()
    tokenizer = m.train_tokenizer(vocab, corpus())
    out.mkdir(parents=True, exist_ok=True)
    m.save_tokenizer(tokenizer, out, model_max_length=32768)
    log(f"trained a {tokenizer.get_vocab_size(with_added_tokens=True)}-token BPE in "
        f"{time.perf_counter() - started:.0f} s -> {out}")
    return out


def tool_set(n: int) -> list[ToolSpec]:
    base = [ToolSpec("get_weather", WEATHER), *(ToolSpec(k, v) for k, v in SCHEMAS.items())]
    return [base[i] if i < len(base) else ToolSpec(f"{base[i % len(base)].name}_{i}", base[i % len(base)].parameters)
            for i in range(n)]


def ms(values: list[float], q: float = 0.5) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 3)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def walk(grammar: Any, tokenizer: GrammarTokenizer, rows: int, steps: int, device: torch.device, open_call: bool,
         threads: int, seed: int) -> dict[str, Any]:
    """``steps`` decode steps of ``rows`` matchers drawing random allowed tokens; a row whose grammar ends starts
    over. Times the fill, the device-side application and the advance of each step."""
    rng = random.Random(seed)
    masks = MaskBatch(tokenizer.vocab_size, rows, device, threads=threads)
    logits = torch.randn(rows, tokenizer.vocab_size, device=device)
    open_id = tokenizer.special_token("<tool_call>")
    stops = tokenizer.stop_token_ids

    def fresh():
        m = grammar.matcher()
        if open_call:
            assert m.accept(open_id)
        return m

    matchers = [fresh() for _ in range(rows)]
    fill, apply, advance = [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        bitmask = masks.fill(matchers)
        t1 = time.perf_counter()
        sync(device)
        t2 = time.perf_counter()
        masked = masked_logits(logits, bitmask)
        sync(device)
        t3 = time.perf_counter()
        allowed = unpack_bitmask(bitmask, tokenizer.vocab_size).cpu()
        picks = []
        for i in range(rows):
            ids = allowed[i].nonzero().flatten()
            choices = [t for t in ids[torch.randperm(len(ids))[:8]].tolist() if t not in stops] or ids.tolist()
            picks.append(rng.choice(choices))
        t4 = time.perf_counter()
        for i, token in enumerate(picks):
            if not matchers[i].accept(token) or matchers[i].done or (not open_call and token == open_id):
                matchers[i] = fresh()
        t5 = time.perf_counter()
        fill.append(t1 - t0)
        apply.append(t3 - t2)
        advance.append(t5 - t4)
        del masked
    return {"fill_ms": ms(fill), "fill_p90_ms": ms(fill, 0.9), "apply_ms": ms(apply), "apply_p90_ms": ms(apply, 0.9),
            "advance_ms": ms(advance), "advance_p90_ms": ms(advance, 0.9)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", help="a tokenizer directory (default: train a BPE of --vocab tokens)")
    ap.add_argument("--vocab", type=int, default=QWEN_VOCAB, help="tokens of the trained BPE (with added tokens)")
    ap.add_argument("--logits", type=int, default=0, help="mask width (default: Qwen's 152064, or the vocab)")
    ap.add_argument("--cache", default="/tmp/bench-structured", help="where the trained BPE is kept")
    ap.add_argument("--rows", default="1,8,32")
    ap.add_argument("--steps", type=int, default=60, help="decode steps per measurement")
    ap.add_argument("--threads", type=int, default=None, help="llguidance's mask threads (default: the engine's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--decode-step-ms", type=float, default=0.0, help="a decode step at the largest row count")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    from transformers import AutoTokenizer

    path = Path(args.tokenizer) if args.tokenizer else trained_tokenizer(args.vocab, Path(args.cache))
    hf = AutoTokenizer.from_pretrained(path)
    width = args.logits or (QWEN_LOGITS if len(hf) == QWEN_VOCAB else (len(hf) + 63) // 64 * 64)
    stops = [hf.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    started = time.perf_counter()
    tokenizer = GrammarTokenizer(hf, width, stops)
    report: dict[str, Any] = {"tokenizer": str(path), "vocab": len(hf), "mask_width": width,
                              "device": str(args.device), "cpus": os.cpu_count(),
                              "tokenizer_init_s": round(time.perf_counter() - started, 2), "compile_ms": {}}
    log(f"{len(hf)} tokens, masks {width} wide, grammar tokenizer in {report['tokenizer_init_s']} s")
    for n in (1, 8, 32, 128):
        compiler = GrammarCompiler(tokenizer, cache_size=0)
        t = time.perf_counter()
        compiler.compile(tool_set(n), ToolChoice(), ResponseFormat())
        report["compile_ms"][n] = round((time.perf_counter() - t) * 1000, 1)
    grammar = GrammarCompiler(tokenizer).compile(tool_set(8), ToolChoice(), ResponseFormat())
    device = torch.device(args.device)
    report["per_step"] = {}
    for rows in [int(r) for r in args.rows.split(",")]:
        log(f"{rows} rows")
        in_call = walk(grammar, tokenizer, rows, args.steps, device, True, args.threads, rows)
        free = walk(grammar, tokenizer, rows, max(12, args.steps // 3), device, False, args.threads, rows + 1)
        report["per_step"][rows] = {"in_call": in_call, "free_text": free}
    if args.decode_step_ms:
        top = report["per_step"][max(report["per_step"])]["in_call"]
        cost = max(0.0, top["fill_ms"] - args.decode_step_ms) + top["apply_ms"] + top["advance_ms"]
        report["share_of_decode_step"] = {"decode_step_ms": args.decode_step_ms, "mask_cost_ms": round(cost, 3),
                                          "share": round(cost / args.decode_step_ms, 4)}
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
