"""The cost of `SSELogger.step()` in a worker: microseconds an event and events/s,
one worker process publishing as fast as it can to a local Redis, with one
subscriber listening (as the API's hub would be).

Baselines in the same run: a bare redis-py `PUBLISH` of the same JSON (what Redis
alone costs: the floor), and the original notes' publisher, a fresh `asyncio.run()`
with its own connection per event.

    python -m bench.publish [--events 5000]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis
import redis.asyncio as aioredis

from kinora.cli.embedded import EmbeddedRedis
from kinora.streaming import keys


def measure(name: str, events: int, publish: Callable[[int], Any]) -> dict[str, Any]:
    costs = np.empty(events)
    started = time.perf_counter()
    for i in range(events):
        t0 = time.perf_counter()
        publish(i)
        costs[i] = time.perf_counter() - t0
    elapsed = time.perf_counter() - started
    p50, p99 = np.percentile(costs, [50, 99]) * 1e6
    return {
        "publisher": name,
        "events": events,
        "p50_us": round(float(p50), 1),
        "p99_us": round(float(p99), 1),
        "events_per_s": round(events / elapsed),
    }


def run(url: str, events: int) -> list[dict[str, Any]]:
    os.environ["REDIS_URL"] = url
    from kinora.core.config import get_settings
    from kinora.streaming.logger import SSELogger

    get_settings.cache_clear()
    client = redis.Redis.from_url(url)
    listener = client.pubsub()  # type: ignore[no-untyped-call]
    listener.psubscribe("video:*")  # a subscriber, so PUBLISH delivers somewhere
    logger = SSELogger(keys.video(1))
    body = orjson.dumps({"type": "progress", "message": "Processing video... 0", "progress": 1})

    async def naive_publish(i: int) -> None:
        conn = aioredis.Redis.from_url(url)
        try:
            await conn.publish("video:3", body)
        finally:
            await conn.aclose()

    warm = max(100, events // 20)
    for _ in range(warm):  # connections made, script loaded
        logger.step(5, "warm-up", progress=0)
    runs = [
        measure(
            "SSELogger.step",
            events,
            lambda i: logger.step(5, f"Processing video... {i}", progress=i * 100 // events),
        ),
        measure("raw PUBLISH (floor)", events, lambda i: client.publish("video:2", body)),
        measure(
            "asyncio.run() per event (original notes)",
            max(1, events // 10),
            lambda i: asyncio.run(naive_publish(i)),
        ),
    ]
    listener.close()
    client.close()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=5000)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="kinora-bench-") as tmp,
        EmbeddedRedis(Path(tmp) / "redis", persist=False) as server,
    ):
        runs = run(server.url, args.events)
    step, floor, naive = runs
    print(
        json.dumps(
            {
                "benchmark": "publish",
                "runs": runs,
                "step_vs_floor": round(step["p50_us"] / floor["p50_us"], 2),
                "naive_vs_step": round(naive["p50_us"] / step["p50_us"], 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
