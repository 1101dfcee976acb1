"""The paged attention kernels (engine/attention_triton.py, launched by engine/attention.py) against the reference
path (gather + masked SDPA), and compiled for sm_90.

On the CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest before Triton is
imported) in float32, at small head sizes; on a GPU the same tests also run them compiled in bfloat16. Each case
scatters its sequences' blocks over a shuffled pool, leaves stale block ids beyond each row's real blocks, and
puts sequences in shuffled table rows, so a kernel that reads one token too many, or another row's blocks, fails.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from engine.attention import AttentionMetadata, KernelShapes, kernels_unavailable, paged_attention, reference_attention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_kernels = pytest.mark.skipif(kernels_unavailable(DEVICE) is not None,
                                   reason=f"attention kernels cannot run here: {kernels_unavailable(DEVICE)}")
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])  # the interpreter's bf16 dot is wrong


def random_step(contexts: list[int], query_lens: list[int], kv_heads: int, group: int, head_dim: int = 16,
                block_size: int = 16, seed: int = 0, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """q [T, H, D], one layer's K/V pool and the metadata of a step whose sequence i ends at ``contexts[i]``
    tokens with ``query_lens[i]`` of them new (one-token sequences first)."""
    g = torch.Generator().manual_seed(seed)
    nblocks = [-(-c // block_size) for c in contexts]
    pool_blocks = sum(nblocks) + 2
    order = (torch.randperm(pool_blocks - 1, generator=g) + 1).tolist()  # block 0 stays scratch
    width = max(nblocks) + 3
    rows = torch.randperm(len(contexts), generator=g)  # sequence i lives in table row rows[i]
    table = torch.zeros(len(contexts) + 1, width, dtype=torch.long)
    used = 0
    for i, n in enumerate(nblocks):
        table[rows[i], :n] = torch.tensor(order[used:used + n])
        table[rows[i], n:] = torch.tensor(order[:width - n])  # stale entries: real blocks of other rows
        used += n
    k = torch.randn(pool_blocks * block_size, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(pool_blocks * block_size, kv_heads, head_dim, generator=g).to(dtype)
    q = torch.randn(sum(query_lens), kv_heads * group, head_dim, generator=g).to(dtype)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    num_decode = next((i for i, n in enumerate(query_lens) if n != 1), len(query_lens))
    t = lambda x: torch.tensor(x, dtype=torch.long, device=DEVICE)  # noqa: E731
    meta = AttentionMetadata("paged", block_size, table.to(DEVICE), rows.to(DEVICE), t(contexts), t(starts),
                             t([0] * starts[-1]), t([s - 1 for s in starts[1:]]), num_decode, list(query_lens))
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), meta


def check(contexts, query_lens, kv_heads, group, splits=0, dtype=torch.float32, head_dim=16, block_size=16,
          shapes: KernelShapes | None = None, seed=0) -> None:
    q, k, v, meta = random_step(contexts, query_lens, kv_heads, group, head_dim, block_size, seed, dtype)
    meta.decode_splits = splits
    scale = head_dim ** -0.5
    want = reference_attention(q.float(), k.float(), v.float(), meta, scale)
    got = paged_attention(q, k, v, meta, scale, **({"shapes": shapes} if shapes else {}))
    assert got.shape == q.shape and got.dtype == q.dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


# ---- decode: one query token per sequence ------------------------------------------------------------------------
DECODE_CASES = {
    "1x3000": [3000],
    "8-ragged-edges": [1, 15, 16, 17, 63, 64, 65, 1000],
    "3-mixed": [2999, 1, 129],
    "5-random": [733, 2048, 5, 1500, 300],
}


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [1, 4, 16], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("group", [1, 5, 7], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("case", sorted(DECODE_CASES))
def test_decode_kernel_matches_the_reference(case, group, splits, dtype):
    """Batches 1-8, contexts 1..3,000 around block edges, GQA groups 1/5/7, split-KV off (1 piece) and on: pieces
    are at least min_split (here 64) tokens, so short rows use fewer pieces than the launch has."""
    contexts = DECODE_CASES[case]
    check(contexts, [1] * len(contexts), kv_heads=2, group=group, splits=splits, dtype=dtype,
          shapes=KernelShapes(min_split=64), seed=len(contexts) * 10 + group)


@needs_kernels
def test_decode_splits_chosen_from_the_batch_and_the_gpu():
    from engine.attention import pick_decode_splits

    assert pick_decode_splits(1, 8, 132) == 64  # one long sequence: 8 KV heads x 64 pieces ~ 4 waves of 132 SMs
    assert pick_decode_splits(32, 8, 132) == 2
    assert pick_decode_splits(64, 8, 132) == 1
    check([2500, 40], [1, 1], kv_heads=2, group=5, splits=0)  # 0: the launcher picks


# ---- prefill: chunks continuing cached prefixes, packed with decodes ------------------------------------------------
PREFILL_CASES = {
    # (contexts after the step, query tokens): prefixes 0, 1, 15, 16, 17, 63, 64, 100, 1000, 2000 tokens
    "fresh-prompts": ([40, 17, 64], [40, 17, 64]),
    "short-prefixes": ([18, 33, 80], [17, 17, 16]),
    "long-prefixes": ([1100, 2065, 164], [100, 65, 100]),
    "decodes-then-chunks": ([300, 1, 77, 1200, 140], [1, 1, 13, 130, 140]),
    "one-token-chunks-at-the-end": ([500, 90, 64], [1, 2, 1]),
}


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [1, 5, 7], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("case", sorted(PREFILL_CASES))
def test_prefill_kernel_continues_cached_prefixes_of_any_length(case, group, dtype):
    contexts, query_lens = PREFILL_CASES[case]
    check(contexts, query_lens, kv_heads=2, group=group, dtype=dtype, shapes=KernelShapes(min_split=64),
          seed=sum(query_lens) + group)


@needs_kernels
def test_head_dim_that_is_not_a_power_of_two_and_large_blocks():
    check([70, 300], [70, 5], kv_heads=1, group=3, head_dim=24, block_size=64)
    check([700, 3], [1, 1], kv_heads=3, group=2, head_dim=24, block_size=64, splits=4)


@needs_kernels
def test_kernels_write_nothing_but_their_output():
    q, k, v, meta = random_step([300, 40, 90], [1, 40, 30], kv_heads=2, group=5)
    before = (q.clone(), k.clone(), v.clone(), meta.block_table.clone())
    paged_attention(q, k, v, meta, 0.25)
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v, meta.block_table)))


# ---- compiled for the GPU --------------------------------------------------------------------------------------------
COMPILE_SM90 = r'''
import json, pathlib, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from engine import attention_triton as kern
from engine.attention import SHAPES, _block

cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def usage(fn, sig, consts, warps, stages):
    sig = {**sig, **dict.fromkeys(consts, "constexpr")}
    names = list(sig)
    # what the JIT specializes at run time: 16-byte aligned pointers, strides that are multiples of 16
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items()
               if t.startswith("*") or n.startswith("stride") or n == "block_size"}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(c),): v for c, v in consts.items()}, attrs=aligned)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
    line = next(l for l in out.splitlines() if "REG:" in l)
    return {kv.split(":")[0]: int(kv.split(":")[1]) for kv in line.split()[:2]}


strides = dict.fromkeys(["stride_qt", "stride_qh", "stride_ks", "stride_kh", "stride_vs", "stride_vh", "stride_ot",
                         "stride_oh", "stride_table", "block_size"], "i32")
io = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", o_ptr="*bf16", table_ptr="*i64", rows_ptr="*i64",
          seq_lens_ptr="*i64")
results = {}
for name, g, d in json.loads(sys.argv[1]):
    for split in (True, False):
        sig = {**io, "part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", **strides, "min_split": "i32", "qk_scale": "fp32"}
        consts = dict(G=g, HEAD_DIM=d, BLOCK_H=_block(g), BLOCK_N=SHAPES.decode_block_n, BLOCK_D=_block(d),
                      SPLIT=split, PRECISION="tf32")
        results[f"decode {name} split={split}"] = usage(kern.decode_kernel, sig, consts, SHAPES.num_warps,
                                                        SHAPES.num_stages)
    sig = {**io, "qsl_ptr": "*i64", "first_seq": "i32", "num_seqs": "i32", **strides, "qk_scale": "fp32"}
    consts = dict(G=g, HEAD_DIM=d, BLOCK_M=max(SHAPES.prefill_block_m, _block(g)), BLOCK_N=SHAPES.prefill_block_n,
                  BLOCK_D=_block(d), PRECISION="tf32")
    results[f"prefill {name}"] = usage(kern.prefill_kernel, sig, consts, SHAPES.prefill_num_warps, SHAPES.num_stages)
    sig = dict(part_o_ptr="*fp32", part_lse_ptr="*fp32", o_ptr="*bf16", stride_ot="i32", stride_oh="i32",
               num_splits="i32")
    results[f"reduce {name}"] = usage(kern.reduce_kernel, sig, dict(HEAD_DIM=d, BLOCK_D=_block(d), BLOCK_S=64),
                                      SHAPES.num_warps, 1)
print(json.dumps(results))
'''


@pytest.mark.slow
def test_attention_kernels_compile_for_sm90_without_spills():
    """The kernels compile for an H100/H200 (sm_90, Triton's own ptxas, no GPU needed) with the launch constants
    the engine uses, for Qwen2.5-14B (GQA 5, head 128), Qwen2.5-0.5B (GQA 7, head 64) and plain MHA, and keep
    everything in registers (no local-memory stack)."""
    from conftest import REPO_ROOT

    pytest.importorskip("triton")
    models = [("14b", 5, 128), ("0.5b", 7, 64), ("mha", 1, 128)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(REPO_ROOT), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", COMPILE_SM90, json.dumps(models)], capture_output=True, text=True,
                          env=env, cwd=REPO_ROOT, timeout=300)
    if proc.returncode != 0 and "cuobjdump" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("this Triton wheel ships no cuobjdump")
    assert proc.returncode == 0, proc.stderr[-3000:]
    usage = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(usage))
    assert len(usage) == 4 * len(models)
    for kernel, res in usage.items():
        assert res["STACK"] == 0 and res["REG"] <= 255, (kernel, res)


# ---- the start-up self-check ----------------------------------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 16), (7, 1, 32)])
def test_self_check_passes_on_working_kernels_and_names_a_mismatch(heads, kv_heads, head_dim, monkeypatch):
    from engine import attention

    assert attention.self_check(heads, kv_heads, head_dim, 16, torch.float32, DEVICE) is None
    real = attention.paged_attention
    monkeypatch.setattr(attention, "paged_attention", lambda *a, **k: real(*a, **k) * 1.01)
    assert "self-check mismatch" in attention.self_check(heads, kv_heads, head_dim, 16, torch.float32, DEVICE)
    monkeypatch.setattr(attention, "paged_attention", lambda *a, **k: 1 / 0)
    assert "ZeroDivisionError" in attention.self_check(heads, kv_heads, head_dim, 16, torch.float32, DEVICE)


@needs_kernels
def test_engine_falls_back_to_the_reference_path_when_the_self_check_or_the_warm_up_fails(tiny_hf_model, monkeypatch,
                                                                                          caplog):
    """On CUDA the engine self-checks the kernels when it is built and compiles them when it starts; either failing
    leaves the server on the reference path with a log line, instead of serving from kernels that fail."""
    from engine import Engine, EngineConfig, core
    from engine.qwen2 import PagedQwen2

    caplog.set_level("INFO", logger="engine.core")
    config = EngineConfig(max_running=4, max_context=128, block_size=16, num_blocks=40, attention="paged",
                          static_decode=True)
    engine = Engine(PagedQwen2(tiny_hf_model), config)
    monkeypatch.setattr(core, "self_check", lambda *a: "self-check mismatch: max error 9")
    engine._verify_paged_attention()
    assert engine.attention == engine.runner.attention == "reference" and engine.runner.graphs.by_context
    assert "falling back to the reference path" in caplog.text and "max error 9" in caplog.text

    ok = Engine(PagedQwen2(tiny_hf_model), config)
    monkeypatch.setattr(core, "self_check", lambda *a: None)
    ok._verify_paged_attention()
    ok._warm_up()  # the real warm-up, interpreted
    assert ok.attention == "paged" and "self-check passed" in caplog.text

    def broken():
        raise RuntimeError("PTX compile failed")

    monkeypatch.setattr(ok.runner, "warm_up", broken)
    ok._warm_up()
    assert ok.attention == ok.runner.attention == "reference" and "PTX compile failed" in caplog.text
