"""Download Qwen/Qwen2.5-14B-Instruct (or another model) and point INFERENCE_MODEL_ID at it in .env.

    python scripts/download_14b_model.py [--model-id ID] [--local-dir DIR] [--env-file .env]

With no ``--model-id`` (``auto``): Qwen/Qwen2.5-14B-Instruct when a CUDA GPU is present (served in 4-bit
NF4), else Qwen/Qwen2.5-0.5B-Instruct, a small model of the same family that runs unquantized on a CPU.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_MODEL = "Qwen/Qwen2.5-14B-Instruct"
CPU_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


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
PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


def set_env_value(env_file: Path, key: str, value: str) -> None:
    """Set ``key=value`` in ``env_file``, keeping every other line as it is."""
    lines = env_file.read_text(encoding="utf-8").splitlines() if env_file.exists() else []
    lines = [line for line in lines if not line.strip().startswith(f"{key}=")]
    lines.append(f"{key}={value}")
    env_file.write_text("\n".join(lines) + "\n", encoding="utf-8")


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

    from huggingface_hub import snapshot_download

    print(f"Downloading {args.model_id} to {local_dir}/ (resumes if interrupted) ...", file=sys.stderr)
    snapshot_download(repo_id=args.model_id, local_dir=str(local_dir), allow_patterns=PATTERNS)
    if not (local_dir / "config.json").is_file():
        print(f"error: {local_dir}/config.json missing after download", file=sys.stderr)
        return 1
    if not args.no_env:
        set_env_value(Path(args.env_file), "INFERENCE_MODEL_ID", str(local_dir))
        print(f"Wrote INFERENCE_MODEL_ID={local_dir} to {args.env_file}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
