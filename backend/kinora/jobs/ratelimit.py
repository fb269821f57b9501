"""A per-user limit on how many videos may be submitted in a window, kept in Redis so
that every API process counts against the same budget."""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis.asyncio as aioredis


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after: int  # seconds until the window resets (when not allowed)


async def hit(client: aioredis.Redis, key: str, *, limit: int, window_seconds: int) -> Verdict:
    """Count one request against `key`'s fixed window of `window_seconds`. The first
    hit of a window creates the counter with its expiry (SET NX EX), so counting is
    one round trip (MULTI) and a counter is never left without an expiry."""
    if limit <= 0:
        return Verdict(True, 0)
    async with client.pipeline(transaction=True) as pipe:
        pipe.set(key, 0, ex=window_seconds, nx=True)
        pipe.incr(key)
        pipe.pttl(key)
        _, count, ttl_ms = await pipe.execute()
    if int(count) <= limit:
        return Verdict(True, 0)
    return Verdict(False, max(1, math.ceil(int(ttl_ms) / 1000)))


def generate_key(user_id: int) -> str:
    return f"ratelimit:generate:{user_id}"
