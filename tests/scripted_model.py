"""A test double of the *model*: a paged-cache model whose logits force a scripted reply.

It implements the same interface as ``engine.qwen2.PagedQwen2``. Its "KV cache" stores the token id
written at each slot, so it reads each row's history back through the block table exactly as the
real attention does: if the engine reused the wrong blocks, the script would see the wrong prompt.
For each prompt (everything up to the last ``<|im_start|>assistant\\n``) it asks ``respond(prompt_text)``
for the reply text and emits that reply's tokens, then ``<|im_end|>``.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch


class ScriptedModel:
    def __init__(self, tokenizer, respond: Callable[[str], str], step_delay: float = 0.0) -> None:
        self.tokenizer = tokenizer
        self.respond = respond
        self.step_delay = step_delay
        self.vocab_size = len(tokenizer)
        self.device = torch.device("cpu")
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.marker = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
        self.cache: torch.Tensor | None = None
        self.prompts: list[str] = []  # every distinct prompt seen, in order
        self._replies: dict[tuple[int, ...], list[int]] = {}
        self._rows: dict[int, tuple[list[int], list[int]]] = {}  # first block id -> (prompt, reply): no re-scan
        self.fail_next = threading.Event()  # set to make the next forward pass raise
        self.forward_calls = 0

    def kv_bytes_per_token(self) -> int:
        return 8

    def allocate_kv_cache(self, num_slots: int) -> None:
        self.cache = torch.full((num_slots,), -1, dtype=torch.long)

    def _reply(self, prompt: tuple[int, ...]) -> list[int]:
        if prompt not in self._replies:
            text = self.tokenizer.decode(list(prompt), skip_special_tokens=False)
            self.prompts.append(text)
            self._replies[prompt] = self.tokenizer.encode(self.respond(text), add_special_tokens=False) + [self.im_end]
        return self._replies[prompt]

    def _split(self, history: list[int]) -> int:
        m = len(self.marker)
        for end in range(len(history), m - 1, -1):
            if history[end - m:end] == self.marker:
                return end
        return len(history)

    def forward(self, input_ids, positions, slot_mapping, block_table, block_size):
        self.forward_calls += 1
        if self.fail_next.is_set():
            self.fail_next.clear()
            raise RuntimeError("CUDA out of memory (injected by the test)")
        if self.step_delay:
            time.sleep(self.step_delay)
        self.cache[slot_mapping.reshape(-1)] = input_ids.reshape(-1)
        logits = torch.full((input_ids.shape[0], self.vocab_size), -1e4)
        for row in range(input_ids.shape[0]):
            last = int(positions[row, -1])
            slots = (block_table[row].unsqueeze(1) * block_size + torch.arange(block_size)).reshape(-1)
            history = self.cache[slots[:last + 1]].tolist()
            known = self._rows.get(int(block_table[row, 0]))
            if known is not None and history[:len(known[0])] == known[0] \
                    and history[len(known[0]):] == known[1][:len(history) - len(known[0])]:
                cut, reply = len(known[0]), known[1]  # same prompt, and so far exactly its reply
            else:
                cut = self._split(history)
                reply = self._reply(tuple(history[:cut]))
                self._rows[int(block_table[row, 0])] = (history[:cut], reply)
            done = len(history) - cut
            logits[row, reply[done] if done < len(reply) else self.im_end] = 1e4
        return logits
