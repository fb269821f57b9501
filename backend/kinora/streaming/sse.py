"""The SSE response: sse-starlette's EventSourceResponse, with a client that stopped
reading cut off cheaply.

sse-starlette can time out every send (`send_timeout`), but that costs a cancel scope
and a timer per send, that is per event per watcher: a fifth of the API's CPU under
fan-out (bench.fanout). Here the ASGI `send` is wrapped instead (the public interface
of any ASGI response): each send notes when it began, and one watchdog per response,
waking every `stall_seconds / 4`, ends the response once a send has been stuck for
`stall_seconds`. The client, if it is still there, reconnects with Last-Event-ID and
loses nothing. (uvicorn logs each such response as "returned without completing
response": it could not be finished, and the server closes its connection.)
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
import redis
from fastapi import HTTPException, status
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Message, Receive, Scope, Send

from kinora.core.config import Settings
from kinora.streaming.hub import StreamHub, SubscribeTimeout
from kinora.streaming.keys import StreamKey
from kinora.streaming.watcher import LostNotice

log = logging.getLogger(__name__)
# How long a stream has to say goodbye (`retry:`) on shutdown before it is cancelled;
# well within uvicorn's graceful shutdown (kinora api).
SHUTDOWN_GRACE_SECONDS = 2.0


class EventStream(EventSourceResponse):
    def __init__(
        self, content: Any, status_code: int = 200, *, stall_seconds: float, **kwargs: Any
    ) -> None:
        # status_code named: FastAPI reads its default off this signature for /docs.
        super().__init__(content, status_code, **kwargs)
        self.stall_seconds = stall_seconds
        self.stalled = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sending_since = 0.0  # 0: no send in progress

        async def watched(message: Message) -> None:
            nonlocal sending_since
            sending_since = time.monotonic()
            await send(message)
            sending_since = 0.0

        async with anyio.create_task_group() as group:

            async def watchdog() -> None:
                while True:
                    await anyio.sleep(self.stall_seconds / 4)
                    began = sending_since
                    if began and time.monotonic() - began >= self.stall_seconds:
                        self.stalled = True
                        log.info("an SSE client stopped reading: disconnected")
                        # Cancels the response (its generator's cleanup runs) and
                        # returns with the body unfinished, so the server closes the
                        # connection: a body that cannot be written cannot be ended.
                        group.cancel_scope.cancel()
                        return

            group.start_soon(watchdog)
            await super().__call__(scope, receive, watched)
            group.cancel_scope.cancel()


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


def ping() -> ServerSentEvent:
    return ServerSentEvent(comment="ping", sep="\n")


async def frames(
    hub: StreamHub,
    key: StreamKey,
    after: int,
    retry_ms: int,
    lifetime: float,
    *,
    floor: int = 0,
    lost: LostNotice | None = None,
) -> AsyncIterator[bytes]:
    """`retry:`, then every event after `after` until `complete` or the timeout. When
    the process shuts down, a last `retry:` tells the client when to come back."""
    yield b"retry: %d\n\n" % retry_ms
    deadline = asyncio.get_running_loop().time() + lifetime
    try:
        watch = hub.watch(key, after, floor=floor, lost=lost)
        async with watch as watcher:
            # One write per batch: everything that arrived since this client's last one.
            async for batch in watcher.batches(deadline):
                yield b"".join(item.sse for item in batch)
                if batch[-1].terminal:  # `complete` is a job's last event
                    return
            if watcher.drained:
                # Spread over time, the reconnects of a whole process's clients do not
                # land on the other processes at one instant.
                yield b"retry: %d\n\n" % random.randint(retry_ms // 2, retry_ms)
    except (SubscribeTimeout, redis.RedisError) as exc:
        # Redis went away (or did not confirm the subscription): end the response with a
        # `retry:`; the client reconnects with Last-Event-ID and loses nothing.
        log.warning("stream of %s ended: Redis unreachable (%s)", key, exc)
        yield b"retry: %d\n\n" % retry_ms


def event_response(
    body: AsyncIterator[bytes],
    settings: Settings,
    *,
    shutdown: anyio.Event | None,
    headers: Mapping[str, str] | None = None,
) -> EventStream:
    """The SSE response of a stream (CONTRACT §4): heartbeats, no caching, a stalled
    client cut off, and a last `retry:` when the server shuts down."""
    return EventStream(
        body,
        ping=int(settings.sse_ping_seconds) or 1,
        ping_message_factory=ping,
        sep="\n",
        headers={"Cache-Control": "no-cache", **(headers or {})},
        stall_seconds=settings.sse_send_timeout_seconds,
        # Set by sse-starlette when the server shuts down; the app drains the hub then,
        # and the streams end on their own with a last `retry:`.
        shutdown_event=shutdown,
        shutdown_grace_period=SHUTDOWN_GRACE_SECONDS,
    )
