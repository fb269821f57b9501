"""The videos API (CONTRACT §3): submit, read, list, download."""

from __future__ import annotations

import logging
import re
import unicodedata
import uuid
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import redis
from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import func, select

from kinora.api.deps import (
    MAX_ID,
    BearerDep,
    CurrentUser,
    HubDep,
    SessionDep,
    SettingsDep,
    VideoId,
    owned_video,
    watcher_video,
)
from kinora.api.urls import content_url, stream_url
from kinora.core import logs
from kinora.core.db import session_scope
from kinora.core.models import TERMINAL_STATUSES, Plan, User, Video, VideoStatus
from kinora.jobs import dispatch, event_floor, idempotency, ratelimit, reference
from kinora.jobs import store as jobs
from kinora.streaming.events import Event, publish_async
from kinora.streaming.hub import StreamHub

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1/videos", tags=["videos"])

# Recent events returned with a video: enough to draw the page without the stream.
RECENT_LOGS = 50
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=10, max_length=2000, description="What the video shows")
    image_url: str | None = Field(
        default=None, description="http(s) or data: URL of a PNG/JPEG reference image"
    )
    seconds: Literal[4, 8, 12] = 4
    size: Literal["1280x720", "720x1280"] = "1280x720"

    @field_validator("prompt")
    @classmethod
    def _printable(cls, value: str) -> str:
        if _CONTROL.search(value):
            raise ValueError("must not contain control characters")
        if visible_length(value) < 10:
            raise ValueError(
                "needs at least 10 visible characters (spaces and invisible ones do not count)"
            )
        return value

    @field_validator("image_url")
    @classmethod
    def _image_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if value.startswith("data:"):
            if not re.match(r"data:image/(png|jpeg);base64,", value):
                raise ValueError("a data: URL must be data:image/png or data:image/jpeg, base64")
            # Checked here, before anything is charged; an http(s) image is fetched
            # (with the same limits) by the worker, which refunds if it is unusable.
            try:
                reference.check(reference.load(value))
            except reference.BadReference as exc:
                raise ValueError(str(exc)) from None
        elif not re.match(r"https?://[^\s/]+", value):
            raise ValueError("must be an http(s):// or data:image/... URL")
        return value


# Unicode categories that draw nothing: controls, format characters (zero-width
# spaces and joiners, bidi marks) and separators.
_INVISIBLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def visible_length(text: str) -> int:
    return sum(1 for ch in text if unicodedata.category(ch) not in _INVISIBLE)


class GenerateResponse(BaseModel):
    video_id: int
    status: VideoStatus
    task_id: str
    stream_url: str
    credits_remaining: int


class VideoOut(BaseModel):
    id: int
    status: VideoStatus
    progress: int
    prompt: str
    seconds: int
    size: str
    error_message: str | None
    video_url: str | None
    thumbnail_url: str | None
    stream_url: str
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    last_event_id: str | None
    logs: list[dict[str, Any]]


class VideoSummary(BaseModel):
    id: int
    status: VideoStatus
    progress: int
    prompt: str
    created_at: datetime
    completed_at: datetime | None


class VideoList(BaseModel):
    videos: list[VideoSummary]
    total: int
    limit: int
    offset: int


def _create(
    user_id: int, body: GenerateRequest, cost: int, task_id: str, key: str | None, digest: str
) -> tuple[Video, int]:
    with session_scope() as session:
        user = session.get(User, user_id)
        assert user is not None  # authenticated in this request
        video, remaining = jobs.create_video(
            session,
            user,
            prompt=body.prompt,
            parameters=body.model_dump(exclude={"prompt"}),
            cost=cost,
            task_id=task_id,
            idempotency_key=key,
            request_hash=digest,
        )
        session.expunge(video)
        return video, remaining


def _lookup(user_id: int, key: str, digest: str) -> idempotency.Replay | None:
    with session_scope() as session:
        return idempotency.lookup(session, user_id, key, digest)


def _replay(user_id: int, key: str, digest: str) -> idempotency.Replay:
    with session_scope() as session:
        return idempotency.replay(session, user_id, key, digest)


def _enqueue(video_id: int, task_id: str, trace_id: str | None) -> None:
    dispatch.generate_video(video_id, trace_id=trace_id, task_id=task_id)


def _fail(video_id: int, message: str) -> None:
    with session_scope() as session:
        jobs.fail(session, video_id, message)
        idempotency.forget(session, video_id)
        session.commit()


@router.post(
    "/generate",
    status_code=status.HTTP_202_ACCEPTED,
    responses={
        401: {"description": "missing or invalid API token"},
        402: {"description": "too few credits"},
        403: {"description": "the free plan cannot generate videos"},
        429: {"description": "too many videos submitted in the window; see Retry-After"},
        503: {"description": "the job queue is unreachable; nothing was charged"},
    },
)
async def generate(
    body: GenerateRequest,
    request: Request,
    response: Response,
    user: CurrentUser,
    settings: SettingsDep,
    hub: HubDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=idempotency.MAX_KEY_LENGTH,
            description="Repeat the request with the same key: one video, one charge",
        ),
    ] = None,
) -> GenerateResponse:
    """Charge the user, create the video and queue its generation."""
    if user.plan == Plan.FREE:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail="the free plan cannot generate videos: upgrade to the pro plan",
        )
    digest = idempotency.request_hash(body.model_dump(mode="json"))
    if idempotency_key is not None:
        # A retry is answered before the rate limit and never counted against it: the
        # limit would refuse exactly the retries that keys exist for (CONTRACT §8).
        try:
            replay = await run_in_threadpool(_lookup, user.id, idempotency_key, digest)
        except idempotency.KeyReused as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from exc
        if replay is not None:
            return replayed(request, response, user.id, replay)
    if not await hub.reachable():  # a 503 at once, before anything is charged
        raise redis.ConnectionError("Redis has not answered the hub's pings")
    verdict = await ratelimit.hit(
        hub.redis,
        ratelimit.generate_key(user.id),
        limit=settings.generate_rate_limit,
        window_seconds=settings.generate_rate_window_seconds,
    )
    if not verdict.allowed:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail=f"more than {settings.generate_rate_limit} videos in "
            f"{settings.generate_rate_window_seconds} s: try again in {verdict.retry_after} s",
            headers={"Retry-After": str(verdict.retry_after)},
        )
    task_id = str(uuid.uuid4())
    try:
        video, remaining = await run_in_threadpool(
            _create, user.id, body, settings.video_cost, task_id, idempotency_key, digest
        )
    except jobs.InsufficientCredits as exc:
        raise HTTPException(status.HTTP_402_PAYMENT_REQUIRED, detail=f"{exc}: add credits") from exc
    except idempotency.KeyTaken:
        assert idempotency_key is not None
        try:
            replay = await run_in_threadpool(_replay, user.id, idempotency_key, digest)
        except idempotency.KeyReused as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from exc
        return replayed(request, response, user.id, replay)
    try:
        # Step 0 is published before the task is queued, so it is always the first event.
        await publish_async(
            hub.redis, video.id, "stage", "Stage: preparing", stage="preparing",
            previous_stage=None, progress=0, status="pending",
        )  # fmt: skip
        await publish_async(
            hub.redis, video.id, "progress", "Video queued", step=0, progress=0, status="pending"
        )
        await run_in_threadpool(_enqueue, video.id, task_id, logs.current_trace_id())
    except Exception as exc:
        # Redis (events and queue alike) went away between the charge and the queue:
        # the video fails and is refunded, its Idempotency-Key is freed for the retry.
        log.exception("could not queue video %s", video.id)
        await run_in_threadpool(_fail, video.id, f"could not queue the job: {exc}")
        await publish_end(hub, video, "failed", "Video failed: the job queue is unreachable")
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail="the job queue is unreachable; your credits were refunded, try again shortly",
            headers={"Retry-After": "2"},
        ) from exc
    return GenerateResponse(
        video_id=video.id,
        status=VideoStatus.PENDING,
        task_id=task_id,
        stream_url=stream_url(request, video.id, video.user_id),
        credits_remaining=remaining,
    )


async def publish_end(hub: StreamHub, video: Video, status_: str, message: str) -> None:
    """The `complete` of a video the API ended, recorded as its end. The database has
    the outcome already: if Redis is unreachable now, the stream publishes the end
    later from it (api.stream.find_end), so this never fails the request."""
    try:
        seq = await publish_async(
            hub.redis, video.id, "complete", message, floor=video.last_seq, status=status_
        )
    except redis.RedisError as exc:
        log.warning("the end of video %s not published: %s", video.id, exc)
        return
    if seq is not None:
        await run_in_threadpool(event_floor.record, video.id, seq, end=True)


def replayed(
    request: Request, response: Response, user_id: int, replay: idempotency.Replay
) -> GenerateResponse:
    response.headers["Idempotent-Replayed"] = "true"
    return GenerateResponse(
        video_id=replay.video_id,
        status=VideoStatus.PENDING,
        task_id=replay.task_id,
        stream_url=stream_url(request, replay.video_id, user_id),
        credits_remaining=replay.credits_remaining,
    )


@router.get("/generate", include_in_schema=False)
async def generate_is_a_post() -> None:
    """Without this, GET /generate would reach GET /{video_id} and be a confusing 422."""
    raise HTTPException(
        status.HTTP_405_METHOD_NOT_ALLOWED,
        detail="submit a video with POST /api/v1/videos/generate; "
        "GET /api/v1/videos/{id} reads one",
        headers={"Allow": "POST"},
    )


@router.get("", response_model=VideoList)
def list_videos(
    session: SessionDep,
    user: CurrentUser,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> VideoList:
    """The caller's videos, newest first."""
    total = session.scalar(select(func.count()).where(Video.user_id == user.id)) or 0
    rows = session.scalars(
        select(Video)
        .where(Video.user_id == user.id)
        .order_by(Video.created_at.desc(), Video.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return VideoList(
        videos=[VideoSummary.model_validate(v, from_attributes=True) for v in rows],
        total=total,
        limit=limit,
        offset=offset,
    )


@router.get("/{video_id}", responses={404: {"description": "no such video of yours"}})
async def get_video(
    video_id: VideoId, request: Request, user: CurrentUser, hub: HubDep
) -> VideoOut:
    """The video's state and its recent events: the polling fallback of the stream."""
    video = await run_in_threadpool(_owned, video_id, user.id)
    return await video_out(request, hub, video)


class Connections(BaseModel):
    video_id: int
    connections: int


@router.get("/{video_id}/connections", responses={404: {"description": "no such video"}})
async def connections(video_id: VideoId, user: CurrentUser, hub: HubDep) -> Connections:
    """Live SSE and WebSocket watchers of the video, across all API processes (counts
    lag by up to half a second)."""
    await run_in_threadpool(_owned, video_id, user.id)
    return Connections(video_id=video_id, connections=await hub.presence.connections(video_id))


def _cancel(video_id: int) -> bool:
    with session_scope() as session:
        return jobs.cancel(session, video_id)


def _revoke(task_id: str) -> None:
    """Best effort: a queued message is dropped; a running attempt notices the
    cancellation itself between steps (its claim is gone)."""
    try:
        dispatch.revoke(task_id)
    except Exception as exc:
        log.warning("could not revoke task %s: %s", task_id, exc)


@router.post(
    "/{video_id}/cancel",
    responses={
        404: {"description": "no such video of yours"},
        409: {"description": "the video has already completed or failed"},
    },
)
async def cancel_video(
    video_id: VideoId, request: Request, user: CurrentUser, hub: HubDep
) -> VideoOut:
    """Stop a pending or processing video and give its credits back. Cancelling a
    cancelled video again changes nothing."""
    video = await run_in_threadpool(_owned, video_id, user.id)
    if await run_in_threadpool(_cancel, video_id):
        await publish_end(hub, video, "cancelled", "Video cancelled; its credits were refunded")
        await run_in_threadpool(_revoke, video.task_id)
    video = await run_in_threadpool(_owned, video_id, user.id)
    if video.status != VideoStatus.CANCELLED:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"video {video_id} has already {video.status}: there is nothing to cancel",
        )
    return await video_out(request, hub, video)


async def video_out(request: Request, hub: StreamHub, video: Video) -> VideoOut:
    video_id = video.id
    try:
        if not await hub.reachable():
            raise redis.ConnectionError("Redis has not answered the hub's pings")
        recent = await hub.recent(video_id, RECENT_LOGS)
    except redis.RedisError as exc:
        # The polling fallback works without Redis: the state is the database's.
        log.warning("video %s read without its events: Redis unreachable (%s)", video_id, exc)
        recent = []
    logs: list[Event] = [item.event for item in recent]
    return VideoOut(
        id=video.id,
        status=video.status,
        progress=video.progress,
        prompt=video.prompt,
        seconds=int(video.parameters.get("seconds", 4)),
        size=str(video.parameters.get("size", "1280x720")),
        error_message=video.error_message,
        video_url=content_url(request, video),
        thumbnail_url=content_url(request, video, "video_thumbnail"),
        stream_url=stream_url(request, video.id, video.user_id),
        created_at=video.created_at,
        updated_at=video.updated_at,
        completed_at=video.completed_at,
        last_event_id=str(recent[-1].seq) if recent else None,
        logs=[dict(e) for e in logs],
    )


def _owned(video_id: int, user_id: int) -> Video:
    with session_scope() as session:
        video = owned_video(session, video_id, user_id)
        session.expunge(video)
        return video


def _file(video: Video, path: str | None, what: str) -> Path:
    if video.status != VideoStatus.COMPLETED or not path:
        wait = "" if video.status in TERMINAL_STATUSES else "; wait for its `complete` event"
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"video {video.id} is {video.status}: it has a {what} once completed{wait}",
        )
    file = Path(path)
    if not file.is_file():
        raise HTTPException(status.HTTP_410_GONE, detail=f"the {what} of video {video.id} is gone")
    return file


@router.get(
    "/{video_id}/content",
    name="video_content",
    response_class=FileResponse,
    responses={
        200: {"content": {"video/mp4": {}}, "description": "the MP4; Range requests work"},
        404: {"description": "no such video of yours"},
        409: {"description": "the video is not completed"},
    },
)
def video_content(
    video_id: VideoId, session: SessionDep, credentials: BearerDep, token: str | None = None
) -> FileResponse:
    """The finished MP4. Takes `?token=` so that a `<video>` element can play it."""
    header = credentials.credentials if credentials else None
    video = watcher_video(session, video_id, header, token)
    return FileResponse(
        _file(video, video.file_path, "video"),
        media_type="video/mp4",
        filename=f"kinora-{video.id}.mp4",
        content_disposition_type="inline",
    )


@router.get(
    "/{video_id}/thumbnail",
    name="video_thumbnail",
    response_class=FileResponse,
    responses={200: {"content": {"image/jpeg": {}}}, 409: {"description": "not completed"}},
)
def video_thumbnail(
    video_id: VideoId, session: SessionDep, credentials: BearerDep, token: str | None = None
) -> FileResponse:
    """A JPEG still of the finished video."""
    header = credentials.credentials if credentials else None
    video = watcher_video(session, video_id, header, token)
    return FileResponse(_file(video, video.thumbnail_path, "thumbnail"), media_type="image/jpeg")
