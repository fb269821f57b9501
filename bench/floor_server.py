"""The floor, kept only to measure against: Kinora's stream design with nothing else.
A bare ASGI app under the same uvicorn: one Redis subscriber per process, one log per
video that every client holds a cursor into, sleeping clients woken a slice per turn
of the loop (kinora.streaming.watcher.Pacer), one write per client per wake-up with
the server's own `send`. No framework, no authorization, no history or replay, no
cut-off of slow or stalled clients, no heartbeats, no metrics: what this design costs
in Python at the least, so the distance to it is what Kinora's guarantees cost."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import orjson
import redis.asyncio as aioredis

from kinora.streaming.watcher import Pacer

HEAD = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
}


class Video:
    def __init__(self) -> None:
        self.frames: list[bytes] = []  # unbounded: a benchmark's videos are short
        self.waiting: list[asyncio.Future[None]] = []
        self.subscribed = asyncio.Event()


class Floor:
    def __init__(self) -> None:
        self.videos: dict[bytes, Video] = {}
        self.pacer = Pacer()
        self.pubsub: Any = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.pubsub = aioredis.Redis.from_url(os.environ["REDIS_URL"]).pubsub()
        await self.pubsub.connect()
        task = asyncio.create_task(self.listen())
        self.tasks.add(task)

    async def listen(self) -> None:
        while True:
            message = await self.pubsub.get_message(timeout=None)
            if message is None:
                continue
            video = self.videos.get(message["channel"])
            if video is None:
                continue
            if message["type"] == "subscribe":
                video.subscribed.set()
            elif message["type"] == "message":
                raw = message["data"]
                video.frames.append(b"id: %d\ndata: %s\n\n" % (orjson.loads(raw)["seq"], raw))
                if video.waiting:
                    waiting, video.waiting = video.waiting, []
                    self.pacer.release(waiting)

    async def stream(self, video_id: str, send: Any) -> None:
        name = f"video:{video_id}".encode()
        video = self.videos.get(name)
        if video is None:
            video = self.videos[name] = Video()
            await self.pubsub.subscribe(name)
        await video.subscribed.wait()
        await send(HEAD)
        await send({"type": "http.response.body", "body": b"retry: 1000\n\n", "more_body": True})
        loop = asyncio.get_running_loop()
        seen = len(video.frames)
        while True:
            if seen == len(video.frames):
                woken: asyncio.Future[None] = loop.create_future()
                video.waiting.append(woken)
                await woken
                continue
            chunk = b"".join(video.frames[seen:])
            seen = len(video.frames)
            last = b'"type":"complete"' in chunk
            await send({"type": "http.response.body", "body": chunk, "more_body": not last})
            if last:
                return


floor = Floor()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await floor.start()
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
    elif scope["path"] == "/healthz":
        await send({**HEAD, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
    else:
        await floor.stream(scope["path"].rsplit("/", 1)[1], send)
