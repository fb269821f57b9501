"""The SSE response against the ASGI interface itself: with `direct_writes`, a
stream's head goes through the app's middleware and its body straight to the server;
without it, everything goes through the middleware (a library host's app)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kinora.streaming.sse import SHALLOW, EventStream, LastChunk, Patrol, direct_writes
from kinora.streaming.watcher import Pacer


def app_with_a_watching_middleware(seen: list[str]) -> FastAPI:
    class Watching:
        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            async def watched(message: Message) -> None:
                seen.append(message["type"])
                await send(message)

            await self.app(scope, receive, watched)

    app = FastAPI()
    app.add_middleware(Watching)

    @app.get("/stream")
    async def stream() -> EventStream:
        async def body() -> AsyncIterator[bytes]:
            yield b"id: 1\ndata: {}\n\n"
            yield LastChunk(b'id: 2\ndata: {"type":"complete"}\n\n')

        patrol = Patrol(Pacer(), on_shutdown=lambda: None)
        return EventStream(body(), ping_seconds=60, stall_seconds=60, patrol=patrol)

    return app


def serve_one(app: Any) -> list[Message]:
    """One GET /stream, as a server would call the app; what the server was sent."""
    sent: list[Message] = []
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": "/stream", "raw_path": b"/stream", "query_string": b"",
        "headers": [], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip

    async def main() -> None:
        never = asyncio.Event()

        async def receive() -> Message:
            await never.wait()  # the client stays (the response ends by itself)
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message)

        await asyncio.wait_for(app(scope, receive, send), 5)

    asyncio.run(main())
    return sent


@pytest.mark.parametrize("direct", [True, False])
def test_the_body_goes_past_the_middleware_only_with_direct_writes(direct: bool) -> None:
    seen: list[str] = []
    app = app_with_a_watching_middleware(seen)
    sent = serve_one(direct_writes(app) if direct else app)

    assert [m["type"] for m in sent] == ["http.response.start", *["http.response.body"] * 2]
    assert sent[0]["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in sent[0]["headers"]
    first, last = sent[1], sent[2]
    assert (first["body"], first["more_body"]) == (b"id: 1\ndata: {}\n\n", True)
    # `complete` and the end of the response: one write
    assert (last["body"], last["more_body"]) == (b'id: 2\ndata: {"type":"complete"}\n\n', False)
    if direct:
        assert seen == ["http.response.start"]
    else:
        assert seen == ["http.response.start", "http.response.body", "http.response.body"]


def cut_stream(shallow: bool, *, by_server: bool = False) -> dict[str, Any]:
    """A stream whose body waits for ever, cut after its first event: by `end` (a
    stalled client, a revoked token), or by the server cancelling the request. What
    the request's task saw, and how many tasks the stream ran."""
    seen: dict[str, Any] = {"cleaned_up": False}

    async def body() -> AsyncIterator[bytes]:
        try:
            yield b"id: 1\ndata: {}\n\n"
            await asyncio.Event().wait()
            yield b"never"
        finally:
            seen["cleaned_up"] = True

    async def main() -> None:
        patrol = Patrol(Pacer(), on_shutdown=lambda: None)
        stream = EventStream(body(), ping_seconds=60, stall_seconds=60, patrol=patrol)
        scope = {"type": "http", "method": "GET", SHALLOW: shallow}
        first = asyncio.Event()

        async def send(message: Message) -> None:
            if message["type"] == "http.response.body":
                first.set()

        async def receive() -> Message:
            await asyncio.Event().wait()
            return {"type": "http.disconnect"}

        async def request() -> None:
            try:
                await stream(scope, receive, send)
                seen["returned"] = True
            finally:
                seen["cancelling"] = asyncio.current_task().cancelling()  # type: ignore[union-attr]

        task = asyncio.create_task(request())
        await asyncio.wait_for(first.wait(), 5)
        seen["tasks"] = len(asyncio.all_tasks()) - 1  # besides this one
        if by_server:
            task.cancel()
        else:
            stream.end("stalled")
        await asyncio.wait({task}, timeout=5)
        seen["cancelled"] = task.cancelled()

    asyncio.run(main())
    return seen


@pytest.mark.parametrize("shallow", [True, False])
def test_a_stream_cut_by_end_returns_and_its_request_goes_on(shallow: bool) -> None:
    seen = cut_stream(shallow)
    assert seen["returned"]
    assert not seen["cancelled"]
    assert seen["cancelling"] == 0  # the cut's cancellation does not linger in the task
    assert seen["cleaned_up"]
    # The request's, the listener and the patrol's; a body's own only behind an app.
    assert seen["tasks"] == (3 if shallow else 4)


@pytest.mark.parametrize("shallow", [True, False])
def test_a_request_the_server_cancels_is_cancelled_with_its_stream(shallow: bool) -> None:
    seen = cut_stream(shallow, by_server=True)
    assert "returned" not in seen
    assert seen["cancelled"]
    assert seen["cleaned_up"]


def test_a_stream_cut_before_its_body_began_writes_nothing() -> None:
    """`end` between the response's start and its body's first step (a shutdown, a
    revoked token at that moment): the body never writes, and its request returns."""
    sent: list[Message] = []

    async def body() -> AsyncIterator[bytes]:
        yield b"id: 1\ndata: {}\n\n"

    async def main() -> None:
        patrol = Patrol(Pacer(), on_shutdown=lambda: None)
        stream = EventStream(body(), ping_seconds=60, stall_seconds=60, patrol=patrol)

        async def send(message: Message) -> None:
            sent.append(message)

        async def receive() -> Message:
            await asyncio.Event().wait()
            return {"type": "http.disconnect"}

        request = asyncio.create_task(stream({"type": "http", "method": "GET"}, receive, send))
        await asyncio.sleep(0)  # the request has made the body's task, not yet run it
        stream.end("shutdown")
        await asyncio.wait_for(request, 5)

    asyncio.run(main())
    assert sent == []
