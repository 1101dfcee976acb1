"""Smoke test of scripts/bench_nf4.py on the CPU: tiny shapes through Triton's interpreter, in-process.
Correctness flags and the JSON's layout are asserted, never speed (the interpreter is not a GPU)."""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():  # before engine.nf4 / Triton are imported (as tests/test_nf4.py does)
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("bitsandbytes")

from conftest import REPO_ROOT  # noqa: E402
from engine import nf4  # noqa: E402

pytestmark = pytest.mark.skipif(nf4.triton_available() is not None,
                                reason=f"Triton kernels cannot run here: {nf4.triton_available()}")


@pytest.fixture(scope="module")
def bench_nf4():
    spec = importlib.util.spec_from_file_location("bench_nf4", REPO_ROOT / "scripts" / "bench_nf4.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_nf4"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_tiny_run_checks_and_times_every_shape_and_m(bench_nf4, tmp_path, capsys):
    out = bench_nf4.main(["--tiny", "--shapes", "qkv,down", "--m", "1,5", "--out", str(tmp_path / "n.json")])
    assert out["errors"] == {}
    assert json.loads(capsys.readouterr().out) == json.loads((tmp_path / "n.json").read_text())
    assert set(out["shapes"]) == {"qkv", "down"}
    qkv, down = out["shapes"]["qkv"], out["shapes"]["down"]
    assert (qkv["n"], qkv["k"], len(qkv["parts"]), qkv["bias"]) == (384, 256, 3, True)  # fused q/k/v, with biases
    assert (down["n"], down["k"], down["bias"]) == (256, 384, False)
    for shape in (qkv, down):
        # codes, one uint8 absmax per 64 and one float32 absmax2 per 256 blocks of each part
        assert shape["weight_bytes"] == sum(n * k // 2 + n * k // 64 + 4 * -(-n * k // 64 // 256)
                                            for _, n, k in shape["parts"])
        assert set(shape["m"]) == {"1", "5"}
        for m, r in shape["m"].items():
            assert r["pass"] and r["max_rel_err"] < 1e-4 and r["bnb_max_rel_err"] < 1e-4
            assert r["config"]["block_m"] == (0 if m == "1" else 16)
            for side in ("ours", "bnb"):
                assert r[side]["us"] > 0 and r[side]["eager_us"] > 0 and r[side]["tb_s"] > 0
                assert r[side]["graph_us"] is None  # no CUDA graphs on the CPU
            assert r["speedup"] > 0
    assert out["summary"]["all_pass"] and out["summary"]["checks"] == 4
    ref = out["reference"]
    assert ref["copy_tb_s"] > 0 and ref["read_tb_s"] > 0


def test_tune_prints_configs_to_paste_into_nf4_tuned(bench_nf4):
    out = bench_nf4.main(["--tiny", "--shapes", "qkv", "--m", "1", "--tune", "--tune-shapes", "qkv,down",
                          "--tune-m", "1,5", "--tune-max", "2", "--calls", "1"])
    assert out["errors"] == {}
    assert "m" not in out["shapes"]["down"]  # built for tuning only
    tuned = eval(out["tuned_literal"], {"KernelConfig": nf4.KernelConfig})  # noqa: S307 (our own output)
    assert set(tuned) == {("gemv", 384, 256, 1), ("gemm", 384, 256, 16), ("gemv", 256, 384, 1),
                          ("gemm", 256, 384, 16)}
    for (kind, n, k, bucket), cfg in tuned.items():
        assert isinstance(cfg, nf4.KernelConfig) and k % cfg.block_k == 0
        assert (cfg.block_m == 0) == (kind == "gemv")
    entry = out["tune"]["qkv"]["1"]
    assert entry["tried"] == 2 and entry["us"] > 0 and entry["tb_s"] > 0 and entry["current_us"] >= entry["us"]
    assert entry["best"] == vars(tuned[("gemv", 384, 256, 1)])


def test_a_failing_shape_or_config_is_recorded_and_the_run_goes_on(bench_nf4, monkeypatch):
    build = bench_nf4.build_shape

    def broken(name, *a, **kw):
        if name == "down":
            raise RuntimeError("no memory for down")
        return build(name, *a, **kw)

    monkeypatch.setattr(bench_nf4, "build_shape", broken)
    # a tile Triton refuses (tl.arange needs a power of two) among the configs tuned
    monkeypatch.setattr(bench_nf4, "stage1", lambda *a: [nf4.KernelConfig(0, 24, 64, 1)])
    out = bench_nf4.main(["--tiny", "--shapes", "o,down", "--m", "1", "--tune", "--tune-shapes", "o",
                          "--tune-m", "1", "--tune-max", "3"])
    assert set(out["errors"]) == {"down"} and "no memory" in out["errors"]["down"]
    assert out["shapes"]["o"]["m"]["1"]["pass"]
    entry = out["tune"]["o"]["1"]
    assert list(entry["failed"]) == ["bm0 bn24 bk64 split1 w4 st2"]
    assert entry["tried"] == 3 and entry["best"]["block_n"] == entry["current"]["block_n"]  # not the failed one
