"""scripts/gpu_check.sh, the one prepared command for a GPU window: its default steps fit one 10-minute device
command, and it runs end to end on the CPU (a dry run on tiny shapes), so the first GPU run measures."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


def run_check(tmp_path, **env):
    full = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO_ROOT, env=full, capture_output=True, text=True,
                          timeout=900)


def test_default_steps_fit_one_device_command(tmp_path):
    proc = run_check(tmp_path, PLAN_ONLY="1")
    assert proc.returncode == 0, proc.stderr
    budget = re.search(r"steps: (.*); time budget (\d+) s in all", proc.stdout)
    assert budget, proc.stdout
    assert budget.group(1).split() == ["imports", "tests", "nf4", "bench"]
    assert int(budget.group(2)) <= 540  # a device command runs at most 600 s; the rest copies results back


@pytest.mark.slow
def test_dry_run_on_the_cpu_reports_json(tmp_path):
    proc = run_check(tmp_path, STEPS="imports bench")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "dry run" in proc.stdout and "imports exit 0" in proc.stdout and "bench exit 0" in proc.stdout
    assert json.loads((tmp_path / "imports.json").read_text())["imports"] == "ok"
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["errors"] == {} and bench["nf4_kernels"] == ["bnb", "triton"]


def test_engine_ii_steps_fit_one_device_command(tmp_path):
    proc = run_check(tmp_path, PLAN_ONLY="1", STEPS="imports attention sweep")
    assert proc.returncode == 0, proc.stderr
    budget = re.search(r"steps: (.*); time budget (\d+) s in all", proc.stdout)
    assert budget and int(budget.group(2)) <= 540, proc.stdout


@pytest.mark.slow
def test_engine_ii_dry_run_on_the_cpu_reports_json(tmp_path):
    """The attention kernels' tests and the context sweep, end to end on the CPU (kernels interpreted)."""
    proc = run_check(tmp_path, STEPS="attention sweep")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "attention tests exit 0" in proc.stdout and "sweep exit 0" in proc.stdout
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert sweep["errors"] == {}
    assert set(sweep["context_sweep"]["decode"]) == {"paged", "reference"}
    assert set(sweep["context_sweep"]["itl"]) == {"mixed_16", "mixed_64", "alternating"}


def test_token_path_steps_fit_one_device_command(tmp_path):
    proc = run_check(tmp_path, PLAN_ONLY="1", STEPS="imports server")
    assert proc.returncode == 0, proc.stderr
    budget = re.search(r"steps: (.*); time budget (\d+) s in all", proc.stdout)
    assert budget and int(budget.group(2)) <= 540, proc.stdout


@pytest.mark.slow
def test_token_path_dry_run_on_the_cpu_reports_json(tmp_path):
    """bench --server-only through gpu_check.sh on the CPU: the engine process builds the model, the figures come."""
    proc = run_check(tmp_path, STEPS="server")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "server exit 0" in proc.stdout
    server = json.loads((tmp_path / "server.json").read_text())
    assert server["errors"] == {}
    points = server["server"]["engine_process_on"]["points"]
    assert set(points) == {"1", "4"}
    for p in points.values():
        assert p["event_loop_us_per_token"] > 0 and p["host_ratio"] > 0 and p["ws"]["tokens"] == 24 * p["streams"]


def test_structured_outputs_step_runs_on_the_cpu_and_fits_beside_bench(tmp_path):
    """The optional "structured" step: masks per decode step against the bench's; with imports and bench it fits
    one device command."""
    plan = run_check(tmp_path, PLAN_ONLY="1", STEPS="imports bench structured")
    budget = re.search(r"steps: (.*); time budget (\d+) s in all", plan.stdout)
    assert budget and int(budget.group(2)) <= 540, plan.stdout
    (tmp_path / "bench.json").write_text(json.dumps({"engine": {"32": {"tpot_p50_ms": 40.0}}}))
    proc = run_check(tmp_path, STEPS="structured", STRUCTURED_ARGS="--rows 1,8")
    assert proc.returncode == 0 and "structured exit 0" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "structured.json").read_text())
    assert set(report["per_step"]) == {"1", "8"} and report["share_of_decode_step"]["decode_step_ms"] == 40.0
