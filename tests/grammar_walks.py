"""Random token streams through a grammar: at each step the mask's allowed tokens, one of them drawn at random. What a
model that writes garbage does under a constraint, without a model. Shared by the grammar tests and the benchmark."""
from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema
import torch

from engine.structured import Grammar, MaskBatch, RowMatcher, unpack_bitmask
from schema_cases import FORMAT_CHECKS


@dataclass
class Walk:
    tokens: list[int]
    finished: bool  # the grammar completed, or a stop token was drawn where one was allowed


def allowed_ids(mask_row: torch.Tensor, vocab_size: int) -> list[int]:
    return unpack_bitmask(mask_row.unsqueeze(0), vocab_size)[0].nonzero().flatten().tolist()


def walk(grammar: Grammar, stop_ids: Sequence[int], rng: random.Random, max_steps: int = 400,
         stop_bias: float = 0.2, check_mask: int = 0) -> Walk:
    """Draw tokens from the mask until the grammar is done, a stop token is drawn, or ``max_steps``.

    ``stop_bias``: the chance of drawing a stop token whenever one is allowed (free text would go on forever).
    ``check_mask``: per step, that many allowed tokens are checked to be taken by the matcher.
    """
    matcher = grammar.matcher()
    masks = MaskBatch(grammar.vocab_size, 1, torch.device("cpu"), threads=1)
    stops = set(stop_ids)
    out: list[int] = []
    for _ in range(max_steps):
        if matcher.done:
            return Walk(out, True)
        mask = masks.fill([matcher])
        assert mask is not None and matcher.error is None, matcher.error
        allowed = allowed_ids(mask[0], grammar.vocab_size)
        assert allowed, "the mask allows nothing"
        if check_mask:
            _check_mask(matcher, allowed, rng, check_mask)
        ends = [t for t in allowed if t in stops]
        others = [t for t in allowed if t not in stops]
        if ends and (not others or rng.random() < stop_bias):
            return Walk(out, True)
        token = rng.choice(others)
        assert matcher.accept(token), f"an allowed token was refused: {token} ({matcher.error})"
        out.append(token)
    return Walk(out, matcher.done)


def _check_mask(matcher: RowMatcher, allowed: list[int], rng: random.Random, n: int) -> None:
    """Every token the mask allows, the matcher takes. (Not the converse: where the grammar forces bytes, the mask
    keeps only the token that spells them canonically, e.g. "ul" and not "u" inside "null".)"""
    for t in rng.sample(allowed, min(len(allowed), n)):
        assert matcher.allows(t), f"token {t} is in the mask but the matcher refuses it"


def check_formats(value: Any, schema: dict[str, Any]) -> None:
    """The string formats jsonschema does not check without optional packages, checked by regex."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key, item in value.items():
            if key in props:
                check_formats(item, props[key])
    elif isinstance(value, str) and schema.get("format") in FORMAT_CHECKS:
        assert re.match(FORMAT_CHECKS[schema["format"]], value), f"{value!r} is not a {schema['format']}"


def validate(value: Any, schema: dict[str, Any]) -> None:
    jsonschema.validate(value, schema, format_checker=jsonschema.FormatChecker())
    check_formats(value, schema)


def validate_json_text(text: str, schema: dict[str, Any]) -> Any:
    value = json.loads(text)
    validate(value, schema)
    return value
