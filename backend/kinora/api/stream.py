"""The SSE stream of one video (docs/protocol.md §2), as an EventStream (kinora.streaming.sse).

The hub does the hard part (history after `Last-Event-ID`, then live events, merged
by `seq`); this module authorizes, decides between `204` and a stream, and frames.
Each event's SSE frame is built once by the hub and passed through unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import redis
from fastapi import APIRouter, Request, Response, status
from fastapi.concurrency import run_in_threadpool

from kinora.api.deps import (
    BearerDep,
    HubDep,
    SettingsDep,
    VideoId,
    not_found,
    revoked_link,
    scoped,
    watcher_token,
    watcher_video,
)
from kinora.api.middleware import TRACE_HEADER
from kinora.api.recent import RecentVideos
from kinora.api.urls import content_url
from kinora.core import logs
from kinora.core.config import Settings
from kinora.core.db import session_scope
from kinora.core.models import TERMINAL_STATUSES, Video, utcnow
from kinora.core.tokens import is_scoped, now_ms
from kinora.jobs import event_floor
from kinora.streaming import keys
from kinora.streaming.access import Access
from kinora.streaming.events import Outcome, ending, history_lost, publish_async, terminal_event
from kinora.streaming.frames import Item
from kinora.streaming.hub import StreamHub
from kinora.streaming.sse import (
    EventStream,
    Finish,
    event_response,
    frames,
    parse_last_event_id,
)
from kinora.streaming.watcher import LostNotice, resume_point

log = logging.getLogger(__name__)
# How long a stream has to say goodbye (`retry:`) on shutdown before it is cancelled;
# well within uvicorn's graceful shutdown (kinora api).
SHUTDOWN_GRACE_SECONDS = 2.0
router = APIRouter(prefix="/api/v1/videos", tags=["stream"])


@dataclass(frozen=True, slots=True)
class Pass:
    """Who opened a stream, with which token."""

    video: Video
    scoped: bool  # a video's scoped token (a shared link), not the user's API token
    issued_ms: int  # the scoped token's signing, or the API-token stream's opening
    expires: float | None  # a scoped token's expiry (epoch seconds)

    @property
    def holder(self) -> int | None:
        """Whose stream counts against the cap (api.quota): the user, when they watch
        with their API token; no one for a shared link (any audience)."""
        return None if self.scoped else self.video.user_id

    def access(self) -> Access:
        return Access(self.expires)

    @contextmanager
    def lease(self, state: Any, access: Access) -> Iterator[None]:
        """While the stream runs: one of its holder's streams, and revoked with the
        token it was opened with."""
        with (
            state.quota.held(self.holder),
            state.grants.held(self.video.user_id, self.issued_ms, access),
        ):
            yield


async def authorize(
    recent: RecentVideos, video_id: int, header: str | None, query: str | None
) -> Pass:
    """The video, if the token (API or scoped to it) may watch it; else 401/404. A
    scoped token's video comes from `recent` (shared by the requests of a reconnect
    storm); an API token is looked up in the database."""
    token = watcher_token(header, query)
    if not is_scoped(token):
        video = await run_in_threadpool(_authorize, video_id, header, query)
        return Pass(video, scoped=False, issued_ms=now_ms(), expires=None)
    scope = scoped(token, video_id)
    viewable = await recent.get(video_id)
    if viewable is None or viewable.video.user_id != scope.user_id:
        raise not_found(video_id)
    if scope.issued_ms < viewable.revoked_before_ms:
        raise revoked_link()
    return Pass(viewable.video, scoped=True, issued_ms=scope.issued_ms, expires=scope.expires)


def _authorize(video_id: int, header: str | None, query: str | None) -> Video:
    with session_scope() as session:
        video = watcher_video(session, video_id, header, query)
        session.expunge(video)
        return video


async def ended_frames(
    hub: StreamHub,
    video: Video,
    after: int,
    end: int,
    retry_ms: int,
    lost: LostNotice,
    url: str | None,
    finish: Finish,
) -> AsyncIterator[bytes]:
    """An ended video's events after `after`, a page at a time, and always its end: the
    `complete` from history, or rebuilt from the database (at the seq the database
    recorded) when Redis no longer holds it (README, Faults)."""
    yield b"retry: %d\n\n" % retry_ms
    try:
        key = keys.video(video.id)
        history, counter = await hub.history_state(key, after)
        seen = after
        capped = None if counter is None else min(counter, end - 1)
        resume = resume_point(after, history, capped, end - 1)
        if resume is not None:
            yield Item(await lost(after, resume), resume, "log").sse
            seen = max(seen, resume)
        while history:
            if history[-1].terminal:  # its video_url signed now, not when published
                history = [*history[:-1], finish(history[-1])]
            yield b"".join(item.sse for item in history)
            seen = history[-1].seq
            if history[-1].terminal or len(history) < hub.history_page:
                break
            history = await hub.history(key, seen)
        if seen < end:
            rebuilt = terminal_event(
                key, end, outcome(video), reason=video.error_message, video_url=url
            )
            yield Item(rebuilt, end, "complete").sse
    except redis.RedisError as exc:
        log.warning("stream of video %s ended: Redis unreachable (%s)", video.id, exc)
        yield b"retry: %d\n\n" % retry_ms


def outcome(video: Video) -> Outcome:
    """An ended video's status, as its `complete` event says it."""
    assert video.status in TERMINAL_STATUSES
    return cast(Outcome, str(video.status))


def lost_notice(video_id: int) -> LostNotice:
    """Builds the `history_lost` notice with the video's state read from the database
    when it is needed (rarely: Redis lost data, or the history expired)."""

    async def build(after: int, resume: int) -> bytes:
        video = await run_in_threadpool(_load, video_id)
        return history_lost(
            keys.video(video_id), after, resume, status=str(video.status), progress=video.progress
        )

    return build


def _load(video_id: int) -> Video:
    with session_scope() as session:
        video = session.get(Video, video_id)
        assert video is not None  # authorized at connect; videos are never deleted
        session.expunge(video)
        return video


# A video that ended this recently may still be publishing its last events (the database
# is written first); only after this long is a missing `complete` rebuilt.
REPAIR_AFTER_SECONDS = 10.0


async def find_end(hub: StreamHub, video: Video, video_url: str | None) -> int | None:
    """The seq of an ended video's `complete`: the database's record, else Redis's;
    when neither has one (it was never published: Redis was down) and the video ended
    a while ago, it is published now and recorded. None: not yet known."""
    if video.end_seq is not None:
        return video.end_seq
    key = keys.video(video.id)
    end = await hub.end_seq(key)
    ended_at = video.completed_at or video.updated_at
    if end is None and (utcnow() - ended_at).total_seconds() > REPAIR_AFTER_SECONDS:
        message, fields = ending(
            key, outcome(video), reason=video.error_message, video_url=video_url
        )
        # None: someone else published it meanwhile; either way Redis has it now.
        await publish_async(hub.redis, key, "complete", message, floor=video.last_seq, **fields)
    end = await hub.end_seq(key)
    if end is not None:
        await run_in_threadpool(event_floor.record, video.id, end, end=True)
    return end


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
    },
)
async def stream_video(
    video_id: VideoId,
    request: Request,
    hub: HubDep,
    settings: SettingsDep,
    credentials: BearerDep,
    token: str | None = None,
    last_event_id: str | None = None,
) -> Response:
    """Server-Sent Events: history after `Last-Event-ID` (header or `?last_event_id=`),
    then the live events, ending after `complete`."""
    after = parse_last_event_id(request.headers.get("last-event-id", last_event_id))
    header = credentials.credentials if credentials else None
    granted = await authorize(request.app.state.recent_videos, video_id, header, token)
    video = granted.video
    if not await hub.reachable():
        raise redis.ConnectionError("Redis has not answered the hub's pings")  # a 503
    request.app.state.quota.check(granted.holder)
    key = keys.video(video_id)
    lost = lost_notice(video_id)
    url = content_url(request, video)
    finish = request.app.state.fresh_ends.finisher(request, video)
    access = granted.access()
    if video.status.is_terminal:
        end = await find_end(hub, video, url)
        if end is not None and after >= end:
            # The client has the `complete` event: EventSource stops on a 204.
            return Response(status_code=status.HTTP_204_NO_CONTENT)
        if end is not None:
            body = ended_frames(hub, video, after, end, settings.sse_retry_ms, lost, url, finish)
            return event_stream(body, request, settings, granted, access)
    body = frames(
        hub, key, after, settings.sse_retry_ms, settings.sse_timeout_seconds,
        floor=video.last_seq, lost=lost, access=access, finish=finish,
    )  # fmt: skip
    return event_stream(body, request, settings, granted, access)


def event_stream(
    body: AsyncIterator[bytes],
    request: Request,
    settings: Settings,
    granted: Pass,
    access: Access,
) -> Response:
    return event_response(
        body,
        settings,
        shutdown=request.app.state.shutdown,
        headers={TRACE_HEADER: logs.current_trace_id() or ""},
        lease=granted.lease(request.app.state, access),  # while the stream runs
    )
