"""The WebSocket route of a video (docs/protocol.md §3): the progress core's, with
Kinora's videos as its job source (api.stream.Videos)."""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

from kinora.streaming.core import ProgressCore

router = APIRouter(tags=["stream"])


@router.websocket("/api/v1/projects/{video_id}/progress")
async def progress(websocket: WebSocket, video_id: int, token: str | None = None) -> None:
    """`token` (or `Authorization: Bearer`) is read by the job source."""
    state = websocket.app.state
    core: ProgressCore = state.progress
    await core.websocket(websocket, state.videos, str(video_id))
