"""Smoke test of scripts/bench.py on the CPU with a tiny config: it runs every section and reports figures.
No speed is asserted here (CI machines are noisy); the targets live in the benchmark's JSON."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import REPO_ROOT


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", REPO_ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_runs_every_section_on_the_cpu(tmp_path):
    bench = load_bench()
    out = bench.main(["--size", "tiny", "--streams", "1,3", "--prompt-len", "40", "--new-tokens", "12",
                      "--followup-context", "150", "--followup-new", "20", "--baseline-requests", "1",
                      "--server", "--server-streams", "2", "--engine-process", "both", "--threads", "1",
                      "--out", str(tmp_path / "b.json")])
    assert out["errors"] == {}
    assert set(out["engine"]) == {"1", "3"}
    for n, run in out["engine"].items():
        assert run["streams"] == int(n) and run["aggregate_tok_s"] > 0 and run["ttft_p99_ms"] >= run["ttft_p50_ms"]
        assert run["seed_design"]["aggregate_tok_s"] > 0 and run["aggregate_vs_seed"] > 0
    follow = out["followup"]
    assert follow["cached_tokens_warm"] >= 150  # the first turn's prompt and output came from the warm cache
    server = out["server"]
    assert server["streams"] == [2] and server["ws_tpot_p50_ms"] > 0
    for placement in ("engine_process_on", "engine_process_off"):  # the engine in its own process, and on a thread
        point = server[placement]["points"]["2"]
        assert point["ws"]["tokens"] == 2 * 12 and point["event_loop_us_per_token"] > 0
        assert point["engine_host_ms_per_step"]["direct"] > 0 and point["engine_host_ms_per_step"]["streaming"] > 0
        assert point["itl_ms"]["e2e_tpot_p50"] > 0 and point["host_ratio"] > 0
    assert (tmp_path / "b.json").read_text().startswith("{")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the real thing: make bench")
def test_bench_compares_both_nf4_paths_in_one_run():
    """The GPU benchmark's NF4 flow, dry-run on the CPU: bitsandbytes' kernels, then ours (interpreted) on the
    same weights, and the ratio between them."""
    pytest.importorskip("triton")  # interpreted: tests/conftest.py sets TRITON_INTERPRET=1 without a GPU
    out = load_bench().main(["--size", "tiny", "--nf4-on-cpu", "--streams", "2", "--prompt-len", "16",
                             "--new-tokens", "4", "--followup-context", "0", "--baseline-requests", "0",
                             "--threads", "1"])
    assert out["errors"] == {} and out["nf4_kernels"] == ["bnb", "triton"]
    for kernel in ("bnb", "triton"):
        assert out["by_nf4_kernel"][kernel]["engine"]["2"]["aggregate_tok_s"] > 0
    by = out["by_nf4_kernel"]
    assert out["triton_vs_bnb"] == {"2": round(by["triton"]["engine"]["2"]["aggregate_tok_s"]
                                              / by["bnb"]["engine"]["2"]["aggregate_tok_s"], 2)}


def test_a_timed_run_that_compiles_is_refused(monkeypatch):
    """A kernel compile or graph capture inside a timed run would be reported as serving speed: the benchmark
    refuses such a figure (an error names why) instead of printing it."""
    bench = load_bench()
    events = iter(range(1000))  # every look at the counter sees a new compile
    monkeypatch.setattr(bench, "compile_events", lambda engine: next(events))
    out = bench.main(["--size", "tiny", "--streams", "1", "--prompt-len", "16", "--new-tokens", "4",
                      "--followup-context", "0", "--baseline-requests", "0", "--threads", "1"])
    assert out["errors"]["engine"].startswith("CompiledWhileTimed")
    assert "1" not in out.get("engine", {})


def test_context_sweep_reports_decode_points_and_inter_token_latency():
    """``--context-sweep`` on the CPU (reference attention; paged needs CUDA or the interpreter): every point has its
    figures or says why it was skipped, and both step shapes report inter-token latency while prompts arrive."""
    out = load_bench().main(["--size", "tiny", "--context-sweep", "--threads", "1", "--sweep-batches", "1,4",
                             "--sweep-contexts", "100,1000", "--sweep-steps", "3", "--itl-streams", "3",
                             "--itl-prompts", "2", "--itl-prompt-len", "200", "--itl-context", "50",
                             "--max-step-tokens", "40", "--itl-step-tokens", "20,40", "--prefill-chunk", "128"])
    assert out["errors"] == {}
    sweep = out["context_sweep"]
    ref = sweep["decode"]["reference"]
    assert [(p["batch"], p["context"]) for p in ref["points"]] == [(1, 100), (1, 1000), (4, 100), (4, 1000)]
    for p in ref["points"]:
        assert p["tok_s"] > 0 and 0 < p["host_ms_per_step"] < p["ms_per_step"] and p["attention_vs_weights"] > 0
    assert set(sweep["itl"]) == {"mixed_20", "mixed_40", "alternating"}
    mixed, alternating = sweep["itl"]["mixed_20"], sweep["itl"]["alternating"]
    assert mixed["steps_by_kind"].get("mixed", 0) > 0 and "prefill" not in mixed["steps_by_kind"]
    assert mixed["steps"] > sweep["itl"]["mixed_40"]["steps"]  # a smaller budget: more, shorter steps
    assert alternating["steps_by_kind"]["prefill"] > 0 and "mixed" not in alternating["steps_by_kind"]
    for run in (mixed, alternating):
        assert run["itl_p99_ms"] >= run["itl_p50_ms"] > 0 and len(run["ttft_ms"]) == 2
    # each window's prompts are new (none served from the prefix cache of an earlier window): 400 prompt tokens
    # take at least 400 / 128 prefill steps alternating, 400 / (40 - 3) mixed at budget 40
    assert alternating["steps_by_kind"]["prefill"] >= 4 and sweep["itl"]["mixed_40"]["steps"] >= 11
    assert "itl_p99_over_p50_mixed_20" in sweep["targets"]
