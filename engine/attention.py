"""Attention over the paged KV pool for one step of packed tokens: the metadata the runner builds, the paged
Triton kernels' launchers (``engine/attention_triton.py``) and the reference path (gather + masked SDPA).

A step packs the query tokens of every scheduled sequence without padding: the first ``num_decode`` sequences
have one token each (decodes, and prompts down to their last token), the others a chunk of their prompt
continuing whatever is already cached. ``reference`` is the simple, obviously-correct path the CPU serves with;
``paged`` reads K/V in place, each row's real context only, and needs CUDA (or Triton's interpreter).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.devices import sm_count

BACKENDS = ("auto", "paged", "reference")
LOG2E = 1.4426950408889634


@dataclass
class AttentionMetadata:
    """What attention needs to know about one step, built by the model runner (device tensors are views of its
    persistent buffers, so a CUDA graph captured over them replays with new contents)."""

    backend: str  # "paged" or "reference"
    block_size: int
    block_table: torch.Tensor  # [table rows, max blocks] persistent; row r holds the blocks of the sequence in row r
    block_rows: torch.Tensor  # [B] which table row each sequence uses
    seq_lens: torch.Tensor  # [B] context length of each sequence after this step
    query_start: torch.Tensor  # [B + 1] first packed token of each sequence (cumulative query lengths)
    slot_mapping: torch.Tensor  # [T] pool slot each token's K/V is written to
    logits_indices: torch.Tensor  # [S] the packed tokens whose logits are wanted (each sampled row's last token)
    num_decode: int  # the first num_decode sequences have exactly one query token
    query_lens: list[int]  # per sequence (host copy: the reference path groups rows by it)
    gather_blocks: int = 0  # reference path: blocks gathered per row (0: the table's width)
    decode_splits: int = 0  # paged decode: split-KV pieces per row (0: chosen from the batch and the GPU)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


def resolve_backend(name: str, device: torch.device) -> str:
    """``auto`` = paged where the kernels run compiled (CUDA with Triton), reference elsewhere."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, not {name!r}")
    if name != "auto":
        if name == "paged" and (why := kernels_unavailable(device)) is not None:
            raise ValueError(f"paged attention cannot run here: {why}")
        return name
    if device.type == "cuda" and kernels_unavailable(device) is None:
        return "paged"
    return "reference"


def kernels_unavailable(device: torch.device) -> str | None:
    """None when the Triton attention kernels can run on ``device``, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    if device.type != "cuda":
        return "no CUDA device (TRITON_INTERPRET=1 runs the kernels on the CPU, slowly)"
    if torch.cuda.get_device_capability(device)[0] < 8:
        return "compute capability < 8.0"
    return None


def attend(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, meta: AttentionMetadata,
           scale: float) -> torch.Tensor:
    """Attention output [T, H, D] for packed queries q [T, H, D] over one layer's pool [slots, KVH, D] (this
    step's K/V already written to it)."""
    if meta.backend == "paged":
        return paged_attention(q, k_pool, v_pool, meta, scale)
    return reference_attention(q, k_pool, v_pool, meta, scale)


# ---- reference: gather each row's blocks into a contiguous copy, masked SDPA --------------------------------------
def _sdpa_rows(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
               positions: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """q [B, T, H, D] at ``positions`` [B, T]; each row attends to its blocks ``table`` [B, nb] up to and
    including each query's position. Returns [B, T, H, D]."""
    bsz, seqlen, heads, d = q.shape
    kvh = k_pool.shape[1]
    ctx = table.shape[1] * block_size
    k_all = k_pool.view(-1, block_size, kvh, d)[table].view(bsz, ctx, kvh, d).transpose(1, 2)
    v_all = v_pool.view(-1, block_size, kvh, d)[table].view(bsz, ctx, kvh, d).transpose(1, 2)
    mask = torch.arange(ctx, device=q.device).view(1, 1, 1, ctx) <= positions.view(bsz, 1, seqlen, 1)
    # Grouped-query attention without copying K/V per query head: the query heads that share a KV head become
    # extra query rows of that head ([B, KVH, G*T, D]), which every SDPA backend that takes a mask handles.
    groups = heads // kvh
    qg = q.transpose(1, 2).reshape(bsz, kvh, groups * seqlen, d)
    mask = mask if groups == 1 else mask.repeat(1, 1, groups, 1)
    out = F.scaled_dot_product_attention(qg, k_all, v_all, attn_mask=mask, scale=scale)
    # reshape, not view: CUDA's memory-efficient kernel returns its output transposed ([B, G*T, KVH, D] in
    # memory), which no view can regroup into [B, H, T, D] when groups > 1 (a copy then, bitwise the same)
    return out.reshape(bsz, heads, seqlen, d).transpose(1, 2)


def reference_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, meta: AttentionMetadata,
                        scale: float) -> torch.Tensor:
    """The decode rows in one batched call, each prefill row in its own (no padding between rows)."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    nd, bs = meta.num_decode, meta.block_size
    width = meta.gather_blocks or meta.block_table.shape[1]
    if nd:
        table = meta.block_table[meta.block_rows[:nd], :width]
        positions = (meta.seq_lens[:nd] - 1).view(nd, 1)
        out[:nd] = _sdpa_rows(q[:nd].unsqueeze(1), k_pool, v_pool, table, positions, bs, scale).squeeze(1)
    start = nd
    for i in range(nd, meta.num_seqs):
        n = meta.query_lens[i]
        table = meta.block_table[meta.block_rows[i:i + 1], :width]
        positions = (meta.seq_lens[i] - n + torch.arange(n, device=q.device)).view(1, n)
        out[start:start + n] = _sdpa_rows(q[start:start + n].unsqueeze(0), k_pool, v_pool, table, positions, bs,
                                          scale).squeeze(0)
        start += n
    return out


def self_check(heads: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
               device: torch.device) -> str | None:
    """Run the paged kernels once against the reference on random data of the model's shapes (decodes, one long
    enough to split, and chunks continuing prefixes): None when they agree within ``dtype``'s precision, else why
    not (a compile or launch failure included). What it compiles is what serving needs anyway."""
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        contexts, query_lens = [700, 1, 90, 200], [1, 1, 40, 130]
        blocks = [-(-c // block_size) for c in contexts]
        table = torch.zeros(len(contexts) + 1, max(blocks), dtype=torch.long)
        first = 1
        for i, n in enumerate(blocks):
            table[i, :n] = torch.arange(first, first + n)
            first += n
        k, v = (torch.randn(first * block_size, kv_heads, head_dim, generator=gen).to(device, dtype)
                for _ in range(2))
        q = torch.randn(sum(query_lens), heads, head_dim, generator=gen).to(device, dtype)
        starts = torch.tensor([0, 1, 2, 42, 172])
        t = lambda x: torch.as_tensor(x, dtype=torch.long).to(device)  # noqa: E731
        meta = AttentionMetadata("paged", block_size, t(table), t(range(len(contexts))), t(contexts), t(starts),
                                 t([0] * int(starts[-1])), t(starts[1:] - 1), 2, query_lens)
        scale = head_dim ** -0.5
        want = reference_attention(q.float(), k.float(), v.float(), meta, scale)
        err = (paged_attention(q, k, v, meta, scale).float() - want).abs().max().item()
        limit = (1e-4 if dtype == torch.float32 else 2e-2) * want.abs().max().item()
        if not err <= limit:
            return f"self-check mismatch: max error {err:.3g} (allowed {limit:.3g})"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def compile_count() -> int:
    """Attention kernels Triton has compiled so far in this process (0 under the interpreter)."""
    try:
        from engine import attention_triton as kern
    except ImportError:
        return 0
    return sum(len(entry[0]) for fn in (kern.decode_kernel, kern.reduce_kernel, kern.prefill_kernel)
               for entry in getattr(fn, "device_caches", {}).values())


# ---- paged: the Triton kernels --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelShapes:
    """Tile sizes (launch constants) of the attention kernels; see ``engine/attention_triton.py``."""

    decode_block_n: int = 64
    prefill_block_m: int = 64
    prefill_block_n: int = 64
    min_split: int = 256  # tokens: a decode row is cut into pieces no shorter than this
    num_warps: int = 4  # decode and reduce
    prefill_num_warps: int = 8  # a 64 x 128 accumulator: 140 registers a thread on sm_90 with 8 warps, 213 with 4
    num_stages: int = 2


SHAPES = KernelShapes()


def pick_decode_splits(batch: int, kv_heads: int, sms: int, max_splits: int = 64) -> int:
    """Split-KV pieces per row: enough programs (batch x KV heads x pieces) for ~2 waves on every SM, as a power
    of two. A graph captured for a batch size keeps this count; rows shorter than ``min_split`` per piece use
    fewer pieces at run time (the others exit at once)."""
    want = -(-2 * sms // max(1, batch * kv_heads))
    return max(1, min(max_splits, 1 << max(0, want - 1).bit_length()))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs


def _block(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, n - 1).bit_length())


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, meta: AttentionMetadata,
                    scale: float, shapes: KernelShapes = SHAPES) -> torch.Tensor:
    """Decode rows through the split-KV decode kernel, prefill rows through the varlen prefill kernel."""
    from engine import attention_triton as kern

    tokens, heads, d = q.shape
    kvh = k_pool.shape[1]
    g = heads // kvh
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    nd, nseq = meta.num_decode, meta.num_seqs
    block_d = _block(d)
    common = (k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1), out.stride(0), out.stride(1),
              meta.block_table.stride(0), meta.block_size)
    qk_scale = scale * LOG2E
    precision = _precision(q.dtype)
    if nd:
        splits = meta.decode_splits or pick_decode_splits(nd, kvh, sm_count(q.device))
        part_o = torch.empty(nd, heads, splits, block_d, dtype=torch.float32, device=q.device) if splits > 1 else out
        part_lse = torch.empty(nd, heads, splits, dtype=torch.float32, device=q.device) if splits > 1 else out
        kern.decode_kernel[(nd, kvh, splits)](
            q, k_pool, v_pool, out, meta.block_table, meta.block_rows, meta.seq_lens, part_o, part_lse,
            q.stride(0), q.stride(1), *common, shapes.min_split, qk_scale,
            G=g, HEAD_DIM=d, BLOCK_H=_block(g), BLOCK_N=shapes.decode_block_n, BLOCK_D=block_d,
            SPLIT=splits > 1, PRECISION=precision, num_warps=shapes.num_warps, num_stages=shapes.num_stages)
        if splits > 1:
            kern.reduce_kernel[(nd, heads)](part_o, part_lse, out, out.stride(0), out.stride(1), splits,
                                            HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=_block(splits, 1))
    if nseq > nd:
        block_m = max(shapes.prefill_block_m, _block(g))
        tiles = (tokens - nd) // (block_m // g) + (nseq - nd)
        kern.prefill_kernel[(tiles, kvh)](
            q, k_pool, v_pool, out, meta.block_table, meta.block_rows, meta.seq_lens, meta.query_start, nd,
            nseq - nd, q.stride(0), q.stride(1), *common, qk_scale,
            G=g, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=shapes.prefill_block_n, BLOCK_D=block_d,
            PRECISION=precision, num_warps=shapes.prefill_num_warps, num_stages=shapes.num_stages)
    return out

