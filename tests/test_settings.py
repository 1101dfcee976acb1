"""Settings from env/.env, the start-up checks, and the rotating log."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest

from model_source import check_model_source
from shared import ConfigError, Settings, session_var, setup_logging, task_var
from conftest import REPO_ROOT


def test_defaults_match_the_seed():
    s = Settings.from_env({}, dotenv_path=None)
    assert (s.model_id, s.attn_implementation, s.quantization, s.host, s.port, s.log_file) == (
        "./Qwen-14B", "sdpa", "auto", "0.0.0.0", 8000, "inference_server.log")


def test_values_are_parsed_and_typed():
    s = Settings.from_env({"INFERENCE_PORT": "9001", "INFERENCE_QUANTIZATION": "NF4", "INFERENCE_LOG_LEVEL": "debug",
                           "INFERENCE_TOOL_RESULT_TIMEOUT_S": "2.5", "INFERENCE_BNB_COMPUTE_DTYPE": "float16",
                           "INFERENCE_MAX_NEW_TOKENS": "77"}, dotenv_path=None)
    assert (s.port, s.quantization, s.log_level, s.tool_result_timeout_s, s.bnb_compute_dtype,
            s.max_new_tokens_cap) == (9001, "nf4", "DEBUG", 2.5, "float16", 77)


@pytest.mark.parametrize("env, fragment", [
    ({"INFERENCE_QUANTIZATION": "int8"},
     "INFERENCE_QUANTIZATION='int8' is invalid: allowed values are auto, nf4, none"),
    ({"INFERENCE_ATTN_IMPLEMENTATION": "eager"}, "allowed values are sdpa, flash_attention_2"),
    ({"INFERENCE_BNB_COMPUTE_DTYPE": "float8"}, "INFERENCE_BNB_COMPUTE_DTYPE"),
    ({"INFERENCE_PORT": "http"}, "INFERENCE_PORT='http' is invalid: must be an integer"),
    ({"INFERENCE_PORT": "70000"}, "must be between 1 and 65535"),
    ({"INFERENCE_MAX_NEW_TOKENS": "0"}, "INFERENCE_MAX_NEW_TOKENS"),
    ({"INFERENCE_TOOL_RESULT_TIMEOUT_S": "soon"}, "must be a number"),
    ({"INFERENCE_LOG_LEVEL": "LOUD"}, "INFERENCE_LOG_LEVEL"),
])
def test_invalid_values_name_the_variable_and_the_allowed_values(env, fragment):
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env, dotenv_path=None)
    assert fragment in str(info.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"INFERENCE_PORT": "x", "INFERENCE_DEVICE": "tpu"}, dotenv_path=None)
    assert "INFERENCE_PORT" in str(info.value) and "INFERENCE_DEVICE" in str(info.value)


def test_dotenv_is_read_and_the_environment_wins(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("INFERENCE_PORT=8123\nINFERENCE_MODEL_ID=from-dotenv\n")
    s = Settings.from_env({"INFERENCE_MODEL_ID": "/from/env"}, dotenv_path=env_file)
    assert (s.port, s.model_id) == (8123, "/from/env")


def test_settings_are_frozen():
    s = Settings()
    with pytest.raises(Exception):
        s.port = 1  # type: ignore[misc]


def test_missing_model_directory_names_the_download_script(tmp_path):
    with pytest.raises(ConfigError) as info:
        check_model_source(Settings(model_id=str(tmp_path / "nope")))
    assert "scripts/download_14b_model.py" in str(info.value) and "INFERENCE_MODEL_ID" in str(info.value)
    assert "make tiny-model" in str(info.value)  # and the way without network


def test_env_example_and_readme_document_every_variable():
    example = (REPO_ROOT / ".env.example").read_text()
    readme = (REPO_ROOT / "README.md").read_text()
    for env, default, _doc in Settings.documented():
        shown = (str(int(default)) if isinstance(default, float) and default.is_integer()
                 else ",".join(default) if isinstance(default, tuple) else str(default))
        assert re.search(rf"^# {env}={re.escape(shown)}$", example, re.M), env
        assert env in readme, env


def _run_server(env: dict[str, str], cwd) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_")}
    full.update(env)
    return subprocess.run([sys.executable, str(REPO_ROOT / "server_starlette.py")], env=full, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_server_refuses_to_start_with_an_invalid_setting(tmp_path):
    result = _run_server({"INFERENCE_QUANTIZATION": "fp3"}, tmp_path)
    assert result.returncode == 2
    assert "INFERENCE_QUANTIZATION='fp3' is invalid: allowed values are auto, nf4, none" in result.stderr


def test_server_without_a_model_says_how_to_download_it(tmp_path):
    result = _run_server({}, tmp_path)
    assert result.returncode == 2
    assert "./Qwen-14B" in result.stderr and "python scripts/download_14b_model.py" in result.stderr


def test_nf4_on_a_cpu_is_refused_clearly(tiny_model_dir):
    import torch

    from shared import load_model

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="INFERENCE_QUANTIZATION=nf4 needs a CUDA GPU"):
        load_model(Settings(model_id=str(tiny_model_dir), quantization="nf4"))


def test_rotating_log_carries_session_and_task_ids(tmp_path):
    log_file = tmp_path / "server.log"
    setup_logging(Settings(log_file=str(log_file), log_max_bytes=2000, log_backup_count=2))
    try:
        session_var.set("sess-1")
        task_var.set("task-9")
        for i in range(100):
            logging.getLogger("inference.test").info("line %d", i)
        files = sorted(p.name for p in tmp_path.iterdir())
        assert files == ["server.log", "server.log.1", "server.log.2"]
        last = log_file.read_text().splitlines()[-1]
        assert "[session=sess-1 task=task-9]" in last and last.endswith("line 99")
        assert log_file.stat().st_size <= 2000
    finally:
        session_var.set("-")
        task_var.set("-")
        root = logging.getLogger()
        for handler in [h for h in root.handlers if getattr(h, "_inference", False)]:
            root.removeHandler(handler)
            handler.close()


def test_engine_ii_settings_are_parsed_and_checked():
    s = Settings.from_env({"INFERENCE_ATTENTION": "Reference", "INFERENCE_MAX_STEP_TOKENS": "256"}, dotenv_path=None)
    assert (s.attention, s.max_step_tokens) == ("reference", 256)
    assert Settings.from_env({}, dotenv_path=None).attention == "auto"
    with pytest.raises(ConfigError, match="INFERENCE_ATTENTION='flash' is invalid: allowed values are auto, paged"):
        Settings.from_env({"INFERENCE_ATTENTION": "flash"}, dotenv_path=None)
    with pytest.raises(ConfigError, match="INFERENCE_MAX_STEP_TOKENS=64 must exceed INFERENCE_MAX_BATCH"):
        Settings.from_env({"INFERENCE_MAX_STEP_TOKENS": "64", "INFERENCE_MAX_BATCH": "64"}, dotenv_path=None)


def test_engine_config_carries_the_engine_ii_settings_and_refuses_what_cannot_run(tiny_model_dir, monkeypatch):
    import torch

    import server_starlette
    from shared import load_model

    if torch.cuda.is_available():
        pytest.skip("on a GPU paged attention runs")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as a CPU server runs: no interpreter
    loaded = load_model(Settings(model_id=str(tiny_model_dir), device="cpu", dtype="float32"))
    config = server_starlette.engine_config(Settings(max_step_tokens=300, max_batch=7), loaded)
    assert (config.max_step_tokens, config.max_running, config.attention) == (300, 7, "auto")
    with pytest.raises(ConfigError, match="INFERENCE_ATTENTION=paged: paged attention cannot run here"):
        server_starlette.engine_config(Settings(attention="paged"), loaded)
