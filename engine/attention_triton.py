"""Triton kernels: attention that reads K/V in place in the paged pool, over each row's real context only.

Imported only where Triton is installed (the CUDA build of torch ships it; CPU tests run these kernels under
``TRITON_INTERPRET=1``). The pool of one layer is ``[slots, kv_heads, head_dim]``; token ``t`` of a sequence
lives in slot ``table[row, t // block_size] * block_size + t % block_size``. A step's query tokens are packed
(``q [tokens, heads, head_dim]``, no padding): sequence ``i`` owns tokens ``qsl[i] .. qsl[i+1]-1`` and, after
this step, ``seq_lens[i]`` tokens of context, the last ``qsl[i+1] - qsl[i]`` of which are its queries.

Both kernels process the G query heads that share a KV head together (rows of one ``tl.dot``), so each K/V tile
is read once per KV head, not once per query head, and softmax runs online in the exp2 domain.

* ``decode_kernel``: one query token per sequence. Grid ``(rows, kv_heads, splits)``: the context is cut into up
  to ``splits`` pieces of at least ``min_split`` tokens (flash-decoding), so one long sequence still fills every
  SM; each piece leaves its normalised output and log-sum-exp and ``reduce_kernel`` merges them. The split count
  is a launch constant and each row's share is computed from its ``seq_len`` in the kernel, so a CUDA graph
  captured for a batch size replays at any context length.
* ``prefill_kernel``: any number of query tokens per sequence continuing a cached prefix of any length (varlen,
  causal). Grid ``(query tiles, kv_heads)``: a program finds its sequence by binary search over ``qsl`` (no host
  table), takes ``BLOCK_M // G`` consecutive query tokens x G heads, reads keys only up to its last query's
  position (causal tile skipping) and masks only the tiles that straddle the diagonal.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _kv_tile(cache_ptr, table_ptr, row, offs, mask, kvh, d, dmask, stride_s, stride_h, stride_table, block_size):
    """K or V rows of tokens ``offs`` of the sequence in block-table row ``row``: [BLOCK_N, BLOCK_D]."""
    page = tl.load(table_ptr + row * stride_table + offs // block_size, mask=mask, other=0)
    slot = page.to(tl.int64) * block_size + offs % block_size
    return tl.load(cache_ptr + slot[:, None] * stride_s + kvh * stride_h + d[None, :],
                   mask=mask[:, None] & dmask[None, :], other=0.0)


@triton.jit
def _online_step(q, k, v, acc, m_i, l_i, visible, qk_scale, PRECISION: tl.constexpr):
    """One tile of online softmax: scores of q against k, masked by ``visible``, folded into (acc, m, l)."""
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def decode_kernel(q_ptr, k_ptr, v_ptr, o_ptr, table_ptr, rows_ptr, seq_lens_ptr, part_o_ptr, part_lse_ptr,
                  stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_ot, stride_oh,
                  stride_table, block_size, min_split, qk_scale,
                  G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    num_splits = tl.num_programs(2)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    row = tl.load(rows_ptr + b)
    # this row's pieces: as many as the launch allows, none shorter than min_split tokens, whole tiles each
    pieces = tl.maximum(tl.minimum(num_splits, tl.cdiv(seq_len, min_split)), 1)
    per_piece = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), pieces) * BLOCK_N
    start = s * per_piece
    end = tl.minimum(start + per_piece, seq_len)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    hmask = h < G
    dmask = d < HEAD_DIM
    heads = kvh * G + h
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        nmask = offs < end
        k = _kv_tile(k_ptr, table_ptr, row, offs, nmask, kvh, d, dmask, stride_ks, stride_kh, stride_table,
                     block_size)
        v = _kv_tile(v_ptr, table_ptr, row, offs, nmask, kvh, d, dmask, stride_vs, stride_vh, stride_table,
                     block_size)
        acc, m_i, l_i = _online_step(q, k, v, acc, m_i, l_i, nmask[None, :], qk_scale, PRECISION)
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    out = acc / safe_l[:, None]
    if SPLIT:
        base = (b * tl.num_programs(1) * G + heads) * num_splits + s  # [B, H, splits] of this program's heads
        tl.store(part_o_ptr + base[:, None].to(tl.int64) * BLOCK_D + d[None, :], out, mask=hmask[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
        tl.store(part_lse_ptr + base, lse, mask=hmask)
    else:
        tl.store(o_ptr + b.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=hmask[:, None] & dmask[None, :])


@triton.jit(do_not_specialize=["num_splits"])
def reduce_kernel(part_o_ptr, part_lse_ptr, o_ptr, stride_ot, stride_oh, num_splits,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Merge one (row, head)'s split outputs by their log-sum-exp weights."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = s < num_splits
    base = (b * tl.num_programs(1) + h) * num_splits
    lse = tl.load(part_lse_ptr + base + s, mask=smask, other=float("-inf"))
    top = tl.max(lse, 0)
    w = tl.where(smask & (lse > float("-inf")), tl.exp2(lse - top), 0.0)
    parts = tl.load(part_o_ptr + (base + s)[:, None].to(tl.int64) * BLOCK_D + d[None, :], mask=smask[:, None],
                    other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
    tl.store(o_ptr + b.to(tl.int64) * stride_ot + h * stride_oh + d, out.to(o_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


@triton.jit
def _find_sequence(qsl_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence whose query tiles include ``tile``: sequence i's tiles start at (qsl[i]-qsl[0])//BLOCK_Q + i
    (one spare tile per sequence, so no host-side tile table is needed); binary search over them."""
    base = tl.load(qsl_ptr)
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = (tl.load(qsl_ptr + mid) - base) // BLOCK_Q + mid
        if first <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1, base


@triton.jit(do_not_specialize=["first_seq", "num_seqs"])
def prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, table_ptr, rows_ptr, seq_lens_ptr, qsl_ptr, first_seq, num_seqs,
                   stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_ot, stride_oh,
                   stride_table, block_size, qk_scale,
                   G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Sequences ``first_seq .. first_seq + num_seqs - 1`` of the step (counts passed as data, not specialised on,
    so no step shape compiles a new variant)."""
    BLOCK_Q: tl.constexpr = BLOCK_M // G
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    rows_ptr += first_seq
    seq_lens_ptr += first_seq
    qsl_ptr += first_seq
    i, base = _find_sequence(qsl_ptr, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(qsl_ptr + i)
    q_len = (tl.load(qsl_ptr + i + 1) - q_start).to(tl.int32)
    q0 = (tile - ((q_start - base) // BLOCK_Q + i)).to(tl.int32) * BLOCK_Q
    if q0 >= q_len:  # a spare tile
        return
    prefix = tl.load(seq_lens_ptr + i).to(tl.int32) - q_len  # context before this step's queries
    row = tl.load(rows_ptr + i)
    r = tl.arange(0, BLOCK_M)
    qi = q0 + r // G
    rmask = (r < BLOCK_Q * G) & (qi < q_len)
    heads = kvh * G + r % G
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    tok = (q_start + qi).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    kv_end = prefix + tl.minimum(q0 + BLOCK_Q, q_len)  # keys the tile's last query sees
    qpos = tl.minimum(prefix + qi, kv_end - 1)  # padding rows act as the last query: no all-masked rows
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # keys before the tile's first query are visible to all its queries: whole tiles without a causal mask
    n_full = (prefix + q0) // BLOCK_N * BLOCK_N
    everywhere = tl.full([1, BLOCK_N], 1, dtype=tl.int1)
    for n0 in range(0, n_full, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        nmask = offs < n_full
        k = _kv_tile(k_ptr, table_ptr, row, offs, nmask, kvh, d, dmask, stride_ks, stride_kh, stride_table,
                     block_size)
        v = _kv_tile(v_ptr, table_ptr, row, offs, nmask, kvh, d, dmask, stride_vs, stride_vh, stride_table,
                     block_size)
        acc, m_i, l_i = _online_step(q, k, v, acc, m_i, l_i, everywhere, qk_scale, PRECISION)
    for n0 in range(n_full, kv_end, BLOCK_N):  # the diagonal
        offs = n0 + tl.arange(0, BLOCK_N)
        nmask = offs < kv_end
        k = _kv_tile(k_ptr, table_ptr, row, offs, nmask, kvh, d, dmask, stride_ks, stride_kh, stride_table,
                     block_size)
        v = _kv_tile(v_ptr, table_ptr, row, offs, nmask, kvh, d, dmask, stride_vs, stride_vh, stride_table,
                     block_size)
        visible = (offs[None, :] <= qpos[:, None]) & nmask[None, :]
        acc, m_i, l_i = _online_step(q, k, v, acc, m_i, l_i, visible, qk_scale, PRECISION)
    out = acc / l_i[:, None]
    tl.store(o_ptr + tok[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
