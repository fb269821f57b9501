"""A drain on SIGTERM, with any number of API processes (docs/protocol.md §2, "How a
stream ends"; README, Deployment): `/readyz` is 503 from the first moment, every open
SSE stream ends cleanly with a last `retry:` (a complete chunked body, never a reset),
spread over DRAIN_SECONDS, WebSockets close with 1012, and the server exits. Real
`kinora api --workers N` processes on 127.0.0.1, real Redis, SIGTERM to the parent as
a supervisor (Kubernetes, compose, systemd) sends it."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from kinora.cli.embedded import free_port
from kinora.streaming import keys
from kinora.streaming.logger import SSELogger
from tests.utils.accounts import Account
from tests.utils.clients import pending_video
from tests.utils.processes import kinora, stop, wait_for

pytestmark = pytest.mark.slow

STREAMS = 100
DRAIN = 2.0


class Streams(threading.Thread):
    """STREAMS SSE clients of one video, each recording what it read, when its response
    ended, and whether the body was complete (httpx raises on a cut chunked body)."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.url, self.headers = url, headers
        self.lines: list[list[str]] = [[] for _ in range(STREAMS)]
        self.ended: list[float | None] = [None] * STREAMS
        self.errors: list[str] = []
        self.opened = 0

    def run(self) -> None:
        asyncio.run(self.main())

    async def main(self) -> None:
        limits = httpx.Limits(max_connections=STREAMS + 10)
        timeout = httpx.Timeout(10, read=30)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            await asyncio.gather(*(self.one(client, i) for i in range(STREAMS)))

    async def one(self, client: httpx.AsyncClient, i: int) -> None:
        try:
            async with client.stream("GET", self.url, headers=self.headers) as response:
                assert response.status_code == 200, response.status_code
                seen = False
                async for line in response.aiter_lines():
                    self.lines[i].append(line)
                    if line.startswith("data: ") and not seen:
                        seen = True
                        self.opened += 1
            self.ended[i] = time.monotonic()
        except Exception as exc:  # a reset, a cut body: what the drain must never do
            self.errors.append(f"stream {i}: {exc!r}")


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_every_stream_with_a_last_retry_spread_over_drain_seconds(
    stack: object, account: Account, environment: dict[str, str], var_dir: Path, workers: int
) -> None:
    video = pending_video(account)
    SSELogger(keys.video(video)).step(1, "Validating request parameters...", progress=3)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = var_dir / "logs" / f"api-drain-{workers}.log"
    env = {**environment, "DRAIN_SECONDS": str(DRAIN), "MAX_STREAMS_PER_USER": "0"}
    api = kinora("api", "--port", str(port), "--workers", str(workers), env=env, log=log)
    try:
        wait_for("the API", lambda: _status(f"{base}/readyz") == 200, timeout=30)
        streams = Streams(f"{base}/api/v1/videos/{video}/stream", account.headers)
        streams.start()
        opened = lambda: f"{streams.opened} streams open ({streams.errors[:3]})"  # noqa: E731
        wait_for(opened, lambda: streams.opened == STREAMS, 20)
        closes: list[Any] = []
        started = [threading.Event(), threading.Event()]
        sockets = [_websocket(f"ws://127.0.0.1:{port}", video, account, closes, e) for e in started]
        assert all(event.wait(10) for event in started), closes

        signalled = time.monotonic()
        api.send_signal(signal.SIGTERM)
        ready: list[tuple[float, int]] = []  # (when, status)
        while time.monotonic() - signalled < 1.5:
            ready.append((time.monotonic() - signalled, _status(f"{base}/readyz")))
        streams.join(DRAIN + 8)
        for socket in sockets:
            socket.join(DRAIN + 8)
        assert api.wait(15) in (0, -signal.SIGTERM)
        exited = time.monotonic() - signalled
    finally:
        stop(api)

    # 503 from the first moment the process serving it is told: at once with one
    # process; with several, uvicorn's supervisor passes SIGTERM on within its 0.5 s tick.
    first = next(i for i, (_, code) in enumerate(ready) if code != 200)
    assert ready[first][0] < (0.1 if workers == 1 else 0.7), ready[: first + 1]
    assert {code for _, code in ready[first:]} <= {503, 0}, ready  # (0: stopped listening)
    assert not streams.errors, streams.errors[:5]
    for lines in streams.lines:
        retries = [i for i, line in enumerate(lines) if line.startswith("retry: ")]
        assert len(retries) == 2, lines  # the opening one, and the goodbye
        assert retries[1] > max(i for i, x in enumerate(lines) if x[:6] == "data: "), lines
    ended = sorted(t - signalled for t in streams.ended if t is not None)
    assert len(ended) == STREAMS
    # Spread over the drain, not in one burst; all within it (and a margin).
    assert ended[-1] < DRAIN + 1.5, ended[-5:]
    assert ended[-1] - ended[0] > DRAIN / 3, (ended[0], ended[-1])
    assert sorted(closes) == [1012, 1012]
    assert exited < DRAIN + 6
    assert "Application shutdown complete" in log.read_text()


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return 0


def _websocket(
    base: str, video: int, account: Account, closes: list[Any], started: threading.Event
) -> threading.Thread:
    """A WebSocket client that answers pings, until the server closes it."""

    def follow() -> None:
        url = f"{base}/api/v1/projects/{video}/progress?token={account.token}"
        with connect(url, open_timeout=10) as ws:
            try:
                while True:
                    message = json.loads(ws.recv(timeout=30))
                    if message["event"] == "initial_state":
                        started.set()
                    elif message["event"] == "ping":
                        ws.send(json.dumps({"event": "pong"}))
            except ConnectionClosed as closed:
                closes.append(closed.rcvd.code if closed.rcvd else None)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    return thread
