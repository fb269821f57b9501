"""The usual shared-subscriber recipe, kept only to measure against: sse-starlette
with the `broadcaster` package (one Redis pub/sub connection per process, a queue
per client), no history, no replay."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from broadcaster import Broadcast
from fastapi import FastAPI
from sse_starlette import EventSourceResponse

broadcast = Broadcast(os.environ["REDIS_URL"])


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    await broadcast.connect()
    yield
    await broadcast.disconnect()


app = FastAPI(lifespan=lifespan)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/stream/{video_id}")
async def stream(video_id: int) -> Any:
    async def events() -> AsyncIterator[dict[str, str]]:
        async with broadcast.subscribe(channel=f"video:{video_id}") as subscriber:
            async for event in subscriber:  # type: ignore[union-attr]
                if event is None:
                    return
                yield {"data": event.message}
                if '"type":"complete"' in event.message:
                    return

    return EventSourceResponse(events())
