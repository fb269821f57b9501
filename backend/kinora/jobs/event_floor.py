"""The database's record of where a video's events stand (README, Faults).

Redis numbers a video's events, but Redis can lose its data; the database keeps the
floor (the last seq known used) and the seq of the `complete` event. Publishers pass
the floor to the publish script, so a new event never reuses a seq a client has seen,
and streams decide `204` from the database's end, not from what Redis still holds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kinora.core.config import get_settings
from kinora.core.db import session_scope
from kinora.core.models import Video
from kinora.jobs import store
from kinora.streaming import keys
from kinora.streaming.logger import SSELogger
from kinora.streaming.settings import Retention


def retention() -> Retention:
    """How much of a video's events Redis keeps (EVENT_HISTORY_MAX, EVENT_RETENTION_SECONDS)."""
    settings = get_settings()
    return Retention(settings.event_history_max, settings.event_retention_seconds)


def floor(video_id: int) -> int:
    with session_scope() as session:
        video = session.get(Video, video_id)
        return video.last_seq if video else 0


def record(video_id: int, seq: int, *, end: bool = False) -> None:
    with session_scope() as session:
        store.record_seq(session, video_id, seq, end=end)


def end_recorder(video_id: int) -> Callable[[int], None]:
    """An `SSELogger(on_complete=...)` that records the video's end."""

    def on_complete(seq: int) -> None:
        record(video_id, seq, end=True)

    return on_complete


def video_logger(video_id: int, *, last_seq: int | None = None, **kwargs: Any) -> SSELogger:
    """The logger of a video in Kinora's worker: Kinora's Redis and retention (its
    settings, `.env` included), numbering above the database's floor."""
    return SSELogger(
        keys.video(video_id),
        redis_url=get_settings().required_redis_url,
        retention=retention(),
        last_seq=floor(video_id) if last_seq is None else last_seq,
        **kwargs,
    )
