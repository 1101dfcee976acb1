"""NF4 storage, fusion and the Triton kernels (engine/nf4.py, engine/nf4_triton.py) against bitsandbytes.

On the CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set here before Triton is
imported) at small sizes; on a GPU the same tests run them compiled, and ``tests/test_gpu.py`` adds the real
Qwen2.5-14B shapes. Every expected value comes from bitsandbytes itself (``dequantize_4bit``) or from the
NF4 table of the QLoRA paper, never from our own dequantizer.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

from engine import nf4  # noqa: E402
from engine.qwen2 import PagedQwen2  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(nf4.triton_available() is not None,
                                  reason=f"Triton kernels cannot run here: {nf4.triton_available()}")

# QLoRA (Dettmers et al. 2023), appendix E: the 16 NF4 values.
NF4_PAPER = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def linear4bit(n: int, k: int, *, bias: bool = True, nested: bool = True, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A bitsandbytes ``Linear4bit`` [n, k] quantized the way the server loads weights (NF4, blocks of 64)."""
    g = torch.Generator().manual_seed(seed)
    lin = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=dtype, quant_type="nf4", compress_statistics=nested)
    # rows with very different magnitudes, so that scales (and the nested blocks) really differ
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 0, n).view(-1, 1)
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=nested, blocksize=64)
    lin = lin.to(DEVICE)
    lin.support_avx512bf16_for_cpu = False  # else its first CPU forward repacks the weight into another layout
    if bias:
        lin.bias.data = (torch.randn(n, generator=g) * 0.1).to(DEVICE, dtype)
    return lin


def bnb_weight(lin: torch.nn.Module) -> torch.Tensor:
    return F.dequantize_4bit(lin.weight.data, lin.weight.quant_state).float()


def expected(x: torch.Tensor, lins: list[torch.nn.Module]) -> torch.Tensor:
    w = torch.cat([bnb_weight(m) for m in lins])
    b = torch.cat([m.bias.float() for m in lins]) if lins[0].bias is not None else 0
    return x.float() @ w.T + b


# ---- storage and the reference dequantizer ---------------------------------------------------------------------------
def test_bitsandbytes_nf4_table_is_the_papers():
    lin = linear4bit(16, 64)
    assert lin.weight.quant_state.code.tolist() == pytest.approx(NF4_PAPER, abs=1e-7)


def test_reference_dequantizer_knows_the_layout():
    """Hand-made storage: one row of 128 elements, two 64-blocks, known nibbles and scales."""
    codes = torch.tensor([(2 * i % 16) << 4 | (2 * i + 1) % 16 for i in range(64)], dtype=torch.uint8)
    w = nf4.NF4Weight(codes, torch.tensor([0.5, 2.0]), torch.zeros(0), torch.zeros(0), torch.zeros(256),
                      torch.tensor(NF4_PAPER), 1, 128)
    want = torch.tensor([NF4_PAPER[j % 16] * (0.5 if j < 64 else 2.0) for j in range(128)])
    assert torch.equal(w.dequantize()[0], want)  # element 2i: high nibble; 2i+1: low nibble


@pytest.mark.parametrize("n, k, nested", [(16, 64, True), (80, 256, True), (33, 192, True), (40, 128, False),
                                          (300, 320, True)])
def test_reference_dequantizer_matches_bitsandbytes_exactly(n, k, nested):
    # (80, 256): 320 blocks = one full and one partial nested block; (300, 320): 1500 blocks, 6 nested blocks
    lin = linear4bit(n, k, nested=nested)
    w = nf4.from_bnb(lin)
    assert w.nested is nested and (w.n, w.k) == (n, k)
    assert torch.equal(w.dequantize(), bnb_weight(lin))


def test_bitsandbytes_cpu_repack_is_refused():
    lin = linear4bit(16, 64)
    lin.support_avx512bf16_for_cpu = True
    lin(torch.randn(1, 64, device=DEVICE))
    if getattr(lin.weight.quant_state, "packing_format_for_cpu", False):
        assert not nf4.supported(lin)


def test_unsupported_layouts_are_refused():
    assert not nf4.supported(torch.nn.Linear(64, 64))
    lin = bnb.nn.Linear4bit(64, 64, quant_type="fp4")
    lin.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="fp4")
    assert not nf4.supported(lin.to(DEVICE))
    assert nf4.supported(linear4bit(16, 64))
    bf16_storage = linear4bit(16, 64)
    # bnb_4bit_quant_storage=bfloat16: the same bytes, two per element
    bf16_storage.weight.data = bf16_storage.weight.data.reshape(-1, 2).view(torch.bfloat16)
    assert not nf4.supported(bf16_storage)


# ---- fusion ----------------------------------------------------------------------------------------------------------
def test_fusion_keeps_every_value_and_does_not_grow_memory():
    # q/k/v-like parts whose 64-block counts are not multiples of 256: nested blocks straddle nothing
    parts = [linear4bit(80, 192, seed=1), linear4bit(24, 192, seed=2), linear4bit(24, 192, seed=3)]
    x = torch.randn(3, 192, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    before = [m(x).clone() for m in parts]
    want = torch.cat([bnb_weight(m) for m in parts])
    fused = nf4.fuse(parts)
    assert (fused.n, fused.k, fused.row_starts) == (128, 192, (0, 80, 104))
    assert fused.nested_starts == (0, 1, 2)  # 240, 72 and 72 blocks: one nested block each
    assert torch.equal(fused.dequantize(), want)
    assert torch.equal(fused.bias, torch.cat([m.bias for m in parts]))
    # the modules now read views of the fused buffers, and compute exactly what they did
    base = fused.codes.untyped_storage().data_ptr()
    for m, b in zip(parts, before):
        assert m.weight.data.untyped_storage().data_ptr() == base
        assert m.weight.quant_state.absmax.untyped_storage().data_ptr() == fused.absmax_q.untyped_storage().data_ptr()
        assert torch.equal(m(x), b)
    assert fused.codes.numel() == sum(m.weight.data.numel() for m in parts)


def test_fusion_with_several_nested_blocks_per_part():
    parts = [linear4bit(300, 320, seed=5), linear4bit(70, 320, seed=6)]  # 1500 + 350 blocks: 6 + 2 nested
    want = torch.cat([bnb_weight(m) for m in parts])
    fused = nf4.fuse(parts)
    assert fused.nested_starts == (0, 6)
    assert torch.equal(fused.dequantize(), want)


def test_fusion_refuses_mismatched_parts():
    with pytest.raises(ValueError, match="same K"):
        nf4.fuse([linear4bit(16, 64), linear4bit(16, 128)])
    with pytest.raises(ValueError, match="three"):
        nf4.fuse([linear4bit(16, 64, seed=i) for i in range(4)])


def test_fusion_without_double_quantization_re_points_the_scales_too():
    parts = [linear4bit(16, 64, nested=False, seed=1), linear4bit(8, 64, nested=False, seed=2)]
    want = torch.cat([bnb_weight(m) for m in parts])
    fused = nf4.fuse(parts)
    assert torch.equal(fused.dequantize(), want)
    for m in parts:
        assert m.weight.quant_state.absmax.untyped_storage().data_ptr() == fused.absmax_q.untyped_storage().data_ptr()


# ---- the kernels -----------------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 16, 33, 64])
def test_kernels_match_bitsandbytes_for_every_m(m):
    lin = linear4bit(96, 320, seed=m)  # K = 320: five 64-blocks, not a multiple of the 256-wide K tile
    x = torch.randn(m, 320, generator=torch.Generator().manual_seed(m)).to(DEVICE)
    got = nf4.nf4_matmul(x, nf4.from_bnb(lin))
    assert got.shape == (m, 96) and got.dtype == x.dtype
    torch.testing.assert_close(got.float(), expected(x, [lin]), rtol=1e-4, atol=1e-4)


@needs_triton
@pytest.mark.parametrize("cfg", [nf4.KernelConfig(0, 16, 64, 1), nf4.KernelConfig(0, 32, 128, 3),
                                 nf4.KernelConfig(0, 64, 256, 2), nf4.KernelConfig(16, 16, 64, 1),
                                 nf4.KernelConfig(16, 32, 128, 4), nf4.KernelConfig(32, 64, 256, 2)],
                         ids=str)
def test_every_kernel_config_on_a_fused_weight(cfg):
    """GEMV and tensor-core paths, split-K or not, tiles that straddle the fused parts and the edges."""
    parts = [linear4bit(80, 384, seed=7), linear4bit(24, 384, seed=8), linear4bit(24, 384, seed=9)]
    want_w = torch.cat([bnb_weight(m) for m in parts])
    bias = torch.cat([m.bias.float() for m in parts])
    fused = nf4.fuse(parts)
    for m in (1, 3, 4) if cfg.block_m == 0 else (1, 5, 17):
        x = torch.randn(m, 384, generator=torch.Generator().manual_seed(m)).to(DEVICE)
        torch.testing.assert_close(nf4.nf4_matmul(x, fused, cfg).float(), x @ want_w.T + bias, rtol=1e-4, atol=1e-4)
        assert not fused.locks.any()  # split-K counters re-armed for the next call (and the next graph replay)


@needs_triton
def test_kernels_without_bias_nesting_or_contiguity():
    lin = linear4bit(40, 128, bias=False, nested=False)
    x = torch.randn(6, 256).to(DEVICE)[:, ::2]  # strided rows: the kernel copies or reads them correctly
    torch.testing.assert_close(nf4.nf4_matmul(x, nf4.from_bnb(lin)), expected(x, [lin]), rtol=1e-4, atol=1e-4)
    x3 = torch.randn(2, 3, 128).to(DEVICE)  # [batch, seq, K] as the model calls it
    assert nf4.nf4_matmul(x3, nf4.from_bnb(lin)).shape == (2, 3, 40)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_activations(dtype):
    lin = linear4bit(64, 256, dtype=dtype)
    # Triton 3.9's interpreter computes tl.dot on bfloat16 wrongly (off by 1e10 on a plain 16x16 product), so
    # on the CPU bfloat16 covers the GEMV path only; compiled on a GPU both paths run.
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    for m in (1,) if interpreted and dtype == torch.bfloat16 else (1, 9):
        x = torch.randn(m, 256).to(DEVICE, dtype)
        got = nf4.nf4_matmul(x, nf4.from_bnb(lin))
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), expected(x, [lin]), rtol=2e-2, atol=2e-2)


def test_many_rows_go_through_the_bitsandbytes_modules():
    """Prefill-sized inputs: bitsandbytes' dequantize-then-GEMM, on the same (fused) storage, same values."""
    parts = [linear4bit(32, 64, seed=11), linear4bit(16, 64, seed=12)]
    calls = []
    proj = nf4.NF4Linear(nf4.fuse(parts), lambda x, w: calls.append(x.shape) or nf4.reference_matmul(x, w), parts)
    small = torch.randn(2, 3, 64).to(DEVICE)
    big = torch.randn(2, nf4.MAX_KERNEL_ROWS, 64).to(DEVICE)
    torch.testing.assert_close(proj(small), expected(small, parts), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(proj(big), expected(big, parts), rtol=1e-4, atol=1e-4)
    assert calls == [small.shape]


def test_config_heuristic_fills_the_gpu():
    big = torch.device("cpu")
    for m, n, k in [(1, 5120, 5120), (1, 1024, 5120), (1, 5120, 13824), (8, 27648, 5120), (64, 7168, 5120)]:
        cfg = nf4.pick_config(m, n, k, big)
        assert k % cfg.block_k == 0 and cfg.split_k <= k // cfg.block_k
        assert (cfg.block_m == 0) == (m <= nf4.GEMV_MAX_M)
        assert cfg.block_m == 0 or cfg.block_m >= m or cfg.block_m == 64


# ---- in the model ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nf4_model(tiny_model_dir):
    """The tiny model loaded by transformers in NF4 (bitsandbytes runs on the CPU too), float32 compute."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=q, dtype=torch.float32,
                                                 device_map={"": DEVICE}).eval()
    for module in model.modules():  # keep bitsandbytes' own layout on CPUs with AVX512-BF16 (see linear4bit)
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def test_install_bnb_keeps_the_models_modules(nf4_model):
    paged = PagedQwen2(nf4_model)
    assert nf4.install(paged, "bnb") == "bnb" and paged.projections is None
    with pytest.raises(ValueError):
        nf4.install(paged, "cutlass")


def test_install_falls_back_with_a_log_line_when_triton_cannot_run(nf4_model, monkeypatch, caplog):
    paged = PagedQwen2(nf4_model)
    monkeypatch.setattr(nf4, "triton_available", lambda: "no GPU here")
    assert nf4.install(paged, "triton") == "bnb" and paged.projections is None
    assert "no GPU here" in caplog.text and "falling back" in caplog.text


def test_install_falls_back_when_the_self_check_fails(nf4_model, monkeypatch, caplog):
    paged = PagedQwen2(nf4_model)
    monkeypatch.setattr(nf4, "triton_available", lambda: None)
    # wrong values on the right device, so the self-check fails on the mismatch it tests, not on a device error
    monkeypatch.setattr(nf4, "nf4_matmul",
                        lambda x, w, config=None: torch.zeros(x.shape[0], w.n, dtype=x.dtype, device=x.device))
    assert nf4.install(paged, "auto") == "bnb" and paged.projections is None
    assert "self-check mismatch" in caplog.text


def test_kernels_do_not_specialise_on_the_row_count():
    """Triton compiles a variant per value class of each specialised int (multiple of 16, equal to 1): M varies
    per call (decode batch, eager prefill chunk), so it must not be one of them. Checked on the compiling JIT
    (a subprocess without the interpreter), which is what a GPU runs."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    pytest.importorskip("triton")
    code = ("from engine import nf4_triton as k; print(sorted({p.name for f in (k.nf4_gemv_kernel, k.nf4_gemm_kernel) "
            "for p in f.params if p.do_not_specialize}))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "['M']"


@needs_triton
def test_warm_up_compiles_what_every_row_count_needs(nf4_model):
    """Every M from 1 to MAX_KERNEL_ROWS (decode batches and eager prefills of 33-127 rows alike) maps to a
    kernel variant that warm-up ran, so no request compiles on its path; and warm-up runs each variant once."""
    projections = nf4.build_projections(nf4_model, nf4.nf4_matmul)
    device = torch.device(DEVICE)
    ran: list[tuple[int, int, int]] = []
    real = nf4.nf4_matmul

    def recording(x, w, config=None):
        ran.append((id(w), *x.shape))
        return real(x, w, config)

    import unittest.mock
    with unittest.mock.patch.object(nf4, "nf4_matmul", recording):
        calls = nf4.warm_up(projections[0], torch.float32, device)
    assert calls == len(ran)
    for lin in (projections[0].qkv, projections[0].o, projections[0].gate_up, projections[0].down):
        warmed = {nf4.kernel_variant(m, lin.weight, device) for wid, m, _k in ran if wid == id(lin.weight)}
        needed = {nf4.kernel_variant(m, lin.weight, device) for m in range(1, nf4.MAX_KERNEL_ROWS + 1)}
        assert warmed == needed
        assert sum(1 for wid, *_ in ran if wid == id(lin.weight)) == len(needed)  # each variant once


@needs_triton
def test_greedy_generation_matches_the_bitsandbytes_path(nf4_model):
    """The engine's greedy tokens with the fused Triton projections equal those with bitsandbytes' modules."""
    from engine import Engine, EngineConfig, SamplingParams

    paged = PagedQwen2(nf4_model)
    prompts = [torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 17)]

    def generate() -> list[list[int]]:
        engine = Engine(paged, EngineConfig(block_size=8, prefill_chunk=16, max_running=4, max_context=128,
                                            num_blocks=40, max_queue=8))
        engine.start()
        try:
            outs: list[list[int]] = [[] for _ in prompts]
            done = [__import__("threading").Event() for _ in prompts]
            for i, p in enumerate(prompts):
                def sink(event, i=i):
                    outs[i].extend(event.token_ids)
                    if event.finished:
                        done[i].set()
                engine.submit(p, SamplingParams(max_new_tokens=12, ignore_eos=True), sink)
            assert all(d.wait(120) for d in done)
            return outs
        finally:
            engine.stop(timeout=10)

    with_bnb = generate()
    assert nf4.install(paged, "triton") == "triton"
    assert len(paged.projections) == nf4_model.config.num_hidden_layers
    with_triton = generate()
    assert with_triton == with_bnb and all(len(o) == 12 for o in with_triton)
    # and the model's own modules (now views of the fused storage) still give the same answer
    paged.projections = None
    assert generate() == with_bnb


# ---- compiled for the GPU --------------------------------------------------------------------------------------------
COMPILE_SM90 = r'''
import json, pathlib, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from engine import devices, nf4, nf4_triton as kern

def pointers(act):
    return dict(x_ptr=act, codes_ptr="*u8", absq_ptr="*u8", abs2_ptr="*fp32", off2_ptr="*fp32", code2_ptr="*fp32",
                nf4_ptr="*fp32", bias_ptr=act, out_ptr=act, ws_ptr="*fp32", lock_ptr="*i32")
ints = dict.fromkeys(["M", "N", "K", "stride_xm", "stride_om", "stride_wn", "r1", "r2", "nb1", "nb2"], "i32")
cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
devices.SM_COUNTS[0] = 132  # an H100
results = {}
for m, n, k, act in json.loads(sys.argv[1]):
    ptrs = pointers(act)
    cfg = nf4.pick_config(m, n, k, __import__("torch").device("cuda", 0))
    consts = dict(BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k, NESTED=True, HAS_BIAS=True)
    if cfg.block_m == 0:
        fn, consts = kern.nf4_gemv_kernel, dict(BLOCK_M=triton.next_power_of_2(m), **consts)
    else:
        fn, consts = kern.nf4_gemm_kernel, dict(BLOCK_M=cfg.block_m, **consts)
    sig = {**ptrs, **ints, **dict.fromkeys(consts, "constexpr")}
    src = ASTSource(fn=fn, signature=sig, constexprs={(list(sig).index(c),): v for c, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
    line = next(l for l in usage.splitlines() if "REG:" in l)
    res = {kv.split(":")[0]: int(kv.split(":")[1]) for kv in line.split()[:2]}
    ptx = compiled.asm["ptx"]
    res.update(tf32="tf32" in ptx, mma="mma" in ptx)  # mma.sync / wgmma: tensor cores
    results[f"{m}x{n}x{k}x{act}"] = res
print(json.dumps(results))
'''


def test_kernels_compile_for_sm90_without_spills():
    """What the interpreter cannot show: the kernels compile for an H100/H200 (sm_90, with Triton's own ptxas,
    no GPU needed) with the configs the server picks, keep everything in registers (no local-memory stack,
    which would turn a bandwidth-bound kernel into a latency-bound one), and never round float32 to TF32."""
    import json
    import subprocess
    import sys

    from conftest import REPO_ROOT

    pytest.importorskip("triton")
    shapes = [(1, 7168, 5120, "*bf16"), (3, 5120, 13824, "*bf16"), (16, 27648, 5120, "*bf16"),
              (33, 5120, 5120, "*bf16"), (64, 7168, 5120, "*bf16"), (16, 1024, 512, "*fp32"), (64, 1024, 512, "*fp32")]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", COMPILE_SM90, json.dumps(shapes)], capture_output=True, text=True,
                          env=env, cwd=REPO_ROOT, timeout=300)
    if proc.returncode != 0 and "cuobjdump" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("this Triton wheel ships no cuobjdump")
    assert proc.returncode == 0, proc.stderr[-3000:]
    usage = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(usage) == len(shapes)
    for shape, res in usage.items():
        # float32 activations (the GPU tests' exact comparisons, never served) are multiplied in float32: TF32
        # would be ~1e-2 off the reference. bf16 (what the server runs) keeps everything in registers, and its
        # tiles of 16+ rows run on the tensor cores.
        assert not res["tf32"], shape
        if shape.endswith("bf16"):
            assert res["STACK"] == 0 and res["REG"] <= 255, (shape, res)
            assert res["mma"] or int(shape.split("x")[0]) <= nf4.GEMV_MAX_M, shape


def test_parameter_count_of_a_4bit_model_is_its_logical_size(nf4_model, tiny_hf_model):
    """bitsandbytes packs two NF4 values per byte: the load log counts each weight's logical shape, not its
    storage (which is about half), so it reports the same count as the unquantized model."""
    from shared import count_parameters

    packed = sum(p.numel() for p in nf4_model.parameters())
    assert count_parameters(nf4_model) == count_parameters(tiny_hf_model) > packed
