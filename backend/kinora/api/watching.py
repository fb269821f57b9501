"""Kinora's videos as a job source of the progress core (kinora.streaming.core): who may
watch a video (its owner's API token, or a token scoped to it), what the database
knows of it (the floor, the outcome), and what a stream holds while it runs (a place
in its holder's quota, the token's revocation). The routes are in api.stream and
api.ws; they are the core's, as every library host's are (docs/library.md).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from starlette.requests import HTTPConnection

from kinora.api.deps import (
    bearer_token,
    not_found,
    revoked_link,
    scoped,
    unauthorized,
    user_by_token,
    watcher_token,
)
from kinora.api.middleware import TRACE_HEADER
from kinora.api.recent import RecentTokens, RecentVideos
from kinora.api.urls import content_url
from kinora.core import logs
from kinora.core.db import session_scope
from kinora.core.models import TERMINAL_STATUSES, Video
from kinora.core.tokens import is_scoped, now_ms
from kinora.jobs import event_floor
from kinora.jobs.submit import announcements
from kinora.streaming import cursor, keys
from kinora.streaming.access import Access
from kinora.streaming.keys import StreamKey
from kinora.streaming.source import Follow, Grant, JobRecord, Since, Watch

log = logging.getLogger(__name__)


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

    def lease(self, state: Any, access: Access) -> Lease:
        """While the stream runs: one of its holder's streams, and revoked with the
        token it was opened with."""
        return Lease(state, self.holder, self.video.user_id, self.issued_ms, access)


class Lease:
    """Held while a stream runs: one of `holder`'s streams (api.quota; None: a shared
    link's, counted for no one), ended if `user_id` rotates their token after
    `issued_ms` (api.grants). A class, not a generator: every open stream holds one."""

    __slots__ = ("access", "grants", "holder", "issued_ms", "quota", "user_id")

    def __init__(
        self, state: Any, holder: int | None, user_id: int, issued_ms: int, access: Access
    ) -> None:
        self.quota, self.grants = state.quota, state.grants
        self.holder, self.user_id, self.issued_ms, self.access = holder, user_id, issued_ms, access

    def __enter__(self) -> None:
        self.quota.take(self.holder)
        self.grants.add(self.user_id, self.issued_ms, self.access)

    def __exit__(self, *exc: object) -> None:
        self.grants.remove(self.user_id, self.access)
        self.quota.give(self.holder)


async def authorize(
    recent: RecentVideos,
    tokens: RecentTokens,
    video_id: int,
    header: str | None,
    query: str | None,
) -> Pass:
    """The video, if the token (API or scoped to it) may watch it; else 401/404. The
    video comes from `recent` and an API token's owner from `tokens`, each read once
    for every request that asks within a second (a reconnect storm's)."""
    token = watcher_token(header, query)
    if not is_scoped(token):
        owner = await tokens.owner(token)
        if owner is None:
            raise unauthorized("invalid API token: check the token `kinora users create` printed")
        viewable = await recent.get(video_id)
        if viewable is None or viewable.video.user_id != owner:
            raise not_found(video_id)
        return Pass(viewable.video, scoped=False, issued_ms=now_ms(), expires=None)
    scope = scoped(token, video_id)
    viewable = await recent.get(video_id)
    if viewable is None or viewable.video.user_id != scope.user_id:
        raise not_found(video_id)
    if scope.issued_ms < viewable.revoked_before_ms:
        raise revoked_link()
    return Pass(viewable.video, scoped=True, issued_ms=scope.issued_ms, expires=scope.expires)


def record_of(video: Video, connection: HTTPConnection | None = None) -> JobRecord:
    """What the database knows of a video, as the core reads a job's record; a
    completed video's `video_url` against the URL the client used."""
    ended = video.status.is_terminal
    url = content_url(connection, video) if connection is not None and ended else None
    ended_at = (video.completed_at or video.updated_at) if ended else None
    return JobRecord(
        status=str(video.status),
        progress=video.progress,
        last_seq=video.last_seq,
        end_seq=video.end_seq,
        reason=video.error_message,
        ended_at=ended_at.timestamp() if ended_at is not None else None,
        result={"video_url": url} if url else {},
    )


class VideoStore:
    """The videos table as the core's Store: a video's floor and outcome."""

    async def load(self, key: StreamKey) -> JobRecord | None:
        video = await run_in_threadpool(_load, int(key.id))
        return None if video is None else record_of(video)

    async def record_end(self, key: StreamKey, seq: int) -> None:
        await run_in_threadpool(event_floor.record, int(key.id), seq, end=True)


def _load(video_id: int) -> Video | None:
    with session_scope() as session:
        video = session.get(Video, video_id)
        if video is not None:
            session.expunge(video)
        return video


STORE = VideoStore()


class Videos:
    """Kinora's videos as a JobSource: a token (header or `?token=`) that may watch the
    video, within its holder's cap of streams (a 429 past it)."""

    def __init__(self, state: Any) -> None:
        self.state = state

    async def grant(self, connection: HTTPConnection, job_id: str) -> Grant:
        video_id = int(job_id)
        header = bearer_token(connection.headers.get("authorization"))
        granted = await authorize(
            self.state.recent_videos,
            self.state.recent_tokens,
            video_id,
            header,
            connection.query_params.get("token"),
        )
        self.state.quota.check(granted.holder)
        video = granted.video
        access = granted.access()
        return Grant(
            keys.video(video.id),
            hello={"project_id": video.id},
            record=record_of(video, connection),
            store=STORE,
            access=access,
            finish=self.state.fresh_ends.finisher(connection, video),
            lease=granted.lease(self.state, access),  # while the stream runs
            headers={TRACE_HEADER: logs.current_trace_id() or ""},
        )

    async def watch_many(
        self,
        connection: HTTPConnection,
        job_ids: Sequence[str],
        resume: Mapping[str, int],
        since: Since,
    ) -> Watch:
        """The listed videos (each the caller's, or a 404), or every video of the caller
        that is not final, and those it submits while the stream is open. The API token
        only: a scoped token is one video's."""
        header = bearer_token(connection.headers.get("authorization"))
        token = watcher_token(header, connection.query_params.get("token"))
        if is_scoped(token):
            raise unauthorized(
                "a stream of several videos needs your API token, not a video's stream_url"
            )
        user_id, video_ids = await run_in_threadpool(_user_of, token), [int(j) for j in job_ids]
        self.state.quota.check(user_id)
        follow = None
        if video_ids:
            videos = await run_in_threadpool(_listed, user_id, video_ids)
        else:
            key = announcements(user_id)
            # Where the announcements stand, read before the videos are listed: a video
            # submitted in between is announced after it, and joins then.
            after = resume[cursor.NEW] if cursor.NEW in resume else await since(key)
            named = [int(name) for name in resume if name.isascii() and name.isdigit()]
            videos = await run_in_threadpool(_following, user_id, named)

            async def grant_new(job: str) -> Grant | None:
                video = await run_in_threadpool(_load, int(job))
                if video is None or video.user_id != user_id:
                    return None
                return self._grant_of(connection, video)

            follow = Follow(key, after, grant_new)
        access = Access()
        return Watch(
            [self._grant_of(connection, video) for video in videos],
            follow=follow,
            access=access,
            lease=Lease(self.state, user_id, user_id, now_ms(), access),
            headers={TRACE_HEADER: logs.current_trace_id() or ""},
        )

    def _grant_of(self, connection: HTTPConnection, video: Video) -> Grant:
        return Grant(
            keys.video(video.id),
            record=record_of(video, connection),
            store=STORE,
            finish=self.state.fresh_ends.finisher(connection, video),
        )


def _user_of(token: str) -> int:
    with session_scope() as session:
        return user_by_token(session, token).id


def _listed(user_id: int, video_ids: list[int]) -> list[Video]:
    """The videos, in the order listed; a 404 naming the first that is not the user's."""
    with session_scope() as session:
        found = {
            video.id: video
            for video in session.scalars(select(Video).where(Video.id.in_(video_ids)))
        }
        for video_id in video_ids:
            video = found.get(video_id)
            if video is None or video.user_id != user_id:
                raise not_found(video_id)
        session.expunge_all()
        return [found[video_id] for video_id in video_ids]


def _following(user_id: int, named: list[int]) -> list[Video]:
    """The user's videos that are not final, and those a resuming client names."""
    with session_scope() as session:
        live = Video.status.not_in(TERMINAL_STATUSES)
        query = select(Video).where(
            Video.user_id == user_id, live | Video.id.in_(named) if named else live
        )
        videos = list(session.scalars(query.order_by(Video.id)))
        session.expunge_all()
        return videos
