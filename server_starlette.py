"""The transport: app factory, HTTP routes, lifespan, graceful shutdown, ``python server_starlette.py``.

The WebSocket side (handshake checks, receive loop, JSON-RPC methods) lives in ``session_socket.py``.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from auth import ApiKeys, RateLimiter, TicketBook, TicketBookFull
from engine import AsyncEngine, Engine
from engine.mp_client import EngineProcess, can_spawn
from engine.structured import GrammarTokenizer
from grammars import GrammarCompiler
from http_guard import BodyError, HostGuard, read_json_body, uvicorn_options
from jsonrpc import Dispatcher, RpcError, validation_details
from limits import max_token_chars, too_many_tools, tools_problem
from metrics import Metrics
from model_source import check_model_source
from models import CreateSessionRequest, CreateSessionResponse, ErrorCode
from openai_api import chat_completions, list_models
from session_socket import GOING_AWAY, METHODS, REPLICA_HEADER, ws_session
from session_store import SessionStore, StoreError, committed
from sessions import SessionRegistry, dump_tools
from shared import ConfigError, LoadedModel, Runtime, Settings, engine_config, load_model, setup_logging
from workers import off_loop

if TYPE_CHECKING:
    from shared import EngineClient

log = logging.getLogger("inference.server")
UVICORN_WS = {"ws_per_message_deflate": False}  # see http_guard.uvicorn_options
STATIC_DIR = Path(__file__).resolve().parent / "static"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


# ---- HTTP ------------------------------------------------------------------------------------------------------
def http_error(status: int, kind: str, message: str, details: Any = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"type": kind, "message": message}
    if details is not None:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def authenticate(request: Request, rt: Runtime) -> str | JSONResponse:
    """The caller's key id, or the 401 to send."""
    owner = rt.keys.from_header(request.headers.get("authorization"))
    if owner is None:
        return http_error(401, "unauthorized", "missing or invalid API key (Authorization: Bearer <key>)",
                          headers={"WWW-Authenticate": "Bearer"})
    return owner


def caller_of(request: Request, rt: Runtime, owner: str) -> str:
    """Who is rate-limited and counted: the key id, or the client address without keys."""
    return owner if rt.keys.enabled else f"addr:{request.client.host if request.client else '-'}"


async def read_json(request: Request, rt: Runtime) -> Any:
    """The JSON body ({} when empty), or the error response to send."""
    try:
        return await read_json_body(request, rt.settings)
    except BodyError as exc:
        return http_error(exc.status, exc.kind, exc.message)


def rate_limited(rt: Runtime, caller: str) -> JSONResponse | None:
    if retry := rt.limiter.acquire(caller):
        return http_error(429, "rate_limited", "too many requests", {"retry_after_s": round(retry, 2)},
                          headers={"Retry-After": str(max(1, round(retry)))})
    return None


def parse_session_request(settings: Settings, payload: Any) -> CreateSessionRequest | JSONResponse:
    """Validation of a session request (tool schemas included): costly, run on the worker pool."""
    try:
        body = CreateSessionRequest.model_validate(payload)
    except ValidationError as exc:
        return http_error(422, "invalid_request", "invalid session request", validation_details(exc))
    except RecursionError:
        return http_error(422, "invalid_request", "invalid session request: nested too deeply")
    if problem := tools_problem(settings, body.tools):
        return http_error(422, "invalid_request", f"tools exceed the server's limits: {problem}")
    return body


async def create_session(request: Request) -> Response:
    rt: Runtime = request.app.state.runtime
    if rt.draining:
        return http_error(503, "shutting_down", "the server is shutting down")
    owner = authenticate(request, rt)
    if isinstance(owner, Response):
        return owner
    caller = caller_of(request, rt, owner)
    if refusal := rate_limited(rt, caller):
        return refusal
    payload = await read_json(request, rt)
    if isinstance(payload, Response):
        return payload
    if isinstance(payload, dict) and (problem := too_many_tools(rt.settings, payload.get("tools"))):
        return http_error(422, "invalid_request", f"tools exceed the server's limits: {problem}")
    body = await off_loop(parse_session_request, rt.settings, payload)
    if isinstance(body, Response):
        return body
    tools_json = await off_loop(dump_tools, body.tools)
    try:
        session = rt.sessions.create(body.tools, owner, rt.settings.max_sessions_per_key, quota=caller,
                                     tools_json=tools_json)
    except RpcError as exc:
        return http_error(429 if exc.code == ErrorCode.RATE_LIMITED else 503, "too_many_sessions", exc.message)
    if problem := await committed(session.save()):  # an id is handed out only once the session survives a restart
        rt.sessions.remove(session)
        return http_error(503, "store_unavailable", f"the session could not be stored: {problem}",
                          headers={"Retry-After": "5"})
    log.info("session %s created with %d tools", session.session_id, len(body.tools))
    return JSONResponse(CreateSessionResponse(session_id=session.session_id).model_dump())


class ReplicaHeader:
    """Every HTTP response says which replica answered (``X-Inference-Replica``): deploy/haproxy.cfg routes a
    session's requests to one replica, and this shows it. (WebSocket upgrades carry it too: session_socket.)"""

    def __init__(self, app: Any, replica_id: str) -> None:
        self.app, self.header = app, (REPLICA_HEADER.lower().encode(), replica_id.encode())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)
        await self.app(scope, receive, send_with_header)


async def issue_ticket(request: Request) -> Response:
    """A short-lived single-use ticket for ``/ws/{id}?ticket=...`` (browsers cannot send headers there)."""
    rt: Runtime = request.app.state.runtime
    owner = authenticate(request, rt)
    if isinstance(owner, Response):
        return owner
    if refusal := rate_limited(rt, caller_of(request, rt, owner)):
        return refusal
    payload = await read_json(request, rt)
    if isinstance(payload, Response):
        return payload
    session_id = payload.get("session_id") if isinstance(payload, dict) else None
    if session_id is not None:
        try:
            session = await rt.sessions.attach(str(session_id))
        except (StoreError, RpcError) as exc:
            return http_error(503, "store_unavailable", f"the session cannot be attached now: {exc}"[:300],
                              headers={"Retry-After": "5"})
        if session is None:
            return http_error(404, "not_found", "no such session")
        if rt.keys.enabled and session.owner != owner:
            return http_error(403, "forbidden", "this session belongs to another key")
    try:
        ticket = rt.tickets.issue(owner, None if session_id is None else str(session_id))
    except TicketBookFull as exc:
        return http_error(503, "too_many_tickets", str(exc), headers={"Retry-After": "10"})
    return JSONResponse({"ticket": ticket, "expires_in_s": rt.tickets.ttl_s})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> JSONResponse:
    rt: Runtime | None = getattr(request.app.state, "runtime", None)
    if rt is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    engine, store = rt.engine, rt.sessions.store.status()
    if rt.draining or not engine.alive:
        reason = "shutting down" if rt.draining else engine.dead_reason or "engine not running"
        return JSONResponse({"status": "unavailable", "reason": reason, "session_store": store}, status_code=503)
    if not store["ok"]:  # new sessions would not survive a restart: take no new work until the store is back
        return JSONResponse({"status": "unavailable", "reason": f"session store failing: {store['error']}",
                             "session_store": store}, status_code=503)
    return JSONResponse({"status": "ready", "model": rt.model.name, "session_store": store})


async def metrics(request: Request) -> Response:
    rt: Runtime = request.app.state.runtime
    if rt.keys.enabled and isinstance(owner := authenticate(request, rt), Response):
        return owner
    text = rt.metrics.render(rt.engine.stats(), len(rt.sessions), len(rt.connections),
                             len(rt.sessions.active_tasks))
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


async def playground(request: Request) -> Response:
    """The web playground: one static page, no external resources."""
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        return http_error(404, "not_found", "the playground is not installed")
    return FileResponse(page, media_type="text/html")


# ---- app ---------------------------------------------------------------------------------------------------------
async def _expire_sessions(sessions: SessionRegistry) -> None:
    while True:
        await asyncio.sleep(min(60.0, sessions.idle_timeout_s / 2))
        try:
            await sessions.maintain()
        except Exception:  # never let the expiry loop die
            log.exception("session maintenance failed")


def build_runtime(settings: Settings, loaded: LoadedModel, engine: EngineClient | None = None) -> Runtime:
    """The runtime around an engine client (default: the engine on a thread of this process, from ``loaded``)."""
    keys = ApiKeys.load(settings.api_key, settings.api_keys_file)
    if not keys.enabled and settings.host not in LOOPBACK:
        log.warning("no API key is configured and the server listens on %s: anyone who can reach this port can "
                    "use it. Set INFERENCE_API_KEY (or INFERENCE_API_KEYS_FILE).", settings.host)
    elif keys.enabled:
        log.info("API keys required (%d configured)", len(keys))
    metrics_ = Metrics()
    if engine is None:
        engine = AsyncEngine(Engine(loaded.paged_model, engine_config(settings, loaded)))
    engine.on_step = metrics_.on_step
    max_token_chars(loaded.tokenizer)  # computed once here, not by the first request
    store = SessionStore.open(settings.session_store, max_bytes=settings.session_max_bytes,
                              idle_s=settings.session_idle_timeout_s)
    store.on_write = metrics_.store_write.observe
    log.info("session store: %s", store.name)
    sessions = SessionRegistry(store, settings.max_sessions, settings.session_idle_timeout_s,
                               replica_id=settings.replica_id, replay_bytes=settings.resume_buffer_bytes,
                               replay_keep_s=settings.resume_grace_s,
                               on_remove=lambda session: engine.release_session(session.session_id))
    sessions.on_lost_task = metrics_.lost_tasks.inc
    return Runtime(settings, loaded, engine, sessions, keys, TicketBook(settings.ticket_ttl_s),
                   RateLimiter(settings.rate_limit_per_min), metrics_,
                   grammar_compiler(settings, loaded, engine.vocab_size))


def grammar_compiler(settings: Settings, loaded: LoadedModel, vocab_size: int) -> GrammarCompiler | None:
    """The grammar engine's view of the tokenizer (it walks the whole vocabulary: about a second for Qwen's),
    built once at start-up, or None with INFERENCE_STRUCTURED_OUTPUTS=off."""
    if settings.structured_outputs == "off":
        log.info("structured outputs are off: tool calls are validated after the fact")
        return None
    if not loaded.stop_token_ids:  # nothing could end a grammar (a benchmark's random-weight model)
        log.warning("structured outputs are off: the model has no stop token")
        return None
    started = time.perf_counter()
    tokenizer = GrammarTokenizer(loaded.tokenizer, vocab_size, sorted(loaded.stop_token_ids))
    compiler = GrammarCompiler(tokenizer)
    log.info("structured outputs: grammar tokenizer ready in %.2f s (tool tags are tokens: %s)",
             time.perf_counter() - started, compiler.tags_are_tokens)
    return compiler


async def drain(rt: Runtime) -> None:
    """Graceful shutdown: refuse new work, let running tasks finish within the grace period, cancel the rest
    (each gets its ``end``), then close every socket with 1001 (going away)."""
    rt.draining = True
    grace = rt.settings.shutdown_grace_s
    log.info("shutting down: %d running tasks get %.0f s to finish", len(rt.sessions.active_tasks), grace)
    deadline = time.monotonic() + grace
    while rt.sessions.active_tasks and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    left = rt.sessions.active_tasks
    if left:
        log.info("cancelling %d tasks still running", len(left))
    await rt.sessions.close_all()
    for conn in list(rt.connections):
        conn.close(GOING_AWAY, "server shutting down")
    deadline = time.monotonic() + 5
    while rt.connections and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def engine_in_own_process(settings: Settings, loader: Callable[[Settings], LoadedModel]) -> bool:
    """INFERENCE_ENGINE_PROCESS: on, off, or auto (on where the loader can be sent to a new process: the server's
    own always can; a test's lambda cannot)."""
    if settings.engine_process == "off":
        return False
    if can_spawn(loader):
        return True
    if settings.engine_process == "on":
        raise ConfigError("INFERENCE_ENGINE_PROCESS=on: this app's model loader cannot be sent to another process "
                          "(a lambda or a closure); use a module-level function, or INFERENCE_ENGINE_PROCESS=off")
    log.info("the engine runs on a thread of this process (its loader cannot be sent to another process)")
    return False


def create_app(settings: Settings | None = None, *,
               loader: Callable[[Settings], LoadedModel] = load_model) -> Starlette:
    """The ASGI app. The model is loaded by ``loader`` in the lifespan, once, and the engine started."""
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        setup_logging(settings)
        try:
            if engine_in_own_process(settings, loader):
                client = EngineProcess(settings, loader)
                loaded = await client.start()  # loads the model there, captures the decode graphs (CUDA) first
                rt = build_runtime(settings, loaded, client)
            else:
                loaded = await asyncio.to_thread(loader, settings)
                rt = build_runtime(settings, loaded)
                await rt.engine.start()  # captures the decode graphs (CUDA) before /ready
        except ConfigError as exc:  # the model cannot be had, a bad setting: main() says so in one message
            app.state.startup_error = exc
            raise
        app.state.runtime = rt
        app.state.loop = asyncio.get_running_loop()
        app.state.dispatcher = Dispatcher(METHODS, observe=rt.metrics.count, max_batch=settings.rpc_max_batch,
                                          max_values=settings.max_json_values, offload=off_loop)
        expiry = asyncio.create_task(_expire_sessions(rt.sessions))
        log.info("ready: model %s, listening on %s:%d", loaded.name, settings.host, settings.port)
        try:
            yield
        finally:
            expiry.cancel()
            await rt.sessions.close_all()
            await rt.sessions.store.close()  # the last writes (each task's end) land before the process exits
            await rt.engine.stop()
            log.info("stopped")

    middleware = [Middleware(HostGuard, allowed=settings.allowed_hosts, bind_host=settings.host)]
    if settings.replica_id:
        middleware.append(Middleware(ReplicaHeader, replica_id=settings.replica_id))
    return Starlette(routes=[
        Route("/create_session", create_session, methods=["POST"]),
        Route("/auth/ticket", issue_ticket, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/", playground, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static"),
        WebSocketRoute("/ws/{session_id}", ws_session),
    ], middleware=middleware, lifespan=lifespan)


def make_server_class() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn, but the first SIGTERM/Ctrl-C drains (see ``drain``) before the server stops; a second one
        stops at once."""

        draining = False
        loop: asyncio.AbstractEventLoop | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            rt = getattr(getattr(self.config.app, "state", None), "runtime", None)
            if self.draining or rt is None or self.loop is None:
                return super().handle_exit(sig, frame)
            self.draining = True
            self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain_then_exit(rt)))

        async def _drain_then_exit(self, rt: Runtime) -> None:
            try:
                await drain(rt)
            finally:
                self.should_exit = True

        async def serve(self, sockets: Any = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

    return DrainingServer


class QuietConfigErrors:
    """ASGI middleware for ``main()``: a start-up that fails with a ConfigError (raised in the engine process or
    here: the model cannot be had, a setting is wrong) is reported by ``main()`` as one message, so uvicorn's
    log gets no traceback of it. Any other start-up failure keeps its traceback."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)

        async def send_quietly(message: Any) -> None:
            if message["type"] == "lifespan.startup.failed" \
                    and isinstance(getattr(scope["app"].state, "startup_error", None), ConfigError):
                message = {**message, "message": ""}
            await send(message)
        return await self.app(scope, receive, send_quietly)


def main() -> None:
    import uvicorn

    try:
        settings = Settings.from_env()
        check_model_source(settings)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    setup_logging(settings)
    app = create_app(settings)
    app.add_middleware(QuietConfigErrors)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, **uvicorn_options(settings))
    try:
        make_server_class()(config).run()
    except SystemExit:  # uvicorn's exit when start-up failed
        if isinstance(error := getattr(app.state, "startup_error", None), ConfigError):
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
