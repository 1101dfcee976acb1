"""The transport: app factory, HTTP routes, the WebSocket loop, JSON-RPC method handlers.

Run with ``python server_starlette.py`` (settings from the environment and ``.env``).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from engine import AsyncEngine, Engine, EngineConfig
from jsonrpc import Dispatcher, Method, RpcError, validation_details
from models import (
    CancelParams,
    CreateSessionRequest,
    CreateSessionResponse,
    ErrorCode,
    GenerateRequestParams,
    ToolResultParams,
)
from shared import (
    ConfigError,
    LoadedModel,
    Runtime,
    Settings,
    check_model_source,
    kv_cache_bytes,
    load_model,
    session_var,
    setup_logging,
)
from tasks import Session, SessionStore, Task, TaskFailure
from utils import (
    build_prompt_ids,
    generate_interactive_stream_ws,
    history_to_messages,
    open_stream,
    sampling_params,
)

log = logging.getLogger("inference.server")
# Small JSON frames (one per token) gain nothing from permessage-deflate, and compressing each one was the
# largest cost on the event loop when streaming (measured with py-spy): servers run with it off.
UVICORN_WS = {"ws_per_message_deflate": False}
SESSION_UNKNOWN_CLOSE = 4404  # sent as a 403 handshake refusal: the close happens before accept()
SESSION_ATTACHED_CLOSE = 4409


# ---- JSON-RPC methods ---------------------------------------------------------------------------------------
@dataclass
class Context:
    rt: Runtime
    session: Session


async def rpc_generate(ctx: Context, p: GenerateRequestParams) -> dict[str, Any]:
    rt, session, settings = ctx.rt, ctx.session, ctx.rt.settings
    if session.active_task is not None:
        raise RpcError(ErrorCode.SESSION_BUSY, "the session already has an active task; cancel it or wait for its end",
                       {"task_id": session.active_task.task_id})
    if p.max_new_tokens is not None and p.max_new_tokens > settings.max_new_tokens_cap:
        raise RpcError(ErrorCode.INVALID_PARAMS, "Invalid params", [{
            "loc": ["max_new_tokens"], "msg": f"must be <= {settings.max_new_tokens_cap}", "type": "less_than_equal"}])
    max_new = p.max_new_tokens or min(settings.default_max_new_tokens, settings.max_new_tokens_cap)
    tools = session.tools if p.tools is None else p.tools
    if p.history is not None:
        messages = history_to_messages(p.history)
    else:
        messages = [*session.messages, {"role": "user", "content": p.message}]
    try:
        prompt_ids = build_prompt_ids(rt.tokenizer, messages, tools)
    except Exception as exc:  # the template rejects the conversation (e.g. roles out of order)
        raise RpcError(ErrorCode.INVALID_PARAMS, f"the chat template cannot render this conversation: {exc}") from None
    task = Task(session, tools, sampling_params(p, rt.model.defaults, max_new, rt.model.stop_token_ids), p.stop or [])
    try:
        task.first_stream = open_stream(rt, task, prompt_ids)
    except TaskFailure as failure:
        raise failure.error from None
    session.messages = messages
    # The response is queued by the dispatcher before this task first runs (it starts at the next await).
    task.start(lambda t: generate_interactive_stream_ws(t, rt))
    log.info("generate: task %s, prompt %d tokens, max_new_tokens %d, %d tools", task.task_id, len(prompt_ids),
             max_new, len(tools))
    if log.isEnabledFor(logging.DEBUG):
        log.debug("prompt: %r", rt.tokenizer.decode(prompt_ids))
    return {"status": "processing", "task_id": task.task_id}


async def rpc_tool_result(ctx: Context, p: ToolResultParams) -> dict[str, Any]:
    task = ctx.session.active_task
    if task is None or task.task_id != p.task_id:
        raise RpcError(ErrorCode.UNKNOWN_TASK, f"this session has no active task {p.task_id!r}",
                       {"active_task_id": task.task_id if task else None})
    task.submit_tool_results(p.results)
    return {"status": "received"}


async def rpc_cancel(ctx: Context, p: CancelParams) -> dict[str, Any]:
    task = ctx.session.active_task
    if task is None:
        raise RpcError(ErrorCode.NOTHING_TO_CANCEL, "no active task to cancel")
    if p.task_id is not None and p.task_id != task.task_id:
        raise RpcError(ErrorCode.UNKNOWN_TASK, f"this session has no active task {p.task_id!r}",
                       {"active_task_id": task.task_id})
    task.cancel()  # delivered at the task's next await, after this response is queued
    return {"status": "cancelled", "task_id": task.task_id}


DISPATCHER = Dispatcher({
    "generate": Method(GenerateRequestParams, rpc_generate),
    "tool_result": Method(ToolResultParams, rpc_tool_result),
    "cancel": Method(CancelParams, rpc_cancel),
})


# ---- WebSocket -------------------------------------------------------------------------------------------------
class Connection:
    """Outgoing messages of one socket, sent in order by one sender task."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.queue: asyncio.Queue[dict[str, Any] | list[Any] | None] = asyncio.Queue()
        self.sender = asyncio.get_running_loop().create_task(self._send_loop())

    def send(self, message: dict[str, Any] | list[Any]) -> None:
        self.queue.put_nowait(message)

    async def _send_loop(self) -> None:
        with contextlib.suppress(Exception):  # the peer went away: the reader sees the disconnect
            while (message := await self.queue.get()) is not None:
                await self.websocket.send_text(json.dumps(message, ensure_ascii=False))

    async def close(self) -> None:
        self.queue.put_nowait(None)
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(self.sender, 5)


async def ws_session(websocket: WebSocket) -> None:
    rt: Runtime = websocket.app.state.runtime
    session = rt.sessions.get(websocket.path_params["session_id"])
    if session is None or session.emitter is not None:
        await websocket.close(code=SESSION_UNKNOWN_CLOSE if session is None else SESSION_ATTACHED_CLOSE)
        return
    session_var.set(session.session_id)
    await websocket.accept()
    conn = Connection(websocket)
    session.emitter = conn.send
    session.touch()
    log.info("websocket connected")
    ctx = Context(rt, session)
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            text = message.get("text")
            if text is None:
                try:
                    text = (message.get("bytes") or b"").decode("utf-8")
                except UnicodeDecodeError:
                    text = "\x00not json"  # answered as a parse error
            session.touch()
            reply = await DISPATCHER.handle_text(text, ctx)
            if reply is not None:
                conn.send(reply)
    except WebSocketDisconnect:
        pass
    finally:
        session.emitter = None
        task = session.active_task
        if task is not None:  # a client that goes away cancels its task and frees its engine slot now
            task.cancel()
            await task.wait()
        await conn.close()
        session.touch()
        log.info("websocket closed")


# ---- HTTP ------------------------------------------------------------------------------------------------------
def http_error(status: int, kind: str, message: str, details: Any = None) -> JSONResponse:
    body: dict[str, Any] = {"type": kind, "message": message}
    if details is not None:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status)


async def create_session(request: Request) -> JSONResponse:
    rt: Runtime = request.app.state.runtime
    raw = await request.body()
    try:
        payload = json.loads(raw) if raw.strip() else {}
    except (ValueError, RecursionError):
        return http_error(400, "invalid_json", "the request body is not valid JSON")
    if payload is None:
        payload = {}
    try:
        body = CreateSessionRequest.model_validate(payload)
    except ValidationError as exc:
        return http_error(422, "invalid_request", "invalid session request", validation_details(exc))
    try:
        session = rt.sessions.create(body.tools)
    except RpcError as exc:
        return http_error(503, "overloaded", exc.message)
    log.info("session %s created with %d tools", session.session_id, len(body.tools))
    return JSONResponse(CreateSessionResponse(session_id=session.session_id).model_dump())


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


STATIC_DIR = Path(__file__).resolve().parent / "static"


async def playground(request: Request) -> Response:
    """The web playground: one static page, no external resources."""
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        return http_error(404, "not_found", "the playground is not installed")
    return FileResponse(page, media_type="text/html")


# ---- app ---------------------------------------------------------------------------------------------------------
def engine_config(settings: Settings, loaded: LoadedModel) -> EngineConfig:
    max_context = settings.max_context or loaded.max_position_embeddings
    if max_context > loaded.max_position_embeddings:
        log.warning("INFERENCE_MAX_CONTEXT=%d exceeds the model's %d positions: using %d", max_context,
                    loaded.max_position_embeddings, loaded.max_position_embeddings)
        max_context = loaded.max_position_embeddings
    return EngineConfig(max_running=settings.max_batch, max_context=max_context, block_size=settings.kv_block_size,
                        kv_cache_bytes=kv_cache_bytes(settings, loaded.paged_model, max_context),
                        prefill_chunk=settings.prefill_chunk, max_queue=settings.max_queue,
                        cuda_graphs=settings.cuda_graphs == "on")


async def _expire_sessions(sessions: SessionStore) -> None:
    while True:
        await asyncio.sleep(min(60.0, sessions.idle_timeout_s / 2))
        sessions.expire_idle()


def create_app(settings: Settings | None = None, *,
               loader: Callable[[Settings], LoadedModel] = load_model) -> Starlette:
    """The ASGI app. The model is loaded by ``loader`` in the lifespan, once, and the engine started."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        s = settings or Settings.from_env()
        setup_logging(s)
        loaded = await asyncio.to_thread(loader, s)
        engine = Engine(loaded.paged_model, engine_config(s, loaded))
        engine.start()
        sessions = SessionStore(s.max_sessions, s.session_idle_timeout_s,
                                on_remove=lambda session: engine.release_session(session.session_id))
        app.state.runtime = Runtime(s, loaded, AsyncEngine(engine), sessions)
        expiry = asyncio.create_task(_expire_sessions(sessions))
        log.info("ready: model %s, listening on %s:%d", loaded.name, s.host, s.port)
        try:
            yield
        finally:
            expiry.cancel()
            await sessions.close_all()
            await asyncio.to_thread(engine.stop)
            log.info("stopped")

    return Starlette(routes=[
        Route("/create_session", create_session, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/", playground, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static"),
        WebSocketRoute("/ws/{session_id}", ws_session),
    ], lifespan=lifespan)


def main() -> None:
    import uvicorn

    try:
        settings = Settings.from_env()
        check_model_source(settings)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    setup_logging(settings)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None,
                ws_max_size=settings.ws_max_message_bytes, **UVICORN_WS)


if __name__ == "__main__":
    main()
