"""The WebSocket transport (docs/protocol.md §3), through the same StreamHub as SSE.

Messages are `{"event": ..., "data": {...}}`: `connected`, `initial_state` (status,
progress and the log so far), then every event (`progress_update`, `stage_change`,
`log`, `error`, `complete`) with the SSE event JSON as `data`. The server pings
every WS_PING_SECONDS; a client that has not answered `{"event": "pong"}` for
WS_PONG_TIMEOUT_SECONDS is closed with 4408. Close codes: 4401 bad token, 4404
unknown or foreign job, 1000 after `complete`, 1013 when the client fell too far
behind (reconnect: `initial_state` carries the log so far).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson
import redis
from fastapi import WebSocket, WebSocketDisconnect

from kinora.streaming.access import MESSAGES, Access
from kinora.streaming.events import Event, timestamp
from kinora.streaming.hub import StreamHub, SubscribeTimeout
from kinora.streaming.keys import StreamKey
from kinora.streaming.settings import StreamSettings
from kinora.streaming.sse import Finish, attached
from kinora.streaming.watcher import Watcher

log = logging.getLogger(__name__)

CLOSE_BAD_TOKEN = 4401
CLOSE_NOT_FOUND = 4404
CLOSE_PONG_TIMEOUT = 4408
# "Try again later" (RFC 6455): too far behind, or too many streams open.
CLOSE_TRY_LATER = 1013
CLOSE_RESTART = 1012


class PongTimeout(Exception):
    pass


def message(event: str, data: object) -> str:
    return orjson.dumps({"event": event, "data": data}).decode()


def state_of(events: list[Event]) -> tuple[str, int]:
    """A job's status and progress as its events tell them (the last that says)."""
    status, progress = "pending", 0
    for event in events:
        status = event.get("status", status)
        progress = event.get("progress", progress)
    return status, progress


async def watch(
    websocket: WebSocket,
    hub: StreamHub,
    key: StreamKey,
    settings: StreamSettings,
    *,
    hello: dict[str, Any],
    status: str | None = None,
    progress: int | None = None,
    access: Access | None = None,
    finish: Finish | None = None,
    store: object | None = None,
) -> None:
    """Serve one accepted WebSocket: `connected` (with `hello`), `initial_state` (the
    given status and progress, else as the events tell them), then every event. It
    closes with 4401 when its `access` expires or is revoked; `finish` makes the
    `complete` event as it is sent (as for SSE)."""
    await websocket.send_text(message("connected", {**hello, "timestamp": timestamp()}))
    try:
        async with hub.watch(key, transport="websocket", store=store) as watcher:
            with attached(access, watcher):
                await _serve_watcher(
                    websocket, hub, key, watcher, settings, status, progress, finish
                )
    except (SubscribeTimeout, redis.RedisError) as exc:
        log.warning("WebSocket of %s ended: Redis unreachable (%s)", key, exc)
        await websocket.close(CLOSE_TRY_LATER, reason="Redis unreachable: reconnect")
    except WebSocketDisconnect:
        pass


async def _serve_watcher(
    websocket: WebSocket,
    hub: StreamHub,
    key: StreamKey,
    watcher: Watcher,
    settings: StreamSettings,
    status: str | None,
    progress: int | None,
    finish: Finish | None,
) -> None:
    """`initial_state` (the history so far), then every event until the end."""
    logs = await hub.history(key, 0)
    if logs:
        watcher.last_seq = logs[-1].seq
        if logs[-1].terminal and finish is not None:
            logs[-1] = finish(logs[-1])
    told = state_of([item.event for item in logs])
    state = {
        "status": status or told[0],
        "progress": told[1] if progress is None else progress,
        "logs": [item.event for item in logs],
    }
    await websocket.send_text(message("initial_state", state))
    if logs and logs[-1].terminal:
        await websocket.close(1000)
        return
    await serve(websocket, watcher, settings, finish)


async def serve(
    websocket: WebSocket, watcher: Watcher, settings: StreamSettings, finish: Finish | None = None
) -> None:
    loop = asyncio.get_running_loop()
    last_pong = loop.time()

    async def receive() -> None:
        nonlocal last_pong
        while True:
            text = await websocket.receive_text()
            with contextlib.suppress(ValueError):
                if orjson.loads(text).get("event") == "pong":
                    last_pong = loop.time()

    async def ping() -> None:
        tick = min(settings.ws_ping_seconds, settings.ws_pong_timeout_seconds / 4)
        next_ping = loop.time() + settings.ws_ping_seconds
        while True:
            await asyncio.sleep(tick)
            if loop.time() - last_pong > settings.ws_pong_timeout_seconds:
                raise PongTimeout
            if loop.time() >= next_ping:
                next_ping += settings.ws_ping_seconds
                await websocket.send_text(message("ping", {"timestamp": timestamp()}))

    async def forward() -> bool:
        """Every event until `complete` (True), or False when the client fell behind."""
        async for item in watcher.events():
            if item.terminal:
                await websocket.send_text((finish(item) if finish else item).ws)
                return True
            await websocket.send_text(item.ws)
        return False

    tasks = [asyncio.create_task(c) for c in (receive(), ping(), forward())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finished = done.pop()
    error = finished.exception()
    if isinstance(error, WebSocketDisconnect):
        return
    if isinstance(error, PongTimeout):
        await websocket.close(CLOSE_PONG_TIMEOUT, reason="no pong: closing")
    elif error is not None:
        raise error
    elif finished.result():
        await websocket.close(1000)
    elif watcher.drained in ("expired", "revoked"):
        await websocket.close(CLOSE_BAD_TOKEN, reason=MESSAGES[watcher.drained][:120])
    elif watcher.drained == "shutdown":
        await websocket.close(CLOSE_RESTART, reason="server restarting: reconnect")
    elif watcher.drained == "redis":
        await websocket.close(CLOSE_TRY_LATER, reason="Redis unreachable: reconnect")
    else:
        await websocket.close(CLOSE_TRY_LATER, reason="too far behind: reconnect")
