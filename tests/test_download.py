"""scripts/download_14b_model.py without a network: the hub call is replaced by a stand-in that writes files."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from conftest import REPO_ROOT


@pytest.fixture
def script(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("download", REPO_ROOT / "scripts" / "download_14b_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls = []

    def fake_snapshot_download(repo_id: str, local_dir: str, allow_patterns: list[str]) -> str:
        calls.append(repo_id)
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / "config.json").write_text("{}")
        return local_dir

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    module.calls = calls
    return module


def test_auto_picks_the_small_model_without_a_gpu_and_writes_env(script, monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    Path(".env").write_text("INFERENCE_PORT=9000\nINFERENCE_MODEL_ID=old\n")
    assert script.main([]) == 0
    assert script.calls == ["Qwen/Qwen2.5-0.5B-Instruct"]
    assert Path(".env").read_text() == "INFERENCE_PORT=9000\nINFERENCE_MODEL_ID=Qwen2.5-0.5B-Instruct\n"
    assert (tmp_path / "Qwen2.5-0.5B-Instruct" / "config.json").is_file()


def test_auto_picks_the_14b_with_a_gpu(script, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert script.main(["--no-env"]) == 0
    assert script.calls == ["Qwen/Qwen2.5-14B-Instruct"] and not Path(".env").exists()


def test_explicit_model_and_directory_win(script):
    assert script.main(["--model-id", "Qwen/Qwen2.5-14B-Instruct", "--local-dir", "m", "--env-file", "x.env"]) == 0
    assert script.calls == ["Qwen/Qwen2.5-14B-Instruct"]
    assert Path("x.env").read_text() == "INFERENCE_MODEL_ID=m\n"
