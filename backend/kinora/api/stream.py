"""The SSE stream of one video (CONTRACT §4), on sse-starlette's EventSourceResponse.

The hub does the hard part (history after `Last-Event-ID`, then live events, merged
by `seq`); this module authorizes, decides between `204` and a stream, and frames.
Each event's SSE frame is built once by the hub and passed through unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator

from fastapi import APIRouter, HTTPException, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Message, Send

from kinora import logs
from kinora.api.deps import BearerDep, HubDep, SettingsDep, VideoId, watcher_video
from kinora.api.middleware import TRACE_HEADER
from kinora.db import session_scope
from kinora.hub import StreamHub, SubscribeTimeout
from kinora.models import Video

log = logging.getLogger(__name__)
# How long a stream has to say goodbye (`retry:`) on shutdown before it is cancelled;
# well within uvicorn's graceful shutdown (kinora api).
SHUTDOWN_GRACE_SECONDS = 2.0
router = APIRouter(prefix="/api/v1/videos", tags=["stream"])


def parse_last_event_id(value: str | None) -> int:
    """The seq a client has seen; 0 when it has seen nothing."""
    if value is None or value.strip() == "":
        return 0
    text = value.strip()
    # isascii: str.isdigit() is true for superscripts and other scripts' digits too.
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            detail=f"malformed Last-Event-ID {value!r}: send the `id:` of the last event received",
        )
    return int(text)


def authorize(video_id: int, header: str | None, query: str | None) -> Video:
    """The video, if the token (API or scoped to it) may watch it; else 401/404."""
    with session_scope() as session:
        video = watcher_video(session, video_id, header, query)
        session.expunge(video)
        return video


class EventStream(EventSourceResponse):
    """sse-starlette's response with its send timeout on heartbeats only.

    The timeout costs a cancel scope and a timer for every send, that is for every
    event times every watcher: a fifth of the API's CPU under fan-out (bench.fanout).
    A client that stops reading is still dropped: the heartbeat's send to it times
    out after `send_timeout` and the response ends.
    """

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if message.get("body", b"").startswith(b":"):  # a heartbeat (an SSE comment)
            await super()._send_with_timeout(send, message)
        else:
            await send(message)


def _ping() -> ServerSentEvent:
    return ServerSentEvent(comment="ping", sep="\n")


async def frames(
    hub: StreamHub, video_id: int, after: int, retry_ms: int, lifetime: float
) -> AsyncIterator[bytes]:
    """`retry:`, then every event after `after` until `complete` or the timeout. When
    the process shuts down, a last `retry:` tells the client when to come back."""
    yield b"retry: %d\n\n" % retry_ms
    deadline = asyncio.get_running_loop().time() + lifetime
    try:
        async with hub.watch(video_id, after) as watcher:
            # One write per batch: everything that arrived since this client's last one.
            async for batch in watcher.batches(deadline):
                yield b"".join(item.sse for item in batch)
                if batch[-1].terminal:  # `complete` is a video's last event
                    return
            if watcher.drained:
                # Spread over time, the reconnects of a whole process's clients do not
                # land on the other processes at one instant.
                yield b"retry: %d\n\n" % random.randint(retry_ms // 2, retry_ms)
    except SubscribeTimeout:
        # Redis did not confirm the subscription: end the response; the client
        # reconnects with Last-Event-ID and loses nothing.
        log.warning("stream of video %s ended: no subscription from Redis", video_id)


@router.get(
    "/{video_id}/stream",
    name="stream_video",
    response_class=EventSourceResponse,
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
    video = await run_in_threadpool(authorize, video_id, header, token)
    last = await hub.recent(video_id, 1)
    if last and last[0].terminal and after >= last[0].seq:
        return Response(status_code=status.HTTP_204_NO_CONTENT)  # EventSource stops here
    if not last and video.status.is_terminal:
        # Its history has expired (EVENT_RETENTION_SECONDS): nothing left to replay.
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    return EventStream(
        frames(hub, video_id, after, settings.sse_retry_ms, settings.sse_timeout_seconds),
        ping=int(settings.sse_ping_seconds) or 1,
        ping_message_factory=_ping,
        sep="\n",
        headers={"Cache-Control": "no-cache", TRACE_HEADER: logs.current_trace_id() or ""},
        send_timeout=settings.sse_send_timeout_seconds,
        # Set by sse-starlette when the server shuts down; the app drains the hub then
        # (app.lifespan), and the streams end on their own with a last `retry:`.
        shutdown_event=request.app.state.shutdown,
        shutdown_grace_period=SHUTDOWN_GRACE_SECONDS,
    )
