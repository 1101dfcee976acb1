"""Import everything the GPU scripts import (scripts/gpu_check.sh runs it first, so a missing or incompatible
carried wheel fails in a second with its name, not minutes into a run), and say which distributions that took.

    python3 scripts/check_gpu_imports.py                 # import all; print the distributions used (JSON)
    python3 scripts/check_gpu_imports.py --image-view D  # (tests) link the GPU image's packages from this
                                                         # environment into D, to import against D alone

GPU_IMAGE is what the GPU machine's image holds (the device docs' package list, read there on 2026-11-17);
everything else must come from scripts/gpu-wheels.txt.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What the GPU scripts import: the engine, the whole server (bench.py --server), the NF4 paths.
MODULES = ["engine", "engine.qwen2", "engine.structured", "grammars", "engine.nf4", "engine.nf4_triton", "shared",
           "models", "utils", "tasks", "session_socket", "openai_api", "server_starlette", "uvicorn",
           "websockets.asyncio.client",
           "bitsandbytes", "bitsandbytes.functional", "transformers", "triton"]
SCRIPTS = ["scripts/bench.py", "scripts/bench_nf4.py", "tests/conftest.py", "tests/test_gpu.py", "tests/test_nf4.py"]

GPU_IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp""".split()


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def carried() -> dict[str, str]:
    """scripts/gpu-wheels.txt as {distribution: version}."""
    pins = {}
    for line in (ROOT / "scripts" / "gpu-wheels.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[normalize(name)] = version.strip()
    return pins


def import_all() -> list[str]:
    """Import every module and script; the third-party distributions now loaded, sorted."""
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    for name in MODULES:
        importlib.import_module(name)
    for path in SCRIPTS:
        spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    owners = importlib.metadata.packages_distributions()
    used = {normalize(d) for top in {m.split(".")[0] for m in list(sys.modules)} for d in owners.get(top, [])}
    return sorted(used)


def image_closure() -> set[str]:
    """The image's distributions plus what they require as installed here (the real image has its own versions'
    requirements: e.g. huggingface_hub 2 needs httpx2 where the image's 1.x needs httpx)."""
    from packaging.requirements import Requirement

    installed = {normalize(d.metadata["Name"]): d for d in importlib.metadata.distributions()}
    todo, seen = [normalize(n) for n in GPU_IMAGE], set()
    while todo:
        name = todo.pop()
        if name in seen or name not in installed:
            continue
        seen.add(name)
        for line in installed[name].requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(normalize(req.name))
    return seen


def image_view(target: Path) -> int:
    """Link the GPU image's distributions (files and metadata) from this environment into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    image = image_closure()
    linked = 0
    for dist in importlib.metadata.distributions():
        if normalize(dist.metadata["Name"]) not in image:
            continue
        base = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            link = target / top
            if (base / top).exists() and not link.exists() and top != "__pycache__":
                link.symlink_to(base / top)
                linked += 1
    return linked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-view", type=Path, help="link the image's packages from here into this folder")
    args = parser.parse_args()
    if args.image_view:
        print(image_view(args.image_view))
        return
    used = import_all()
    versions = {d: importlib.metadata.version(d) for d in used}
    print(json.dumps({"imports": "ok", "python": sys.version.split()[0], "distributions": versions}))

if __name__ == "__main__":
    main()
