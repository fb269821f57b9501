"""The videos API (README, Try it with curl): submit, read, list, download."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import redis
from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
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
from kinora.api.schemas import (
    Connections,
    GenerateRequest,
    GenerateResponse,
    VideoList,
    VideoOut,
    VideoSummary,
    WebhookAttemptOut,
    WebhookAttempts,
    WebhookSecret,
)
from kinora.api.urls import content_url, stream_url
from kinora.core.db import session_scope
from kinora.core.models import TERMINAL_STATUSES, Plan, Video, VideoStatus
from kinora.jobs import idempotency, ratelimit, store, submit, webhooks
from kinora.jobs.lifecycle import VideoParameters
from kinora.streaming import keys
from kinora.streaming.events import Event
from kinora.streaming.hub import StreamHub

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1/videos", tags=["videos"])

# Recent events returned with a video: enough to draw the page without the stream.
RECENT_LOGS = 50


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
    try:
        if idempotency_key is not None:
            # A retry is answered before the rate limit and never counted against it:
            # the limit would refuse exactly the retries keys exist for (README, Faults).
            earlier = await run_in_threadpool(submit.lookup, user.id, idempotency_key, digest)
            if earlier is not None:
                return answer(request, response, earlier)
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
        submitted = await run_in_threadpool(
            submit.create,
            user.id,
            body.prompt,
            body.parameters,
            settings.video_cost,
            idempotency_key,
            digest,
            body.webhook,
        )
        if not submitted.replayed:
            await submit.start(hub.redis, submitted)
    except idempotency.KeyReused as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from exc
    except store.InsufficientCredits as exc:
        raise HTTPException(status.HTTP_402_PAYMENT_REQUIRED, detail=f"{exc}: add credits") from exc
    except submit.QueueUnreachable as exc:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail="the job queue is unreachable; your credits were refunded, try again shortly",
            headers={"Retry-After": "2"},
        ) from exc
    return answer(request, response, submitted)


def answer(request: Request, response: Response, submitted: submit.Submitted) -> GenerateResponse:
    if submitted.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return GenerateResponse(
        video_id=submitted.video_id,
        status=VideoStatus.PENDING,
        task_id=submitted.task_id,
        stream_url=stream_url(request, submitted.video_id, submitted.user_id),
        credits_remaining=submitted.credits_remaining,
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


@router.get("/{video_id}/connections", responses={404: {"description": "no such video"}})
async def connections(video_id: VideoId, user: CurrentUser, hub: HubDep) -> Connections:
    """Live SSE and WebSocket watchers of the video, across all API processes (counts
    lag by up to half a second)."""
    await run_in_threadpool(_owned, video_id, user.id)
    return Connections(
        video_id=video_id, connections=await hub.presence.connections(keys.video(video_id))
    )


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
    await submit.cancel(hub.redis, video)
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
        recent = await hub.recent(keys.video(video_id), RECENT_LOGS)
    except redis.RedisError as exc:
        # The polling fallback works without Redis: the state is the database's.
        log.warning("video %s read without its events: Redis unreachable (%s)", video_id, exc)
        recent = []
    if recent and recent[-1].terminal:  # its video_url signed now (README, Faults)
        recent[-1] = request.app.state.fresh_ends.finisher(request, video)(recent[-1])
    logs: list[Event] = [item.event for item in recent]
    parameters = VideoParameters.of(video.parameters)
    return VideoOut(
        id=video.id,
        status=video.status,
        progress=video.progress,
        prompt=video.prompt,
        seconds=parameters.seconds,
        size=parameters.size,
        error_message=video.error_message,
        video_url=content_url(request, video),
        thumbnail_url=content_url(request, video, "thumbnail"),
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


@router.get("/{video_id}/webhooks", responses={404: {"description": "no such video of yours"}})
def video_webhooks(video_id: VideoId, session: SessionDep, user: CurrentUser) -> WebhookAttempts:
    """Every attempt at delivering the video's webhooks, oldest first."""
    owned_video(session, video_id, user.id)
    return WebhookAttempts(
        video_id=video_id,
        attempts=[
            WebhookAttemptOut.model_validate(a, from_attributes=True)
            for a in webhooks.attempts(session, video_id)
        ],
    )


secrets_router = APIRouter(prefix="/api/v1/webhooks", tags=["webhooks"])


@secrets_router.get("/secret")
def webhook_secret(session: SessionDep, user: CurrentUser) -> WebhookSecret:
    """The secret that signs your webhooks (Standard Webhooks: `whsec_…`), so that
    any of that spec's libraries verifies them."""
    secret = webhooks.secret_for(session, user.id)
    session.commit()
    return WebhookSecret(secret=secret)
