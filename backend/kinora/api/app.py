"""The FastAPI application: routers, error format, and the hub's lifespan."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from kinora import __version__
from kinora.api import ops, stream, videos, ws
from kinora.config import get_settings
from kinora.hub import StreamHub


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Created here, not at import: asyncio objects bind to the loop that runs them.
    settings = get_settings()
    hub = StreamHub(
        settings.required_redis_url,
        queue_size=settings.stream_queue_size,
        presence_ttl=settings.presence_ttl_seconds,
    )
    await hub.start()
    app.state.hub = hub
    tune_gc()
    try:
        yield
    finally:
        await hub.stop()


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
        {"detail": detail, "errors": errors},
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
    )


WEB = Path(__file__).resolve().parent.parent / "web"


def create_app() -> FastAPI:
    app = FastAPI(
        title="Kinora",
        version=__version__,
        summary="Run AI video generation jobs and watch them happen live.",
        lifespan=lifespan,
    )
    app.add_exception_handler(RequestValidationError, validation_error)
    app.include_router(ops.router)
    app.include_router(videos.router)
    app.include_router(stream.router)
    app.include_router(ws.router)
    app.mount("/static", StaticFiles(directory=WEB), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB / "index.html", headers={"Cache-Control": "no-cache"})

    return app
