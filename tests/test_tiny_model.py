"""Tests for scripts/make_tiny_model.py: the tiny Qwen2.5-style test model."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import sys
import unicodedata
from types import ModuleType

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_script() -> ModuleType:
    """Import scripts/make_tiny_model.py (scripts/ is not a package)."""
    name = "make_tiny_model"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / "make_tiny_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


mtm = _load_script()

TEXTS = [
    "Hello world",
    " leading space and trailing  ",
    "Café naïve résumé déjà vu",
    "e\u0301 (decomposed, NFC-normalised to é)",
    "日本語のテキストです。",
    "emoji 😀🎉 family 👩\u200d👩\u200d👧 flag 🇯🇵",
    "line1\nline2\r\n\n\ttabbed\n\n\n",
    "def foo(x: int) -> int:\n    return x ** 2  # square\n",
    "I'm sure we'll see; THEY'D agree.",
    "12345 3.14159 -1e-10",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>',
    "<tool_response>\nok\n</tool_response><|endoftext|>",
    "",
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Build the default tiny model once for this module."""
    return mtm.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokenizer(model_dir: pathlib.Path):
    """The tokenizer reloaded through AutoTokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def in_memory_tokenizer():
    """A fresh in-memory ``tokenizers.Tokenizer`` trained like the saved one."""
    return mtm.train_tokenizer(1024)


@pytest.fixture(scope="module")
def model(model_dir: pathlib.Path):
    """The model reloaded through AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def test_pretokenizer_regex_matches_transformers() -> None:
    from transformers.models.qwen2 import tokenization_qwen2

    assert mtm.QWEN2_PRETOKENIZE_REGEX == tokenization_qwen2.PRETOKENIZE_REGEX


def test_directory_configs(model_dir: pathlib.Path, tokenizer) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    gen = json.loads((model_dir / "generation_config.json").read_text())
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert (model_dir / "model.safetensors").is_file()

    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    assert len(tokenizer) == 1024
    assert config["model_type"] == "qwen2"
    assert config["vocab_size"] % 64 == 0 and config["vocab_size"] >= len(tokenizer)
    assert config["rope_parameters"]["rope_theta"] == 1e6
    assert config["initializer_range"] == 0.5
    assert config["dtype"] == "float32"

    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == im_end
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == endoftext
    assert tokenizer.bos_token is None
    assert tokenizer.model_max_length == 4096
    assert tok_config["tokenizer_class"] == "Qwen2Tokenizer"
    assert gen["eos_token_id"] == [im_end, endoftext]
    assert gen["pad_token_id"] == endoftext and gen["bos_token_id"] == endoftext
    assert gen["do_sample"] is False
    assert config["eos_token_id"] == im_end and config["bos_token_id"] == endoftext


@pytest.mark.parametrize("text", TEXTS)
def test_reloaded_tokenizer_matches_in_memory(tokenizer, in_memory_tokenizer, text: str) -> None:
    expected = in_memory_tokenizer.encode(text).ids
    assert tokenizer.encode(text) == expected
    assert tokenizer(text)["input_ids"] == expected
    assert tokenizer.decode(expected) == unicodedata.normalize("NFC", text)


def test_reloaded_vocab_matches_in_memory(tokenizer, in_memory_tokenizer) -> None:
    assert tokenizer.get_vocab() == in_memory_tokenizer.get_vocab(with_added_tokens=True)


@pytest.mark.parametrize("tag", ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"])
def test_tool_tags_are_single_non_special_tokens(tokenizer, tag: str) -> None:
    ids = tokenizer.encode(tag)
    assert len(ids) == 1
    assert tokenizer.decode(ids) == tag
    assert tokenizer.decode(ids, skip_special_tokens=True) == tag
    assert tag not in tokenizer.all_special_tokens


def test_chat_markers_are_special(tokenizer) -> None:
    text = "<|im_start|>assistant\nhi<|im_end|><|endoftext|>"
    ids = tokenizer.encode(text)
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == ids[0]
    assert ids[-2:] == [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "assistant\nhi"


def test_chat_template_default_system_prompt(tokenizer) -> None:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_template_tools_and_tool_calls(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
            ],
        },
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "rainy"},
    ]
    text = tokenizer.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(TOOLS[0])
        + "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n"
        "<tool_response>\nrainy\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_model_loads_and_generates_varied_tokens(tokenizer, model) -> None:
    import torch

    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert model.get_output_embeddings().weight.shape[0] == model.config.vocab_size

    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a poem."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=20, min_new_tokens=20)[0, prompt_len:].tolist()
        second = model.generate(**inputs, max_new_tokens=20, min_new_tokens=20)[0, prompt_len:].tolist()
    assert len(first) == 20
    assert first == second  # greedy by default (generation_config do_sample=False)
    assert len(set(first)) > 3


def test_cli_builds_custom_sizes(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoConfig, AutoTokenizer

    out = tmp_path / "cli"
    args = [str(out), "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--num-kv-heads", "1"]
    args += ["--vocab-target", "400", "--tie-word-embeddings"]
    assert mtm.main(args) == 0
    assert capsys.readouterr().out.strip() == str(out)
    config = AutoConfig.from_pretrained(out)
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (32, 1, 1)
    assert config.tie_word_embeddings is True
    assert len(AutoTokenizer.from_pretrained(out)) == 400
    assert config.vocab_size == 448
