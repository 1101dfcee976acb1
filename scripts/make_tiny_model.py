"""Build a tiny, random-weight Qwen2 model directory for tests.

The directory mirrors the layout of ``Qwen/Qwen2.5-14B-Instruct`` closely enough
that ``AutoTokenizer.from_pretrained(dir)`` and
``AutoModelForCausalLM.from_pretrained(dir)`` load it through exactly the same
code paths as the real checkpoint:

* ``tokenizer.json`` -- a byte-level BPE trained here (with the ``tokenizers``
  library) on the Python standard library's own source, using the same NFC
  normaliser, pre-tokeniser regex, byte-level mapping and decoder as
  transformers' ``Qwen2Tokenizer``, followed by Qwen2.5's added tokens
  (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` ... as special tokens,
  ``<tool_call>``/``</tool_call>`` ... as plain, non-special added tokens);
* ``vocab.json`` / ``merges.txt`` -- the same vocabulary in the legacy format
  the real repository also ships;
* ``tokenizer_config.json`` -- Qwen2.5's keys (``tokenizer_class``
  ``Qwen2Tokenizer``, eos ``<|im_end|>``, pad ``<|endoftext|>``, no bos/unk,
  ``added_tokens_decoder`` and the real Qwen2.5-Instruct ``chat_template``);
* ``config.json`` / ``model.safetensors`` -- a freshly built ``Qwen2Config``
  and randomly initialised ``Qwen2ForCausalLM`` in float32;
* ``generation_config.json`` -- Qwen2.5's bos/pad/eos ids, greedy decoding.

Usage::

    python scripts/make_tiny_model.py OUT_DIR [--hidden-size 64 ...]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports stay lazy so ``--help`` is instant
    from tokenizers import Tokenizer

# Qwen2's pre-tokenisation regex, byte for byte as in transformers'
# ``models/qwen2/tokenization_qwen2.py`` (``PRETOKENIZE_REGEX``) and in the real
# Qwen2.5 ``tokenizer.json``.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
TOOL_RESPONSE_START = "<tool_response>"
TOOL_RESPONSE_END = "</tool_response>"

# Qwen2.5's added tokens, in id order, as (content, special).  The real model
# numbers them 151643..151664; here they follow the trained BPE vocabulary in
# the same order.  ``<tool_response>``/``</tool_response>`` are not tokens in
# Qwen2.5 (they arrived with Qwen3); they are appended as non-special added
# tokens so that tool results also tokenize to single ids.
QWEN25_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    (ENDOFTEXT, True),
    (IM_START, True),
    (IM_END, True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    (TOOL_CALL_START, False),
    (TOOL_CALL_END, False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    (TOOL_RESPONSE_START, False),
    (TOOL_RESPONSE_END, False),
)

# Qwen2.5's ``additional_special_tokens`` (the special added tokens other than
# ``<|endoftext|>``).
QWEN25_ADDITIONAL_SPECIAL_TOKENS: tuple[str, ...] = tuple(
    content for content, special in QWEN25_ADDED_TOKENS if special and content != ENDOFTEXT
)

DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# The chat template of Qwen2.5-Instruct (all sizes share it), verbatim.
QWEN25_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# A little non-ASCII text so that the vocabulary also learns some multi-byte
# merges (the byte-level alphabet already covers every possible byte).
_MULTILINGUAL_SAMPLE = (
    "Café, naïve, résumé, déjà vu, façade, crème brûlée. Grüße aus München!\n"
    "日本語のテキストです。東京は日本の首都です。\n"
    "中文文本：你好，世界！今天天气很好。\n"
    "Привет, мир! Как дела?\n"
    "😀 🎉 🚀 ✨ — “quotes” ‘single’ … €100 ±5 °C\n"
)

# Characters of stdlib source to train on: at least ~400 KB (enough for a few
# thousand merges, trained in well under a second), more for big vocabularies.
DEFAULT_CORPUS_CHARS = 400_000
CORPUS_CHARS_PER_TOKEN = 120

ROPE_THETA = 1_000_000.0


def iter_training_corpus(max_chars: int = DEFAULT_CORPUS_CHARS) -> Iterator[str]:
    """Yield deterministic training text: stdlib ``.py`` sources, then a multilingual sample.

    Files are taken from the directory of the running interpreter's ``os``
    module in sorted order until ``max_chars`` characters have been yielded.
    """
    stdlib_dir = pathlib.Path(os.path.dirname(os.__file__))
    total = 0
    for path in sorted(stdlib_dir.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if not text:
            continue
        yield text
        total += len(text)
        if total >= max_chars:
            break
    for _ in range(20):
        yield _MULTILINGUAL_SAMPLE


def _qwen2_backend(
    vocab: dict[str, int] | None = None, merges: list[tuple[str, str]] | None = None
) -> Tokenizer:
    """Return a ``tokenizers.Tokenizer`` configured exactly as transformers' ``Qwen2Tokenizer`` builds it."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    model_kwargs: dict[str, object] = {}
    if vocab is not None:
        model_kwargs = {"vocab": vocab, "merges": merges or []}
    tokenizer = Tokenizer(
        BPE(
            **model_kwargs,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(vocab_target: int = 1024, corpus: Iterable[str] | None = None,
                    keep_merge: Callable[[str, str], bool] | None = None) -> Tokenizer:
    """Train a Qwen2-style byte-level BPE ``tokenizers.Tokenizer`` of about ``vocab_target`` tokens.

    ``vocab_target`` counts the added tokens too, so ``tokenizer.get_vocab_size()``
    (with added tokens) equals ``vocab_target`` when the corpus holds enough
    merges.  ``keep_merge(left, right)`` may drop learned merges (the
    vocabulary keeps its ids).  ``corpus`` defaults to :func:`iter_training_corpus`, sized to
    the target.  The added tokens follow the BPE vocabulary in Qwen2.5's order.
    """
    from tokenizers import AddedToken, pre_tokenizers, processors, trainers

    n_added = len(QWEN25_ADDED_TOKENS)
    n_alphabet = len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_target < n_alphabet + n_added + 1:
        raise ValueError(
            f"vocab_target must be at least {n_alphabet + n_added + 1} "
            f"(256 byte symbols + {n_added} added tokens + 1 merge), got {vocab_target}"
        )

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_target - n_added,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    scratch = _qwen2_backend()
    if corpus is None:
        corpus = iter_training_corpus(max(DEFAULT_CORPUS_CHARS, CORPUS_CHARS_PER_TOKEN * vocab_target))
    scratch.train_from_iterator(corpus, trainer=trainer)

    # Rebuild from the learned vocab/merges exactly the way Qwen2Tokenizer does
    # when it reloads tokenizer.json, so the in-memory object and the reloaded
    # one are configured identically.
    trained = json.loads(scratch.to_str())
    vocab: dict[str, int] = trained["model"]["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["model"]["merges"]]
    if keep_merge is not None:  # tokens a dropped merge would have made stay in the vocabulary, unreachable
        merges = [m for m in merges if keep_merge(*m)]
    tokenizer = _qwen2_backend(vocab, merges)
    # As in the real Qwen2.5 tokenizer.json (ids are unaffected).
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for content, special in QWEN25_ADDED_TOKENS:
        token = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        if special:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
    return tokenizer


def _added_tokens_decoder(tokenizer: Tokenizer) -> dict[str, dict[str, object]]:
    """Return the ``added_tokens_decoder`` mapping written into tokenizer_config.json."""
    decoder: dict[str, dict[str, object]] = {}
    for content, special in QWEN25_ADDED_TOKENS:
        decoder[str(tokenizer.token_to_id(content))] = {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
    return decoder


def save_tokenizer(tokenizer: Tokenizer, out_dir: pathlib.Path, *, model_max_length: int) -> None:
    """Write tokenizer.json, vocab.json, merges.txt and tokenizer_config.json as Qwen2.5 ships them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))

    model_json = json.loads(tokenizer.to_str())["model"]
    vocab: dict[str, int] = model_json["vocab"]
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = [m if isinstance(m, str) else " ".join(m) for m in model_json["merges"]]
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merge_lines) + "\n", encoding="utf-8")

    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": _added_tokens_decoder(tokenizer),
        "additional_special_tokens": list(QWEN25_ADDITIONAL_SPECIAL_TOKENS),
        "bos_token": None,
        "chat_template": QWEN25_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def _round_up(value: int, multiple: int) -> int:
    """Round ``value`` up to a multiple of ``multiple``."""
    return -(-value // multiple) * multiple


def build_tiny_model(
    out_dir: str | os.PathLike,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_target: int = 1024,
    seed: int = 0,
    initializer_range: float = 0.5,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 4096,
) -> pathlib.Path:
    """Build a tiny random-weight Qwen2.5-style model directory and return its path.

    The tokenizer (about ``vocab_target`` tokens including Qwen2.5's added
    tokens), the chat template, ``config.json``, float32 ``model.safetensors``
    and ``generation_config.json`` (greedy) are all written to ``out_dir``,
    which is created if needed.  The model's ``vocab_size`` is the tokenizer
    length rounded up to a multiple of 64, as Qwen pads its embedding.  A large
    ``initializer_range`` (the default 0.5) makes greedy decoding produce
    varied tokens; Qwen's real 0.02 makes a random model repeat one token.

    The build is deterministic for a given Python installation (the
    tokenizer is trained on the stdlib's sources) and ``seed``; the caller's
    global torch RNG state is left untouched.
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")

    out_path = pathlib.Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer(vocab_target)
    save_tokenizer(tokenizer, out_path, model_max_length=max_position_embeddings)

    endoftext_id = tokenizer.token_to_id(ENDOFTEXT)
    im_end_id = tokenizer.token_to_id(IM_END)
    vocab_size = _round_up(tokenizer.get_vocab_size(with_added_tokens=True), 64)

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        rms_norm_eps=1e-6,
        use_cache=True,
        tie_word_embeddings=tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        use_sliding_window=False,
        max_window_layers=num_layers,
        attention_dropout=0.0,
        bos_token_id=endoftext_id,
        eos_token_id=im_end_id,
    )
    config.architectures = ["Qwen2ForCausalLM"]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.float32).eval()

    model.generation_config = GenerationConfig(
        bos_token_id=endoftext_id,
        pad_token_id=endoftext_id,
        eos_token_id=[im_end_id, endoftext_id],
        do_sample=False,
    )
    model.save_pretrained(out_path)
    return out_path


def _parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="directory to write the model into (created if missing)")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=2)
    parser.add_argument("--intermediate-size", type=int, default=128)
    parser.add_argument("--vocab-target", type=int, default=1024, help="tokenizer size incl. added tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--initializer-range", type=float, default=0.5)
    parser.add_argument("--tie-word-embeddings", action="store_true")
    parser.add_argument("--max-position-embeddings", type=int, default=4096)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: build the model and print its directory."""
    args = _parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stdout/stderr to the printed path
    path = build_tiny_model(
        args.out_dir,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        intermediate_size=args.intermediate_size,
        vocab_target=args.vocab_target,
        seed=args.seed,
        initializer_range=args.initializer_range,
        tie_word_embeddings=args.tie_word_embeddings,
        max_position_embeddings=args.max_position_embeddings,
    )
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
