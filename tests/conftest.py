"""Shared fixtures: a tiny random Qwen2 model directory built once per test session, and settings."""
from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

import pytest
import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

torch.set_num_threads(1)  # 2-core CI machines: avoids erratic slowdowns when another process runs
if not torch.cuda.is_available():
    # The NF4 Triton kernels run under Triton's interpreter on the CPU; Triton reads this when it is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _load_make_tiny_model():
    name = "make_tiny_model"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / "make_tiny_model.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session", autouse=True)
def _working_directory(tmp_path_factory: pytest.TempPathFactory):
    """Tests run in a scratch directory: a server's default files (the SQLite session store, sessions.db) and a
    developer's .env stay out of the checkout."""
    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(previous)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A saved tiny Qwen2.5-style model (random weights, real tokenizer layout and chat template)."""
    return _load_make_tiny_model().build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: pathlib.Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_hf_model(tiny_model_dir: pathlib.Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def grammar_tokenizer(tiny_tokenizer, tiny_model_dir: pathlib.Path):
    """The tiny tokenizer as the grammar engine sees it (masks as wide as the tiny model's logits)."""
    import json

    from engine.structured import GrammarTokenizer

    config = json.loads((tiny_model_dir / "config.json").read_text())
    stops = [tiny_tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    return GrammarTokenizer(tiny_tokenizer, config["vocab_size"], stops)


@pytest.fixture(scope="session")
def grammar_compiler(grammar_tokenizer):
    from grammars import GrammarCompiler

    return GrammarCompiler(grammar_tokenizer)
