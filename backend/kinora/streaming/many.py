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
    """A lane's place in its topic's waiting line: an event there wakes the stream."""

    __slots__ = ("armed", "mux")

    def __init__(self, mux: Mux) -> None:
        self.mux = mux
        self.armed = False

    def done(self) -> bool:
        return not self.armed

    def set_result(self, _result: None, /) -> None:
        if self.armed:
            self.armed = False
            self.mux.wake()


class Lane:
    """One job of a many-jobs stream."""

    __slots__ = ("context", "grant", "hook", "name", "watcher")

    def __init__(
        self,
        grant: Grant,
        name: str,
        context: AbstractAsyncContextManager[Watcher],
        watcher: Watcher,
        hook: Hook,
    ) -> None:
        self.grant = grant
        self.name = name
        self.context = context
        self.watcher = watcher
        self.hook = hook

    @property
    def ready(self) -> bool:
        watcher = self.watcher
        return watcher.cursor != watcher.topic.end or watcher.cut or watcher.expired


class Mux:
    """The lanes of one stream, and the one future they wake."""

    def __init__(self, hub: StreamHub, watch: Watch) -> None:
        self.hub = hub
        self.watch = watch
        self.lanes: dict[str, Lane] = {}
        self.future: asyncio.Future[None] | None = None
        self.expired = False

    def wake(self) -> None:
        future = self.future
        if future is not None and not future.done():
            future.set_result(None)

    def expire(self) -> None:
        self.expired = True
        self.wake()

    async def open(self, grant: Grant, name: str, after: int) -> Lane:
        context = self.hub.watch(
            grant.key, after, floor=grant.floor, lost=lost_notice(grant.key, grant.store)
        )
        watcher = await context.__aenter__()
        lane = self.lanes[name] = Lane(grant, name, context, watcher, Hook(self))
        if self.watch.access is not None:
            self.watch.access.attach(watcher)
        return lane

    async def close(self, lane: Lane) -> None:
        self.lanes.pop(lane.name, None)
        lane.hook.armed = False  # it may still stand in its topic's line: it wakes no one
        if self.watch.access is not None:
            self.watch.access.detach(lane.watcher)
        await lane.context.__aexit__(None, None, None)

    async def sleep(self) -> None:
        """Until an event reaches any lane (or the stream must end)."""
        self.future = asyncio.get_running_loop().create_future()
        for lane in self.lanes.values():
            if lane.ready:
                return
            hook = lane.hook
            if not hook.armed:
                hook.armed = True
                lane.watcher.topic.waiting.append(hook)
        if not self.expired:
            await self.future

    def ended_by(self) -> Watcher | None:
        """A lane whose watcher was cut off, drained or expired: the stream ends."""
        for lane in self.lanes.values():
            if lane.watcher.cut or lane.watcher.expired:
                return lane.watcher
        return None


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


async def frames(
    hub: StreamHub,
    watch: Watch,
    resume: dict[str, int],
    settings: StreamSettings,
) -> AsyncIterator[bytes]:
    """`retry:`, then every event of every job after the client's cursor, until every
    listed job has ended (or, following the caller's new jobs, until the timeout)."""
    retry_ms = settings.sse_retry_ms
    yield b"retry: %d\n\n" % retry_ms
    loop = asyncio.get_running_loop()
    mux = Mux(hub, watch)
    following = watch.follow is not None
    positions: dict[str, int] = {}
    out = Frames(positions)
    timers = [loop.call_later(settings.sse_timeout_seconds, mux.expire)]
    access = watch.access
    if access is not None and access.expires is not None:
        timers.append(
            loop.call_later(max(0.0, access.expires - time.time()), access.end, "expired")
        )
    try:
        pending: list[bytes] = []
        for grant in watch.grants:
            async for chunk in _join(mux, out, grant, resume, settings, following):
                pending.append(chunk)
            if pending:
                yield b"".join(pending)
                pending = []
        news: Watcher | None = None
        if watch.follow is not None:
            follow = watch.follow
            after = resume.get(cursor.NEW, follow.after)
            positions[cursor.NEW] = after
            announced = hub.watch(follow.key, after)
            news = await announced.__aenter__()  # closed with the lanes
            mux.lanes[cursor.NEW] = Lane(Grant(follow.key), cursor.NEW, announced, news, Hook(mux))
        elif not mux.lanes:
            yield LastChunk(b"")  # every listed job had ended: the client has them all
            return
        replayed = news.replay() if news is not None else None
        while True:
            if replayed is not None:  # the announcements since the cursor, first
                async for batch in replayed:
                    async for chunk in _announced(mux, out, batch, resume, settings):
                        yield chunk
                replayed = None
            stop = mux.ended_by()
            if stop is not None or mux.expired:
                break
            wrote = False
            for lane in list(mux.lanes.values()):
                if not lane.ready:
                    continue
                async for batch in lane.watcher.take():
                    if lane.name == cursor.NEW:
                        async for chunk in _announced(mux, out, batch, resume, settings):
                            yield chunk
                        continue
                    chunk, finished = _lane_batch(out, lane.grant, lane.name, batch)
                    if finished:
                        await mux.close(lane)
                        if not following:
                            positions[lane.name] = batch[-1].seq
                        else:
                            positions.pop(lane.name, None)
                        if not following and not mux.lanes:
                            yield LastChunk(chunk)  # every listed job has ended
                            return
                    yield chunk
                    wrote = True
            if not wrote:
                await mux.sleep()
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


def _lane_batch(out: Frames, grant: Grant, name: str, batch: list[Item]) -> tuple[bytes, bool]:
    """A lane's batch as frames, its `complete` made as it is sent; whether it ended."""
    finished = batch[-1].terminal
    if finished and grant.finish is not None:
        batch = [*batch[:-1], grant.finish(batch[-1])]
    return out.of(name, batch), finished


async def _join(
    mux: Mux,
    out: Frames,
    grant: Grant,
    resume: dict[str, int],
    settings: StreamSettings,
    following: bool,
) -> AsyncIterator[bytes]:
    """A job joins the stream: its events after the cursor's position, then (unless it
    has ended) a lane for its live ones."""
    name = cursor.token(grant.key.id)
    if name in mux.lanes:
        return
    after = resume.get(name, 0)
    record = grant.record
    hub = mux.hub
    if record is not None and record.ended:
        end = await ended.find_end(hub, grant, settings.retention)
        if end is not None:
            if after < end:
                lost = lost_notice(grant.key, grant.store)
                async for batch in ended.replay(hub, grant, after, end, lost):
                    yield out.of(name, batch)
            elif not following:
                out.positions[name] = after
            if following:
                out.positions.pop(name, None)
            return
    lane = await mux.open(grant, name, after)
    if not following:
        out.positions.setdefault(name, after)
    async for batch in lane.watcher.replay():
        chunk, finished = _lane_batch(out, grant, name, batch)
        yield chunk
        if finished:
            await mux.close(lane)
            if following:
                out.positions.pop(name, None)
            return


async def _announced(
    mux: Mux, out: Frames, batch: list[Item], resume: dict[str, int], settings: StreamSettings
) -> AsyncIterator[bytes]:
    """Jobs the caller submitted: each joins the stream (from its first event)."""
    follow = mux.watch.follow
    assert follow is not None
    for item in batch:
        out.positions[cursor.NEW] = item.seq
        job = _job_of(item)
        if job is None:
            continue
        grant = await follow.grant(job)
        if grant is not None:
            async for chunk in _join(mux, out, grant, resume, settings, following=True):
                yield chunk


def _job_of(item: Item) -> str | None:
    event: dict[str, Any] = orjson.loads(item.raw)
    job = event.get("job")
    return None if job is None else str(job)
