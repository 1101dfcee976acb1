"""Requests as the engine sees them: token ids in, token ids out, no JSON and no text."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. temperature 0 (or top_k 1) means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF's: divides seen tokens' positive logits (prompt and output)
    presence_penalty: float = 0.0  # OpenAI's: subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time a token was generated
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    grammar: Any = None  # engine.structured.Grammar: each step's tokens are masked to what it allows

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if not (-2 <= self.presence_penalty <= 2 and -2 <= self.frequency_penalty <= 2):
            raise ValueError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError("seed must be in [0, 2**64)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass(frozen=True)
class TokenEvent:
    """What the engine reports for one request after a step.

    ``token_ids`` are the newly sampled tokens (usually one). A final event has ``finish_reason`` set;
    ``error`` explains a failure. ``prompt_tokens``/``cached_tokens`` say how much of the prompt was
    served from the warm KV cache.
    """

    request_id: str
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    error: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


EventSink = Callable[[TokenEvent], None]
_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One sequence being generated. ``tokens`` holds prompt + output; ``num_computed`` counts the
    tokens whose KV is in the cache; everything else is derived."""

    prompt_ids: list[int]
    params: SamplingParams
    sink: EventSink
    session_key: str | None = None
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    status: RequestStatus = RequestStatus.WAITING
    tokens: list[int] = field(default_factory=list)
    num_computed: int = 0
    cached_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chain hashes of the full blocks computed so far
    row: int = -1  # index into per-sequence device buffers while running
    queued: bool = True  # submitted and not yet admitted once (counts against the queue bound)
    noise_seed: int | None = None  # the sampler's seed (params.seed or drawn at admission), kept across preemption
    max_tokens: int = 0  # hard cap on len(tokens): prompt + new tokens, bounded by the context
    in_flight: int = 0  # tokens sampled by a step still running on the device (async scheduling): 0 or 1
    matcher: Any = None  # engine.structured.RowMatcher of a request with a grammar: where its output is in it
    cache_salt: str = ""  # prefix-cache blocks are shared only between requests with the same salt (the API key)

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.prompt_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens of the sequence, the one still being sampled on the device included (async scheduling)."""
        return len(self.tokens) + self.in_flight

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated so far (known: a token in flight is not counted until it arrives)."""
        return len(self.tokens) - len(self.prompt_ids)

    @property
    def at_limit(self) -> bool:
        """Its token in flight will be its last by length: no further step is scheduled for it."""
        return (self.num_tokens - len(self.prompt_ids) >= self.params.max_new_tokens
                or self.num_tokens >= self.max_tokens)

    @property
    def num_pending(self) -> int:
        """Tokens whose KV still has to be computed (1 for a sequence in decode, its token perhaps in flight)."""
        return self.num_tokens - self.num_computed

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[len(self.prompt_ids):]
