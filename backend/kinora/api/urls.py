"""The URLs the API hands out: absolute, built from the request (so they carry the
public scheme and host behind a proxy), each with a token scoped to its one video."""

from __future__ import annotations

from typing import Literal

from fastapi import Request

from kinora.core.models import Video, VideoStatus
from kinora.core.tokens import sign_scoped
from kinora.jobs.lifecycle import content_path


def stream_url(request: Request, video_id: int, user_id: int) -> str:
    url = request.url_for("stream_video", video_id=video_id)
    return f"{url}?token={sign_scoped(video_id, user_id)}"


def content_url(
    request: Request, video: Video, what: Literal["content", "thumbnail"] = "content"
) -> str | None:
    """The `video_url` of the `complete` event (lifecycle.content_path), made absolute
    against the URL the client used (its root path behind a proxy included)."""
    if video.status != VideoStatus.COMPLETED:
        return None
    return str(request.base_url).rstrip("/") + content_path(video.id, video.user_id, what)
