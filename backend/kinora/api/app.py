"""The FastAPI application: routers, error format, and the hub's lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import redis
from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp

from kinora import __version__
from kinora.api import ops, stream, tokens, videos, ws
from kinora.api.front import StreamFront
from kinora.api.grants import Grants
from kinora.api.middleware import (
    TRACE_HEADER,
    TRACE_STATE,
    BodyLimitMiddleware,
    TraceMiddleware,
)
from kinora.api.quota import StreamQuota
from kinora.api.recent import RecentTokens, RecentVideos
from kinora.api.urls import FreshEnds
from kinora.api.watching import Videos
from kinora.core import logs, tracing
from kinora.core.config import Settings, get_settings
from kinora.streaming.core import ProgressCore, core_of
from kinora.streaming.router import script_response
from kinora.streaming.settings import Retention, StreamSettings
from kinora.streaming.sse import direct_writes

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Created here, not at import: asyncio objects bind to the loop that runs them.
    settings = get_settings()
    # The same core (its hub, patrol, drain and routes) as any app's progress_router.
    async with core_of(app, ProgressCore(stream_settings(settings))):
        app.state.videos = Videos(app.state)
        app.state.quota = StreamQuota(settings.max_streams_per_user)
        app.state.recent_videos = RecentVideos()
        app.state.recent_tokens = RecentTokens()
        app.state.fresh_ends = FreshEnds()
        app.state.grants = Grants()
        patrol = asyncio.create_task(app.state.grants.patrol(), name="token-revocations")
        if app.state.tune_gc:
            tune_gc()
        try:
            yield
        finally:
            patrol.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await patrol


def stream_settings(settings: Settings) -> StreamSettings:
    """The progress core's settings, from Kinora's (environment and `.env`): each of
    StreamSettings's fields is Kinora's setting of the same name."""
    same = {
        field.name: getattr(settings, field.name)
        for field in dataclasses.fields(StreamSettings)
        if field.name not in ("redis_url", "retention")
    }
    return StreamSettings(
        redis_url=settings.required_redis_url,
        retention=Retention(settings.event_history_max, settings.event_retention_seconds),
        **same,
    )


def tune_gc() -> None:
    """Collect less often: with thousands of streams open, every collection walks
    every connection's objects, and at the interpreter's default (a young collection
    every 700 allocations) that was the API's largest cost and its latency spikes
    (bench.fanout). What exists after start-up lives as long as the process, so
    it is frozen out of the collector's view."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 100)


GC_YOUNG_THRESHOLD = 50_000


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422 whose `detail` is one line naming the field, as users read it; the full
    list stays under `errors` for programs."""
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"field": _field(e["loc"]), "message": e["msg"], "type": e["type"]} for e in exc.errors()
    ]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return JSONResponse(
        {"detail": detail, "errors": errors, "trace_id": logs.current_trace_id()},
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        headers=trace_header(),
    )


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    """`{"detail": ...}` as FastAPI gives it, plus the trace id to quote in a report."""
    assert isinstance(exc, HTTPException)
    return JSONResponse(
        {"detail": exc.detail, "trace_id": logs.current_trace_id()},
        status_code=exc.status_code,
        headers={**(exc.headers or {}), **trace_header()},
    )


def trace_header() -> dict[str, str]:
    """Set on error bodies here, since TraceMiddleware leaves stream responses alone."""
    trace_id = logs.current_trace_id()
    return {TRACE_HEADER: trace_id} if trace_id else {}


# What a client is told to wait before trying again while Redis is unreachable.
REDIS_RETRY_AFTER_SECONDS = 2


async def redis_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """Redis down, paused or restarting: a 503 the client can act on, within the
    hub's bounded timeouts, never a 500 or a hang (README, Faults)."""
    log.warning("Redis unreachable in %s %s: %s", request.method, request.url.path, exc)
    return JSONResponse(
        {
            "detail": "the event store (Redis) is unreachable: "
            f"try again in {REDIS_RETRY_AFTER_SECONDS} s",
            "trace_id": logs.current_trace_id(),
        },
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": str(REDIS_RETRY_AFTER_SECONDS), **trace_header()},
    )


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """Runs in Starlette's outermost middleware, outside TraceMiddleware's log context:
    the request's trace id is read from its scope (middleware.TRACE_STATE)."""
    trace_id = str(request.scope.get("state", {}).get(TRACE_STATE) or logs.new_trace_id())
    with logs.bind(trace_id=trace_id):
        log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(
        {"detail": f"internal error: report trace id {trace_id}", "trace_id": trace_id},
        status_code=status.HTTP_500_INTERNAL_SERVER_ERROR,
        headers={TRACE_HEADER: trace_id},
    )


WEB = Path(__file__).resolve().parent.parent / "web"


def create_app(*, gc_tuned: bool = False) -> FastAPI:
    """The API. `gc_tuned`: the app owns its process (`kinora api`) and tunes its
    garbage collector at start-up (tune_gc), which an app among others (the tests', a
    host's) must not do to its process."""
    settings = get_settings()
    logs.configure(settings.log_format, settings.log_level)
    tracing.start("kinora-api")  # before the database engine is made
    # /docs and /redoc load their scripts from this server, not a CDN: they work offline.
    app = FastAPIOffline(
        title="Kinora",
        version=__version__,
        summary="Run AI video generation jobs and watch them happen live.",
        lifespan=lifespan,
        favicon_url="/favicon.ico",
        redoc_url=None,  # ours below: the same page, kept from reaching out
    )
    app.state.tune_gc = gc_tuned
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(redis.RedisError, redis_unavailable)
    app.add_exception_handler(Exception, internal_error)
    # The last added runs first: the trace id exists before anything can answer.
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"],
            expose_headers=["X-Trace-Id", "Retry-After", "Idempotent-Replayed"],
        )
    app.add_middleware(TraceMiddleware)
    app.include_router(ops.router)
    app.include_router(videos.router)
    app.include_router(videos.secrets_router)
    app.include_router(tokens.router)
    app.include_router(stream.router)
    app.include_router(stream.many_router)
    app.include_router(ws.router)
    # The browser module of any progress_router, at the address the page imports.
    app.add_api_route("/static/kinora-progress.js", script_response, include_in_schema=False)
    app.mount("/static", StaticFiles(directory=WEB), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        return FileResponse(WEB / "favicon.svg", media_type="image/svg+xml")

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        """ReDoc from this server. Its sidebar draws a logo from a CDN; the page's policy
        keeps images to this server (the logo is left out), so it works offline and
        tells no one who reads the docs."""
        page = get_redoc_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title="Kinora - ReDoc",
            redoc_js_url="/static-offline-docs/redoc.standalone.js",
            redoc_favicon_url="/favicon.ico",
            with_google_fonts=False,
        )
        page.headers["Content-Security-Policy"] = "img-src 'self' data: blob:"
        return page

    tracing.instrument_app(app)
    return app


def serve() -> ASGIApp:
    """The app as `kinora api` serves it: a video's stream answered in front of it
    (api/front.py), and streams write their bodies straight to the server
    (kinora.streaming.sse.direct_writes)."""
    app = create_app(gc_tuned=True)
    if tracing.active():  # every request a span: through the app's instrumentation
        return direct_writes(app)
    settings = get_settings()
    return StreamFront(app, body_limit=settings.max_request_bytes, cors=bool(settings.cors_origins))
