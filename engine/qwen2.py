"""Qwen2-family forward pass over a paged KV cache, reusing the Hugging Face module weights.

The HF model is loaded as usual (``from_pretrained``, NF4 or not); this class runs its layers with our
own attention so that rows of one batch can sit at different positions and the cache has fixed
shapes (what continuous batching and CUDA graphs need). Everything else (embeddings, norms, rotary
embedding with its scaling, the MLP, bitsandbytes linears, lm_head) is the model's own code, except that
with NF4 weights the projections may run as fused Triton kernels over the same storage (``engine/nf4.py``,
set in ``projections``).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

try:  # the helper lives next to every Qwen2-style model in transformers
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb
except ImportError:  # pragma: no cover - very old transformers
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


# RoPE variants whose frequencies depend on the current sequence length (transformers' dynamic_rope_update takes
# the max of the position ids): under continuous batching that is the batch's longest row, not the sequence's own.
BATCH_DEPENDENT_ROPE = ("dynamic", "longrope")


def rope_type(config) -> str:
    """The model's RoPE scaling type ("default" without scaling), from transformers 5's ``rope_parameters`` or
    the older ``rope_scaling``."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        params = next(iter(params.values()))  # per-layer-type parameters (e.g. full/sliding attention)
    return str(params.get("rope_type", params.get("type", "default"))) if isinstance(params, dict) else "default"


class PagedQwen2:
    """Adapter that makes a ``Qwen2ForCausalLM`` (or a Llama/Qwen3-shaped model) a paged-cache model."""

    def __init__(self, hf_model: torch.nn.Module) -> None:
        self.hf = hf_model.eval()
        cfg = hf_model.config
        self.config = cfg
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.vocab_size = cfg.vocab_size
        emb = hf_model.get_input_embeddings().weight
        self.device = emb.device
        self.dtype = emb.dtype
        rope = rope_type(cfg)
        if rope in BATCH_DEPENDENT_ROPE:
            raise ValueError(f"RoPE scaling {rope!r} is not supported: its frequencies follow the longest position "
                             f"in the batch, so a sequence's output would depend on what it is batched with (and "
                             f"'dynamic' decides on the host, which CUDA graphs cannot replay). Use the model without "
                             f"it, or with a static scaling (yarn, linear, llama3)")
        if getattr(cfg, "use_sliding_window", False):
            log.warning("model config enables sliding-window attention; this engine attends to the full context")
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.projections: list | None = None  # engine.nf4.LayerProjections per layer, when installed

    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def allocate_kv_cache(self, num_slots: int) -> None:
        shape = (self.num_layers, num_slots, self.num_kv_heads, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                block_table: torch.Tensor, block_size: int) -> torch.Tensor:
        """Logits [B, V] (float32) for the last position of each row.

        input_ids, positions, slot_mapping: [B, T]; block_table: [B, nb]. A row attends to the first
        ``nb * block_size`` positions of its own blocks, up to and including each query's position.
        """
        assert self.k_cache is not None, "allocate_kv_cache() first"
        model = self.hf.model
        bsz, seqlen = input_ids.shape
        ctx = block_table.shape[1] * block_size
        hidden = model.embed_tokens(input_ids)
        cos, sin = model.rotary_emb(hidden, positions)
        key_pos = torch.arange(ctx, device=input_ids.device)
        mask = (key_pos.view(1, 1, 1, ctx) <= positions.view(bsz, 1, seqlen, 1))
        slots = slot_mapping.reshape(-1)
        projections = self.projections
        for i, layer in enumerate(model.layers):
            proj = projections[i] if projections is not None else None
            residual = hidden
            x = layer.input_layernorm(hidden)
            x = self._attention(layer.self_attn, x, cos, sin, mask, slots, block_table, block_size, i, proj)
            hidden = residual + x
            x = layer.post_attention_layernorm(hidden)
            hidden = hidden + (proj.mlp(x) if proj is not None else layer.mlp(x))
        last = model.norm(hidden[:, -1, :])
        return self.hf.lm_head(last).float()

    def _attention(self, attn: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor, slots: torch.Tensor, block_table: torch.Tensor, block_size: int,
                   layer_idx: int, proj=None) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        d, kvh = self.head_dim, self.num_kv_heads
        if proj is not None:
            q, k, v = proj.qkv(x).split([proj.q_size, proj.kv_size, proj.kv_size], dim=-1)
            q, k, v = q.view(bsz, seqlen, -1, d), k.view(bsz, seqlen, kvh, d), v.reshape(bsz, seqlen, kvh, d)
        else:
            q = attn.q_proj(x).view(bsz, seqlen, -1, d)
            k = attn.k_proj(x).view(bsz, seqlen, kvh, d)
            v = attn.v_proj(x).view(bsz, seqlen, kvh, d)
        if hasattr(attn, "q_norm"):  # Qwen3 normalises q and k per head before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        k_pool, v_pool = self.k_cache[layer_idx], self.v_cache[layer_idx]
        k_pool.index_copy_(0, slots, k.transpose(1, 2).reshape(-1, kvh, d))
        v_pool.index_copy_(0, slots, v.reshape(-1, kvh, d))
        ctx = block_table.shape[1] * block_size
        k_all = k_pool.view(-1, block_size, kvh, d)[block_table].view(bsz, ctx, kvh, d).transpose(1, 2)
        v_all = v_pool.view(-1, block_size, kvh, d)[block_table].view(bsz, ctx, kvh, d).transpose(1, 2)
        # Grouped-query attention without copying K/V per query head: the query heads that share a KV head
        # become extra query rows of that head ([B, KVH, G*T, D]), which every SDPA backend that takes a
        # mask handles (memory-efficient on CUDA), instead of the math fallback that enable_gqa may take.
        groups = q.shape[1] // kvh
        q = q.reshape(bsz, kvh, groups * seqlen, d)
        mask = mask if groups == 1 else mask.repeat(1, 1, groups, 1)
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=attn.scaling)
        # reshape, not view: CUDA's memory-efficient kernel returns its output transposed ([B, G*T, KVH, D] in
        # memory), which no view can regroup into [B, H, T, D] when groups > 1 (a copy then, bitwise the same)
        out = out.reshape(bsz, kvh * groups, seqlen, d)
        out = out.transpose(1, 2).reshape(bsz, seqlen, -1)
        return proj.o(out) if proj is not None else attn.o_proj(out)
