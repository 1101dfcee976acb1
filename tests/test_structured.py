"""engine/structured.py: bitmasks filled per row (rows without a grammar left open), unpacked and applied on the device
without touching the allowed logits, matchers that follow the grammar and report errors instead of raising."""
from __future__ import annotations

import random

import pytest
import torch

from engine.structured import (Grammar, GrammarCompileError, MaskBatch, apply_bitmask_, bitmask_words, first_line,
                               unpack_bitmask)

JSON_INT = 'start: %json {"type": "integer", "minimum": 0, "maximum": 99}'


def reference_unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    out = torch.zeros(bitmask.shape[0], vocab, dtype=torch.bool)
    for r in range(bitmask.shape[0]):
        for t in range(vocab):
            out[r, t] = bool((int(bitmask[r, t // 32]) >> (t % 32)) & 1)
    return out


def test_unpack_matches_a_bit_by_bit_reference():
    gen = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 5), dtype=torch.int32, generator=gen)
    for vocab in (160, 150, 129):
        assert torch.equal(unpack_bitmask(bitmask, vocab), reference_unpack(bitmask, vocab))


def test_apply_sets_minus_inf_exactly_outside_the_mask_and_keeps_allowed_logits_bit_for_bit():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 100, generator=gen)
    bitmask = torch.randint(-2**31, 2**31 - 1, (4, bitmask_words(96)), dtype=torch.int32, generator=gen)
    bitmask[2] = -1  # an unconstrained row: all ones
    out = apply_bitmask_(logits.clone(), bitmask)
    allowed = torch.cat([reference_unpack(bitmask, 96), torch.zeros(4, 4, dtype=torch.bool)], dim=1)
    assert torch.equal(out[allowed], logits[allowed])
    assert torch.isneginf(out[~allowed]).all()
    assert torch.equal(out[2, :96], logits[2, :96])  # the open row's tokens are untouched
    assert torch.isneginf(out[:, 96:]).all()  # padding columns past the mask are never sampled


def test_fill_leaves_rows_without_a_matcher_open_and_computes_nothing_without_any(grammar_tokenizer):
    grammar = Grammar(grammar_tokenizer, JSON_INT)
    vocab = grammar_tokenizer.vocab_size
    for threads in (1, 2):
        masks = MaskBatch(vocab, 4, torch.device("cpu"), threads=threads)
        assert masks.fill([None, None]) is None
        matchers = [grammar.matcher(), None, grammar.matcher(), None]
        out = masks.fill(matchers)
        assert out.shape == (4, bitmask_words(vocab))
        assert (out[1] == -1).all() and (out[3] == -1).all()
        alone = MaskBatch(vocab, 1, torch.device("cpu"), threads=1).fill([grammar.matcher()])
        assert torch.equal(out[0], alone[0]) and torch.equal(out[2], alone[0])
        digits = set(unpack_bitmask(out[:1], vocab)[0].nonzero().flatten().tolist())
        hf = grammar_tokenizer._hf
        assert digits and all(hf.decode([t]).isdigit() for t in digits)


def test_a_matcher_follows_its_grammar_and_copies_are_independent(grammar_tokenizer):
    grammar = Grammar(grammar_tokenizer, JSON_INT)
    one, two = grammar.matcher(), grammar.matcher()
    seven = grammar_tokenizer.encode("7")[0]
    assert one.accept(seven) and not one.done
    assert two.allows(seven)
    x = grammar_tokenizer.encode("x")[0]
    assert not two.accept(x) and two.error  # refused: the matcher reports, it does not raise
    assert one.error is None
    stop = min(grammar_tokenizer.stop_token_ids)
    assert one.accept(stop) and one.done
    assert not two.done  # llguidance stops a matcher in error too: that is not a complete grammar


def test_a_grammar_that_does_not_compile_raises_one_line(grammar_tokenizer):
    with pytest.raises(GrammarCompileError) as info:
        Grammar(grammar_tokenizer, 'start: %json {"type": "frob"}')
    assert "\n" not in str(info.value) and "frob" in str(info.value)


def test_first_line_keeps_the_regex_error_and_drops_the_parser_state():
    msg = "at 1(8): failed to compile JSON schema: regex parse error:\n    ^(?=a)$\n    ^^^\nerror: look-around is " \
          "not supported\n<state>\nTokens: secret"
    assert first_line(msg) == "regex parse error: look-around is not supported"
    assert first_line("lexer error: too many expressions constructed\n<state>\nx") == \
        "lexer error: too many expressions constructed"


def test_masks_from_parallel_fill_equal_one_by_one(grammar_compiler, grammar_tokenizer):
    """The executor's threads fill the same masks as a sequential fill, step after step of 8 rows."""
    from grammars import ResponseFormat, ToolChoice, ToolSpec
    from schema_cases import SCHEMAS

    tools = [ToolSpec(name, schema) for name, schema in SCHEMAS.items()]
    grammar = grammar_compiler.compile(tools, ToolChoice("auto"), ResponseFormat())
    rng = random.Random(0)
    vocab = grammar_tokenizer.vocab_size
    open_id = grammar_tokenizer.encode("<tool_call>")[0]
    rows = [grammar.matcher() for _ in range(8)]
    for m in rows[::2]:
        assert m.accept(open_id)
    par, seq = MaskBatch(vocab, 8, torch.device("cpu"), threads=2), MaskBatch(vocab, 8, torch.device("cpu"), threads=1)
    for _ in range(30):
        a, b = par.fill(rows), seq.fill(rows)
        assert torch.equal(a, b)
        allowed = unpack_bitmask(a, vocab)
        for i, m in enumerate(rows):
            choices = [t for t in allowed[i].nonzero().flatten().tolist() if t not in grammar_tokenizer.stop_token_ids]
            if m.done or not choices:
                rows[i] = grammar.matcher()
                continue
            assert m.accept(rng.choice(choices))
