"""Rows as the database has them now (detached, for assertions)."""

from __future__ import annotations

from kinora.core.db import session_scope
from kinora.core.models import Video


def video_row(video_id: int) -> Video:
    with session_scope() as session:
        video = session.get(Video, video_id)
        assert video is not None
        session.expunge(video)
        return video
