"""GET /connections counts SSE and WebSocket watchers across API processes, and
forgets a process that crashed (PRESENCE_TTL_SECONDS=2 in the tests)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from pathlib import Path

import httpx
import pytest
import redis
from websockets.asyncio.client import ClientConnection, connect

from kinora.cli.embedded import free_port
from tests.utils.accounts import Account
from tests.utils.clients import pending_video
from tests.utils.processes import Stack, kinora, stop, wait_for

pytestmark = pytest.mark.slow


async def count(base: str, account: Account, video_id: int) -> int:
    async with httpx.AsyncClient(base_url=base, headers=account.headers, timeout=10) as client:
        response = await client.get(f"/api/v1/videos/{video_id}/connections")
    assert response.status_code == 200
    assert response.json()["video_id"] == video_id
    return int(response.json()["connections"])


async def until(base: str, account: Account, video_id: int, expected: int) -> None:
    """Poll the endpoint (counts lag by up to half a second), bounded."""
    async with asyncio.timeout(15):
        while True:
            if await count(base, account, video_id) == expected:
                return
            await asyncio.sleep(0.1)


async def answer_pings(ws: ClientConnection) -> None:
    with contextlib.suppress(Exception):
        async for raw in ws:
            if json.loads(raw)["event"] == "ping":
                await ws.send(json.dumps({"event": "pong"}))


def test_counts_rise_and_fall_across_two_api_processes(
    stack: Stack, account: Account, environment: dict[str, str], tmp_path: Path
) -> None:
    video_id = pending_video(account)
    port = free_port()
    other = f"http://127.0.0.1:{port}"
    second = kinora("api", "--port", str(port), env=environment, log=tmp_path / "api2.log")

    def up() -> bool:
        try:
            return httpx.get(f"{other}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    async def scenario() -> None:
        stream = f"/api/v1/videos/{video_id}/stream?token={account.token}"
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=10) as client:
            streams = [client.stream("GET", stream) for _ in range(3)]
            for s in streams:
                assert (await s.__aenter__()).status_code == 200
            await until(stack.base_url, account, video_id, 3)

            ws_url = (
                f"ws://127.0.0.1:{port}/api/v1/projects/{video_id}/progress?token={account.token}"
            )
            sockets = [await connect(ws_url, open_timeout=10) for _ in range(2)]
            readers = [asyncio.create_task(answer_pings(ws)) for ws in sockets]
            await until(other, account, video_id, 5)
            await until(stack.base_url, account, video_id, 5)

            for s in streams:
                await s.__aexit__(None, None, None)
            await until(stack.base_url, account, video_id, 2)

            second.send_signal(signal.SIGKILL)  # a crash: nothing is cleaned up by it
            await until(stack.base_url, account, video_id, 0)
            for task in readers:
                task.cancel()
            for ws in sockets:
                with contextlib.suppress(Exception):
                    await ws.close()

    try:
        wait_for("the second API", up, timeout=30)
        asyncio.run(scenario())
    finally:
        stop(second)


def test_counts_come_back_after_redis_lost_them(
    stack: Stack, account: Account, redis_client: redis.Redis
) -> None:
    """Presence is rewritten every third of PRESENCE_TTL_SECONDS, not only on change:
    a Redis that lost its data (flushed, failed over) counts the watchers again."""
    video_id = pending_video(account)

    async def scenario() -> None:
        stream = f"/api/v1/videos/{video_id}/stream?token={account.token}"
        async with (
            httpx.AsyncClient(base_url=stack.base_url, timeout=10) as client,
            client.stream("GET", stream) as response,
        ):
            assert response.status_code == 200
            await until(stack.base_url, account, video_id, 1)
            redis_client.delete(*redis_client.keys("presence:*"))
            await until(stack.base_url, account, video_id, 1)  # counted again

    asyncio.run(scenario())
