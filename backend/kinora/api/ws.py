"""The WebSocket route of a video (docs/protocol.md §3): authorization and the per-user cap;
the transport itself is `kinora.streaming.ws`."""

from __future__ import annotations

import logging

from fastapi import APIRouter, HTTPException, WebSocket, status

from kinora.api.deps import bearer_token
from kinora.api.quota import StreamQuota
from kinora.api.stream import authorize
from kinora.streaming import keys
from kinora.streaming.hub import StreamHub
from kinora.streaming.ws import CLOSE_BAD_TOKEN, CLOSE_NOT_FOUND, CLOSE_TRY_LATER, watch

log = logging.getLogger(__name__)
router = APIRouter(tags=["stream"])


@router.websocket("/api/v1/projects/{video_id}/progress")
async def progress(websocket: WebSocket, video_id: int, token: str | None = None) -> None:
    # Accept first: a close before accepting is an HTTP 403 and loses the close code.
    await websocket.accept()
    bearer = bearer_token(websocket.headers.get("authorization"))
    try:
        granted = await authorize(websocket.app.state.recent_videos, video_id, bearer, token)
    except HTTPException as exc:
        code = (
            CLOSE_BAD_TOKEN if exc.status_code == status.HTTP_401_UNAUTHORIZED else CLOSE_NOT_FOUND
        )
        await websocket.close(code, reason=str(exc.detail)[:120])
        return
    video = granted.video
    state = websocket.app.state
    hub: StreamHub = state.hub
    quota: StreamQuota = state.quota
    if quota.full(granted.holder):
        await websocket.close(CLOSE_TRY_LATER, reason="too many streams open: close one")
        return
    access = granted.access()
    with granted.lease(state, access):
        await watch(
            websocket,
            hub,
            keys.video(video.id),
            hello={"project_id": video.id},
            status=str(video.status),
            progress=video.progress,
            access=access,
            finish=state.fresh_ends.finisher(websocket, video),
        )
