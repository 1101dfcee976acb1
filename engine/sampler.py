"""Batched sampling on the device: every row keeps its own temperature, top-k, top-p, min-p, penalties and seed.

Per-row parameters live in persistent device tensors, written once when a request takes a row (``start_row``),
so a step sends nothing to the device but the row indices (already in the runner's step buffer) and reads back
only the sampled tokens.

Randomness is counter-based: the noise of token ``t`` at a row's ``n``-th sampled token is a hash of (the row's
seed, n, t). A seeded request therefore draws the same noise whatever else is in the batch (the batch's largest
top-k, its size, its order), across preemption (``n`` restarts from the tokens already generated), and with no
generator object or per-row loop. Unseeded requests get a random seed when they are first admitted.
"""
from __future__ import annotations

import secrets
from collections.abc import Sequence

import numpy as np
import torch

from engine.request import SamplingParams

M32 = 0xFFFFFFFF
_TEMP, _TOP_P, _MIN_P, _REP, _PRES, _FREQ = range(6)  # float params columns
_TOP_K, _SEED_LO, _SEED_HI, _DRAWN = range(4)  # int params columns (_DRAWN: tokens sampled so far)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 0 <= x < 2**32 in int64 arithmetic that never overflows."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * (c & 0xFFFF)) & 0xFFFF) << 16)) & M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash with good avalanche (Chris Wellons' lowbias32) on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def noise(seed_lo: torch.Tensor, seed_hi: torch.Tensor, drawn: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Exponential(1) noise [n, k] for tokens ``token_ids`` [n, k] of rows with (seed, tokens drawn so far) [n]:
    a pure function of its inputs, so one row's noise never depends on the others."""
    key = hash32(hash32(hash32(seed_hi) ^ seed_lo) ^ (drawn & M32)).unsqueeze(1)
    h = hash32(hash32(token_ids ^ key) ^ hash32(key ^ 0x5BD1E995))
    u = ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))  # 24 bits: exactly representable, strictly inside (0, 1)
    return -torch.log(u)


def _order_key(logits: torch.Tensor) -> torch.Tensor:
    """int64 [n, V], distinct within a row: ordered as the float32 logits, ties broken by the lower token id."""
    bits = logits.contiguous().view(torch.int32).long()
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # the IEEE bits as integers in the floats' order
    ids = torch.arange(logits.shape[-1], device=logits.device)
    return ordered * (1 << 32) + (M32 - ids)


class Sampler:
    """Samples one token per row from ``logits`` [n, V] in one batched pass (see the module docstring)."""

    def __init__(self, vocab_size: int, max_rows: int, device: torch.device) -> None:
        self.device = device
        self.vocab_size = vocab_size
        self.fparams = torch.zeros(max_rows, 6, dtype=torch.float32, device=device)
        self.iparams = torch.zeros(max_rows, 4, dtype=torch.int64, device=device)
        # presence[row, token]: token occurs in that row's prompt or output (repetition penalty)
        self.presence = torch.zeros(max_rows, vocab_size, dtype=torch.bool, device=device)
        # counts[row, token]: times the row generated the token (presence / frequency penalties)
        self.counts = torch.zeros(max_rows, vocab_size, dtype=torch.int32, device=device)
        # last[row]: the row's latest sampled token, where the next step's input is read from while the token
        # is still on its way to the host (async scheduling)
        self.last = torch.zeros(max_rows, dtype=torch.int64, device=device)
        # host mirrors: what a step must compute at all (no device read needed to decide)
        self._greedy = np.ones(max_rows, dtype=bool)
        self._top_k = np.zeros(max_rows, dtype=np.int64)
        self._repetition = np.zeros(max_rows, dtype=bool)
        self._additive = np.zeros(max_rows, dtype=bool)

    @staticmethod
    def new_seed() -> int:
        return secrets.randbits(64)

    def start_row(self, row: int, params: SamplingParams, token_ids: Sequence[int], generated: Sequence[int] = (),
                  seed: int | None = None) -> None:
        """Give ``row`` to a request: its parameters, the tokens it starts from (prompt and output so far, for its
        penalties) and its seed (``params.seed``, else ``seed``, else a random one)."""
        seed = params.seed if params.seed is not None else seed if seed is not None else self.new_seed()
        f = torch.tensor([params.temperature, params.top_p, params.min_p, params.repetition_penalty,
                          params.presence_penalty, params.frequency_penalty], dtype=torch.float32)
        i = torch.tensor([params.top_k, seed & M32, seed >> 32, len(generated)], dtype=torch.int64)
        self.fparams[row].copy_(f, non_blocking=True)
        self.iparams[row].copy_(i, non_blocking=True)
        self._greedy[row] = params.greedy
        self._top_k[row] = params.top_k
        self._repetition[row] = params.repetition_penalty != 1.0
        self._additive[row] = bool(params.presence_penalty or params.frequency_penalty)
        self.presence[row].zero_()
        ids = torch.tensor([t for t in token_ids if 0 <= t < self.vocab_size], dtype=torch.long)
        self.presence[row, ids.to(self.device)] = True
        self.counts[row].zero_()
        out = torch.tensor([t for t in generated if 0 <= t < self.vocab_size], dtype=torch.long).to(self.device)
        self.counts[row].index_add_(0, out, torch.ones_like(out, dtype=torch.int32))

    def sample(self, logits: torch.Tensor, rows: torch.Tensor, host_rows: Sequence[int],
               allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens [n] (on the device) for ``logits`` [n, >=V] of rows ``rows`` (device) / ``host_rows``.

        ``allowed`` (bool [n, V], optional) restricts each row to the tokens marked True (e.g. a grammar's)."""
        logits = logits[:, : self.vocab_size].float()
        if allowed is not None:
            logits = logits.masked_fill(~allowed[:, : self.vocab_size], float("-inf"))
        hr = np.asarray(host_rows, dtype=np.int64)
        fp, ip = self.fparams[rows], self.iparams[rows]
        if self._repetition[hr].any():
            pen = fp[:, _REP:_REP + 1]
            seen = self.presence[rows]
            logits = torch.where(seen, torch.where(logits > 0, logits / pen, logits * pen), logits)
        if self._additive[hr].any():
            counts = self.counts[rows].float()
            logits = logits - fp[:, _FREQ:_FREQ + 1] * counts - fp[:, _PRES:_PRES + 1] * (counts > 0).float()
        tokens = logits.argmax(dim=-1)
        sampling = ~self._greedy[hr]
        if sampling.any():
            top_k = self._top_k[hr][sampling]
            k = self.vocab_size if (top_k == 0).any() else min(self.vocab_size, int(top_k.max()))
            greedy = (fp[:, _TEMP] == 0) | (ip[:, _TOP_K] == 1)
            tokens = torch.where(greedy, tokens, self._draw(logits, fp, ip, k))
        self.presence[rows, tokens] = True
        self.counts[rows, tokens] += 1
        self.iparams[rows, _DRAWN] += 1
        self.last[rows] = tokens
        return tokens

    def _draw(self, logits: torch.Tensor, fp: torch.Tensor, ip: torch.Tensor, k: int) -> torch.Tensor:
        """HF's order: temperature, top-k, then top-p and min-p on the renormalised top-k distribution; then an
        exponential race (argmax p/E, E ~ Exp(1)), which draws from the renormalised distribution."""
        vocab = logits.shape[-1]
        # top-k needs only the k best (cheap on 152K vocabularies); without it, a full sort. Both rank by a unique
        # key (the logit, then the lower token id), so tied logits (common in bf16) come in the same order whatever
        # k the batch asks for: which tie falls inside a row's top-k or top-p is the row's alone.
        key = _order_key(logits)
        order = key.topk(k, dim=-1).indices if k < vocab else key.sort(dim=-1, descending=True).indices
        top = logits.gather(1, order)
        temp = fp[:, _TEMP:_TEMP + 1]
        temp = torch.where(temp > 0, temp, torch.ones_like(temp))  # greedy rows: their draw is not used
        ranks = torch.arange(k, device=logits.device).unsqueeze(0)
        row_k = ip[:, _TOP_K:_TOP_K + 1]
        row_k = torch.where(row_k > 0, row_k, torch.full_like(row_k, k))
        probs = torch.softmax((top / temp).masked_fill(ranks >= row_k, float("-inf")), dim=-1)
        drop = (probs.cumsum(dim=-1) - probs) >= fp[:, _TOP_P:_TOP_P + 1]  # keeps the smallest set reaching top_p
        drop |= probs < fp[:, _MIN_P:_MIN_P + 1] * probs[:, :1]
        drop[:, 0] = False
        probs = probs.masked_fill(drop, 0.0)
        race = probs / noise(ip[:, _SEED_LO], ip[:, _SEED_HI], ip[:, _DRAWN], order)
        return order.gather(1, race.argmax(dim=-1, keepdim=True)).squeeze(1)
