"""Redis, N inference replicas and HAProxy on this machine, for demos and tests (tiny model on the CPU).

    python scripts/cluster.py [--replicas 2] [--port 8080] [--model models/tiny] [--dir cluster]

Each replica is ``server_starlette.py`` with INFERENCE_REPLICA_ID=r<i>, its own port and log, and the shared
Redis store; HAProxy runs deploy/haproxy.cfg with the server lines rewritten for these replicas. Ctrl-C (or
SIGTERM) stops everything. Needs Debian's redis-server and haproxy: bash scripts/install_services.sh.
Tests drive the same ``Cluster`` class (kill a replica, start it again).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HAPROXY_CFG = REPO / "deploy" / "haproxy.cfg"
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin"])
log = logging.getLogger("cluster")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary(name: str) -> str:
    path = shutil.which(name, path=SEARCH_PATH)
    if path is None:
        raise SystemExit(f"{name} is not installed: bash scripts/install_services.sh (Debian's {name})")
    return path


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_status(port: int, path: str) -> int | None:
    import http.client

    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None


def render_haproxy(template: str, port: int, servers: list[tuple[str, int]]) -> str:
    """deploy/haproxy.cfg for these replicas: the bind port and both server blocks rewritten."""
    text = re.sub(r"(?m)^(\s*)bind \S+$", rf"\1bind 127.0.0.1:{port}", template, count=1)
    blocks = iter([
        "".join(f"    server {name} 127.0.0.1:{p}\n" for name, p in servers),
        "".join(f"    server {name} 127.0.0.1:{p} track replicas/{name}\n" for name, p in servers),
    ])
    text = re.sub(r"(?ms)^(\s*# replicas: begin\n).*?^(\s*# replicas: end)",
                  lambda m: m.group(1) + next(blocks) + m.group(2), text)
    return text


@dataclass
class Replica:
    name: str
    port: int
    proc: subprocess.Popen | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Cluster:
    """Redis + replicas + HAProxy, as child processes writing their logs under ``workdir``."""

    workdir: Path
    model_dir: Path
    replicas: int = 2
    port: int = 0  # HAProxy's; 0 = a free one
    launcher: Path = REPO / "server_starlette.py"  # tests pass one that serves a scripted model
    env: dict[str, str] = field(default_factory=dict)  # extra INFERENCE_* settings for every replica
    redis_port: int = 0
    members: list[Replica] = field(default_factory=list)
    redis: subprocess.Popen | None = None
    haproxy: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def store_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def start(self, timeout_s: float = 180.0) -> Cluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.redis_port = self.redis_port or free_port()
        self.redis = subprocess.Popen(
            [binary("redis-server"), "--bind", "127.0.0.1", "--port", str(self.redis_port), "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--loglevel", "warning"],
            stdout=open(self.workdir / "redis.log", "ab"), stderr=subprocess.STDOUT)
        self.members = [Replica(f"r{i}", free_port()) for i in range(self.replicas)]
        for replica in self.members:
            self.start_replica(replica.name, wait=False)
        deadline = time.monotonic() + timeout_s
        for replica in self.members:
            self.wait_ready(replica, deadline)
        cfg = self.workdir / "haproxy.cfg"
        cfg.write_text(render_haproxy(HAPROXY_CFG.read_text(), self.port, [(r.name, r.port) for r in self.members]))
        self.haproxy = subprocess.Popen([binary("haproxy"), "-f", str(cfg), "-db"],
                                        stdout=open(self.workdir / "haproxy.log", "ab"), stderr=subprocess.STDOUT)
        while http_status(self.port, "/ready") != 200:
            if self.haproxy.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"haproxy did not come up; see {self.workdir / 'haproxy.log'}")
            time.sleep(0.1)
        return self

    def replica(self, name: str) -> Replica:
        return next(r for r in self.members if r.name == name)

    def start_replica(self, name: str, wait: bool = True) -> Replica:
        replica = self.replica(name)
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_")}
        env.update(INFERENCE_MODEL_ID=str(self.model_dir), INFERENCE_HOST="127.0.0.1",
                   INFERENCE_PORT=str(replica.port), INFERENCE_REPLICA_ID=replica.name,
                   INFERENCE_SESSION_STORE=self.store_url, INFERENCE_LOG_FILE=str(self.workdir / f"{name}.log"),
                   INFERENCE_MAX_CONTEXT="4096", INFERENCE_KV_CACHE_GB="0.05", OMP_NUM_THREADS="1",
                   PYTHONUNBUFFERED="1")
        env.update(self.env)
        replica.proc = subprocess.Popen([sys.executable, str(self.launcher)], env=env, cwd=self.workdir,
                                        stdout=open(self.workdir / f"{name}.out", "ab"), stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready(replica, time.monotonic() + 120)
        return replica

    def wait_ready(self, replica: Replica, deadline: float) -> None:
        while http_status(replica.port, "/ready") != 200:
            if not replica.alive:
                raise RuntimeError(f"replica {replica.name} exited; see {self.workdir / (replica.name + '.out')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica {replica.name} not ready; see {self.workdir / (replica.name + '.out')}")
            time.sleep(0.1)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        replica = self.replica(name)
        if replica.alive:
            replica.proc.send_signal(sig)
            replica.proc.wait(60)

    def stop(self) -> None:
        procs = [self.haproxy, *(r.proc for r in self.members), self.redis]
        for proc in procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in procs:
            if proc is None:
                continue
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def tiny_model(path: Path) -> Path:
    if not (path / "config.json").is_file():
        sys.path.insert(0, str(REPO / "scripts"))
        from make_tiny_model import build_tiny_model

        log.info("building the tiny model in %s", path)
        build_tiny_model(path)
    return path


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--port", type=int, default=8080, help="HAProxy's port")
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: models/tiny, built "
                        "if missing)")
    parser.add_argument("--dir", type=Path, default=REPO / "cluster", help="logs, haproxy.cfg, Redis' files")
    args = parser.parse_args()
    if not 1 <= args.replicas <= 16:
        parser.error("--replicas must be between 1 and 16")
    if args.model is not None and not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model}: no model directory with a config.json there")
    model = args.model or tiny_model(REPO / "models" / "tiny")
    cluster = Cluster(args.dir.resolve(), model.resolve(), args.replicas, args.port)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        cluster.start()
        log.info("cluster up: http://%s (playground), ws://%s/ws/<session_id>; Redis %s; replicas %s; logs in %s",
                 cluster.url, cluster.url, cluster.store_url,
                 ", ".join(f"{r.name}=127.0.0.1:{r.port}" for r in cluster.members), cluster.workdir)
        while not stop:
            for replica in cluster.members:
                if replica.proc is not None and replica.proc.poll() is not None:
                    log.warning("replica %s exited with %s", replica.name, replica.proc.returncode)
                    replica.proc = None
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        log.info("stopping")
        cluster.stop()


if __name__ == "__main__":
    main()
