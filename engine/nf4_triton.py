"""Triton kernels: ``x @ W.T (+ bias)`` straight from bitsandbytes' NF4 storage, dequantizing in registers.

Imported only where Triton is installed (the CUDA build of torch ships it; CPU tests run these kernels under
``TRITON_INTERPRET=1``). The storage is bitsandbytes' own (see ``engine/nf4.py``): for a weight [N, K] in
row-major order, element ``j = n*K + k`` is the high nibble of byte ``j // 2`` when ``j`` is even, the low
nibble when odd; its scale is ``absmax[j // 64]``, itself double-quantized: ``code2[absmax_q[b]] *
absmax2[nb] + offset2[nb]`` with ``nb`` the block's 256-block of its own (pre-fusion) weight. A fused weight
is up to three weights stacked by rows (q/k/v, gate/up); ``r1, r2`` are the rows where the second and third
start and ``nb1, nb2`` their first nested blocks, so every value is the one bitsandbytes would produce.

Each program computes a [BLOCK_M, BLOCK_N] tile of the output over its share of K (split-K: partial sums go
to a float32 workspace and the last program of a tile adds them up, see ``_finish``).
Even and odd columns are handled as two half-width matrices (high and low nibbles) against the even and odd
columns of x, so no interleaving is needed in registers. Small M (GEMV, up to 4 rows in one program, so the
weight is read once) multiplies-and-reduces on the CUDA cores and applies each 64-block's scale once to its
partial sum; larger M dequantizes the tile to the activation dtype and uses ``tl.dot`` (tensor cores).

M (the number of rows) is not specialised on (``do_not_specialize``): it only bounds masks, and otherwise every
M that is not a multiple of 16 would compile a variant of its own on the request path (~0.6 s each).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _scales(absq_ptr, abs2_ptr, off2_ptr, code2_ptr, rn, t, N, KB, r1, r2, nb1, nb2,
            G: tl.constexpr, BLOCK_N: tl.constexpr, NESTED: tl.constexpr):
    """float32 scales [BLOCK_N, G] of the 64-blocks ``t*G .. t*G+G-1`` of rows ``rn``."""
    g = t * G + tl.arange(0, G)
    blk = rn[:, None].to(tl.int64) * KB + g[None, :]  # global 64-block index, [BLOCK_N, G]
    mask = (rn < N)[:, None] & (g < KB)[None, :]
    if NESTED:
        q = tl.load(absq_ptr + blk, mask=mask, other=0).to(tl.int32)
        seg1 = rn >= r1
        seg2 = rn >= r2
        row0 = tl.where(seg2, r2, tl.where(seg1, r1, 0)).to(tl.int64)
        nest0 = tl.where(seg2, nb2, tl.where(seg1, nb1, 0)).to(tl.int64)
        nb = nest0[:, None] + (blk - row0[:, None] * KB) // 256
        scale = tl.load(code2_ptr + q) * tl.load(abs2_ptr + nb, mask=mask, other=0.0) \
            + tl.load(off2_ptr + nb, mask=mask, other=0.0)
    else:
        scale = tl.load(absq_ptr + blk, mask=mask, other=0.0)
    return scale


@triton.jit
def _finish(acc, rows, rn, M, N, stride_om, tile, pid_k, out_ptr, ws_ptr, lock_ptr, bias_ptr,
            SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Store a tile. With split-K, each program leaves its float32 partial in the workspace and counts itself
    in on the tile's lock; the last one in adds the partials (and the bias), stores the tile and re-arms the
    lock for the next call: one kernel per matmul, no memset, nothing for the host to wait on."""
    omask = (rows < M)[:, None] & (rn < N)[None, :]
    if SPLIT_K > 1:
        tl.store(ws_ptr + (pid_k * M + rows[:, None]) * N + rn[None, :], acc, mask=omask)
        arrived = tl.atomic_add(lock_ptr + tile, 1)  # acq_rel: our partial is visible to whoever sums
        if arrived == SPLIT_K - 1:
            acc = tl.zeros_like(acc)
            for s in range(SPLIT_K):
                acc += tl.load(ws_ptr + (s * M + rows[:, None]) * N + rn[None, :], mask=omask, other=0.0,
                               cache_modifier=".cg")
            _store(acc, rows, rn, N, stride_om, omask, out_ptr, bias_ptr, HAS_BIAS)
            tl.atomic_xchg(lock_ptr + tile, 0)
    else:
        _store(acc, rows, rn, N, stride_om, omask, out_ptr, bias_ptr, HAS_BIAS)


@triton.jit
def _store(acc, rows, rn, N, stride_om, omask, out_ptr, bias_ptr, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit(do_not_specialize=["M"])
def nf4_gemv_kernel(x_ptr, codes_ptr, absq_ptr, abs2_ptr, off2_ptr, code2_ptr, nf4_ptr, bias_ptr, out_ptr,
                    ws_ptr, lock_ptr, M, N, K, stride_xm, stride_om, stride_wn, r1, r2, nb1, nb2,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                    NESTED: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Up to BLOCK_M (a few) rows of x: each weight tile is dequantized once and used for every row. Products
    accumulate elementwise (already scaled) and are reduced once after the loop: no shuffles inside it."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    G: tl.constexpr = BLOCK_K // 64
    KB = K // 64
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    gi = tl.arange(0, G)
    bi = tl.arange(0, 32)
    xi = tl.arange(0, 64)
    num_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(num_tiles, SPLIT_K)
    start = pid_k * per_split
    stop = tl.minimum(start + per_split, num_tiles)
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, G, 32), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N, G, 32), dtype=tl.float32)
    row_bytes = rn.to(tl.int64) * stride_wn
    x_rows = x_ptr + rows[:, None, None] * stride_xm
    for t in range(start, stop):
        kb = t * (BLOCK_K // 2) + gi[:, None] * 32 + bi[None, :]  # byte index within a row, [G, 32]
        kmask = kb < stride_wn
        wmask = (rn < N)[:, None, None] & kmask[None, :, :]
        packed = tl.load(codes_ptr + row_bytes[:, None, None] + kb[None, :, :], mask=wmask, other=0)
        w_hi = tl.load(nf4_ptr + (packed >> 4).to(tl.int32))  # [BLOCK_N, G, 32]
        w_lo = tl.load(nf4_ptr + (packed & 15).to(tl.int32))
        scale = _scales(absq_ptr, abs2_ptr, off2_ptr, code2_ptr, rn, t, N, KB, r1, r2, nb1, nb2,
                        G, BLOCK_N, NESTED)
        # x's 64 columns per block, contiguous, split into the even (high nibble) and odd (low nibble) ones
        kx = t * BLOCK_K + gi[:, None] * 64 + xi[None, :]  # [G, 64]
        if BLOCK_M == 1:  # 3-D throughout: each thread keeps one row's 16 bytes of one block, and its one scale
            x = tl.load(x_ptr + kx, mask=kx < K, other=0.0).to(tl.float32)  # [G, 64]
            x_even, x_odd = tl.split(tl.reshape(x, (G, 32, 2)))
            acc += (w_hi * x_even[None, :, :] + w_lo * x_odd[None, :, :]) * scale[:, :, None]
        else:
            xmask = (rows < M)[:, None, None] & (kx < K)[None, :, :]
            x = tl.load(x_rows + kx[None, :, :], mask=xmask, other=0.0).to(tl.float32)  # [BLOCK_M, G, 64]
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, G, 32, 2)))
            prod = w_hi[None, :, :, :] * x_even[:, None, :, :] + w_lo[None, :, :, :] * x_odd[:, None, :, :]
            acc += prod * scale[None, :, :, None]
    if BLOCK_M == 1:
        out = tl.sum(tl.sum(acc, axis=2), axis=1)[None, :]  # [1, BLOCK_N]
    else:
        out = tl.sum(tl.sum(acc, axis=3), axis=2)  # [BLOCK_M, BLOCK_N]
    _finish(out, rows, rn, M, N, stride_om, pid_n, pid_k, out_ptr, ws_ptr, lock_ptr, bias_ptr, SPLIT_K, HAS_BIAS)


@triton.jit(do_not_specialize=["M"])
def nf4_gemm_kernel(x_ptr, codes_ptr, absq_ptr, abs2_ptr, off2_ptr, code2_ptr, nf4_ptr, bias_ptr, out_ptr,
                    ws_ptr, lock_ptr, M, N, K, stride_xm, stride_om, stride_wn, r1, r2, nb1, nb2,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                    NESTED: tl.constexpr, HAS_BIAS: tl.constexpr):
    """A [BLOCK_M, BLOCK_N] output tile with tensor cores: the NF4 tile is dequantized to x's dtype."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    G: tl.constexpr = BLOCK_K // 64
    HALF: tl.constexpr = BLOCK_K // 2
    KB = K // 64
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    hb = tl.arange(0, HALF)
    num_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(num_tiles, SPLIT_K)
    start = pid_k * per_split
    stop = tl.minimum(start + per_split, num_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_bytes = rn.to(tl.int64) * stride_wn
    mmask = rm < M
    for t in range(start, stop):
        kb = t * HALF + hb  # byte index within a row, [HALF]
        kmask = kb < stride_wn
        packed = tl.load(codes_ptr + row_bytes[:, None] + kb[None, :], mask=(rn < N)[:, None] & kmask[None, :],
                         other=0)
        scale = _scales(absq_ptr, abs2_ptr, off2_ptr, code2_ptr, rn, t, N, KB, r1, r2, nb1, nb2,
                        G, BLOCK_N, NESTED)
        w_hi = tl.reshape(tl.reshape(tl.load(nf4_ptr + (packed >> 4).to(tl.int32)), (BLOCK_N, G, 32))
                          * scale[:, :, None], (BLOCK_N, HALF))
        w_lo = tl.reshape(tl.reshape(tl.load(nf4_ptr + (packed & 15).to(tl.int32)), (BLOCK_N, G, 32))
                          * scale[:, :, None], (BLOCK_N, HALF))
        xmask = mmask[:, None] & kmask[None, :]
        x_even = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * kb[None, :], mask=xmask, other=0.0)
        x_odd = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * kb[None, :] + 1, mask=xmask, other=0.0)
        # ieee: float32 activations stay float32 (the default would round them to TF32 on sm_80+, 1e-2 off the
        # reference); half-precision operands are unaffected (the same bf16/fp16 MMA either way)
        acc = tl.dot(x_even, tl.trans(w_hi.to(x_even.dtype)), acc, input_precision="ieee")
        acc = tl.dot(x_odd, tl.trans(w_lo.to(x_odd.dtype)), acc, input_precision="ieee")
    _finish(acc, rm, rn, M, N, stride_om, pid_m * tl.num_programs(0) + pid_n, pid_k, out_ptr, ws_ptr, lock_ptr,
            bias_ptr, SPLIT_K, HAS_BIAS)
