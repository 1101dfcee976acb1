"""NF4 weights as bitsandbytes stores them, fused where that saves launches, multiplied by our Triton kernels.

Layout (bitsandbytes' own, unchanged: no value is recomputed). A weight W [N, K] (K a multiple of 64) is
``codes``: N*K/2 bytes, row-major, element ``j = n*K + k`` in the high nibble of byte ``j//2`` when ``j`` is
even, else in the low nibble, each nibble an index into the 16-value NF4 table; ``absmax_q``: one uint8 per
64 consecutive elements; with double quantization (what the server loads) the 64-block scale is
``code2[absmax_q[b]] * absmax2[b // 256] + offset`` (``code2`` bitsandbytes' 256-entry dynamic map, ``absmax2``
one float32 per 256 blocks, ``offset`` one float32 per weight).

Fusion (q/k/v -> one [7168, 5120] weight, gate/up -> one [27648, 5120] for Qwen2.5-14B) stacks the parts by
rows: their codes, absmax_q and absmax2 are copied once into one buffer each, and the bitsandbytes modules are
re-pointed to views of those buffers, so memory does not grow (the parts' old storage is freed) and the
modules keep working (the ``bnb`` path, and ``model.generate``). The per-weight ``offset`` becomes one float32
per 256-block (``offset2``, 0.006 % of the weight) so that a fused weight needs no branch per part, and the
kernel maps each row's 64-blocks to its own part's 256-blocks (``nb``), so every scale is bitsandbytes'.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from engine.devices import sm_count

log = logging.getLogger(__name__)

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
KERNELS = ("auto", "triton", "bnb")


@dataclass
class NF4Weight:
    """One (possibly fused) NF4 weight [N, K] in bitsandbytes' storage; see the module docstring."""

    codes: torch.Tensor  # uint8 [N*K/2]
    absmax_q: torch.Tensor  # uint8 [N*K/64] (nested) or float32 [N*K/64]
    absmax2: torch.Tensor  # float32 [nested blocks] (empty when not nested)
    offset2: torch.Tensor  # float32 [nested blocks]: each nested block's weight offset
    code2: torch.Tensor  # float32 [256]: the dynamic map absmax_q indexes
    nf4: torch.Tensor  # float32 [16]: the NF4 table codes index
    n: int
    k: int
    bias: torch.Tensor | None = None
    row_starts: tuple[int, ...] = (0,)  # first row of each fused part
    nested_starts: tuple[int, ...] = (0,)  # first nested block of each fused part
    locks: torch.Tensor | None = None  # int32 split-K tile counters (the kernels leave them at zero)

    @property
    def nested(self) -> bool:
        return self.absmax_q.dtype == torch.uint8

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def scales(self) -> torch.Tensor:
        """float32 [N*K/64]: each 64-block's absmax, as bitsandbytes computes it."""
        if not self.nested:
            return self.absmax_q.float()
        kb = self.k // BLOCKSIZE
        blocks = torch.arange(self.n * kb, device=self.device)
        rows = blocks // kb
        part = torch.zeros_like(rows)
        for start in self.row_starts[1:]:
            part += (rows >= start).long()
        row0 = torch.tensor(self.row_starts, device=self.device)[part]
        nest0 = torch.tensor(self.nested_starts, device=self.device)[part]
        nb = nest0 + (blocks - row0 * kb) // NESTED_BLOCKSIZE
        return self.code2[self.absmax_q.long()] * self.absmax2[nb] + self.offset2[nb]

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]: the reference dequantizer (what the kernels must match)."""
        hi = (self.codes >> 4).long()
        lo = (self.codes & 15).long()
        values = self.nf4[torch.stack([hi, lo], dim=1).reshape(-1)]
        return (values.view(-1, BLOCKSIZE) * self.scales().view(-1, 1)).view(self.n, self.k)


def supported(module: torch.nn.Module) -> bool:
    """A bitsandbytes ``Linear4bit`` holding NF4 codes with 64-element blocks along whole rows."""
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is None or getattr(state, "quant_type", None) != "nf4" or state.blocksize != BLOCKSIZE:
        return False
    if weight.data.dtype != torch.uint8:  # bnb_4bit_quant_storage other than uint8
        return False
    if getattr(state, "packing_format_for_cpu", False):  # bitsandbytes' AVX512 repack (CPU only): another layout
        return False
    if len(state.shape) != 2 or state.shape[1] % BLOCKSIZE:
        return False
    return not state.nested or state.state2.blocksize == NESTED_BLOCKSIZE


def from_bnb(module: torch.nn.Module) -> NF4Weight:
    """A view of a ``Linear4bit``'s storage (nothing is copied but the per-block offsets)."""
    weight = module.weight
    state = weight.quant_state
    n, k = state.shape
    codes = weight.data.reshape(-1)
    if state.nested:
        absmax_q, absmax2, code2 = state.absmax.reshape(-1), state.state2.absmax.reshape(-1), state.state2.code
        offset2 = torch.full_like(absmax2, float(state.offset))
    else:
        absmax_q = state.absmax.reshape(-1).float()
        absmax2 = offset2 = torch.zeros(0, device=codes.device)
        code2 = torch.zeros(256, device=codes.device)
    bias = module.bias.data if getattr(module, "bias", None) is not None else None
    return NF4Weight(codes, absmax_q, absmax2.float(), offset2.float(), code2.float(), state.code.float(), n, k, bias)


def fuse(modules: Sequence[torch.nn.Module]) -> NF4Weight:
    """Stack ``modules`` (same K, all nested or none) by rows into one weight, re-pointing each module's
    bitsandbytes storage to views of the fused buffers (their old storage is freed)."""
    if not 1 <= len(modules) <= 3:
        raise ValueError("the kernels take one to three fused parts")
    parts = [from_bnb(m) for m in modules]
    first = parts[0]
    if len({p.k for p in parts}) != 1 or len({p.nested for p in parts}) != 1:
        raise ValueError("fused weights need the same K and quantization")
    if not all(torch.equal(p.code2, first.code2) and torch.equal(p.nf4, first.nf4) for p in parts):
        raise ValueError("fused weights need the same code tables")
    codes = torch.cat([p.codes for p in parts])
    absmax_q = torch.cat([p.absmax_q for p in parts])
    absmax2 = torch.cat([p.absmax2 for p in parts])
    offset2 = torch.cat([p.offset2 for p in parts])
    biases = [p.bias for p in parts]
    bias = torch.cat(biases) if all(b is not None for b in biases) else None
    if bias is None and any(b is not None for b in biases):
        dtype = next(b.dtype for b in biases if b is not None)
        bias = torch.cat([b if b is not None else torch.zeros(p.n, dtype=dtype, device=first.device)
                          for b, p in zip(biases, parts)])
    row_starts, nested_starts = [0], [0]
    for p in parts[:-1]:
        row_starts.append(row_starts[-1] + p.n)
        nested_starts.append(nested_starts[-1] + p.absmax2.numel())
    # Re-point the modules at the fused storage: same values, one copy.
    c0 = a0 = s0 = 0
    for m, p in zip(modules, parts):
        state = m.weight.quant_state
        m.weight.data = codes[c0:c0 + p.codes.numel()].view(m.weight.data.shape)
        state.absmax = absmax_q[a0:a0 + p.absmax_q.numel()].view(state.absmax.shape)
        if p.nested:
            state.state2.absmax = absmax2[s0:s0 + p.absmax2.numel()].view(state.state2.absmax.shape)
        c0, a0, s0 = c0 + p.codes.numel(), a0 + p.absmax_q.numel(), s0 + p.absmax2.numel()
    return NF4Weight(codes, absmax_q, absmax2, offset2, first.code2, first.nf4, sum(p.n for p in parts), first.k,
                     bias, tuple(row_starts), tuple(nested_starts))


# ---- the matmul ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelConfig:
    block_m: int  # 0: the GEMV kernel (all of x's rows, at most GEMV_MAX_M, in each program)
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 2


GEMV_MAX_M = 4
# (kind, N, K, M) -> config; scripts/bench_nf4.py --tune prints the best per shape to paste here.
TUNED: dict[tuple[str, int, int, int], KernelConfig] = {}


def pick_config(m: int, n: int, k: int, device: torch.device) -> KernelConfig:
    """A tuned entry if there is one, else a heuristic chosen from the compiled kernels on sm_90 (registers and
    SASS, read with Triton's cuobjdump; no GPU has timed them yet: ``scripts/bench_nf4.py --tune`` does):
    GEMV tiles of 16 rows x 256 columns, one 16-byte load (LDG.128) per thread per step, 96 registers and
    315 instructions per step at M=1; tensor-core tiles of 64 columns x 64 (107-186 registers, no spills).
    Split-K until there are enough programs to keep every SM busy (8 per SM for GEMV, 2 for tensor cores)."""
    kind = "gemv" if m <= GEMV_MAX_M else "gemm"
    bucket_m = m if kind == "gemv" else (16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128)
    tuned = TUNED.get((kind, n, k, bucket_m))
    if tuned is not None:
        return tuned
    sms = sm_count(device)
    if kind == "gemv":
        block_n, block_k = 16, (256 if k % 256 == 0 else 128 if k % 128 == 0 else 64)
        split = max(1, min(k // block_k, cdiv(8 * sms, cdiv(n, block_n))))
        return KernelConfig(0, block_n, block_k, split, num_warps=4 if m == 1 else 8)
    block_m, block_n, block_k = min(bucket_m, 64), 64, 64
    programs = cdiv(n, block_n) * cdiv(m, block_m)
    split = max(1, min(k // block_k, cdiv(2 * sms, programs)))
    return KernelConfig(block_m, block_n, block_k, split, num_warps=4 if block_m == 16 else 8)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def nf4_matmul(x: torch.Tensor, w: NF4Weight, config: KernelConfig | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for x [..., K] with the Triton kernels (no host sync; capturable in a CUDA graph)."""
    import triton

    from engine import nf4_triton as kern

    shape = x.shape
    x2 = x.reshape(-1, w.k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    cfg = config or pick_config(m, w.n, w.k, x.device)
    out = torch.empty(m, w.n, dtype=x.dtype, device=x.device)
    ws = out if cfg.split_k == 1 else torch.empty(cfg.split_k, m, w.n, dtype=torch.float32, device=x.device)
    tiles = cdiv(w.n, cfg.block_n) * (1 if cfg.block_m == 0 else cdiv(m, cfg.block_m))
    if w.locks is None or w.locks.numel() < tiles:  # split-K tile counters; every call leaves them at zero
        w.locks = torch.zeros(max(tiles, cdiv(w.n, 16) * cdiv(MAX_KERNEL_ROWS, 16)),
                              dtype=torch.int32, device=x.device)
    rs = (*w.row_starts[1:], w.n, w.n)[:2]
    ns = (*w.nested_starts[1:], 0, 0)[:2]
    bias = w.bias if w.bias is not None else w.nf4  # any pointer when there is none
    abs2, off2 = (w.absmax2, w.offset2) if w.nested else (w.absmax_q, w.absmax_q)  # unused without nesting
    args = (x2, w.codes, w.absmax_q, abs2, off2, w.code2, w.nf4, bias, out, ws, w.locks, m, w.n, w.k,
            x2.stride(0), out.stride(0), w.k // 2, rs[0], rs[1], ns[0], ns[1])
    if cfg.block_m == 0:
        if m > GEMV_MAX_M:
            raise ValueError(f"the GEMV kernel takes at most {GEMV_MAX_M} rows, not {m}")
        grid = (cdiv(w.n, cfg.block_n), cfg.split_k)
        kern.nf4_gemv_kernel[grid](*args, BLOCK_M=triton.next_power_of_2(m), BLOCK_N=cfg.block_n,
                                   BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
                                   NESTED=w.nested, HAS_BIAS=w.bias is not None, num_warps=cfg.num_warps,
                                   num_stages=cfg.num_stages)
    else:
        grid = (cdiv(w.n, cfg.block_n), cfg.split_k, cdiv(m, cfg.block_m))
        kern.nf4_gemm_kernel[grid](*args, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                                   SPLIT_K=cfg.split_k, NESTED=w.nested, HAS_BIAS=w.bias is not None,
                                   num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.view(*shape[:-1], w.n)


def reference_matmul(x: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """The same product through the reference dequantizer (the tests and the load-time self-check)."""
    y = x.float() @ w.dequantize().T
    if w.bias is not None:
        y = y + w.bias.float()
    return y.to(x.dtype)


# ---- wiring into the model -------------------------------------------------------------------------------------------
# Above this many rows (prefill chunks, very large decode batches) bitsandbytes' path (dequantize the whole
# weight once, then a cuBLAS GEMM) wins over re-dequantizing the weight per tile of rows.
MAX_KERNEL_ROWS = 128


class NF4Linear:
    """A callable projection: one NF4 weight through ``matmul`` (the Triton kernels) for up to
    ``MAX_KERNEL_ROWS`` rows, else through the bitsandbytes modules it was built from (concatenated)."""

    def __init__(self, weight: NF4Weight, matmul: Callable[[torch.Tensor, NF4Weight], torch.Tensor],
                 modules: Sequence[torch.nn.Module] = ()) -> None:
        self.weight = weight
        self.matmul = matmul
        self.modules = list(modules)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.modules and x.numel() > MAX_KERNEL_ROWS * self.weight.k:
            outs = [m(x) for m in self.modules]
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return self.matmul(x, self.weight)


@dataclass
class LayerProjections:
    """One decoder layer's projections: q/k/v fused, o, gate/up fused, down."""

    qkv: NF4Linear
    q_size: int
    kv_size: int
    o: NF4Linear
    gate_up: NF4Linear
    intermediate: int
    down: NF4Linear
    act: Callable[[torch.Tensor], torch.Tensor]

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split([self.intermediate, self.intermediate], dim=-1)
        return self.down(self.act(gate) * up)


def build_projections(hf_model: torch.nn.Module,
                      matmul: Callable[[torch.Tensor, NF4Weight], torch.Tensor]) -> list[LayerProjections] | None:
    """Fused NF4 projections for every layer of a Qwen2/Llama-shaped bitsandbytes model, or None when any
    projection is not NF4 in a layout the kernels read (then the model's own modules keep running)."""
    layers = hf_model.model.layers
    for layer in layers:
        a, mlp = layer.self_attn, layer.mlp
        mods = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if not all(supported(m) for m in mods):
            return None
    out = []
    for layer in layers:
        a, mlp = layer.self_attn, layer.mlp
        qkv, gate_up = [a.q_proj, a.k_proj, a.v_proj], [mlp.gate_proj, mlp.up_proj]
        out.append(LayerProjections(
            qkv=NF4Linear(fuse(qkv), matmul, qkv),
            q_size=a.q_proj.weight.quant_state.shape[0], kv_size=a.k_proj.weight.quant_state.shape[0],
            o=NF4Linear(from_bnb(a.o_proj), matmul, [a.o_proj]),
            gate_up=NF4Linear(fuse(gate_up), matmul, gate_up),
            intermediate=mlp.gate_proj.weight.quant_state.shape[0],
            down=NF4Linear(from_bnb(mlp.down_proj), matmul, [mlp.down_proj]), act=mlp.act_fn))
    return out


def triton_available() -> str | None:
    """None when the Triton kernels can run here, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    if not torch.cuda.is_available():
        return "no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)"
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return f"compute capability {major}.x < 8.0"
    return None


def self_check(proj: LayerProjections, dtype: torch.dtype, device: torch.device) -> str | None:
    """Run the kernels once on each of the first layer's projections (GEMV and tensor-core paths) against the
    reference dequantizer; None when they agree within the activation dtype's precision."""
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        for name, lin in (("qkv", proj.qkv), ("o", proj.o), ("gate_up", proj.gate_up), ("down", proj.down)):
            for m in (1, 3, GEMV_MAX_M + 1):
                x = torch.randn(m, lin.weight.k, generator=gen).to(device=device, dtype=dtype)
                got = nf4_matmul(x, lin.weight).float()
                want = reference_matmul(x.float(), lin.weight).float()
                err = (got - want).abs().max().item()
                if not err <= 2e-2 * want.abs().max().item() + 1e-6:
                    return f"self-check mismatch on {name} at M={m}: max error {err:.3g}"
    except Exception as exc:  # a compile or launch failure on this GPU/Triton: fall back, say why
        return f"{type(exc).__name__}: {exc}"
    return None


def kernel_variant(m: int, w: NF4Weight, device: torch.device) -> tuple[KernelConfig, int]:
    """What Triton compiles a kernel for at ``m`` rows of ``w``: its config and BLOCK_M. M itself is not part of
    it (the kernels do not specialise on M); N, K and the strides are the weight's, the same on every call."""
    cfg = pick_config(m, w.n, w.k, device)
    return cfg, (1 << (m - 1).bit_length() if cfg.block_m == 0 else cfg.block_m)


def warm_up(proj: LayerProjections, dtype: torch.dtype, device: torch.device) -> int:
    """Compile every kernel variant any row count up to ``MAX_KERNEL_ROWS`` needs (decode batches and eager
    prefill chunks alike; Triton caches them on disk), so that no request waits for a compile. Returns how many
    calls it made: one per distinct variant per projection."""
    calls = 0
    for lin in (proj.qkv, proj.o, proj.gate_up, proj.down):
        seen = set()
        for m in range(1, MAX_KERNEL_ROWS + 1):
            variant = kernel_variant(m, lin.weight, device)
            if variant not in seen:
                seen.add(variant)
                nf4_matmul(torch.zeros(m, lin.weight.k, dtype=dtype, device=device), lin.weight)
                calls += 1
    return calls


def compile_count() -> int:
    """Kernels Triton has compiled so far in this process (0 under the interpreter, which compiles nothing):
    a benchmark compares it before and after a timed step to refuse timings that include a compile."""
    try:
        from engine import nf4_triton as kern
    except ImportError:
        return 0
    total = 0
    for fn in (kern.nf4_gemv_kernel, kern.nf4_gemm_kernel):
        for entry in getattr(fn, "device_caches", {}).values():  # device -> (kernel cache, ...) in Triton 3.x
            total += len(entry[0])
    return total


def install(paged_model, kernel: str) -> str:
    """Select the projections a ``PagedQwen2`` runs: ``triton`` (fused NF4 kernels) or ``bnb`` (the model's own
    bitsandbytes modules). ``auto`` means triton where it runs. Returns what is in use, with a log line."""
    if kernel not in KERNELS:
        raise ValueError(f"nf4 kernel must be one of {KERNELS}")
    if kernel == "bnb":
        return "bnb"
    why = triton_available()
    projections = None
    if why is None:
        projections = build_projections(paged_model.hf, nf4_matmul)
        if projections is None:
            why = "a projection is not NF4 with 64-element blocks"
    if why is None:
        why = self_check(projections[0], paged_model.dtype, paged_model.device)
    if why is not None:
        log.warning("NF4 Triton kernels not used (%s): falling back to bitsandbytes' kernels", why)
        return "bnb"
    paged_model.projections = projections
    started = time.perf_counter()
    if os.environ.get("TRITON_INTERPRET") != "1":
        warm_up(projections[0], paged_model.dtype, paged_model.device)
    log.info("NF4 matmuls: Triton kernels, q/k/v and gate/up fused (%d layers; kernels ready in %.1f s)",
             len(projections), time.perf_counter() - started)
    return "triton"
