"""Process-wide pieces: settings from env/.env, logging, model + tokenizer loading, the runtime state. Where the model
comes from and why it cannot be had: ``model_source``."""
from __future__ import annotations

import logging
import logging.handlers
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from log_context import session_var, task_var  # noqa: F401 (the log filter reads them; tests import them here)
from store_backends import check_url

if TYPE_CHECKING:  # heavy imports happen inside load_model, never at import time
    from auth import ApiKeys, RateLimiter, TicketBook
    from engine import AsyncEngine, EngineConfig
    from engine.mp_client import EngineProcess

    EngineClient = AsyncEngine | EngineProcess  # the engine as the transport sees it: on a thread, or a process
    from metrics import Metrics
    from sessions import SessionRegistry

log = logging.getLogger("inference")


class ConfigError(Exception):
    """A setting is invalid or the model cannot be found; the message says which and what to do."""


# ---- settings ----------------------------------------------------------------------------------------------
def _choice(*allowed: str) -> Callable[[str], str]:
    canonical = {a.lower(): a for a in allowed}

    def parse(raw: str) -> str:
        value = canonical.get(raw.strip().lower())
        if value is None:
            raise ValueError(f"allowed values are {', '.join(allowed)}")
        return value
    return parse


def _int(lo: int, hi: int = 2**62) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError("must be an integer") from None
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return value
    return parse


def _float(lo: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError("must be a number") from None
        if not value >= lo:
            raise ValueError(f"must be >= {lo}")
        return value
    return parse


def _text(raw: str) -> str:
    if not raw.strip():
        raise ValueError("must not be empty")
    return raw.strip()


def _replica(raw: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}", raw.strip()):
        raise ValueError("use 1-32 lowercase letters, digits, _ or -, starting with a letter or digit (it names "
                         "the HAProxy server of this replica)")
    return raw.strip()


def _list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _setting(env: str, parse: Callable[[str], Any], default: Any, doc: str) -> Any:
    return field(default=default, metadata={"env": env, "parse": parse, "doc": doc})


@dataclass(frozen=True)
class Settings:
    """Every setting, read once from the environment (and ``.env``). See ``.env.example``."""

    model_id: str = _setting("INFERENCE_MODEL_ID", _text, "./Qwen-14B", "HF model id or local directory")
    served_model_name: str = _setting("INFERENCE_SERVED_MODEL_NAME", _text, "",
                                      "model name in /v1/models and responses (default: the directory's name)")
    attn_implementation: str = _setting("INFERENCE_ATTN_IMPLEMENTATION", _choice("sdpa", "flash_attention_2"), "sdpa",
                                        "attention implementation the model is loaded with")
    bnb_compute_dtype: str = _setting("INFERENCE_BNB_COMPUTE_DTYPE", _choice("bfloat16", "float16"), "bfloat16",
                                      "compute dtype of the 4-bit layers")
    nf4_kernel: str = _setting("INFERENCE_NF4_KERNEL", _choice("auto", "triton", "bnb"), "auto",
                               "NF4 matmuls: triton (fused kernels on bitsandbytes' storage), bnb (its own kernels); "
                               "auto = triton where it runs, else bnb")
    quantization: str = _setting("INFERENCE_QUANTIZATION", _choice("auto", "nf4", "none"), "auto",
                                 "auto = nf4 on CUDA, none on CPU")
    dtype: str = _setting("INFERENCE_DTYPE", _choice("auto", "float32", "bfloat16", "float16"), "auto",
                          "weights dtype when not quantized; auto = bfloat16 on CUDA and on CPUs with native "
                          "bfloat16, else float32")
    device: str = _setting("INFERENCE_DEVICE", _choice("auto", "cuda", "cpu"), "auto", "auto = cuda when available")
    host: str = _setting("INFERENCE_HOST", _text, "0.0.0.0", "listen address")
    port: int = _setting("INFERENCE_PORT", _int(1, 65535), 8000, "listen port")
    log_file: str = _setting("INFERENCE_LOG_FILE", _text, "inference_server.log", "rotating log file")
    log_level: str = _setting("INFERENCE_LOG_LEVEL", _choice("DEBUG", "INFO", "WARNING", "ERROR"), "INFO",
                              "DEBUG also logs prompt text")
    log_max_bytes: int = _setting("INFERENCE_LOG_MAX_BYTES", _int(1024), 10 * 2**20, "log size before rotating")
    log_backup_count: int = _setting("INFERENCE_LOG_BACKUP_COUNT", _int(0, 1000), 5, "rotated log files kept")
    max_new_tokens_cap: int = _setting("INFERENCE_MAX_NEW_TOKENS", _int(1), 8192, "largest max_new_tokens accepted")
    default_max_new_tokens: int = _setting("INFERENCE_DEFAULT_MAX_NEW_TOKENS", _int(1), 1024,
                                           "max_new_tokens when a request gives none")
    max_context: int = _setting("INFERENCE_MAX_CONTEXT", _int(0), 0,
                                "prompt + new tokens per sequence (0 = the model's own limit)")
    max_batch: int = _setting("INFERENCE_MAX_BATCH", _int(1, 1024), 32, "sequences decoded together")
    kv_cache_gb: float = _setting("INFERENCE_KV_CACHE_GB", _float(0.0), 0.0,
                                  "KV cache size in GiB (0 = auto: most of the free GPU memory)")
    kv_block_size: int = _setting("INFERENCE_KV_BLOCK_SIZE", _int(1, 4096), 64, "tokens per KV-cache block")
    prefill_chunk: int = _setting("INFERENCE_PREFILL_CHUNK", _int(1), 2048,
                                  "prompt tokens of one sequence per step (longer prompts are chunked); a step's "
                                  "prompt budget when no sequence is decoding")
    max_step_tokens: int = _setting("INFERENCE_MAX_STEP_TOKENS", _int(2), 128,
                                    "tokens per step while sequences decode: one for each of them, prompt chunks in "
                                    "the rest (must exceed INFERENCE_MAX_BATCH)")
    attention: str = _setting("INFERENCE_ATTENTION", _choice("auto", "paged", "reference"), "auto",
                              "paged (Triton kernels reading the KV pool in place), reference (gather + SDPA); "
                              "auto = paged on CUDA, reference on the CPU")
    cuda_graphs: str = _setting("INFERENCE_CUDA_GRAPHS", _choice("on", "off"), "on",
                                "replay decode steps as CUDA graphs (on CUDA)")
    max_queue: int = _setting("INFERENCE_MAX_QUEUE", _int(1), 256, "requests waiting for a batch slot")
    tool_result_timeout_s: float = _setting("INFERENCE_TOOL_RESULT_TIMEOUT_S", _float(0.001), 300.0,
                                            "how long a task waits for tool_result")
    structured_outputs: str = _setting("INFERENCE_STRUCTURED_OUTPUTS", _choice("on", "off"), "on",
                                       "constrained decoding: tool calls that match their tool's schema by "
                                       "construction, tool_choice and response_format enforced by a grammar; off: "
                                       "tool calls are validated after the fact (INFERENCE_TOOL_CALL_RETRIES) and "
                                       "response_format is refused")
    tool_call_retries: int = _setting("INFERENCE_TOOL_CALL_RETRIES", _int(0), 1,
                                      "model calls a task may spend on correcting tool calls that name no tool or "
                                      "whose arguments break the tool's schema; then they reach the client flagged")
    session_idle_timeout_s: float = _setting("INFERENCE_SESSION_IDLE_TIMEOUT_S", _float(1.0), 3600.0,
                                             "idle sessions are deleted after this long")
    max_sessions: int = _setting("INFERENCE_MAX_SESSIONS", _int(1), 10000, "sessions alive at once")
    # durable sessions, resumable streams, replicas
    session_store: str = _setting("INFERENCE_SESSION_STORE", check_url, "sqlite:///sessions.db",
                                  "where sessions are kept: sqlite:///path.db (this server; relative to the working "
                                  "directory), redis://host:port/db (shared by replicas), or memory (lost on restart)")
    session_max_bytes: int = _setting("INFERENCE_SESSION_MAX_BYTES", _int(4096), 32 * 2**20,
                                      "largest stored session (its conversation and tools as JSON)")
    resume_grace_s: float = _setting("INFERENCE_RESUME_GRACE_S", _float(0.0), 30.0,
                                     "a task whose socket dropped runs on this long, buffering, for the client to "
                                     "reconnect with ?resume_from=; 0 = cancel it at once")
    resume_buffer_bytes: int = _setting("INFERENCE_RESUME_BUFFER_BYTES", _int(4096), 2**20,
                                        "notifications kept per session for a resuming client (JSON bytes)")
    replica_id: str = _setting("INFERENCE_REPLICA_ID", _replica, "",
                               "this replica's name (HAProxy's server name): session ids begin with it, so the "
                               "proxy routes each session back here; empty = plain uuid session ids")
    async_scheduling: str = _setting("INFERENCE_ASYNC_SCHEDULING", _choice("auto", "on", "off"), "auto",
                                     "schedule and send step N+1 while the GPU runs step N (the host's work per step "
                                     "hides behind the GPU; a finished row computes one dropped token more); steps "
                                     "with grammar rows still run one at a time; auto = on with CUDA (a CPU runs "
                                     "the forward pass itself: nothing to overlap)")
    engine_process: str = _setting("INFERENCE_ENGINE_PROCESS", _choice("auto", "on", "off"), "auto",
                                   "on: the engine (model, scheduler, KV cache) runs in a process of its own, so "
                                   "streaming to clients never slows its steps; off: on a thread of the server's "
                                   "process; auto: on, unless the model loader cannot be sent to another process "
                                   "(tests' scripted models)")
    stream_coalesce: str = _setting("INFERENCE_STREAM_COALESCE", _choice("on", "off"), "on",
                                    "while a client reads slower than its stream comes (its socket's messages wait to "
                                    "be written), join the text of later tokens into one text_chunk; the first chunk "
                                    "of a model call is never held")
    ws_max_message_bytes: int = _setting("INFERENCE_WS_MAX_MESSAGE_BYTES", _int(1024), 16 * 2**20,
                                         "largest WebSocket message (and HTTP body) accepted")
    ws_send_queue: int = _setting("INFERENCE_WS_SEND_QUEUE", _int(16), 4096,
                                  "messages queued for a client that reads too slowly before it is disconnected")
    ws_send_queue_bytes: int = _setting("INFERENCE_WS_SEND_QUEUE_BYTES", _int(65536), 8 * 2**20,
                                        "bytes queued for a client that reads too slowly before it is disconnected")
    max_json_values: int = _setting("INFERENCE_MAX_JSON_VALUES", _int(1000), 100_000,
                                    "JSON values in one WebSocket message or HTTP body, bounded by counting , [ { "
                                    "before parsing (commas inside strings count too)")
    rpc_max_batch: int = _setting("INFERENCE_RPC_MAX_BATCH", _int(1, 10_000), 32,
                                  "requests in one JSON-RPC batch (a larger batch is refused whole)")
    http_header_timeout_s: float = _setting("INFERENCE_HTTP_HEADER_TIMEOUT_S", _float(0.1), 10.0,
                                            "seconds a connection may take to send a request's headers")
    http_body_timeout_s: float = _setting("INFERENCE_HTTP_BODY_TIMEOUT_S", _float(0.1), 60.0,
                                          "seconds a request may take to send its body")
    http_keep_alive_s: int = _setting("INFERENCE_HTTP_KEEP_ALIVE_S", _int(1, 3600), 5,
                                      "seconds an idle keep-alive HTTP connection stays open")
    max_connections: int = _setting("INFERENCE_MAX_CONNECTIONS", _int(1), 1024,
                                    "open connections (HTTP and WebSocket); beyond, requests get 503")
    # security
    api_key: str = _setting("INFERENCE_API_KEY", _text, "", "API key required on every request (none: no auth)")
    api_keys_file: str = _setting("INFERENCE_API_KEYS_FILE", _text, "", "file with one API key per line")
    allowed_origins: tuple[str, ...] = _setting("INFERENCE_ALLOWED_ORIGINS", _list, (),
                                                "WebSocket Origins allowed (comma list, * = any; none: same-origin)")
    allowed_hosts: tuple[str, ...] = _setting("INFERENCE_ALLOWED_HOSTS", _list, (),
                                              "Host headers accepted (comma list; none: any)")
    ticket_ttl_s: float = _setting("INFERENCE_TICKET_TTL_S", _float(1.0), 60.0, "lifetime of a WebSocket ticket")
    # limits
    rate_limit_per_min: int = _setting("INFERENCE_RATE_LIMIT_PER_MIN", _int(0), 600,
                                       "create_session + generate per key (or client address) per minute; 0 = off")
    max_sessions_per_key: int = _setting("INFERENCE_MAX_SESSIONS_PER_KEY", _int(1), 1000, "sessions alive per key")
    max_tools: int = _setting("INFERENCE_MAX_TOOLS", _int(0), 128, "tools per session or request")
    max_tool_schema_bytes: int = _setting("INFERENCE_MAX_TOOL_SCHEMA_BYTES", _int(64), 65536,
                                          "JSON size of one tool definition")
    max_message_chars: int = _setting("INFERENCE_MAX_MESSAGE_CHARS", _int(1), 1_000_000,
                                      "characters in one message (and in one history entry)")
    max_history_messages: int = _setting("INFERENCE_MAX_HISTORY_MESSAGES", _int(1), 2000, "entries in a history")
    max_tool_result_chars: int = _setting("INFERENCE_MAX_TOOL_RESULT_CHARS", _int(1), 100_000,
                                          "characters of one tool result (as the text the model reads)")
    max_tool_round_chars: int = _setting("INFERENCE_MAX_TOOL_ROUND_CHARS", _int(1), 200_000,
                                         "characters of all the tool results of one round of tool calls")
    max_prompt_tokens: int = _setting("INFERENCE_MAX_PROMPT_TOKENS", _int(0), 0,
                                      "prompt tokens per model call (0 = the context minus one)")
    shutdown_grace_s: float = _setting("INFERENCE_SHUTDOWN_GRACE_S", _float(0.0), 30.0,
                                       "on SIGTERM, how long running tasks may finish before they are cancelled")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, dotenv_path: str | os.PathLike | None = ".env"
                 ) -> Settings:
        """Settings from ``environ`` (default: os.environ) over the values of ``dotenv_path``."""
        from dotenv import dotenv_values

        values: dict[str, str | None] = {}
        if dotenv_path is not None and Path(dotenv_path).is_file():
            values.update(dotenv_values(dotenv_path))
        values.update(os.environ if environ is None else environ)
        kwargs, problems = {}, []
        for f in fields(cls):
            raw = values.get(f.metadata["env"])
            if raw is None or raw == "":
                continue
            try:
                kwargs[f.name] = f.metadata["parse"](raw)
            except ValueError as exc:
                problems.append(f"{f.metadata['env']}={raw!r} is invalid: {exc}")
        step_tokens = kwargs.get("max_step_tokens", cls.max_step_tokens)
        if not problems and step_tokens <= kwargs.get("max_batch", cls.max_batch):
            problems.append(f"INFERENCE_MAX_STEP_TOKENS={step_tokens} must exceed INFERENCE_MAX_BATCH (a step carries "
                            f"a token for every running sequence and room for prompt tokens)")
        if problems:
            raise ConfigError("; ".join(problems))
        return cls(**kwargs)

    @classmethod
    def documented(cls) -> list[tuple[str, Any, str]]:
        """(variable, default, description) for every setting."""
        return [(f.metadata["env"], f.default, f.metadata["doc"]) for f in fields(cls)]


# ---- logging -----------------------------------------------------------------------------------------------
class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.session_id = session_var.get()
        record.task_id = task_var.get()
        return True


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [session=%(session_id)s task=%(task_id)s] %(message)s"
# Line breaks and other control characters a log viewer could act on, as escapes
_LOG_ESCAPES = {**{c: f"\\x{c:02x}" for c in range(32) if c != 9}, 10: "\\n", 13: "\\r", 0x7F: "\\x7f",
                0x85: "\\x85", 0x2028: "\\u2028", 0x2029: "\\u2029"}


class EscapingFormatter(logging.Formatter):
    """One record, one line: client and model text in a message (a tool name with a newline) cannot forge a
    log line. Tracebacks, appended after the message, keep their lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return super().formatMessage(record).translate(_LOG_ESCAPES)


def setup_logging(settings: Settings, rotate: bool = True) -> None:
    """Console + rotating file on the root logger; every line carries the session and task ids. ``rotate=False``
    (the engine process, which shares the file with the server that rotates it): append to whatever file has the
    name now, never rename it."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_inference", False)]:
        root.removeHandler(handler)
        handler.close()
    file = (logging.handlers.RotatingFileHandler(settings.log_file, maxBytes=settings.log_max_bytes,
                                                 backupCount=settings.log_backup_count, encoding="utf-8")
            if rotate else logging.handlers.WatchedFileHandler(settings.log_file, encoding="utf-8"))
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr), file]
    for handler in handlers:
        handler._inference = True  # type: ignore[attr-defined]
        handler.setFormatter(EscapingFormatter(LOG_FORMAT))
        handler.addFilter(_ContextFilter())
        root.addHandler(handler)
    root.setLevel(settings.log_level)
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ---- model loading ---------------------------------------------------------------------------------------------
@dataclass
class GenerationDefaults:
    """Sampling defaults from the model's generation_config.json (Qwen2.5 ships its recommended ones)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0


@dataclass
class LoadedModel:
    hf_model: Any
    tokenizer: Any
    paged_model: Any  # engine.qwen2.PagedQwen2 (or a test double with the same interface)
    defaults: GenerationDefaults
    stop_token_ids: frozenset[int]
    name: str
    max_position_embeddings: int
    serving_info: dict[str, Any] = field(default_factory=dict)  # device, quantization, ... (for /v1/models)


SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral")


def _resolve_device(settings: Settings) -> str:
    import torch

    if settings.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("INFERENCE_DEVICE=cuda but no CUDA device is available (allowed values: auto, cuda, cpu)")
    if settings.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return settings.device


def cpu_dtype() -> str:
    """bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX: ~3x faster than float32 for a 0.5B
    model on 2 cores, measured), else float32 (bfloat16 emulated in software is slower)."""
    import torch

    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # older torch: no way to ask
        native = False
    return "bfloat16" if native else "float32"


def _load_kwargs(settings: Settings, device: str) -> tuple[dict[str, Any], str]:
    import torch

    quant = settings.quantization
    if quant == "auto":
        quant = "nf4" if device == "cuda" else "none"
    if quant == "nf4" and device != "cuda":
        raise ConfigError("INFERENCE_QUANTIZATION=nf4 needs a CUDA GPU; use INFERENCE_QUANTIZATION=none on a CPU")
    kwargs: dict[str, Any] = {"attn_implementation": settings.attn_implementation}
    if quant == "nf4":
        from transformers import BitsAndBytesConfig

        compute = getattr(torch, settings.bnb_compute_dtype)
        kwargs.update(dtype=compute, device_map={"": 0}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute))
    else:
        dtype = settings.dtype if settings.dtype != "auto" else ("bfloat16" if device == "cuda" else cpu_dtype())
        kwargs.update(dtype=getattr(torch, dtype), device_map={"": 0} if device == "cuda" else None)
    return kwargs, quant


def _generation_defaults(generation_config: Any) -> GenerationDefaults:
    d = GenerationDefaults()
    for name in ("do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        value = getattr(generation_config, name, None)
        if value is not None:
            setattr(d, name, type(getattr(d, name))(value))
    return d


def _stop_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    for token in (tokenizer.eos_token, "<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(token) if token else None
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return frozenset(ids)


def count_parameters(model: Any) -> int:
    """Parameters as the model defines them: a 4-bit weight counts its logical shape, not its packed bytes
    (bitsandbytes stores two NF4 values per uint8 element)."""
    total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        total += math.prod(state.shape) if state is not None else p.numel()
    return total


def load_model(settings: Settings) -> LoadedModel:
    """Load the model and tokenizer once (NF4 on CUDA by default) and wrap it for the engine."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.qwen2 import PagedQwen2
    from model_source import check_model_source, load_errors

    check_model_source(settings)
    device = _resolve_device(settings)
    kwargs, quant = _load_kwargs(settings, device)
    started = time.perf_counter()
    with load_errors(settings.model_id):
        tokenizer = AutoTokenizer.from_pretrained(settings.model_id)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"INFERENCE_MODEL_ID={settings.model_id!r}: the tokenizer has no chat template")
    with load_errors(settings.model_id):
        model = AutoModelForCausalLM.from_pretrained(settings.model_id, **kwargs)
    if model.config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"INFERENCE_MODEL_ID={settings.model_id!r}: model type {model.config.model_type!r} is not "
                          f"supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    elapsed = time.perf_counter() - started
    gpu = (f", GPU memory allocated {torch.cuda.memory_allocated() / 2**30:.2f} GiB" if device == "cuda" else "")
    nparams = count_parameters(model)
    log.info("loaded %s (%s, %.2fB params, quantization=%s, dtype=%s, attn=%s, device=%s) in %.1f s%s",
             settings.model_id, model.config.model_type, nparams / 1e9, quant, kwargs["dtype"],
             settings.attn_implementation, device, elapsed, gpu)
    info = {"device": device, "quantization": quant, "dtype": str(kwargs["dtype"]).removeprefix("torch.")}
    try:
        paged = PagedQwen2(model)
    except ValueError as exc:  # a model the engine cannot serve correctly (e.g. batch-dependent RoPE scaling)
        raise ConfigError(f"INFERENCE_MODEL_ID={settings.model_id!r}: {exc}") from None
    if quant == "nf4":
        from engine import nf4

        info["nf4_kernel"] = nf4.install(paged, settings.nf4_kernel)
    if device == "cpu":
        info["note"] = "no CUDA GPU: running unquantized on the CPU (Qwen2.5-14B-Instruct in NF4 needs a GPU)"
        log.warning("%s: serving %s on the CPU", info["note"], settings.model_id)
    return LoadedModel(model, tokenizer, paged, _generation_defaults(model.generation_config),
                       _stop_ids(model, tokenizer), settings.served_model_name or Path(settings.model_id).name
                       or settings.model_id, int(getattr(model.config, "max_position_embeddings", 32768)), info)


def kv_cache_bytes(settings: Settings, paged_model: Any, max_context: int) -> int:
    """Bytes for the KV pool: the configured size; else, on CUDA, 0 (auto: ``engine.memory`` sizes it from the free
    memory once the largest step and the decode graphs are measured); else enough on a CPU."""
    if settings.kv_cache_gb > 0:
        return int(settings.kv_cache_gb * 2**30)
    per_token = paged_model.kv_bytes_per_token()
    if str(paged_model.device).startswith("cuda"):
        return 0  # the engine measures its largest step and its decode graphs, then takes most of what is free
    return min(4 * 2**30, max(max_context * per_token, max_context * per_token * min(settings.max_batch, 8)))


def engine_config(settings: Settings, loaded: LoadedModel) -> EngineConfig:
    """The engine's configuration from the settings and the loaded model (checked: a bad value names its variable)."""
    max_context = settings.max_context or loaded.max_position_embeddings
    if max_context > loaded.max_position_embeddings:
        log.warning("INFERENCE_MAX_CONTEXT=%d exceeds the model's %d positions: using %d", max_context,
                    loaded.max_position_embeddings, loaded.max_position_embeddings)
        max_context = loaded.max_position_embeddings
    if settings.max_step_tokens <= settings.max_batch:
        raise ConfigError(f"INFERENCE_MAX_STEP_TOKENS={settings.max_step_tokens} must exceed INFERENCE_MAX_BATCH="
                          f"{settings.max_batch}: a step carries a token for every running sequence and room for "
                          f"prompt tokens")
    from engine import EngineConfig
    from engine.attention import resolve_backend

    try:
        resolve_backend(settings.attention, loaded.paged_model.device)
    except ValueError as exc:
        raise ConfigError(f"INFERENCE_ATTENTION={settings.attention}: {exc}") from None
    return EngineConfig(max_running=settings.max_batch, max_context=max_context, block_size=settings.kv_block_size,
                        kv_cache_bytes=kv_cache_bytes(settings, loaded.paged_model, max_context),
                        prefill_chunk=settings.prefill_chunk, max_step_tokens=settings.max_step_tokens,
                        attention=settings.attention, max_queue=settings.max_queue,
                        cuda_graphs=settings.cuda_graphs == "on",
                        async_scheduling=settings.async_scheduling == "on" or (
                            settings.async_scheduling == "auto" and str(loaded.paged_model.device).startswith("cuda")))



# ---- runtime -------------------------------------------------------------------------------------------------
@dataclass
class Runtime:
    """What the transport and the tasks share once the app has started."""

    settings: Settings
    model: LoadedModel
    engine: EngineClient
    sessions: SessionRegistry
    keys: ApiKeys
    tickets: TicketBook
    limiter: RateLimiter
    metrics: Metrics
    grammars: Any = None  # grammars.GrammarCompiler; None with INFERENCE_STRUCTURED_OUTPUTS=off
    connections: set[Any] = field(default_factory=set)  # open WebSocket connections
    draining: bool = False  # shutting down: no new sessions or tasks
    started_at: float = field(default_factory=time.time)

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer
