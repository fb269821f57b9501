"""The SSE response: a lean streaming response on sse-starlette's framing, with the
heartbeats, the stalled-client cut-off and the shutdown notice of every open stream
done by one patrol task per event loop.

sse-starlette's EventSourceResponse runs four tasks in an anyio task group for every
response (the body, the heartbeat, the shutdown listener, the disconnect listener):
under a reconnect storm, spawning them was a fifth of the API's CPU (bench.storm),
and they are memory held by every idle connection (bench.fanout). Here a response
writes its body in the request's task in front of the app (a shallow task of its own
otherwise: see EventStream.__call__) and has one task that waits for the client to
disconnect; ONE patrol task per event loop, waking every PATROL_SECONDS, sends
`: ping` on a stream idle for `ping_seconds`, ends a stream whose write has been
stuck for `stall_seconds` (the client stopped reading: it reconnects with
Last-Event-ID and loses nothing), and when the server starts
shutting down (sse-starlette's AppStatus, which hooks uvicorn's exit) tells its
core, whose hub tells every stream to end with a last `retry:`, and ends whatever is
still open SHUTDOWN_GRACE_SECONDS later (the patrol is the core's:
kinora.streaming.core). The frames are sse-starlette's: the hub encodes each event
once (kinora.streaming.frames), and the heartbeat is its `ServerSentEvent` comment.
(uvicorn logs a response ended this way as "returned without completing response":
it could not be finished, and the server closes its connection.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import redis
from fastapi import HTTPException, status
from sse_starlette import ServerSentEvent
from sse_starlette.sse import AppStatus
from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kinora.streaming.access import Access, sse_notice
from kinora.streaming.frames import Item
from kinora.streaming.hub import StreamHub, SubscribeTimeout
from kinora.streaming.keys import StreamKey
from kinora.streaming.settings import StreamSettings
from kinora.streaming.watcher import LostNotice, Pacer, Watcher

log = logging.getLogger(__name__)
# How long a stream has to say goodbye (`retry:`) on shutdown before it is cancelled;
# well within uvicorn's graceful shutdown (kinora api).
SHUTDOWN_GRACE_SECONDS = 2.0
# How often the patrol looks at every open stream (heartbeats are this late at most).
PATROL_SECONDS = 0.5
PING = ServerSentEvent(comment="ping", sep="\n").encode()
END: Message = {"type": "http.response.body", "body": b"", "more_body": False}
FINISHED = "finished"  # EventStream.ended once its body is written: nothing cuts it then


class LastChunk(bytes):
    """A body's last chunk (its `complete` event): written with the end of the
    response, in one write."""


# The server's own `send`, put in every HTTP request's scope by `direct_writes`.
SERVER_SEND = "kinora.server_send"
# Set in a request's scope by an app that serves the stream with few coroutines above
# it (api/front.py): the body is written by the request's own task, not one of its own.
SHALLOW = "kinora.shallow"


def direct_writes(app: ASGIApp) -> ASGIApp:
    """`app`, with the server's own `send` kept in each request's scope: a stream writes
    its head (and so its headers: CORS, the trace id) through the app's middleware,
    and its body, event after event, straight to the server. Each middleware wraps
    `send` in a coroutine of its own (Starlette's error and exception handlers, three
    in a FastAPI app), and a hot video's stream writes tens of thousands of times a
    second; none of them looks at a body (a middleware that rewrites bodies, such as
    compression, has no place on an event stream anyway)."""

    async def server_send_in_scope(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[SERVER_SEND] = send
        await app(scope, receive, send)

    return server_send_in_scope


# Every stream's headers, as StreamingResponse would encode them (and its callers' after).
HEADERS = (
    (b"cache-control", b"no-cache"),
    (b"connection", b"keep-alive"),
    (b"x-accel-buffering", b"no"),
    (b"content-type", b"text/event-stream; charset=utf-8"),
)


class EventStream(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(
        self,
        content: AsyncIterator[bytes],
        status_code: int = 200,
        *,
        ping_seconds: float,
        stall_seconds: float,
        patrol: Patrol,
        headers: Mapping[str, str] | None = None,
        lease: contextlib.AbstractContextManager[Any] | None = None,
    ) -> None:
        # status_code named: FastAPI reads its default off this signature for /docs.
        # StreamingResponse's own __init__, but for the headers: every stream's are the
        # same (shared here, not encoded anew per response) but for the caller's few.
        self.body_iterator = content
        self.status_code = status_code
        self.background = None
        extra = [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()
        ]
        if extra:
            named = {name for name, _ in extra}
            self.raw_headers = [h for h in HEADERS if h[0] not in named] + extra
        else:
            self.raw_headers = list(HEADERS)
        self.ping_seconds = ping_seconds
        self.stall_seconds = stall_seconds
        self.patrol = patrol
        self.lease = lease  # held while the response runs (a user's count of streams)
        self.sending_since = 0.0  # when the write in progress began; 0: none
        self.last_write = 0.0  # 0: the body has not been written to yet
        self.ended: str | None = None  # why `end` cut it, or FINISHED
        self.task: asyncio.Task[Any] | None = None  # the task that writes the body
        self.writing = False  # while `_run` runs: `end` cancels it only then
        self.send: Send | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            # A stream on HEAD would never end: the head, and no body.
            await send(self._head())
            await send(END)
            return
        self.send = scope.get(SERVER_SEND, send)
        loop = asyncio.get_running_loop()
        patrol = self.patrol
        with self.lease or contextlib.nullcontext():
            listener = loop.create_task(self._listen(receive), name="sse-disconnect")
            patrol.add(self)
            try:
                if scope.get(SHALLOW):
                    # Served in front of the app (api/front.py): the request's task
                    # resumes through a handful of coroutines, and writes the body.
                    self.task = asyncio.current_task()
                    await self._run(send)
                else:
                    # Resuming the request's task runs through the coroutine of every
                    # middleware and router layer (two dozen in a FastAPI app), and a
                    # stream resumes once a write: the body's task of its own is three
                    # deep (a sixth of the CPU per write, by bench.harness's accounting).
                    # The request's task waits for it; cancelling the request cancels it.
                    self.task = loop.create_task(self._run(send), name="sse-body")
                    await self.task
            finally:
                patrol.discard(self)
                listener.cancel()
                body = self.task
                if body is not None and body is not asyncio.current_task() and not body.done():
                    await asyncio.wait({body})  # the request was cancelled: so is the body

    def _head(self) -> Message:
        """The response's head; its headers are let go (not held while it streams)."""
        headers, self.raw_headers = self.raw_headers, []
        return {"type": "http.response.start", "status": self.status_code, "headers": headers}

    async def _run(self, send: Send) -> None:
        self.writing = True
        try:
            if self.ended is not None:
                return  # cut before it began
            # The head through the app's middleware, the body straight to the server.
            self.sending_since = time.monotonic()
            await send(self._head())
            self.sending_since = 0.0
            last = b""
            async for chunk in self.body_iterator:
                if type(chunk) is LastChunk:
                    last = chunk
                    break
                await self._write({"type": "http.response.body", "body": chunk, "more_body": True})
            # Finished: nothing cuts it from here on (uvicorn tells the listener the
            # response is complete as a disconnect).
            self.ended = FINISHED
            await self._write({**END, "body": last})
            # The rest (letting the body go, the request's unwinding, the connection's
            # end) waits until the clients already in line have been written to: a
            # video's streams all end in the pass that delivers its `complete`, and
            # each end costs several writes' worth.
            await self.patrol.pacer.wait_turn()
        except asyncio.CancelledError:
            if self.ended in (None, FINISHED):
                raise  # not ours: the server is cancelling the request
            # Cut by `end`: the response returns unfinished, and the task goes on (in
            # front of the app, it is the request's own).
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        finally:
            # The body's cleanup (the hub's watcher let go), if it was stopped at a yield.
            try:
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            except Exception:
                log.exception("a stream's cleanup failed")
            self.writing = False

    async def _write(self, message: Message) -> None:
        assert self.send is not None
        self.sending_since = time.monotonic()
        await self.send(message)
        self.last_write = time.monotonic()
        self.sending_since = 0.0

    async def _listen(self, receive: Receive) -> None:
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception as exc:  # the server could not read: the client is gone
            log.info("a stream's connection could not be read (%r): ending it", exc)
        self.end("the client disconnected")

    def end(self, why: str) -> None:
        """Stop the response (its body's cleanup runs); it returns unfinished, and the
        server closes the connection."""
        if self.ended is not None:
            return
        self.ended = why
        if self.writing and self.task is not None:
            self.task.cancel()
        # Not writing yet (its task has not started): it returns as soon as it starts.

    async def _ping(self) -> None:
        # A client gone mid-write (uvicorn's ClientDisconnected is an OSError): its
        # listener ends the stream.
        with contextlib.suppress(OSError):
            await self._write({"type": "http.response.body", "body": PING, "more_body": True})


class Patrol:
    """The open streams of one core, and the one task that pings the idle ones, cuts
    the stalled ones, and ends them all when the server shuts down (`on_shutdown` is
    told first, so they can say goodbye); the task ends by itself once no stream is
    open (or with the core: `stop`). `pacer`: the turn a finished stream waits for."""

    def __init__(self, pacer: Pacer, on_shutdown: Callable[[], object]) -> None:
        self.pacer = pacer
        self.on_shutdown = on_shutdown
        self.streams: set[EventStream] = set()
        self.task: asyncio.Task[None] | None = None
        self.pings: set[asyncio.Task[None]] = set()
        self.cut_at = 0.0  # shutting down: what is still open then is ended (monotonic)

    def add(self, stream: EventStream) -> None:
        self.streams.add(stream)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run(), name="sse-patrol")

    def discard(self, stream: EventStream) -> None:
        self.streams.discard(stream)

    async def _run(self) -> None:
        while self.streams:
            await asyncio.sleep(PATROL_SECONDS)
            now = time.monotonic()
            if AppStatus.should_exit and not self.cut_at:
                # A server the core's own signal handler did not see (another
                # server's exit hook, sse-starlette's): drain at once.
                self.on_shutdown()
            if self.cut_at and now >= self.cut_at:
                for stream in list(self.streams):
                    stream.end("the server is shutting down")
            for stream in list(self.streams):
                began = stream.sending_since
                if began:
                    if now - began >= stream.stall_seconds:
                        log.info("an SSE client stopped reading: disconnected")
                        stream.end("the client stopped reading")
                elif (
                    # (a stream's first write is its body's opening `retry:`: no ping before)
                    stream.last_write
                    and now - stream.last_write >= stream.ping_seconds
                    and stream.ended is None
                ):
                    stream.last_write = now  # one heartbeat per interval, even if it waits
                    ping = asyncio.get_running_loop().create_task(stream._ping())
                    self.pings.add(ping)
                    ping.add_done_callback(self.pings.discard)

    def shutting_down(self, within: float) -> None:
        """The streams were told to end within `within` seconds: whatever is still open
        SHUTDOWN_GRACE_SECONDS after that is ended (it could not say goodbye)."""
        if not self.cut_at:
            self.cut_at = time.monotonic() + within + SHUTDOWN_GRACE_SECONDS

    async def stop(self) -> None:
        """At the core's stop: no task left pending when the loop closes."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


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


Finish = Callable[[Item], Item]


async def frames(
    hub: StreamHub,
    key: StreamKey,
    after: int,
    retry_ms: int,
    lifetime: float,
    *,
    floor: int = 0,
    lost: LostNotice | None = None,
    access: Access | None = None,
    finish: Finish | None = None,
    store: object | None = None,
) -> AsyncIterator[bytes]:
    """`retry:`, then every event after `after` until `complete` or the timeout. When
    the process shuts down, a last `retry:` tells the client when to come back; when
    the stream's `access` expires or is revoked, a last notice says so (and no new
    `retry:`: a reconnect would meet a 401). `finish` makes the `complete` event as it
    is sent (Kinora signs its `video_url` then, not when it was published). `store`: the
    job's Store, asked again while the stream hears nothing (StreamHub.watch).

    The opening `retry:` goes out in one write with the history a resuming client
    missed (a reconnect storm's streams each write once less), or alone as soon as
    there is none."""
    opening = b"retry: %d\n\n" % retry_ms  # written with the first chunk, whatever it is
    loop = asyncio.get_running_loop()
    deadline = loop.time() + lifetime
    try:
        watch = hub.watch(key, after, floor=floor, lost=lost, store=store)
        async with watch as watcher:
            with attached(access, watcher):
                # One write per batch: everything that arrived since this client's last.
                async for batch in watcher.batches(deadline, caught_up=True):
                    if not batch:  # the history is written: the live events follow
                        if opening:
                            yield opening
                            opening = b""
                        continue
                    if batch[-1].terminal:  # `complete` is a job's last event
                        if finish is not None:
                            batch = [*batch[:-1], finish(batch[-1])]
                        yield LastChunk(b"".join([opening, *[item.sse for item in batch]]))
                        return
                    yield b"".join([opening, *[item.sse for item in batch]])
                    opening = b""
            if watcher.drained in ("expired", "revoked"):
                yield LastChunk(opening + sse_notice(key, watcher.drained))
            elif watcher.drained:
                # Spread over time, the reconnects of a whole process's clients do not
                # land on the other processes at one instant.
                yield b"%sretry: %d\n\n" % (opening, random.randint(retry_ms // 2, retry_ms))
    except (SubscribeTimeout, redis.RedisError) as exc:
        # Redis went away (or did not confirm the subscription): end the response with a
        # `retry:`; the client reconnects with Last-Event-ID and loses nothing.
        log.warning("stream of %s ended: Redis unreachable (%s)", key, exc)
        yield b"retry: %d\n\n" % retry_ms


class attached:
    """The watcher ends with `access`: when it is revoked, or when it expires. (A
    class, not a generator: every open stream holds one.)"""

    __slots__ = ("access", "slot", "watcher")

    def __init__(self, access: Access | None, watcher: Watcher) -> None:
        self.access, self.watcher = access, watcher
        self.slot: int | None = None

    def __enter__(self) -> None:
        access = self.access
        if access is None:
            return
        access.attach(self.watcher)
        if access.expires is not None:
            when = asyncio.get_running_loop().time() + max(0.0, access.expires - time.time())
            self.slot = self.watcher.hub.deadlines.add(access, when, access.expire)

    def __exit__(self, *exc: object) -> None:
        if self.access is None:
            return
        self.access.detach(self.watcher)
        if self.slot is not None:
            self.watcher.hub.deadlines.remove(self.access, self.slot)


def event_response(
    body: AsyncIterator[bytes],
    settings: StreamSettings,
    *,
    patrol: Patrol,
    headers: Mapping[str, str] | None = None,
    lease: contextlib.AbstractContextManager[Any] | None = None,
) -> EventStream:
    """The SSE response of a stream (docs/protocol.md §2): heartbeats, no caching, a stalled
    client cut off, and a last `retry:` when the server shuts down (the patrol's core
    drains its hub then, and the streams end on their own). `lease` is held while the
    stream runs."""
    return EventStream(
        body,
        ping_seconds=settings.sse_ping_seconds,
        stall_seconds=settings.sse_send_timeout_seconds,
        patrol=patrol,
        headers=headers,
        lease=lease,
    )
