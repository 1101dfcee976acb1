"""Prometheus metrics of one app (its own registry, so several apps can live in one process, as in tests)."""
from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ITL_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("inference_requests", "Requests by method and outcome (ok or an error code)",
                                ["method", "outcome"], registry=r)
        self.errors = Counter("inference_errors", "Errors by code (responses and error notifications)", ["code"],
                              registry=r)
        self.sessions = Gauge("inference_active_sessions", "Sessions alive", registry=r)
        self.connections = Gauge("inference_open_websockets", "WebSockets open", registry=r)
        self.tasks = Gauge("inference_active_tasks", "Tasks running or waiting for tool results", registry=r)
        self.queue_depth = Gauge("inference_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("inference_running_sequences", "Sequences in the running batch", registry=r)
        self.batch_size = Histogram("inference_decode_batch_size", "Sequences per decode step", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256))
        self.step_seconds = Histogram("inference_step_seconds", "Engine step time by kind", ["kind"], registry=r,
                                      buckets=LATENCY_BUCKETS)
        self.ttft = Histogram("inference_time_to_first_token_seconds", "Time to first token of each model call",
                              registry=r, buckets=LATENCY_BUCKETS)
        self.itl = Histogram("inference_inter_token_seconds", "Time between streamed tokens", registry=r,
                             buckets=ITL_BUCKETS)
        self.prompt_tokens = Counter("inference_prompt_tokens", "Prompt tokens", registry=r)
        self.cached_tokens = Counter("inference_cached_prompt_tokens", "Prompt tokens served from the KV cache",
                                     registry=r)
        self.generated_tokens = Counter("inference_generated_tokens", "Generated tokens", registry=r)
        self.kv_usage = Gauge("inference_kv_cache_usage_ratio", "KV-cache blocks in use / total", registry=r)
        self.kv_blocks = Gauge("inference_kv_cache_blocks", "KV-cache blocks by state", ["state"], registry=r)
        self.gpu_memory = Gauge("inference_gpu_memory_bytes", "GPU memory by kind", ["kind"], registry=r)
        self.store_write = Histogram("inference_session_store_write_seconds", "Session store writes, from queued "
                                     "to committed", registry=r, buckets=LATENCY_BUCKETS)
        self.resumes = Counter("inference_resumes", "Sockets that resumed a session's stream, by outcome "
                               "(complete, incomplete: some notifications were no longer kept)", ["outcome"],
                               registry=r)
        self.lost_tasks = Counter("inference_lost_tasks", "Tasks found running in a stored session that no process "
                                  "runs any more (their replica or process died)", registry=r)

    def on_step(self, kind: str, batch: int, seconds: float) -> None:
        """Engine hook (called on the engine thread; prometheus_client metrics are thread-safe)."""
        self.step_seconds.labels(kind).observe(seconds)
        if kind == "decode":
            self.batch_size.observe(batch)

    def render(self, engine_stats: dict[str, int], sessions: int, connections: int, tasks: int) -> bytes:
        """The exposition text, with the gauges read at scrape time."""
        self.sessions.set(sessions)
        self.connections.set(connections)
        self.tasks.set(tasks)
        self.queue_depth.set(engine_stats["waiting"] + engine_stats["queued"])
        self.running.set(engine_stats["running"])
        total, used = engine_stats["kv_blocks_total"], engine_stats["kv_blocks_used"]
        self.kv_usage.set(used / total if total else 0)
        self.kv_blocks.labels("used").set(used)
        self.kv_blocks.labels("total").set(total)
        for kind in ("allocated", "reserved"):  # the engine's figures (it may run in another process)
            if f"gpu_{kind}_bytes" in engine_stats:
                self.gpu_memory.labels(kind).set(engine_stats[f"gpu_{kind}_bytes"])
        return generate_latest(self.registry)

    def count(self, method: str, error: Any = None) -> None:
        outcome = "ok" if error is None else str(error)
        self.requests.labels(method, outcome).inc()
        if error is not None:
            self.errors.labels(str(error)).inc()
