"""The stream routes of Kinora's videos (docs/protocol.md §2 and §6): the progress
core's (kinora.streaming.core), with Kinora's videos as their job source
(api.watching.Videos). The WebSocket route is in api.ws."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from kinora.api.deps import MAX_ID, BearerDep, VideoId
from kinora.streaming.core import MAX_JOBS, ProgressCore, too_many
from kinora.streaming.sse import EventStream

router = APIRouter(prefix="/api/v1/videos", tags=["stream"])
many_router = APIRouter(prefix="/api/v1", tags=["stream"])


@router.get(
    "/{video_id}/stream",
    name="stream_video",
    response_class=EventStream,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "the event stream"},
        204: {"description": "the stream has ended and the client has every event"},
        400: {"description": "malformed Last-Event-ID"},
        401: {"description": "missing or invalid token"},
        404: {"description": "no such video of yours"},
        429: {"description": "too many streams open with this API token: close one"},
        503: {"description": "Redis is unreachable: try again after Retry-After"},
    },
)
async def stream_video(
    video_id: VideoId,
    request: Request,
    credentials: BearerDep,  # read by Videos.grant; here for the API's documentation
    token: str | None = None,
    last_event_id: str | None = None,
) -> Response:
    """Server-Sent Events: history after `Last-Event-ID` (header or `?last_event_id=`),
    then the live events, ending after `complete`."""
    state = request.app.state
    core: ProgressCore = state.progress
    return await core.sse(request, state.videos, str(video_id), last_event_id)


VideosQuery = Annotated[
    list[Annotated[int, Query(ge=1, le=MAX_ID)]],
    Query(description="a video to watch (repeat for each); none: all of yours that run"),
]


@many_router.get(
    "/stream",
    response_class=EventStream,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "the events of every video"},
        204: {"description": "every listed video has ended and the client has every event"},
        400: {"description": "malformed Last-Event-ID (send the last `id:` received)"},
        401: {"description": "missing or invalid API token (a video's stream_url will not do)"},
        404: {"description": "a listed video that is not yours"},
        422: {"description": f"more than {MAX_JOBS} videos listed"},
        429: {"description": "too many streams open with this API token: close one"},
    },
)
async def stream_many(
    request: Request,
    credentials: BearerDep,  # read by Videos.watch_many; here for the API's documentation
    video: VideosQuery = [],  # noqa: B006 (FastAPI copies it)
    token: str | None = None,
    last_event_id: str | None = None,
) -> Response:
    """One SSE stream of several videos (docs/protocol.md §6): the listed ones, or all
    of yours that are not final and those you submit while it is open. Each event's
    `id:` is a cursor that resumes every video at once."""
    if len(video) > MAX_JOBS:
        raise too_many("video")
    state = request.app.state
    core: ProgressCore = state.progress
    return await core.many_sse(request, state.videos, [str(v) for v in video], last_event_id)
