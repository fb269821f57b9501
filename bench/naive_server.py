"""The naive design, kept only to measure against: one Redis pub/sub subscription
(and so one Redis connection, from redis-py's default asyncio pool of 100) per
browser connection, no history, no replay."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI
from sse_starlette import EventSourceResponse

client = aioredis.Redis.from_url(os.environ["REDIS_URL"])
app = FastAPI()


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/stream/{video_id}")
async def stream(video_id: int) -> Any:
    async def events() -> AsyncIterator[dict[str, str]]:
        pubsub = client.pubsub()
        await pubsub.subscribe(f"video:{video_id}")
        try:
            async for message in pubsub.listen():
                if message["type"] == "message":
                    data = message["data"].decode()
                    yield {"data": data}
                    if '"type":"complete"' in data:
                        return
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    return EventSourceResponse(events())
