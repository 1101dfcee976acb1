"""Where the model comes from, and why it cannot be had: a local directory, or a Hugging Face hub id whose failures
(no network, no such repo, gated, disk full, an interrupted download) become one ConfigError naming the cause and the
next step, instead of a chain of tracebacks. ``shared.load_model`` loads inside ``load_errors``; the server checks the
source before anything heavy starts (``check_model_source``)."""
from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from shared import ConfigError

if TYPE_CHECKING:
    from shared import Settings

DOWNLOAD_HINT = ".venv/bin/python scripts/download_14b_model.py"


def looks_like_local_path(model_id: str) -> bool:
    return model_id.startswith((".", "/", "~")) or os.path.exists(model_id) or not re.fullmatch(
        r"[\w.\-]+/[\w.\-]+", model_id)


OFFLINE_NEXT_STEP = """next: to serve without network (or to try the server in a minute), use a local model:
  make tiny-model && INFERENCE_MODEL_ID=models/tiny make serve    # random weights: every protocol path works
  make demo-model && INFERENCE_MODEL_ID=models/demo make serve    # trained here in 2-4 min: calls get_weather
or set INFERENCE_MODEL_ID (environment or .env) to a local model directory."""


def hub_problem(exc: BaseException) -> str | None:
    """What went wrong fetching from the Hugging Face hub, in a few words (None: not a hub or network problem).
    Looks through the whole chain: the hub wraps the network error it met."""
    from huggingface_hub import errors

    chain, seen = [], exc
    while seen is not None and len(chain) < 20:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for e in chain:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return "the disk is full (free some space; a model's download resumes where it stopped)"
    for e in chain:
        if isinstance(e, errors.GatedRepoError):
            return ("the model is gated: accept its license on its hub page, then log in "
                    "(`huggingface-cli login`, or set HF_TOKEN)")
        if isinstance(e, errors.RepositoryNotFoundError):
            return "no such model on the hub (check the id; a private model needs `huggingface-cli login` or HF_TOKEN)"
        if isinstance(e, errors.RevisionNotFoundError):
            return "no such revision of the model on the hub"
        if isinstance(e, errors.OfflineModeIsEnabled):
            return "no network: HF_HUB_OFFLINE is set and the model is not in the local cache"
    for e in chain:
        if isinstance(e, (ConnectionError, TimeoutError, socket.gaierror)) or type(e).__name__ in (
                "ConnectError", "ConnectTimeout", "ReadTimeout", "ProxyError", "NetworkError"):
            return f"no network: the hub ({os.environ.get('HF_ENDPOINT') or 'huggingface.co'}) is unreachable ({e})"
    if isinstance(exc, errors.LocalEntryNotFoundError):
        return "no network: the hub is unreachable and the model is not in the local cache"
    if isinstance(exc, errors.HfHubHTTPError):
        return f"the hub answered with an error ({str(exc).splitlines()[0]})"
    return None


def check_model_source(settings: Settings) -> None:
    """Fail early, with the cause and the fix, when the model cannot be had: a local directory that does not
    exist, or a hub id whose config.json cannot be fetched (no network, no such repo, gated, disk full)."""
    path = Path(settings.model_id).expanduser()
    if looks_like_local_path(settings.model_id):
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"INFERENCE_MODEL_ID={settings.model_id!r}: no model directory with a config.json there. Download "
                f"Qwen2.5-14B-Instruct with `{DOWNLOAD_HINT}` (`make serve` runs it when no model is configured; "
                f"it also writes .env), or set INFERENCE_MODEL_ID to a local model directory or a Hugging Face id "
                f"such as Qwen/Qwen2.5-14B-Instruct.\n{OFFLINE_NEXT_STEP}")
        return
    # A hub id: fetch its config.json now (cached afterwards), which fails in a second with a reason, rather
    # than in the middle of loading with a chain of tracebacks (and transformers' retries: ~25 s offline).
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import logging as hub_logging

    level = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        snapshot_download(repo_id=settings.model_id, allow_patterns=["config.json"])
    except Exception as exc:  # noqa: BLE001 (classified below; anything else is re-raised as it is)
        if (problem := hub_problem(exc)) is None:
            raise
        raise ConfigError(f"INFERENCE_MODEL_ID={settings.model_id!r}: cannot fetch it from the Hugging Face hub: "
                          f"{problem}.\n{OFFLINE_NEXT_STEP}") from None
    finally:
        hub_logging.set_verbosity(level)


@contextlib.contextmanager
def load_errors(model_id: str) -> Iterator[None]:
    """A download that fails midway (network, disk full) becomes a ConfigError naming the cause; so does a model
    whose files cannot be read (transformers says which are missing: e.g. an interrupted download's directory)."""
    try:
        yield
    except Exception as exc:
        if (problem := hub_problem(exc)) is not None:
            raise ConfigError(f"INFERENCE_MODEL_ID={model_id!r}: cannot load it: {problem}.\n{OFFLINE_NEXT_STEP}"
                              ) from None
        if not isinstance(exc, OSError):
            raise
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ConfigError(f"INFERENCE_MODEL_ID={model_id!r}: cannot load it: {reason.rstrip('.')} (an interrupted "
                          f"download resumes where it stopped: `{DOWNLOAD_HINT}`).\n{OFFLINE_NEXT_STEP}") from None
