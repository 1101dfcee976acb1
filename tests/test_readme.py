"""The README's Quick start and Clients sections, run as written, in a fresh copy of this checkout, offline.

Every fenced ``bash`` block of those two sections runs, in order, in a copy of the files a clone would have
(tracked and untracked-but-not-ignored), with a ``.venv`` that reuses this interpreter's installed packages
(no torch reinstalled; make's install stamps are fresh, so ``make`` installs nothing). The network is off
for everything: ``HF_ENDPOINT`` points at a closed port and pip may not use an index. Each ``python`` block
whose first line names a file (``# weather_chat.py``) is saved under that name first, as the README says.

What cannot run literally, and what runs instead (nothing else is changed):

* ``localhost:8000``: the server listens on a free port (``INFERENCE_PORT``) and every ``localhost:8000`` in
  a command becomes that port, so a server already on 8000 (a developer's own) cannot answer instead;
* a command that starts the server (``make serve``) runs in the background until it is ready, and stops
  when the next server starts or the test ends; the bare ``make serve`` has no model and no network here,
  so it must stop with one short message that names the cause and the next step (issue 15, item 1);
* ``make test`` is what runs this test: ``make -n test`` checks the target is there and would install
  nothing (CI's own ``make test`` is the real run).

A block fails the test when any of its commands exits non-zero. Without curl on the machine the curl block
cannot run: the rest runs, and the test then ends as skipped, naming what did not run. Blocks get the same stdin (one weather
question), which the terminal chat reads; the other commands ignore it.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REPO_ROOT

SECTIONS = ("Quick start", "Clients")
QUESTION = "What is the weather like in London?\n"
OFFLINE_ENV = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_DISABLE_TELEMETRY": "1", "PIP_NO_INDEX": "1",
               "PIP_NO_BUILD_ISOLATION": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "INFERENCE_LOG_LEVEL": "INFO"}
BLOCK_TIMEOUT_S = 600  # make demo-model trains for about two minutes on two cores


@dataclass
class Block:
    lang: str
    code: str
    section: str
    commands: list[str] = field(default_factory=list)


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of the README's Quick start and Clients sections, in order."""
    blocks, section = [], None
    for match in re.finditer(r"^## ([^\n]+)$|^```(\w+)\n(.*?)^```$", text, re.M | re.S):
        if match.group(1) is not None:
            section = match.group(1).strip()
        elif section in SECTIONS:
            block = Block(match.group(2), match.group(3), section)
            if block.lang == "bash":
                block.commands = [c for c in re.sub(r"\\\n", " ", block.code).splitlines() if c.strip()]
            blocks.append(block)
    return blocks


def test_readme_blocks_are_found():
    """The parser sees what the README shows (so the end-to-end test below cannot pass on an empty list)."""
    blocks = readme_blocks((REPO_ROOT / "README.md").read_text(encoding="utf-8"))
    commands = [c for b in blocks for c in b.commands]
    assert {b.section for b in blocks} == set(SECTIONS)
    assert "make serve" in [c.split("#")[0].strip() for c in commands]
    assert any("weather_client.py" in c for c in commands) and any("inference-chat" in c for c in commands)
    assert all(not re.search(r"(^|\s)python3? ", c) for c in commands), "a bare python lacks the venv's packages"
    named = [b for b in blocks if b.lang == "python"]
    assert named and all(re.match(r"# (\w+\.py)\b", b.code) for b in named), "python blocks name their file"


# ---- the fresh clone --------------------------------------------------------------------------------------------
def fresh_clone(dest: Path) -> Path:
    """The files a clone of this working tree would have, with their times (so make sees fresh stamps)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO_ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file() and not source.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def venv_over_this_one(clone: Path) -> None:
    """``clone/.venv``: a new venv that sees this interpreter's packages through a .pth file, with make's
    install stamps written after the requirement files, as ``make install-dev`` leaves them."""
    venv = clone / ".venv"
    base_python = getattr(sys, "_base_executable", sys.executable)  # the interpreter this venv was made from
    subprocess.run([base_python, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; "
                                   "print(sysconfig.get_paths()['purelib'])"], check=True, capture_output=True,
                                  text=True).stdout.strip())
    (purelib / "_reuse_installed_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    time.sleep(0.01)
    for stamp in (".installed", ".installed-dev"):
        (venv / stamp).touch()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- running commands -------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, clone: Path, port: int, transcript: Path) -> None:
        self.clone, self.port, self.transcript = clone, port, transcript
        self.env = {**os.environ, **OFFLINE_ENV, "INFERENCE_PORT": str(port)}
        for name in ("INFERENCE_MODEL_ID", "VIRTUAL_ENV", "PYTHONPATH", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"):
            self.env.pop(name, None)
        self.server: subprocess.Popen | None = None
        self.log: list[str] = []
        self.without_curl: list[str] = []

    def record(self, text: str) -> None:
        """Keep what ran and what it printed, also on disk as it goes (``readme-transcript.txt``)."""
        self.log.append(text)
        with self.transcript.open("a", encoding="utf-8") as f:
            f.write(text + "\n")

    def localize(self, text: str) -> str:
        return text.replace("localhost:8000", f"localhost:{self.port}")

    def run_block(self, block: Block) -> None:
        if shutil.which("curl") is None and any(c.lstrip().startswith("curl ") for c in block.commands):
            self.without_curl.append(block.code)  # the rest still runs; the test ends as skipped, saying so
            return
        script: list[str] = []
        for command in block.commands:
            bare = command.split("#")[0].strip()
            if bare == "make test":
                script.append("make -n test")
            elif bare.endswith("make serve") and bare != "make serve":
                self.flush(script, block)
                self.start_server(command)
            elif bare == "make serve":
                self.flush(script, block)
                self.offline_make_serve()
            else:
                script.append(self.localize(command))
        self.flush(script, block)

    def flush(self, script: list[str], block: Block) -> None:
        if not script:
            return
        text = "set -euo pipefail\n" + "\n".join(script) + "\n"
        proc = subprocess.run(["bash", "-c", text], cwd=self.clone, env=self.env, input=QUESTION, text=True,
                              capture_output=True, timeout=BLOCK_TIMEOUT_S)
        self.record(f"$ {text}{proc.stdout}{proc.stderr}")
        assert proc.returncode == 0, f"README ({block.section}) failed:\n{text}\n{proc.stdout}\n{proc.stderr}"
        script.clear()

    def offline_make_serve(self) -> None:
        """No model configured and no network: one short message, the cause and the next step; no traceback."""
        proc = subprocess.run(["make", "serve"], cwd=self.clone, env=self.env, capture_output=True, text=True,
                              timeout=120)
        out = proc.stdout + proc.stderr
        self.record(f"$ make serve\n{out}")
        assert proc.returncode != 0, out
        assert "Traceback" not in out and len(out.strip().splitlines()) <= 12, out
        assert "no network" in out and "make tiny-model" in out and "make demo-model" in out, out

    def start_server(self, command: str) -> None:
        self.stop_server()
        log = open(self.clone / "server-output.log", "ab")  # noqa: SIM115 (closed with the process)
        self.record(f"$ {command}   (in the background until the next server or the end)")
        self.server = subprocess.Popen(["bash", "-c", command], cwd=self.clone, env=self.env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise AssertionError(f"`{command}` exited with {self.server.returncode}:\n{self.server_output()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"`{command}` was not ready within 180 s:\n{self.server_output()}")

    def server_output(self) -> str:
        path = self.clone / "server-output.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop_server(self) -> None:
        if self.server is None:
            return
        if self.server.poll() is None:
            os.killpg(self.server.pid, signal.SIGINT)  # make and the server: Ctrl-C, as a user would
            try:
                self.server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.server.pid, signal.SIGKILL)
                self.server.wait(10)
        self.server = None


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[Runner]:
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("needs a git checkout (the fresh copy is made from `git ls-files`)")
    if shutil.which("make") is None:
        pytest.skip("the README's commands need make")
    clone = fresh_clone(tmp_path / "clone")
    venv_over_this_one(clone)
    run = Runner(clone, free_port(), tmp_path / "readme-transcript.txt")
    try:
        yield run
    finally:
        run.stop_server()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_every_quick_start_and_clients_command_runs_as_written(runner: Runner, tmp_path: Path) -> None:
    blocks = readme_blocks((runner.clone / "README.md").read_text(encoding="utf-8"))
    for block in blocks:
        if block.lang == "python":
            name = re.match(r"# (\w+\.py)\b", block.code).group(1)
            (runner.clone / name).write_text(runner.localize(block.code), encoding="utf-8")
        elif block.lang == "bash":
            runner.run_block(block)
    transcript = "\n".join(runner.log)  # also in tmp_path/readme-transcript.txt
    # The demo model really calls the tool, through the example client and the terminal chat.
    assert '[tool call] get_weather({"location": "London"})' in transcript, transcript[-6000:]
    assert '[tool] get_weather({"location": "London"}) -> {"temperature": "15°C"' in transcript, transcript[-6000:]
    # curl -s exits 0 on an HTTP error too: the answer itself must be a completion of the served model.
    if not runner.without_curl:
        assert '"object":"chat.completion"' in transcript and "model_not_found" not in transcript, transcript[-6000:]
    # The client is installed: importable from outside the checkout, with its console script.
    outside = subprocess.run([str(runner.clone / ".venv/bin/python"), "-c", "import inference_client, sys; "
                              "print(inference_client.__file__)"], cwd=tmp_path, capture_output=True, text=True)
    assert outside.returncode == 0 and outside.stdout.startswith(str(runner.clone)), outside
    assert (runner.clone / ".venv/bin/inference-chat").is_file()
    if runner.without_curl:
        pytest.skip(f"everything else ran and passed, but curl is not installed: not run: {runner.without_curl}")
