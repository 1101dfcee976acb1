"""Batched sampling: every row keeps its own temperature, top-k, top-p, min-p, repetition penalty and seed."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.request import SamplingParams


class Sampler:
    """Samples one token per row from ``logits`` [B, V] in one batched pass.

    Rows with a seed draw their noise from their own generator, so a seeded request reproduces its
    tokens whatever else shares the batch. Greedy rows take the argmax of the penalised logits.
    """

    def __init__(self, vocab_size: int, max_rows: int, device: torch.device) -> None:
        self.device = device
        self.vocab_size = vocab_size
        # presence[row, token]: token occurs in that row's prompt or output (repetition penalty)
        self.presence = torch.zeros(max_rows, vocab_size, dtype=torch.bool, device=device)
        # counts[row, token]: times the row generated the token (presence / frequency penalties)
        self.counts = torch.zeros(max_rows, vocab_size, dtype=torch.int32, device=device)
        self.default_generator = torch.Generator(device=device)
        self.default_generator.seed()

    def make_generator(self, seed: int) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        return gen

    def start_row(self, row: int, token_ids: Sequence[int], generated: Sequence[int] = ()) -> None:
        """Record the tokens a row starts from (prompt and any output so far, for its penalties)."""
        self.presence[row].zero_()
        ids = torch.tensor([t for t in token_ids if t < self.vocab_size], dtype=torch.long)
        self.presence[row, ids.to(self.device)] = True
        self.counts[row].zero_()
        out = torch.tensor([t for t in generated if t < self.vocab_size], dtype=torch.long, device=self.device)
        self.counts[row].index_add_(0, out, torch.ones_like(out, dtype=torch.int32))

    def sample(self, logits: torch.Tensor, rows: Sequence[int], params: Sequence[SamplingParams],
               generators: Sequence[torch.Generator | None]) -> list[int]:
        logits = logits[:, : self.vocab_size].float()
        row_idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        penalties = [p.repetition_penalty for p in params]
        if any(p != 1.0 for p in penalties):
            pen = torch.tensor(penalties, device=self.device).unsqueeze(1)
            seen = self.presence.index_select(0, row_idx)
            logits = torch.where(seen, torch.where(logits > 0, logits / pen, logits * pen), logits)
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            counts = self.counts.index_select(0, row_idx).float()
            freq = torch.tensor([p.frequency_penalty for p in params], device=self.device).unsqueeze(1)
            pres = torch.tensor([p.presence_penalty for p in params], device=self.device).unsqueeze(1)
            logits = logits - freq * counts - pres * (counts > 0).float()
        tokens = logits.argmax(dim=-1)
        sampling = [i for i, p in enumerate(params) if not p.greedy]
        if sampling:
            idx = torch.tensor(sampling, device=self.device)
            tokens[idx] = self._sample_rows(logits[idx], [params[i] for i in sampling],
                                            [generators[i] or self.default_generator for i in sampling])
        self.presence[row_idx, tokens] = True
        self.counts[row_idx, tokens] += 1
        return tokens.tolist()

    def _sample_rows(self, logits: torch.Tensor, params: list[SamplingParams],
                     generators: list[torch.Generator]) -> torch.Tensor:
        """HF's order: temperature, top-k, then top-p and min-p on the renormalised top-k distribution."""
        dev = self.device
        vocab = logits.shape[-1]
        k = vocab if any(p.top_k == 0 for p in params) else min(vocab, max(p.top_k for p in params))
        # top-k needs only the k best (cheap on 152K vocabularies); without it, a full sort
        top, order = logits.topk(k, dim=-1) if k < vocab else logits.sort(dim=-1, descending=True)
        temp = torch.tensor([p.temperature for p in params], device=dev).unsqueeze(1)
        ranks = torch.arange(k, device=dev).unsqueeze(0)
        top_k = torch.tensor([p.top_k or k for p in params], device=dev).unsqueeze(1)
        probs = torch.softmax((top / temp).masked_fill(ranks >= top_k, float("-inf")), dim=-1)
        top_p = torch.tensor([p.top_p for p in params], device=dev).unsqueeze(1)
        min_p = torch.tensor([p.min_p for p in params], device=dev).unsqueeze(1)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p  # keeps the smallest set reaching top_p
        drop |= probs < min_p * probs[:, :1]
        drop[:, 0] = False
        probs = probs.masked_fill(drop, 0.0)
        # Exponential-race sampling (argmax p/E, E ~ Exp(1)) draws from the renormalised distribution;
        # a seeded row draws its noise from its own generator, the others share one draw.
        noise = torch.empty_like(probs).exponential_(generator=self.default_generator)
        for i, gen in enumerate(generators):
            if gen is not self.default_generator:
                noise[i].exponential_(generator=gen)
        choice = (probs / noise).argmax(dim=-1, keepdim=True)
        return order.gather(1, choice).squeeze(1)
