"""The wheels carried to a GPU machine without network (scripts/gpu-wheels.txt, scripts/fetch_wheels.sh): they
must be the versions CI tests, and, installed alone over the GPU image's packages, import everything the GPU
scripts import (scripts/check_gpu_imports.py). A wrong pin there fails only on the GPU, minutes into a run."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


OFFLINE = ("Failed to establish a new connection", "Name or service not known", "Temporary failure in name resolution",
           "Network is unreachable", "(from versions: none)")  # offline, pip finds no version at all


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def load_checker():
    spec = importlib.util.spec_from_file_location("check_gpu_imports", REPO_ROOT / "scripts" / "check_gpu_imports.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GPU_PYTHON = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
              "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}


def requirement_pins(path: str) -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name, _, version = line.partition("==")
            pins[load_checker().normalize(name.split("[")[0])] = version.strip()
    return pins


def test_carried_wheels_pin_what_ci_tests_and_satisfy_each_other():
    """Without network: the server's own pins are carried at the same versions, and every requirement of a carried
    wheel (as this environment's metadata of that same version states it, for the GPU's Python 3.12) is met by
    another carried wheel's pin or left to the image. typing-inspection 0.4.2 beside pydantic 2.14.4 (which needs
    >= 0.4.4) broke `import models` on the GPU machine."""
    from packaging.requirements import Requirement

    checker = load_checker()
    pins = checker.carried()
    for name, version in {**requirement_pins("requirements.txt"), **requirement_pins("requirements-dev.txt")}.items():
        if name in pins:
            assert pins[name] == version, f"{name}: requirements pin {version}, gpu-wheels.txt {pins[name]}"
    image = {checker.normalize(n) for n in checker.GPU_IMAGE}
    checked = 0
    for name, version in pins.items():
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if dist.version != version:  # its requirements at the carried version are unknown here
            continue
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(GPU_PYTHON):
                continue
            dep = checker.normalize(req.name)
            if dep in pins:
                assert req.specifier.contains(pins[dep], prereleases=True), f"{name} {version} needs {req}"
                checked += 1
            else:
                assert dep in image, f"{name} {version} needs {req.name}: carry it in scripts/gpu-wheels.txt"
    assert checked >= 5  # pydantic's, starlette's, jsonschema's, uvicorn's requirements among them


@pytest.mark.slow
def test_fetched_wheels_alone_import_everything_the_gpu_scripts_import(tmp_path):
    """Fetch the wheels (for this Python), install them with --no-deps into an empty target as gpu_check.sh does,
    and import every GPU script's modules with nothing but that target and the image's packages on the path.
    It needs PyPI: offline it skips, except under CI (CI=true), which reaches PyPI and must run it."""
    wheels, site, image = tmp_path / "whl", tmp_path / "site", tmp_path / "image"
    env = {**os.environ, "PY_VERSION": f"{sys.version_info.major}.{sys.version_info.minor}",
           "WHEEL_DIR": str(wheels), "PYTHON": sys.executable}
    fetched = subprocess.run(["bash", "scripts/fetch_wheels.sh"], cwd=REPO_ROOT, env=env, capture_output=True,
                             text=True, timeout=600)
    if fetched.returncode and not in_ci() and any(s in fetched.stderr for s in OFFLINE):
        pytest.skip("PyPI is not reachable from here (CI, which reaches it, runs this test)")
    assert fetched.returncode == 0, fetched.stderr[-2000:]
    files = sorted(str(p) for p in wheels.glob("*.whl"))
    assert len(files) == len(load_checker().carried())
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                "--no-compile", "--target", str(site), *files], capture_output=True, text=True,
                               timeout=600)
    assert installed.returncode == 0, installed.stderr[-2000:]
    checker = str(REPO_ROOT / "scripts" / "check_gpu_imports.py")
    linked = subprocess.run([sys.executable, checker, "--image-view", str(image)], capture_output=True, text=True,
                            timeout=120)
    assert linked.returncode == 0 and int(linked.stdout) > 10, linked.stderr[-2000:]
    # -S: none of this environment's site-packages; the carried wheels first, as gpu_check.sh's PYTHONPATH has it
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run([sys.executable, "-S", checker], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**clean, "PYTHONPATH": f"{site}:{image}", "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, version in load_checker().carried().items():
        if name in report["distributions"]:
            assert report["distributions"][name] == version, name
