"""`progress_router`: the live progress of any job, for any FastAPI app (docs/library.md).

    app.include_router(progress_router(authorize=can_watch), prefix="/progress")

gives `GET {prefix}/{job_id}/stream` (SSE, docs/protocol.md §2), `GET {prefix}/{job_id}` (a
snapshot with the recent events, for polling), `WS {prefix}/{job_id}/ws` (§3) and the
browser module `GET {prefix}/kinora-progress.js`, of the events a job publishes with
`SSELogger.for_task(self)` or `SSELogger(job_id, kind=...)` (the router's `kind`, `job`
unless given). `authorize(request, job_id)`, sync or async, says whether the caller may
watch; a False is a 404 (it may raise an HTTPException of its own, a 401 say).

The routes are the progress core's (kinora.streaming.core), as Kinora's own video
routes are: the app's one core is started with the app (one Redis subscriber per
process) and stopped on shutdown. With a `store` (kinora.streaming.sqlstore), a job's
stream keeps the promises Kinora's videos keep when Redis loses data.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request, Response, WebSocket, status
from fastapi.responses import FileResponse
from starlette.requests import HTTPConnection

from kinora.streaming import keys
from kinora.streaming.core import MAX_JOBS, ProgressCore, core_of, too_many
from kinora.streaming.source import Grant, Since, Store, Watch
from kinora.streaming.sse import EventStream

Authorize = Callable[[Any, str], bool | Awaitable[bool]]
JobsQuery = Annotated[list[str], Query(description="a job to watch (repeat for each)")]


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


class HookSource:
    """The JobSource of a library host: its `authorize` hook decides, and its `store`
    (if any) tells the job's floor and outcome."""

    def __init__(self, authorize: Authorize, kind: str, store: Store | None) -> None:
        self.authorize = authorize
        self.kind = kind
        self.store = store

    def key(self, job_id: str) -> keys.StreamKey:
        try:
            return keys.of(self.kind, job_id)
        except ValueError:  # a video's id that is no number: no such video
            raise not_found(job_id) from None

    async def grant(self, connection: HTTPConnection, job_id: str) -> Grant:
        if not await allowed(self.authorize, connection, job_id):
            raise not_found(job_id)
        key = self.key(job_id)
        record = await self.store.load(key) if self.store is not None else None
        return Grant(key, record=record, store=self.store)

    async def watch_many(
        self,
        connection: HTTPConnection,
        job_ids: Sequence[str],
        resume: Mapping[str, int],
        since: Since,
    ) -> Watch:
        """The listed jobs, each authorized (one refused: the whole request is a 404)."""
        if not job_ids:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                detail="name the jobs to watch: ?job=<id>&job=<id>",
            )
        return Watch([await self.grant(connection, job_id) for job_id in job_ids])


def progress_router(
    authorize: Authorize,
    *,
    kind: str = "job",
    redis_url: str | None = None,
    store: Store | None = None,
    core: ProgressCore | None = None,
) -> APIRouter:
    """The routes of one kind of job (`job`, the kind of `SSELogger.for_task`, unless
    given: a router of kind `import` serves what `SSELogger(id, kind="import")`
    publishes). Redis is `redis_url`, else REDIS_URL; `core`, to give the app's core
    settings of its own (a second router, or the host's, shares the app's one core)."""
    source = HookSource(authorize, kind, store)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with core_of(app, core or ProgressCore(redis_url=redis_url)):
            yield

    router = APIRouter(lifespan=lifespan, tags=["progress"])

    def core_in(connection: HTTPConnection) -> ProgressCore:
        found: ProgressCore = connection.app.state.progress
        return found

    # Before the routes that take a job id, or it would be taken for one.
    @router.get("/kinora-progress.js", include_in_schema=False)
    async def browser_module() -> FileResponse:
        return script_response()

    # Before `/{job_id}`, or `stream` would be taken for a job's id.
    @router.get(
        "/stream",
        response_class=EventStream,
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "the events of every job"},
            204: {"description": "every job has ended and the client has every event"},
            400: {"description": "malformed Last-Event-ID (send the last `id:` received)"},
            404: {"description": "a job that does not exist or is not yours to watch"},
            422: {"description": f"no job named, or more than {MAX_JOBS}"},
        },
    )
    async def stream_many(
        request: Request,
        job: JobsQuery = [],  # noqa: B006 (FastAPI copies it)
        last_event_id: str | None = None,
    ) -> Response:
        """One SSE stream of several jobs (docs/protocol.md §6); each event's `id:` is a
        cursor that resumes them all."""
        if len(job) > MAX_JOBS:
            raise too_many("job")
        return await core_in(request).many_sse(request, source, job, last_event_id)

    @router.get(
        "/{job_id}/stream",
        response_class=EventStream,
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "the event stream"},
            204: {"description": "the job has ended and the client has every event"},
            400: {"description": "malformed Last-Event-ID"},
            404: {"description": "no such job, or not yours to watch"},
            503: {"description": "Redis is unreachable: try again after Retry-After"},
        },
    )
    async def stream(request: Request, job_id: str, last_event_id: str | None = None) -> Response:
        """Server-Sent Events: the events after `Last-Event-ID` (header or
        `?last_event_id=`), then the live ones, ending after `complete`."""
        return await core_in(request).sse(request, source, job_id, last_event_id)

    @router.get("/{job_id}", responses={404: {"description": "no such job"}})
    async def snapshot(request: Request, job_id: str) -> dict[str, Any]:
        """The job's status, progress and recent events: the polling fallback."""
        return await core_in(request).snapshot(request, source, job_id)

    @router.websocket("/{job_id}/ws")
    async def websocket(ws: WebSocket, job_id: str) -> None:
        await core_in(ws).websocket(ws, source, job_id)

    return router
