"""What a caller configures an engine with, and the errors ``Engine.submit()`` raises synchronously."""
from __future__ import annotations

from dataclasses import dataclass


class EngineError(Exception):
    """Base of the errors ``submit()`` raises synchronously."""


class ContextLengthExceeded(EngineError):
    def __init__(self, prompt_tokens: int, max_context: int) -> None:
        super().__init__(f"prompt has {prompt_tokens} tokens; the context holds {max_context} "
                         f"(prompt plus at least one new token)")
        self.prompt_tokens, self.max_context = prompt_tokens, max_context


class EngineOverloaded(EngineError):
    pass


class EngineStopped(EngineError):
    pass


@dataclass(frozen=True)
class EngineConfig:
    max_running: int = 32  # sequences decoded together in one step
    max_context: int = 4096  # prompt + generated tokens of one sequence
    block_size: int = 64
    kv_cache_bytes: int = 1 << 30  # KV pool size, unless num_blocks is given; 0 = what CUDA has free (measured)
    num_blocks: int = 0
    prefill_chunk: int = 2048  # prompt tokens of one sequence per step; a step's budget when nothing decodes
    max_step_tokens: int = 128  # tokens per step while sequences decode: theirs, then prompt chunks
    mixed_steps: bool = True  # prompt chunks ride along with decodes (False: prefill and decode steps alternate)
    attention: str = "auto"  # paged (Triton kernels), reference (gather + SDPA), auto: paged where it runs
    max_queue: int = 256  # requests waiting for a slot before submit() refuses more
    cuda_graphs: bool = True  # replay decode steps as CUDA graphs (on CUDA devices)
    static_decode: bool = False  # CPU tests: run decode through the padded static buffers graphs use
    async_scheduling: bool = False  # schedule and prepare step N+1 while the device runs step N (see Engine._step)

    def __post_init__(self) -> None:
        if self.mixed_steps and self.max_step_tokens <= self.max_running:
            raise ValueError(f"max_step_tokens ({self.max_step_tokens}) must exceed max_running ({self.max_running}): "
                             f"a step carries a decode token for every running sequence and room for prompt tokens")
        if self.prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1")
