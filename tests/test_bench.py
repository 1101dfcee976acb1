"""Smoke test of scripts/bench.py on the CPU with a tiny config: it runs every section and reports figures.
No speed is asserted here (CI machines are noisy); the targets live in the benchmark's JSON."""
from __future__ import annotations

import importlib.util

from conftest import REPO_ROOT


def test_bench_runs_every_section_on_the_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("bench", REPO_ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--size", "tiny", "--streams", "1,3", "--prompt-len", "40", "--new-tokens", "12",
                      "--followup-context", "150", "--followup-new", "20", "--baseline-requests", "1",
                      "--server", "--server-streams", "2", "--threads", "1", "--out", str(tmp_path / "b.json")])
    assert out["errors"] == {}
    assert set(out["engine"]) == {"1", "3"}
    for n, run in out["engine"].items():
        assert run["streams"] == int(n) and run["aggregate_tok_s"] > 0 and run["ttft_p99_ms"] >= run["ttft_p50_ms"]
        assert run["seed_design"]["aggregate_tok_s"] > 0 and run["aggregate_vs_seed"] > 0
    follow = out["followup"]
    assert follow["cached_tokens_warm"] >= 150  # the first turn's prompt and output came from the warm cache
    assert out["server"]["streams"] == 2 and out["server"]["ws_tpot_p50_ms"] > 0
    assert (tmp_path / "b.json").read_text().startswith("{")
