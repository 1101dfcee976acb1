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

from engine.attention import AttentionMetadata, attend

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

    def attention_shape(self) -> tuple[int, int, int, torch.dtype]:
        """(query heads, KV heads, head dim, dtype) of the attention layers: what the kernels' self-check runs."""
        return self.config.num_attention_heads, self.num_kv_heads, self.head_dim, self.dtype

    def allocate_kv_cache(self, num_slots: int) -> None:
        shape = (self.num_layers, num_slots, self.num_kv_heads, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Logits [S, V] (float32) of the tokens ``meta.logits_indices``, for a step of packed tokens
        ``input_ids``/``positions`` [T] (see ``engine/attention.py``)."""
        assert self.k_cache is not None, "allocate_kv_cache() first"
        model = self.hf.model
        hidden = model.embed_tokens(input_ids).unsqueeze(0)  # [1, T, hidden]: the HF modules expect a batch
        cos, sin = model.rotary_emb(hidden, positions.unsqueeze(0))
        projections = self.projections
        for i, layer in enumerate(model.layers):
            proj = projections[i] if projections is not None else None
            residual = hidden
            x = layer.input_layernorm(hidden)
            x = self._attention(layer.self_attn, x, cos, sin, meta, i, proj)
            hidden = residual + x
            x = layer.post_attention_layernorm(hidden)
            hidden = hidden + (proj.mlp(x) if proj is not None else layer.mlp(x))
        last = model.norm(hidden[0, meta.logits_indices])
        return self.hf.lm_head(last).float()

    def _attention(self, attn: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   meta: AttentionMetadata, layer_idx: int, proj=None) -> torch.Tensor:
        _, tokens, _ = x.shape
        d, kvh = self.head_dim, self.num_kv_heads
        if proj is not None:
            q, k, v = proj.qkv(x).split([proj.q_size, proj.kv_size, proj.kv_size], dim=-1)
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        q, k, v = q.view(1, tokens, -1, d), k.view(1, tokens, kvh, d), v.reshape(tokens, kvh, d)
        if hasattr(attn, "q_norm"):  # Qwen3 normalises q and k per head before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # [1, heads, T, D]
        k_pool, v_pool = self.k_cache[layer_idx], self.v_cache[layer_idx]
        k_pool.index_copy_(0, meta.slot_mapping, k[0].transpose(0, 1))
        v_pool.index_copy_(0, meta.slot_mapping, v)
        out = attend(q[0].transpose(0, 1), k_pool, v_pool, meta, attn.scaling)  # [T, H, D]
        out = out.reshape(1, tokens, -1)
        return proj.o(out) if proj is not None else attn.o_proj(out)
