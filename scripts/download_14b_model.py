"""Download Qwen/Qwen2.5-14B-Instruct (or another model) and point INFERENCE_MODEL_ID at it in .env.

    python scripts/download_14b_model.py [--model-id ID] [--local-dir DIR] [--env-file .env]

Names, plainly: the server's default INFERENCE_MODEL_ID is ./Qwen-14B (the seed's name, kept). This script
downloads into a directory named after the model, ./Qwen2.5-14B-Instruct, and writes
INFERENCE_MODEL_ID=Qwen2.5-14B-Instruct to .env so the server finds it (`make serve` runs this script when
neither INFERENCE_MODEL_ID nor ./Qwen-14B exists).

With no --model-id (auto): Qwen/Qwen2.5-14B-Instruct (~30 GB, served in 4-bit NF4) when a CUDA GPU is
present; WITHOUT a GPU it downloads Qwen/Qwen2.5-0.5B-Instruct instead (~1 GB, to ./Qwen2.5-0.5B-Instruct),
a small model of the same family that runs unquantized on a CPU. Pass --model-id Qwen/Qwen2.5-14B-Instruct
to download the 14B anyway. The download resumes where it stopped.

Without network: `make tiny-model` (random weights) or `make demo-model` (a tiny model that calls
get_weather), then INFERENCE_MODEL_ID=models/tiny (or models/demo) make serve.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # model_source.py: the hub's errors, explained

DEFAULT_MODEL = "Qwen/Qwen2.5-14B-Instruct"
CPU_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


def auto_model() -> str:
    """The 14B on a CUDA machine, the 0.5B elsewhere (the 14B in NF4 needs a GPU)."""
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if cuda:
        return DEFAULT_MODEL
    print(f"No CUDA GPU here: choosing {CPU_MODEL}, which runs on the CPU (Qwen2.5-14B-Instruct needs a GPU; "
          f"pass --model-id {DEFAULT_MODEL} to download it anyway).", file=sys.stderr)
    return CPU_MODEL


def set_env_value(env_file: Path, key: str, value: str) -> None:
    """Set ``key=value`` in ``env_file``, keeping every other line as it is."""
    lines = env_file.read_text(encoding="utf-8").splitlines() if env_file.exists() else []
    lines = [line for line in lines if not line.strip().startswith(f"{key}=")]
    lines.append(f"{key}={value}")
    env_file.write_text("\n".join(lines) + "\n", encoding="utf-8")


def download(model_id: str, local_dir: Path) -> str | None:
    """Download ``model_id`` into ``local_dir``; None on success, else why not and what to do (one message)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import logging as hub_logging

    from model_source import OFFLINE_NEXT_STEP, hub_problem

    hub_logging.set_verbosity_error()  # its retry warnings would bury the one message that matters
    try:
        snapshot_download(repo_id=model_id, local_dir=str(local_dir), allow_patterns=PATTERNS)
    except Exception as exc:  # noqa: BLE001 (classified; anything unknown keeps its traceback)
        if (problem := hub_problem(exc)) is None:
            raise
        return f"cannot download {model_id}: {problem}.\n{OFFLINE_NEXT_STEP}"
    if not (local_dir / "config.json").is_file():
        return f"{local_dir}/config.json missing after the download of {model_id}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-id", default="auto",
                        help=f"Hugging Face model id (auto: {DEFAULT_MODEL} with a CUDA GPU, else {CPU_MODEL})")
    parser.add_argument("--local-dir", default=None, help="target directory (default: the id's last part)")
    parser.add_argument("--env-file", default=".env", help="env file to write INFERENCE_MODEL_ID into")
    parser.add_argument("--no-env", action="store_true", help="do not write the env file")
    args = parser.parse_args(argv)
    if args.model_id == "auto":
        args.model_id = auto_model()
    local_dir = Path(args.local_dir or args.model_id.split("/")[-1])

    print(f"Downloading {args.model_id} to {local_dir}/ (resumes if interrupted) ...", file=sys.stderr)
    if (problem := download(args.model_id, local_dir)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    if not args.no_env:
        set_env_value(Path(args.env_file), "INFERENCE_MODEL_ID", str(local_dir))
        print(f"Wrote INFERENCE_MODEL_ID={local_dir} to {args.env_file}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
