"""One connection, many jobs (docs/protocol.md §6): one SSE response carrying every
event of several jobs, each job's events in its own `seq` order, none missing, none
twice, and each event's `id:` a cursor (kinora.streaming.cursor) that resumes them all.

Each job is a lane: a watcher of the hub, as a single stream has, so a many-jobs
stream costs the hub what single streams of its jobs cost (one subscription per job
and process, an event appended once per topic). The lanes sleep on ONE wake-up: each
lane's hook waits in its topic's line (watcher.Wakeable) and wakes the stream, which
then takes what every ready lane has, in one write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import orjson
import redis

from kinora.streaming import cursor, ended
from kinora.streaming.access import sse_notice
from kinora.streaming.frames import Item
from kinora.streaming.hub import StreamHub, SubscribeTimeout
from kinora.streaming.settings import StreamSettings
from kinora.streaming.source import Grant, Watch, lost_notice
from kinora.streaming.sse import LastChunk
from kinora.streaming.watcher import Watcher

log = logging.getLogger(__name__)


class Hook:
    """A lane's place in its topic's waiting line: each event there marks the lane
    ready and wakes the stream. It stays in line (it puts itself back when it is
    woken) until its lane closes."""

    __slots__ = ("armed", "lane", "mux")

    def __init__(self, mux: Mux, lane: Lane) -> None:
        self.mux = mux
        self.lane = lane
        self.armed = True
        lane.watcher.topic.waiting.append(self)

    def done(self) -> bool:
        return not self.armed

    def set_result(self, _result: None, /) -> None:
        if not self.armed:
            return
        lane = self.lane
        lane.watcher.topic.waiting.append(self)  # in line for the next event
        self.mux.mark(lane)


class Lane:
    """One job of a many-jobs stream."""

    __slots__ = ("context", "flagged", "grant", "hook", "name", "watcher")

    def __init__(
        self,
        grant: Grant,
        name: str,
        context: AbstractAsyncContextManager[Watcher],
        watcher: Watcher,
    ) -> None:
        self.grant = grant
        self.name = name
        self.context = context
        self.watcher = watcher
        self.flagged = False  # in the stream's ready list
        self.hook: Hook | None = None


class Mux:
    """The lanes of one stream, the ones an event has reached since it last looked,
    and the one future that wakes it."""

    def __init__(self, hub: StreamHub, watch: Watch) -> None:
        self.hub = hub
        self.watch = watch
        self.lanes: dict[str, Lane] = {}
        self.ready: list[Lane] = []
        self.future: asyncio.Future[None] | None = None
        self.expired = False

    def mark(self, lane: Lane) -> None:
        if not lane.flagged:
            lane.flagged = True
            self.ready.append(lane)
        future = self.future
        if future is not None and not future.done():
            future.set_result(None)

    def expire(self) -> None:
        self.expired = True
        future = self.future
        if future is not None and not future.done():
            future.set_result(None)

    async def open(self, grant: Grant, name: str, after: int, *, lost: bool = True) -> Lane:
        context = self.hub.watch(
            grant.key, after, floor=grant.floor,
            lost=lost_notice(grant.key, grant.store) if lost else None, store=grant.store,
        )  # fmt: skip
        watcher = await context.__aenter__()
        lane = self.lanes[name] = Lane(grant, name, context, watcher)
        lane.hook = Hook(self, lane)
        self.mark(lane)  # what reached it before its hook was in line
        if self.watch.access is not None:
            self.watch.access.attach(watcher)
        return lane

    async def close(self, lane: Lane) -> None:
        self.lanes.pop(lane.name, None)
        if lane.hook is not None:
            lane.hook.armed = False  # it may still stand in its topic's line: it wakes no one
        if self.watch.access is not None:
            self.watch.access.detach(lane.watcher)
        await lane.context.__aexit__(None, None, None)

    async def sleep(self) -> None:
        """Until an event reaches any lane (or the stream must end)."""
        if self.ready or self.expired:
            return
        self.future = asyncio.get_running_loop().create_future()
        await self.future

    def take_ready(self) -> list[Lane]:
        ready, self.ready = self.ready, []
        for lane in ready:
            lane.flagged = False
        return ready


class Frames:
    """The SSE frames of a stream: each event with the stream's cursor as its id."""

    def __init__(self, positions: dict[str, int]) -> None:
        self.positions = positions

    def of(self, name: str, batch: list[Item]) -> bytes:
        positions = self.positions
        positions.setdefault(name, 0)
        # The cursor around this job's entry is the same for the whole batch.
        before, after, seen = [], [], False
        for other, seq in positions.items():
            if other == name:
                seen = True
            elif seen:
                after.append(f",{other}:{seq}")
            else:
                before.append(f"{other}:{seq},")
        head = ("id: " + "".join(before) + name + ":").encode()
        tail = ("".join(after) + "\ndata: ").encode()
        parts = []
        for item in batch:
            parts.append(b"%s%d%s%s\n\n" % (head, item.seq, tail, item.raw))
        positions[name] = batch[-1].seq
        return b"".join(parts)


class Stream:
    """One many-jobs stream's state: its lanes, its cursor, what it resumes from."""

    def __init__(
        self, hub: StreamHub, watch: Watch, resume: dict[str, int], settings: StreamSettings
    ) -> None:
        self.mux = Mux(hub, watch)
        self.watch = watch
        self.resume = resume
        self.settings = settings
        self.following = watch.follow is not None
        self.out = Frames({})
        self.news: Lane | None = None  # the announcements of the caller's new jobs

    async def join(self, grant: Grant) -> AsyncIterator[bytes]:
        """A job joins the stream: its events after the cursor's position, then (unless
        it has ended) a lane for its live ones."""
        name = cursor.token(grant.key.id)
        mux, positions = self.mux, self.out.positions
        if name in mux.lanes:
            return
        after = self.resume.get(name, 0)
        record = grant.record
        if record is not None and record.ended:
            end = await ended.find_end(mux.hub, grant, self.settings.retention)
            if end is not None:
                if after < end:
                    lost = lost_notice(grant.key, grant.store)
                    async for batch in ended.replay(mux.hub, grant, after, end, lost):
                        yield self.out.of(name, batch)
                if self.following:
                    positions.pop(name, None)  # final: it will not be listed again
                else:
                    positions[name] = max(after, positions.get(name, 0))
                return
        lane = await mux.open(grant, name, after)
        if not self.following:
            positions.setdefault(name, after)
        async for batch in lane.watcher.replay():
            chunk, finished = self.batch(lane, batch)
            yield chunk
            if finished:
                await self.finished(lane)
                return

    async def announced(self, batch: list[Item]) -> AsyncIterator[bytes]:
        """Jobs the caller submitted: each joins the stream (from its first event)."""
        follow = self.watch.follow
        assert follow is not None
        for item in batch:
            self.out.positions[cursor.NEW] = item.seq
            job = _job_of(item)
            grant = None if job is None else await follow.grant(job)
            if grant is not None:
                async for chunk in self.join(grant):
                    yield chunk

    async def long_way(self, lane: Lane) -> AsyncIterator[bytes]:
        """A lane's events when history must fill a gap first, or the announcements."""
        async for batch in lane.watcher.take():
            if lane is self.news:
                async for chunk in self.announced(batch):
                    yield chunk
                continue
            chunk, finished = self.batch(lane, batch)
            yield chunk
            if finished:
                await self.finished(lane)

    def batch(self, lane: Lane, batch: list[Item]) -> tuple[bytes, bool]:
        """A lane's batch as frames, its `complete` made as it is sent; whether it ended."""
        finished = batch[-1].terminal
        finish = lane.grant.finish
        if finished and finish is not None:
            batch = [*batch[:-1], finish(batch[-1])]
        return self.out.of(lane.name, batch), finished

    async def finished(self, lane: Lane) -> None:
        """A job's `complete` went out: its lane closes (following the caller's jobs,
        the cursor forgets it: it is final, and will not be listed again)."""
        await self.mux.close(lane)
        if self.following:
            self.out.positions.pop(lane.name, None)


async def frames(
    hub: StreamHub, watch: Watch, resume: dict[str, int], settings: StreamSettings
) -> AsyncIterator[bytes]:
    """`retry:`, then every event of every job after the client's cursor, until every
    listed job has ended (or, following the caller's new jobs, until the timeout)."""
    retry_ms = settings.sse_retry_ms
    yield b"retry: %d\n\n" % retry_ms
    loop = asyncio.get_running_loop()
    stream = Stream(hub, watch, resume, settings)
    mux = stream.mux
    timers = [loop.call_later(settings.sse_timeout_seconds, mux.expire)]
    access = watch.access
    if access is not None and access.expires is not None:
        timers.append(
            loop.call_later(max(0.0, access.expires - time.time()), access.end, "expired")
        )
    try:
        for grant in watch.grants:
            joined = [chunk async for chunk in stream.join(grant)]
            if joined:
                yield b"".join(joined)
        if watch.follow is not None:
            follow = watch.follow
            after = resume.get(cursor.NEW, follow.after)
            stream.out.positions[cursor.NEW] = after
            news = stream.news = await mux.open(Grant(follow.key), cursor.NEW, after, lost=False)
            async for batch in news.watcher.replay():  # announced since the cursor
                async for chunk in stream.announced(batch):
                    yield chunk
        elif not mux.lanes:
            yield LastChunk(b"")  # every listed job had ended: the client has them all
            return
        stop: Watcher | None = None
        while stop is None and not mux.expired:
            await mux.sleep()
            parts: list[bytes] = []
            for lane in mux.take_ready():
                watcher = lane.watcher
                if lane.name not in mux.lanes:
                    continue  # closed meanwhile
                if watcher.cut or watcher.expired:
                    stop = watcher
                    break
                taken = None if lane is stream.news else watcher.take_now()
                if taken is None:  # a gap to fill, or new jobs: the long way
                    if parts:
                        yield b"".join(parts)
                        parts = []
                    async for chunk in stream.long_way(lane):
                        yield chunk
                elif taken:
                    chunk, finished = stream.batch(lane, taken)
                    parts.append(chunk)
                    if finished:
                        await stream.finished(lane)
            if not stream.following and not mux.lanes:
                yield LastChunk(b"".join(parts))  # every listed job has ended
                return
            if parts:
                yield b"".join(parts)
        why = stop.drained if stop is not None else None
        if why == "expired" or why == "revoked":
            yield LastChunk(sse_notice(None, why))
        elif why is not None:
            # Spread over time, the reconnects of a whole process's clients.
            yield b"retry: %d\n\n" % random.randint(retry_ms // 2, retry_ms)
    except (SubscribeTimeout, redis.RedisError) as exc:
        log.warning("a many-jobs stream ended: Redis unreachable (%s)", exc)
        yield b"retry: %d\n\n" % retry_ms
    finally:
        for timer in timers:
            timer.cancel()
        for lane in list(mux.lanes.values()):
            with contextlib.suppress(Exception):
                await mux.close(lane)


def _job_of(item: Item) -> str | None:
    event: dict[str, Any] = orjson.loads(item.raw)
    job = event.get("job")
    return None if job is None else str(job)
