"""The README's structured-output examples run as written (one per API) against a real server with the tiny model."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from shared import Settings
from support import running_server


def examples() -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Structured outputs", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_section_has_one_example_per_api():
    blocks = examples()
    assert len(blocks) == 2
    assert "ws://" in blocks[0] and "tool_choice" in blocks[0]
    assert "from openai import OpenAI" in blocks[1] and "response_format" in blocks[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    settings = Settings(model_id=str(tiny_model_dir), log_file=str(tmp_path_factory.mktemp("log") / "log"),
                        kv_block_size=16, max_context=4096, rate_limit_per_min=0)
    with running_server(settings) as app:
        yield app


@pytest.mark.parametrize("index", [0, 1])
def test_readme_example_runs(server, index):
    code = examples()[index].replace("localhost:8000", server.base)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if index == 0:
        assert "'tool': 'get_weather'" in proc.stdout
    else:
        assert proc.stdout.startswith("{") and "'city'" in proc.stdout and "'population'" in proc.stdout
