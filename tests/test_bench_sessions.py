"""scripts/bench_sessions.py runs end to end (small counts) and prints its benchmark line: the session store's
write latency per turn on SQLite and a real redis-server, and the resume latency of a dropped stream."""
from __future__ import annotations

import importlib.util
import sys

from conftest import REPO_ROOT
from services import require


def test_bench_sessions_prints_its_line(capsys, tmp_path):
    require("redis-server")
    spec = importlib.util.spec_from_file_location("bench_sessions", REPO_ROOT / "scripts" / "bench_sessions.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_sessions"] = bench
    spec.loader.exec_module(bench)
    out = bench.main(["--sessions", "4", "--turns", "3", "--resume", "2", "--out", str(tmp_path / "b.json")])
    line = capsys.readouterr().out
    assert "store write per turn: sqlite p50" in line and "redis p50" in line and "resume p50" in line
    for store in ("sqlite", "redis"):
        assert out[store]["writes"] == 12 and 0 < out[store]["p50_ms"] <= out[store]["p99_ms"]
    assert out["resume"]["trials"] == 2 and 0 < out["resume"]["p50_ms"] <= out["resume"]["resumed_p50_ms"] * 1.0001
    print(line)
