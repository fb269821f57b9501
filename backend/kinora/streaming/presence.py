"""Presence: how many clients watch a video, across every API process (README, Try it with curl).

Each process keeps its own counts in memory (the hub changes them as watchers come
and go, without awaiting) and writes the changed ones to Redis twice a second: one
hash per video, `presence:video:<id>`, a field per process. A process proves it is
alive with a key that expires after PRESENCE_TTL_SECONDS unless renewed; the fields
of a process whose key is gone (it crashed) are not counted, and are removed the
next time someone asks. Every count is written again each third of the TTL, so a
Redis that lost its data is right again within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import Counter
from typing import cast

import redis
import redis.asyncio as aioredis

from kinora.streaming.cancellation import raise_if_cancelled
from kinora.streaming.keys import StreamKey

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.5


def alive_key(process: str) -> str:
    return f"presence:alive:{process}"


class Presence:
    def __init__(self, client: aioredis.Redis, ttl_seconds: float) -> None:
        self.client = client
        self.ttl = max(1, round(ttl_seconds))
        self.process = uuid.uuid4().hex
        self.counts: Counter[StreamKey] = Counter()
        self._dirty: set[StreamKey] = set()
        self._task: asyncio.Task[None] | None = None

    def joined(self, key: StreamKey) -> None:
        self.counts[key] += 1
        self._dirty.add(key)

    def left(self, key: StreamKey) -> None:
        self.counts[key] -= 1
        if self.counts[key] <= 0:
            del self.counts[key]
        self._dirty.add(key)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="presence")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):  # best effort: the TTL cleans up anyway
            pipe = self.client.pipeline(transaction=False)
            for key in self.counts:
                pipe.hdel(key.presence, self.process)
            pipe.delete(alive_key(self.process))
            await pipe.execute()

    async def connections(self, key: StreamKey) -> int:
        fields = cast(dict[bytes, bytes], await self.client.hgetall(key.presence))
        if not fields:
            return 0
        processes = [p.decode() for p in fields]
        pipe = self.client.pipeline(transaction=False)
        for process in processes:
            pipe.exists(alive_key(process))
        alive = await pipe.execute()
        dead = [p for p, ok in zip(processes, alive, strict=True) if not ok]
        if dead:
            await self.client.hdel(key.presence, *dead)
        return sum(int(fields[p.encode()]) for p, ok in zip(processes, alive, strict=True) if ok)

    async def _run(self) -> None:
        renew_every = max(1, int(self.ttl / 3 / FLUSH_SECONDS))
        ticks = 0
        while True:
            raise_if_cancelled()
            try:
                if ticks % renew_every == 0:
                    await self.client.set(alive_key(self.process), 1, ex=self.ttl)
                    # Every count again, not only the changed ones: a Redis that lost
                    # its data (restarted empty, failed over) learns them back.
                    self._dirty |= set(self.counts)
                await self._flush()
            except (redis.RedisError, OSError) as exc:
                log.warning("presence not written to Redis (%s); trying again", exc)
            except Exception:  # a bug: shown with its trace, and presence goes on
                log.exception("presence not written to Redis; trying again")
            ticks += 1
            await asyncio.sleep(FLUSH_SECONDS)

    async def _flush(self) -> None:
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        pipe = self.client.pipeline(transaction=False)
        for key in dirty:
            count = self.counts.get(key, 0)
            if count:
                pipe.hset(key.presence, self.process, count)
            else:
                pipe.hdel(key.presence, self.process)
        try:
            await pipe.execute()
        except Exception:
            self._dirty |= dirty  # written next time
            raise
