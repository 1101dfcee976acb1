"""scripts/bench_structured.py runs on the CPU and reports what the README and the issue ask for."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO_ROOT


def test_bench_structured_reports_compile_times_and_per_step_costs(tmp_path):
    out = tmp_path / "structured.json"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "bench_structured.py"), "--vocab", "2000",
                           "--cache", str(tmp_path), "--steps", "6", "--rows", "1,8,32", "--decode-step-ms", "50",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(proc.stdout) == report
    assert report["vocab"] == 2000 and report["mask_width"] == 2048
    assert set(report["compile_ms"]) == {"1", "8", "32", "128"} and all(v > 0 for v in report["compile_ms"].values())
    assert set(report["per_step"]) == {"1", "8", "32"}
    for rows in report["per_step"].values():
        for state in ("in_call", "free_text"):
            assert {"fill_ms", "apply_ms", "advance_ms"} <= set(rows[state]) and rows[state]["fill_ms"] >= 0
    share = report["share_of_decode_step"]
    assert share["decode_step_ms"] == 50 and 0 <= share["share"] == round(share["mask_cost_ms"] / 50, 4)
