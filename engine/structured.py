"""Constrained decoding, the engine's side: compiled grammars, the matcher each constrained request advances token by
token, the step's token bitmasks (filled on the CPU while the GPU runs the step) and the device op that applies them
to the logits.

The engine sees token ids only: a grammar arrives compiled (``grammars.py`` builds it from tools and JSON schemas),
rides on ``SamplingParams.grammar``, and every request that uses it gets its own copy of the matcher. The grammar
engine is llguidance (an Earley parser over a derivative-based lexer, in Rust): see README, "Structured outputs", for
why it and not xgrammar.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import torch
from llguidance import LLExecutor, LLMatcher, LLParserLimits, LLTokenizer

log = logging.getLogger(__name__)

# llguidance's resource limits, tightened where a client's schema could make one step slow for the whole batch.
# Defaults: lexer fuel 200K per step (~14 ms), 50K Earley items per step (~2.5 ms), grammar size 500K symbols.
PARSER_LIMITS = dict(step_lexer_fuel=100_000, step_max_items=25_000, max_grammar_size=200_000,
                     initial_lexer_fuel=1_000_000, max_lexer_states=100_000, verbose_errors=False)


def parser_limits() -> LLParserLimits:
    return LLParserLimits(**PARSER_LIMITS)


class GrammarCompileError(ValueError):
    """llguidance refused a grammar (its message, first line only: never the parser's internal state)."""


class GrammarTokenizer:
    """The tokenizer as the grammar engine sees it. Building it walks the whole vocabulary (about a second for
    Qwen's 152K tokens): once, at start-up.

    ``vocab_size`` is the width of the model's logits (Qwen pads 151,665 tokens to 152,064); ids past the
    tokenizer's are never allowed. ``stop_token_ids`` are the tokens that may end a finished grammar.
    """

    def __init__(self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        import llguidance.hf

        if not stop_token_ids:
            raise ValueError("a grammar needs at least one stop token")
        self.vocab_size = vocab_size
        self.stop_token_ids = frozenset(stop_token_ids)
        self.ll: LLTokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size,
                                                            eos_token=sorted(self.stop_token_ids))
        self._hf = hf_tokenizer

    def special_token(self, text: str) -> int | None:
        """The id of ``text`` if it is one token the grammar engine treats as special (an added token)."""
        ids = self._hf.encode(text, add_special_tokens=False)
        return ids[0] if len(ids) == 1 and self.ll.is_special_token(ids[0]) else None

    def encode(self, text: str) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=False))


_LOCATION = re.compile(r"^at \d+\(\d+\): (failed to compile JSON schema: )?")


def first_line(message: str) -> str:
    """llguidance's message in one line, without its parser state: "regex parse error:" keeps its "error: ..."
    line (the others draw a caret under the regex)."""
    lines = [ln.strip() for ln in message.split("<state>", 1)[0].splitlines() if ln.strip()]
    if not lines:
        return "unknown error"
    head = _LOCATION.sub("", lines[0])
    detail = next((ln for ln in lines[1:] if ln.startswith("error:")), None)
    return f"{head} {detail[len('error:'):].strip()}" if detail else head


class Grammar:
    """A compiled grammar, immutable and shared by every request that uses it.

    ``prefix`` holds token ids the prompt already ends with (a forced ``<tool_call>`` opening): the template matcher
    has consumed them, so each request's matcher starts right after them.
    """

    def __init__(self, tokenizer: GrammarTokenizer, text: str, prefix: Sequence[int] = ()) -> None:
        matcher = LLMatcher(tokenizer.ll, text, log_level=0, limits=parser_limits())
        if matcher.is_error():
            raise GrammarCompileError(first_line(matcher.get_error()))
        if prefix and not matcher.consume_tokens(list(prefix)):
            raise GrammarCompileError(f"the forced prefix does not fit the grammar: {first_line(matcher.get_error())}")
        # The first mask builds the lexer's initial state: a regex too large to build fails here, not mid-stream.
        matcher.compute_bitmask()
        if matcher.is_error():
            raise GrammarCompileError(first_line(matcher.get_error()))
        self.text = text
        self.prefix = tuple(prefix)
        self.vocab_size = tokenizer.vocab_size
        self._template = matcher
        # Set when a request's matcher failed: every copy shares the template's lexer state, which a lexer limit
        # (too many expressions) leaves exhausted for all later copies too. Caches compile such a grammar afresh.
        self.failed = False

    def matcher(self) -> RowMatcher:
        return RowMatcher(self._template.deep_copy(), self)

    def __repr__(self) -> str:
        return f"Grammar({len(self.text)} chars, prefix {len(self.prefix)} tokens)"


class RowMatcher:
    """One request's position in its grammar. Masks come from ``MaskBatch.fill``; ``accept`` advances it."""

    __slots__ = ("ll", "grammar")

    def __init__(self, ll: LLMatcher, grammar: Grammar) -> None:
        self.ll = ll
        self.grammar = grammar

    def accept(self, token_id: int) -> bool:
        """Advance by the sampled token; False when the grammar refuses it (the matcher is then in error)."""
        return self.ll.consume_token(token_id)

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but a stop token may follow. (llguidance also stops on an error.)"""
        return self.ll.is_stopped() and not self.ll.is_error()

    @property
    def error(self) -> str | None:
        """Why the matcher failed, or None. A failure marks its grammar (see ``Grammar.failed``)."""
        if not self.ll.is_error():
            return None
        self.grammar.failed = True
        return first_line(self.ll.get_error())

    def allows(self, token_id: int) -> bool:
        """Whether the next token may be ``token_id`` (without advancing; for tests and checks)."""
        return self.ll.validate_tokens([token_id]) == 1


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


class MaskBatch:
    """The token bitmasks of one step's rows: int32 words, bit ``t % 32`` of word ``t // 32`` set when token ``t``
    is allowed. Filled in a host buffer (pinned on CUDA, so the copy overlaps), rows without a matcher left all
    ones, then copied to the device. llguidance fills the rows on its own threads without the GIL.
    """

    def __init__(self, vocab_size: int, max_rows: int, device: torch.device, threads: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.words = bitmask_words(vocab_size)
        self.device = torch.device(device)
        pin = self.device.type == "cuda"
        self.host = torch.full((max_rows, self.words), -1, dtype=torch.int32, pin_memory=pin)
        self.dev = torch.full((max_rows, self.words), -1, dtype=torch.int32, device=self.device)
        threads = threads if threads is not None else max(1, min(8, (os.cpu_count() or 2) // 2))
        self.executor = LLExecutor(num_threads=threads) if threads > 1 else None

    def fill(self, matchers: Sequence[RowMatcher | None]) -> torch.Tensor | None:
        """Masks [len(matchers), words] on the device for this step's rows, in order; None when no row has a
        matcher (then nothing is computed or copied)."""
        n = len(matchers)
        jobs = [(m.ll, i) for i, m in enumerate(matchers) if m is not None]
        if not jobs:
            return None
        host = self.host[:n]
        if len(jobs) < n:
            host.fill_(-1)
        if self.executor is not None and len(jobs) > 1:
            self.executor.unsafe_compute_mask_ptr(jobs, host.data_ptr(), self.words * 4, n)
        else:
            for ll, i in jobs:
                row = host[i]
                ll.unsafe_compute_mask_ptr(row.data_ptr(), self.words * 4)
        dev = self.dev[:n]
        dev.copy_(host, non_blocking=True)
        return dev


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 bitmask [n, words] -> bool [n, vocab_size] (True: allowed), on the bitmask's device.

    Read as bytes (little-endian words: token ``t`` is bit ``t % 8`` of byte ``t // 8``), so the intermediate is
    [n, words * 4, 8] uint8, a quarter of an int32 expansion.
    """
    as_bytes = bitmask.contiguous().view(torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    bits = (as_bytes.unsqueeze(-1) >> shifts) & 1
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


def apply_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Set the logits of disallowed tokens to -inf in place; logits [n, >= V], bitmask [n, words]. Columns past the
    mask's width (padding of the logits) are disallowed too."""
    vocab = min(logits.shape[-1], bitmask.shape[-1] * 32)
    allowed = unpack_bitmask(bitmask, vocab)
    logits[:, :vocab].masked_fill_(~allowed, float("-inf"))
    if logits.shape[-1] > vocab:
        logits[:, vocab:] = float("-inf")
    return logits


def masked_logits(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``apply_bitmask_`` on a copy (the model's logits may live in a CUDA graph's output buffer)."""
    return apply_bitmask_(logits.clone(), bitmask)
