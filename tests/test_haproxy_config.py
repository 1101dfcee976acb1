"""deploy/haproxy.cfg in front of a replica, with Debian's real haproxy (never mocked: without it the test skips,
and under CI=true it fails). The replica here is a small uvicorn app run with the server's own uvicorn options,
so that what it sees of the client is what the inference server would see."""
from __future__ import annotations

import subprocess
import threading
import time

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from services import free_port, require, stop, wait_for_port
from test_cluster import load_cluster_module

from conftest import REPO_ROOT


async def ready(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ready"})


async def whoami(request: Request) -> JSONResponse:
    return JSONResponse({"client": request.client.host if request.client else None})


def test_a_client_cannot_pick_the_address_the_replicas_see(tmp_path):
    """Without API keys the server counts sessions and rate-limits per client address. uvicorn trusts
    X-Forwarded-For from 127.0.0.1 (where HAProxy runs): the proxy must replace whatever the client sent there
    with the client's real address, or one client could pose as any address (and escape every per-address limit)."""
    require("haproxy")
    cluster = load_cluster_module()
    app = Starlette(routes=[Route("/ready", ready), Route("/whoami", whoami)])
    replica_port, proxy_port = free_port(), free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=replica_port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(cluster.render_haproxy((REPO_ROOT / "deploy" / "haproxy.cfg").read_text(), proxy_port,
                                          [("gpu0", replica_port)]))
    proxy = subprocess.Popen([require("haproxy"), "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for_port(replica_port)
        wait_for_port(proxy_port, proc=proxy)
        deadline = time.monotonic() + 20
        while True:  # until the health check has marked the replica up
            reply = httpx.get(f"http://127.0.0.1:{proxy_port}/whoami", timeout=5)
            if reply.status_code == 200:
                break
            assert time.monotonic() < deadline, reply.status_code
            time.sleep(0.2)
        # from another address than the proxy's own: the replica sees the client's, not the proxy's
        with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2")) as client:
            url = f"http://127.0.0.1:{proxy_port}/whoami"
            assert client.get(url, timeout=5).json()["client"] == "127.0.0.2"
            for spoofed in ({"X-Forwarded-For": "203.0.113.9"}, {"X-Forwarded-For": "203.0.113.9, 198.51.100.7"}):
                seen = client.get(url, headers=spoofed, timeout=5).json()["client"]
                assert seen == "127.0.0.2", f"{spoofed} made the replica see {seen}"
    finally:
        stop(proxy)
        server.should_exit = True
        thread.join(10)
