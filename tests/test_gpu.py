"""GPU-only checks (run on a CUDA machine: `pytest -m gpu tests/test_gpu.py`, or scripts/gpu_check.sh)."""
from __future__ import annotations

import threading

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _run(engine, prompts, new):
    from engine import SamplingParams

    results, done = {}, threading.Event()

    def sink_for(i):
        tokens = []

        def sink(event):
            tokens.extend(event.token_ids)
            if event.finished:
                results[i] = (tokens, event.finish_reason, event.error)
                if len(results) == len(prompts):
                    done.set()
        return sink

    for i, p in enumerate(prompts):
        engine.submit(p, SamplingParams(max_new_tokens=new, ignore_eos=True), sink_for(i))
    assert done.wait(300)
    return [results[i] for i in range(len(prompts))]


@pytest.mark.parametrize("attention", ["paged", "reference"])
def test_cuda_graph_decode_gives_the_eager_tokens(tiny_model_dir, attention):
    """The same greedy tokens with decode replayed from CUDA graphs as with eager decode, batched; with paged
    attention every batch bucket's graph is captured at start-up and none while serving."""
    from transformers import AutoModelForCausalLM

    from engine import Engine, EngineConfig
    from engine.qwen2 import PagedQwen2

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).cuda().eval()
    prompts = [[(7 * i + j) % 1000 for j in range(5 + 9 * i)] for i in range(5)]
    outputs = {}
    for graphs in (False, True):
        engine = Engine(PagedQwen2(model), EngineConfig(max_running=8, max_context=512, block_size=16,
                                                        num_blocks=200, cuda_graphs=graphs, attention=attention))
        engine.start()
        captured = len(engine.runner.graphs.graphs) if graphs else 0
        try:
            outputs[graphs] = _run(engine, prompts, 24)
            if graphs:
                assert engine.runner.graphs.use_graphs and len(engine.runner.graphs.graphs) >= 1
                if attention == "paged":
                    assert captured == len(engine.runner.graphs.buckets) == len(engine.runner.graphs.graphs)
        finally:
            engine.stop()
    assert [o[0] for o in outputs[True]] == [o[0] for o in outputs[False]]
    assert all(len(o[0]) == 24 for o in outputs[True])


def test_paged_and_reference_attention_give_the_same_greedy_tokens(tiny_model_dir):
    """float32 tiny model: the compiled kernels and the gather path agree token for token (mixed steps, graphs)."""
    from transformers import AutoModelForCausalLM

    from engine import Engine, EngineConfig
    from engine.qwen2 import PagedQwen2

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).cuda().eval()
    prompts = [[(11 * i + 3 * j) % 1000 for j in range(3 + 40 * i)] for i in range(6)]
    outputs = {}
    for attention in ("reference", "paged"):
        engine = Engine(PagedQwen2(model), EngineConfig(max_running=8, max_context=1024, block_size=16,
                                                        num_blocks=400, prefill_chunk=64, attention=attention))
        engine.start()
        try:
            outputs[attention] = _run(engine, prompts, 40)
        finally:
            engine.stop()
    assert outputs["paged"] == outputs["reference"]


def test_nf4_from_pretrained_with_the_real_14b_layer_shapes(tmp_path):
    """A random model with Qwen2.5-14B's layer shapes (2 layers), saved and loaded through the server's NF4
    from_pretrained path, serves a request through the engine."""
    import importlib.util

    from conftest import REPO_ROOT
    from engine import Engine, EngineConfig
    from shared import Settings, load_model

    spec = importlib.util.spec_from_file_location("mtm", REPO_ROOT / "scripts" / "make_tiny_model.py")
    mtm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mtm)
    path = mtm.build_tiny_model(tmp_path / "m14", hidden_size=5120, num_layers=2, num_heads=40, num_kv_heads=8,
                                intermediate_size=13824, initializer_range=0.02, max_position_embeddings=32768)
    loaded = load_model(Settings(model_id=str(path), quantization="nf4"))
    import bitsandbytes as bnb

    attn = loaded.hf_model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, bnb.nn.Linear4bit) and attn.q_proj.weight.quant_type == "nf4"
    assert torch.cuda.memory_allocated() < 2 * 2**30
    engine = Engine(loaded.paged_model, EngineConfig(max_running=4, max_context=4096, block_size=64,
                                                     kv_cache_bytes=2**30))
    engine.start()
    try:
        [(tokens, reason, error)] = _run(engine, [list(range(100, 400))], 16)
    finally:
        engine.stop()
    assert error is None and len(tokens) == 16
    # the fused Triton NF4 kernels are what the server selected; they give bitsandbytes' logits (bfloat16 random
    # logits are near-ties, so tokens are compared only on the CPU, in float32: tests/test_nf4.py)
    paged = loaded.paged_model
    assert loaded.serving_info["nf4_kernel"] == "triton" and paged.projections is not None
    projections, logits = paged.projections, {}
    from paged_inputs import packed_step

    ids = torch.tensor(list(range(100, 107)) + list(range(7, 14)), device="cuda")  # 14 rows: the kernels' path
    positions, meta = packed_step([[1], [2]], [7, 7], [7, 7], 64, device="cuda")
    for kernel in ("triton", "bnb"):
        paged.projections = projections if kernel == "triton" else None
        paged.allocate_kv_cache(4 * 64)
        logits[kernel] = paged.forward(ids, positions, meta)
    err = (logits["triton"] - logits["bnb"]).abs().max().item()
    assert err <= 2e-2 * logits["bnb"].abs().max().item(), err
    paged.projections = projections


QWEN14B_SHAPES = {"q": (5120, 5120), "k": (1024, 5120), "o": (5120, 5120), "gate": (13824, 5120),
                  "down": (5120, 13824)}


@pytest.mark.parametrize("name", sorted(QWEN14B_SHAPES))
def test_nf4_kernels_on_the_real_shapes(name):
    """Our kernels vs bitsandbytes' dequantize_4bit(W) @ x for every Qwen2.5-14B projection, M in 1..64."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from engine import nf4

    n, k = QWEN14B_SHAPES[name]
    torch.manual_seed(0)
    lin = bnb.nn.Linear4bit(k, n, bias=name == "q", compute_dtype=torch.bfloat16, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(torch.randn(n, k) * 0.02, requires_grad=False, quant_type="nf4",
                                   compress_statistics=True, blocksize=64)
    lin = lin.cuda()
    w = nf4.from_bnb(lin)
    ref_w = F.dequantize_4bit(lin.weight.data, lin.weight.quant_state).float()
    for m in (1, 2, 7, 16, 33, 64):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        want = x.float() @ ref_w.T + (lin.bias.float() if lin.bias is not None else 0)
        got = nf4.nf4_matmul(x, w).float()
        err = (got - want).abs().max().item() / want.abs().max().item()
        assert err < 1e-2, (name, m, err)
