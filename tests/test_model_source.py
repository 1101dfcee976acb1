"""When the model cannot be had, start-up says why in one short message and what to do next (issue 15, item 1):
the hub's errors classified, and the server and the download script run with the network disabled."""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
from huggingface_hub import errors

from conftest import REPO_ROOT
from model_source import OFFLINE_NEXT_STEP, check_model_source, hub_problem
from shared import ConfigError, Settings

CLOSED_PORT_HUB = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_DISABLE_TELEMETRY": "1"}  # nothing listens on 9


def bare(cls: type[BaseException], message: str = "") -> BaseException:
    """An instance of a hub error class without its HTTP response (only its type matters here)."""
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    return exc


def chained(outer: BaseException, inner: BaseException) -> BaseException:
    outer.__cause__ = inner
    return outer


@pytest.mark.parametrize(("exc", "cause"), [
    (chained(bare(errors.LocalEntryNotFoundError, "cannot find"), socket.gaierror(-2, "Name or service not known")),
     "no network: the hub"),
    (chained(OSError("wrapped"), ConnectionRefusedError(111, "Connection refused")), "no network: the hub"),
    (chained(bare(errors.LocalEntryNotFoundError), bare(errors.OfflineModeIsEnabled, "offline")), "HF_HUB_OFFLINE"),
    (bare(errors.LocalEntryNotFoundError), "no network"),
    (bare(errors.RepositoryNotFoundError, "404"), "no such model on the hub"),
    (bare(errors.GatedRepoError, "403"), "gated: accept its license"),
    (bare(errors.RevisionNotFoundError), "no such revision"),
    (chained(RuntimeError("download failed"), OSError(errno.ENOSPC, "No space left on device")), "the disk is full"),
])
def test_hub_problems_are_named(exc, cause):
    assert cause in hub_problem(exc)


def test_other_errors_are_not_hub_problems():
    assert hub_problem(ValueError("a bug")) is None
    assert hub_problem(OSError(errno.EACCES, "Permission denied")) is None


def run_offline(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_")}
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env={**environ, **CLOSED_PORT_HUB, **env},
                          capture_output=True, text=True, timeout=120)


def assert_short_with_next_step(proc: subprocess.CompletedProcess, cause: str) -> None:
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out and len(out.strip().splitlines()) <= 8, out
    assert cause in out and OFFLINE_NEXT_STEP in out, out


def test_server_with_an_unreachable_hub_id_stops_with_the_cause_and_the_next_step(tmp_path):
    proc = run_offline("server_starlette.py", INFERENCE_MODEL_ID="Qwen/Qwen2.5-7B-Instruct",
                       INFERENCE_LOG_FILE=str(tmp_path / "log"), HF_HOME=str(tmp_path / "hf"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: INFERENCE_MODEL_ID='Qwen/Qwen2.5-7B-Instruct': cannot fetch it from the "
                                  "Hugging Face hub: no network: the hub (http://127.0.0.1:9) is unreachable")
    assert_short_with_next_step(proc, "no network")


def test_a_hub_id_is_checked_before_loading_offline_mode_too(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConfigError) as info:
        check_model_source(Settings(model_id="Qwen/Qwen2.5-7B-Instruct"))
    message = str(info.value)
    assert "HF_HUB_OFFLINE is set" in message and message.endswith(OFFLINE_NEXT_STEP)
    assert len(message.splitlines()) <= 6


def test_download_script_offline_says_why_and_what_next(tmp_path):
    proc = run_offline("scripts/download_14b_model.py", "--local-dir", str(tmp_path / "m"), "--no-env",
                       HF_HOME=str(tmp_path / "hf"))
    assert proc.returncode == 1
    assert "error: cannot download Qwen/Qwen2.5-" in proc.stderr
    assert_short_with_next_step(proc, "no network: the hub (http://127.0.0.1:9) is unreachable")


def test_download_script_help_says_the_names_plainly():
    out = run_offline("scripts/download_14b_model.py", "--help").stdout
    assert "./Qwen-14B" in out and "./Qwen2.5-14B-Instruct" in out and "INFERENCE_MODEL_ID=Qwen2.5-14B-Instruct" in out
    assert "WITHOUT a GPU it downloads Qwen/Qwen2.5-0.5B-Instruct instead" in out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("engine_process", ["auto", "off"])  # auto: load_model runs in the engine process
@pytest.mark.parametrize(("broken", "cause"), [
    ("model.safetensors", "cannot load it: "),
    ("chat template", "the tokenizer has no chat template"),
])
def test_a_model_that_fails_to_load_stops_with_one_message_in_either_engine_placement(
        tiny_model_dir, tmp_path, engine_process, broken, cause):
    """The directory passes the early check (it has a config.json) and fails inside load_model: with the engine
    in its own process the ConfigError crosses the process boundary, and the user still sees one message (no
    traceback, from either process) and exit status 2, as on a thread."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    if broken == "chat template":
        (model / "chat_template.jinja").unlink(missing_ok=True)
        config = json.loads((model / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (model / "tokenizer_config.json").write_text(json.dumps(config))
    else:
        (model / broken).unlink()
    proc = run_offline("server_starlette.py", INFERENCE_MODEL_ID=str(model), INFERENCE_ENGINE_PROCESS=engine_process,
                       INFERENCE_LOG_FILE=str(tmp_path / "log"), INFERENCE_SESSION_STORE="memory",
                       INFERENCE_PORT=str(free_port()))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out and len(out.strip().splitlines()) <= 12, out
    [error] = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert error.startswith(f"error: INFERENCE_MODEL_ID={str(model)!r}: {cause}"), out
