"""`progress_router`: the live progress of any job, for any FastAPI app (docs/library.md).

    app.include_router(progress_router(authorize=can_watch), prefix="/progress")

gives `GET {prefix}/{job_id}/stream` (SSE, docs/protocol.md §2), `GET {prefix}/{job_id}` (a
snapshot with the recent events, for polling), `WS {prefix}/{job_id}/ws` (§3) and the
browser module `GET {prefix}/kinora-progress.js`, of
the events a job publishes with `SSELogger.for_task(self)` or `SSELogger(job_id,
kind=...)` (the router's `kind`, `job` unless given).
`authorize(request, job_id)`, sync or async, says whether the caller may watch; a
False is a 404 (it may raise an HTTPException of its own, a 401 say).

The router starts the app's one StreamHub (one Redis subscriber per process) with
the app and stops it on shutdown (`hub_for`); Kinora's own app runs its video
streams on the same hub and the same SSE and WebSocket code.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import redis
from fastapi import APIRouter, FastAPI, HTTPException, Request, Response, WebSocket, status
from fastapi.responses import FileResponse

from kinora.core.config import get_settings
from kinora.streaming import keys
from kinora.streaming.hub import StreamHub
from kinora.streaming.sse import (
    EventStream,
    Patrol,
    event_response,
    frames,
    parse_last_event_id,
)
from kinora.streaming.ws import CLOSE_BAD_TOKEN, CLOSE_NOT_FOUND, state_of, watch

Authorize = Callable[[Any, str], bool | Awaitable[bool]]

# Events a snapshot carries: enough to draw a job's state without the stream.
RECENT_EVENTS = 50


@asynccontextmanager
async def hub_for(app: FastAPI, redis_url: str | None = None) -> AsyncIterator[StreamHub]:
    """The app's one hub, started with the app and stopped with it. A second caller
    (another router, Kinora's own routes) shares the first one's hub."""
    existing: StreamHub | None = getattr(app.state, "hub", None)
    if existing is not None:
        yield existing
        return
    settings = get_settings()
    hub = StreamHub(
        redis_url or settings.required_redis_url,
        queue_size=settings.stream_queue_size,
        presence_ttl=settings.presence_ttl_seconds,
        history_page=settings.history_page_size,
    )
    await hub.start()
    app.state.hub = hub
    # One event for the process: the first stream to see the server shutting down sets
    # it (sse-starlette), and every stream is then drained at once.
    app.state.shutdown = anyio.Event()
    drainer = asyncio.create_task(_drain_on_shutdown(app.state.shutdown, hub))
    try:
        yield hub
    finally:
        drainer.cancel()
        await Patrol.stop()
        await hub.stop()
        del app.state.hub


async def _drain_on_shutdown(shutdown: anyio.Event, hub: StreamHub) -> None:
    await shutdown.wait()
    hub.drain()


async def allowed(authorize: Authorize, connection: Any, job_id: str) -> bool:
    verdict = authorize(connection, job_id)
    if inspect.isawaitable(verdict):
        verdict = await verdict
    return bool(verdict)


SCRIPT = Path(__file__).resolve().parent / "static" / "kinora-progress.js"


def script_response() -> FileResponse:
    """The browser module (static/kinora-progress.js), as an ES module."""
    return FileResponse(SCRIPT, media_type="text/javascript", headers={"Cache-Control": "no-cache"})


def not_found(job_id: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} not found")


def progress_router(
    authorize: Authorize, *, kind: str = "job", redis_url: str | None = None
) -> APIRouter:
    """The routes of one kind of job (`job`, the kind of `SSELogger.for_task`, unless
    given: a router of kind `import` serves what `SSELogger(id, kind="import")`
    publishes)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with hub_for(app, redis_url):
            yield

    router = APIRouter(lifespan=lifespan, tags=["progress"])

    def key_for(job_id: str) -> keys.StreamKey:
        try:
            return keys.of(kind, job_id)
        except ValueError:  # a video's id that is no number: no such video
            raise not_found(job_id) from None

    # Before the routes that take a job id, or it would be taken for one.
    @router.get("/kinora-progress.js", include_in_schema=False)
    async def browser_module() -> FileResponse:
        return script_response()

    async def hub_of(request: Request, job_id: str) -> StreamHub:
        if not await allowed(authorize, request, job_id):
            raise not_found(job_id)
        hub: StreamHub = request.app.state.hub
        if not await hub.reachable():
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                detail="Redis is unreachable: try again shortly",
                headers={"Retry-After": "2"},
            )
        return hub

    @router.get(
        "/{job_id}/stream",
        response_class=EventStream,
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "the event stream"},
            204: {"description": "the job has ended and the client has every event"},
            400: {"description": "malformed Last-Event-ID"},
            404: {"description": "no such job, or not yours to watch"},
        },
    )
    async def stream(request: Request, job_id: str, last_event_id: str | None = None) -> Response:
        """Server-Sent Events: the events after `Last-Event-ID` (header or
        `?last_event_id=`), then the live ones, ending after `complete`."""
        after = parse_last_event_id(request.headers.get("last-event-id", last_event_id))
        hub = await hub_of(request, job_id)
        key = key_for(job_id)
        try:
            end = await hub.end_seq(key)
        except redis.RedisError as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(exc)) from exc
        if end is not None and after >= end:
            return Response(status_code=status.HTTP_204_NO_CONTENT)  # EventSource stops
        settings = get_settings()
        body = frames(hub, key, after, settings.sse_retry_ms, settings.sse_timeout_seconds)
        return event_response(body, settings, shutdown=request.app.state.shutdown)

    @router.get("/{job_id}", responses={404: {"description": "no such job"}})
    async def snapshot(request: Request, job_id: str) -> dict[str, Any]:
        """The job's status, progress and recent events: the polling fallback."""
        hub = await hub_of(request, job_id)
        recent = await hub.recent(key_for(job_id), RECENT_EVENTS)
        events = [item.event for item in recent]
        status_, progress = state_of(events)
        return {
            key_for(job_id).id_field: job_id,
            "status": status_,
            "progress": progress,
            "last_event_id": str(recent[-1].seq) if recent else None,
            "logs": events,
        }

    @router.websocket("/{job_id}/ws")
    async def websocket(ws: WebSocket, job_id: str) -> None:
        # Accept first: a close before accepting is an HTTP 403 and loses the code.
        await ws.accept()
        try:
            if not await allowed(authorize, ws, job_id):
                raise not_found(job_id)
        except HTTPException as exc:
            code = CLOSE_BAD_TOKEN if exc.status_code == 401 else CLOSE_NOT_FOUND
            await ws.close(code, reason=str(exc.detail)[:120])
            return
        await watch(ws, ws.app.state.hub, key_for(job_id), hello={key_for(job_id).id_field: job_id})

    return router
