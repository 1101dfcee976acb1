"""The paged Qwen2 forward (engine/qwen2.py): layouts CUDA kernels produce that the CPU never does, and the
models it must refuse."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from engine.qwen2 import PagedQwen2, rope_type
from paged_inputs import packed_step
from shared import ConfigError, Settings, load_model


def prefill_then_decode(paged: PagedQwen2) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a 6-token prefill of two rows (block size 4, so they cross a block) and of one decode step."""
    paged.allocate_kv_cache(8 * 4)
    tables = [[1, 2], [3, 4]]
    ids = torch.tensor([5, 9, 14, 3, 22, 7, 11, 4, 8, 30, 2, 19])
    positions, meta = packed_step(tables, [6, 6], [6, 6], 4)
    prefill = paged.forward(ids, positions, meta)
    positions, meta = packed_step(tables, [7, 7], [1, 1], 4)
    decode = paged.forward(torch.tensor([40, 41]), positions, meta)
    return prefill, decode


def test_attention_accepts_the_transposed_output_cuda_kernels_return(tiny_hf_model, monkeypatch):
    """CUDA's memory-efficient SDPA returns [B, H, T, D] laid out as [B, T, H, D]; with grouped query heads the
    regrouping of that output must copy (a view raises), and give the same logits."""
    paged = PagedQwen2(tiny_hf_model)
    assert paged.config.num_attention_heads // paged.num_kv_heads > 1  # grouped: the case that broke
    want = prefill_then_decode(paged)
    sdpa = F.scaled_dot_product_attention
    layouts = []

    def transposed_sdpa(*args, **kwargs):
        out = sdpa(*args, **kwargs)
        out = out.transpose(1, 2).contiguous().transpose(1, 2)  # same values, the kernel's memory layout
        layouts.append(out.is_contiguous())
        return out

    monkeypatch.setattr(F, "scaled_dot_product_attention", transposed_sdpa)
    got = prefill_then_decode(PagedQwen2(tiny_hf_model))
    assert layouts and not any(layouts)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("params, expected", [
    ({"rope_type": "default", "rope_theta": 1e6}, "default"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, "yarn"),
    ({"type": "dynamic", "factor": 2.0}, "dynamic"),
    ({"full_attention": {"rope_type": "longrope"}}, "longrope"),
    (None, "default"),
])
def test_rope_type_reads_every_config_shape(params, expected):
    config = type("Config", (), {"rope_parameters": params})()
    assert rope_type(config) == expected


@pytest.mark.parametrize("rope", ["dynamic", "longrope"])
def test_batch_dependent_rope_scaling_is_refused_at_load(tiny_model_dir, tmp_path, rope):
    """'dynamic' and 'longrope' rescale by the batch's longest position: a sequence's tokens would depend on its
    neighbours in the batch. The server refuses such a model with a message, not a traceback mid-request."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    params = {"rope_type": rope, "rope_theta": 1e6, "factor": 2.0}
    if rope == "longrope":
        half = config["hidden_size"] // config["num_attention_heads"] // 2
        params.update(original_max_position_embeddings=256, short_factor=[1.0] * half, long_factor=[2.0] * half)
    config["rope_parameters"] = params
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=f"RoPE scaling '{rope}' is not supported"):
        load_model(Settings(model_id=str(model_dir), device="cpu", dtype="float32"))


def test_kv_cache_on_cuda_is_left_to_the_engine_unless_configured():
    """On CUDA the engine sizes the pool itself, after measuring its largest step and its graphs (engine/memory.py,
    tests/test_steps.py); a configured size is used as is."""
    import shared

    fake = type("Paged", (), {"device": torch.device("cuda", 0), "kv_bytes_per_token": lambda self: 1024})()
    assert shared.kv_cache_bytes(Settings(), fake, 4096) == 0
    assert shared.kv_cache_bytes(Settings(kv_cache_gb=2.0), fake, 4096) == 2 * 2**30
