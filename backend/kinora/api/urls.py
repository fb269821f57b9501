"""The URLs the API hands out: absolute, built from the request (so they carry the
public scheme and host behind a proxy), each with a token scoped to its one video."""

from __future__ import annotations

from fastapi import Request

from kinora.core.models import Video, VideoStatus
from kinora.core.tokens import sign_scoped


def stream_url(request: Request, video_id: int, user_id: int) -> str:
    url = request.url_for("stream_video", video_id=video_id)
    return f"{url}?token={sign_scoped(video_id, user_id)}"


def content_url(request: Request, video: Video, route: str = "video_content") -> str | None:
    if video.status != VideoStatus.COMPLETED:
        return None
    url = request.url_for(route, video_id=video.id)
    return f"{url}?token={sign_scoped(video.id, video.user_id)}"
