"""A test double of the *model*: a paged-cache model whose logits force a scripted reply.

It implements the same interface as ``engine.qwen2.PagedQwen2``. Its "KV cache" stores the token id
written at each slot, so it reads each row's history back through the block table exactly as the
real attention does: if the engine reused the wrong blocks, the script would see the wrong prompt.

A sequence's prompt is its whole history the first time the model is asked to continue it (so text the
prompt puts in the assistant turn, such as a forced ``<tool_call>`` opening, is part of the prompt).
For each prompt it asks ``respond(prompt_text)`` for the reply text and emits that reply's tokens, then
``<|im_end|>``; the reply's first tokens may repeat what the prompt's assistant turn already holds.
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
        self.cache: torch.Tensor | None = None
        self.prompts: list[str] = []  # every prompt, in the order first seen
        self._known: list[tuple[list[int], list[int]]] = []  # (prompt, reply) of every sequence seen
        # Fast path: the block a sequence is writing into is its own (shared blocks are full ones), so it
        # names the sequence until the sequence moves on to its next block.
        self._by_block: dict[int, tuple[list[int], list[int]]] = {}
        self.fail_next = threading.Event()  # set to make the next forward pass raise
        self.forward_calls = 0

    def kv_bytes_per_token(self) -> int:
        return 8

    def allocate_kv_cache(self, num_slots: int) -> None:
        self.cache = torch.full((num_slots,), -1, dtype=torch.long)

    @staticmethod
    def _continues(history: list[int], seq: tuple[list[int], list[int]]) -> bool:
        prompt, reply = seq
        return len(history) >= len(prompt) and history[:len(prompt)] == prompt \
            and history[len(prompt):] == reply[:len(history) - len(prompt)]

    def _sequence(self, history: list[int], current_block: int) -> tuple[list[int], list[int]]:
        known = self._by_block.get(current_block)
        if known is None or not self._continues(history, known):
            matches = [seq for seq in self._known if self._continues(history, seq)]
            if matches:  # the most specific: the longest prompt this history continues
                known = max(matches, key=lambda seq: len(seq[0]))
            else:  # a new request: everything so far is its prompt
                text = self.tokenizer.decode(history, skip_special_tokens=False)
                self.prompts.append(text)
                reply = self.tokenizer.encode(self.respond(text), add_special_tokens=False) + [self.im_end]
                known = (history, reply)
                self._known.append(known)
            self._by_block[current_block] = known
        return known

    def forward(self, input_ids, positions, meta):
        self.forward_calls += 1
        if self.fail_next.is_set():
            self.fail_next.clear()
            raise RuntimeError("CUDA out of memory (injected by the test)")
        if self.step_delay:
            time.sleep(self.step_delay)
        self.cache[meta.slot_mapping] = input_ids
        bs = meta.block_size
        starts = meta.query_start.tolist()
        logits = torch.full((len(meta.logits_indices), self.vocab_size), -1e4)
        for out_row, token_index in enumerate(meta.logits_indices.tolist()):
            seq = max(i for i in range(len(starts) - 1) if starts[i] <= token_index)
            last = int(positions[token_index])
            table = meta.block_table[int(meta.block_rows[seq])]
            slots = (table.unsqueeze(1) * bs + torch.arange(bs)).reshape(-1)
            history = self.cache[slots[:last + 1]].tolist()
            prompt, reply = self._sequence(history, int(table[last // bs]))
            done = len(history) - len(prompt)
            logits[out_row, reply[done] if done < len(reply) else self.im_end] = 1e4
        return logits
