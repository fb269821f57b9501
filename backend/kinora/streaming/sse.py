"""The SSE response: sse-starlette's EventSourceResponse, with a client that stopped
reading cut off cheaply.

sse-starlette can time out every send (`send_timeout`), but that costs a cancel scope
and a timer per send, that is per event per watcher: a fifth of the API's CPU under
fan-out (bench.fanout). Here the ASGI `send` is wrapped instead (the public interface
of any ASGI response): each send notes when it began, and ONE patrol task per event
loop, waking every `stall_seconds / 4`, ends any response whose send has been stuck
for `stall_seconds` (a task per response cost 5.5 KB per idle connection, bench.fanout
at 2,000). The client, if it is still there, reconnects with Last-Event-ID and loses
nothing. (uvicorn logs each such response as "returned without completing response":
it could not be finished, and the server closes its connection.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import weakref
from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar

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
        self.sending_since = 0.0  # when the send in progress began; 0: none
        self.cancel_scope: anyio.CancelScope | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def watched(message: Message) -> None:
            self.sending_since = time.monotonic()
            await send(message)
            self.sending_since = 0.0

        patrol = Patrol.of_this_loop()
        patrol.streams.add(self)
        try:
            with anyio.CancelScope() as self.cancel_scope:
                patrol.start(self.stall_seconds / 4)
                await super().__call__(scope, receive, watched)
        finally:
            patrol.streams.discard(self)

    def cut(self) -> None:
        """Cancels the response (its generator's cleanup runs), which then returns with
        the body unfinished, so the server closes the connection: a body that cannot be
        written cannot be ended."""
        self.stalled = True
        log.info("an SSE client stopped reading: disconnected")
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()


class Patrol:
    """The open streams of one event loop, and the one task that cuts a stalled one;
    the task ends by itself once no stream is open (or with the app: `stop`)."""

    _by_loop: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Patrol]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self) -> None:
        self.streams: set[EventStream] = set()
        self.task: asyncio.Task[None] | None = None

    @classmethod
    def of_this_loop(cls) -> Patrol:
        loop = asyncio.get_running_loop()
        patrol = cls._by_loop.get(loop)
        if patrol is None:
            patrol = cls._by_loop[loop] = cls()
        return patrol

    def start(self, interval: float) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(
                self._run(interval), name="sse-stall-patrol"
            )

    async def _run(self, interval: float) -> None:
        while self.streams:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for stream in list(self.streams):
                began = stream.sending_since
                if began and now - began >= stream.stall_seconds and not stream.stalled:
                    stream.cut()

    @classmethod
    async def stop(cls) -> None:
        """At the app's shutdown: no task left pending when the loop closes."""
        patrol = cls._by_loop.get(asyncio.get_running_loop())
        if patrol is not None and patrol.task is not None:
            patrol.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await patrol.task


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
