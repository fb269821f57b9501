"""The per-user submission limit, counted in a real Redis."""

from __future__ import annotations

import asyncio
import time
import uuid

import redis.asyncio as aioredis

from kinora.jobs import ratelimit


def test_the_limit_refuses_with_the_time_left_and_opens_again(
    environment: dict[str, str],
) -> None:
    async def main() -> None:
        client = aioredis.Redis.from_url(environment["REDIS_URL"])
        key, other = f"test:{uuid.uuid4()}", f"test:{uuid.uuid4()}"

        async def hit(name: str) -> ratelimit.Verdict:
            return await ratelimit.hit(client, name, limit=3, window_seconds=2)

        try:
            verdicts = [await hit(key) for _ in range(5)]
            assert [v.allowed for v in verdicts] == [True, True, True, False, False]
            assert all(1 <= v.retry_after <= 2 for v in verdicts[3:])
            assert (await hit(other)).allowed  # each key has its own budget
            deadline = time.monotonic() + 5
            while not (await hit(key)).allowed:
                assert time.monotonic() < deadline, "the window never reopened"
                await asyncio.sleep(0.2)
            assert 0 < await client.ttl(key) <= 2  # a counter never outlives its window
        finally:
            await client.delete(key, other)
            await client.aclose()

    asyncio.run(main())


def test_a_limit_of_zero_counts_nothing(environment: dict[str, str]) -> None:
    async def main() -> None:
        client = aioredis.Redis.from_url(environment["REDIS_URL"])
        key = f"test:{uuid.uuid4()}"
        try:
            for _ in range(50):
                assert (await ratelimit.hit(client, key, limit=0, window_seconds=60)).allowed
            assert await client.exists(key) == 0
        finally:
            await client.aclose()

    asyncio.run(main())
